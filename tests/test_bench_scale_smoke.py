"""Smoke tests of ``benchmarks.bench_scale``: the memory sampler, and a tiny simulation on a Ray cluster.

``test_quick_benchmark_on_external_ray_cluster`` starts a private Ray head
(``ray start --head`` on loopback, own temp dir and ports), runs
``python -m benchmarks.bench_scale --quick --ray-address 127.0.0.1:<port>``
(20 clients, 1 round) and checks that the run completed, that the table was
produced, and that the simulation really ran on that cluster: the cluster's job
table holds a ``flwr-simulation`` driver and the head's worker logs of that job
name ``ClientAppActor``. The head is then stopped by its own process ids
(never ``ray stop``, which kills every Ray process of the machine).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import bench_scale as B
from runner.processes import environ_values

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"


def test_process_kinds() -> None:
    assert B.process_kind(["/v/bin/python3", "/v/bin/flower-superlink", "--insecure"]) == "superlink"
    assert B.process_kind(["/v/bin/python3", "/v/bin/flwr-simulation", "--x"]) == "simulation (ServerApp + engine)"
    assert B.process_kind(["ray::ClientAppActor.run"]) == "ray ClientApp actors"
    assert B.process_kind(["ray::IDLE"]) == "ray ClientApp actors"
    assert B.process_kind(["ray::DashboardAgent"]) == "ray system"
    assert B.process_kind(["/v/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet", "--x"]) == "ray system"
    assert B.process_kind(["/v/bin/python3", "/v/bin/flwr", "run", "."]) == "flwr CLI"


def test_resolve_ray_address_passes_explicit_addresses() -> None:
    assert B.resolve_ray_address("127.0.0.1:6379") == "127.0.0.1:6379"
    assert B.resolve_ray_address("ray://10.0.0.1:10001") == "ray://10.0.0.1:10001"


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_sampler_sums_descendants_and_marked_orphans() -> None:
    """A child (300 MB) and a re-parented grandchild carrying the runner marker (200 MB) are both counted."""
    marker = "test-" + os.urandom(6).hex()
    env = dict(os.environ, **{B.RUNNER_MARKER_VAR: marker})
    # The child starts a middle process that starts the grandchild and exits at once: the grandchild is
    # re-parented away from this test's process tree, as Ray's daemons are, and only the marker finds it.
    grandchild = "x = b'1' * (200 << 20); import time; time.sleep(8)"
    middle = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {grandchild!r}], start_new_session=True)"
    script = ("import subprocess, sys, time\n"
              f"subprocess.run([sys.executable, '-c', {middle!r}])\n"
              "x = b'1' * (300 << 20)\n"
              "time.sleep(8)\n")
    child = subprocess.Popen([sys.executable, "-c", script], env=env)
    sampler = B.TreeMemorySampler(interval=0.1)
    try:
        sampler.start()
        time.sleep(3)
        peak = sampler.stop()
    finally:
        child.terminate()
        child.wait(timeout=10)
    orphans = [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
               if environ_values(p, (B.RUNNER_MARKER_VAR,)).get(B.RUNNER_MARKER_VAR) == marker]
    for pid in orphans:
        os.kill(pid, 15)
    assert marker in sampler.markers_seen
    assert peak.rss >= 480 * 2**20, peak
    assert peak.processes >= 2


@pytest.fixture()
def ray_head():
    head = B.RayHead(num_cpus=2)
    head.start()
    try:
        yield head
    finally:
        head.stop()
        assert head.pids() == [], "Ray head processes left behind"
        assert not Path(head.temp_dir).exists()


@pytest.mark.skipif(not RAY.exists(), reason="the ray CLI is not installed beside this Python")
def test_quick_benchmark_on_external_ray_cluster(ray_head: B.RayHead, tmp_path: Path) -> None:
    since_ms = int(time.time() * 1000)
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_scale", "--quick", "--ray-address", ray_head.address,
         "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # the table, printed and written
    assert "| clients |" in proc.stdout and "| 20 |" in proc.stdout
    markdown = (tmp_path / "scale.md").read_text()
    assert "| clients |" in markdown and "| 20 |" in markdown
    res = json.loads((tmp_path / "scale.json").read_text())
    (row,) = res["runs"]
    assert row["num_clients"] == 20 and row["explorers"] == 2 and row["sampled_per_round"] == [2]
    assert row["replied_per_round"] == [2]
    assert row["peak_rss_gib"] > 0.1 and row["peak_pss_gib"] > 0.1
    assert row["stage0_seconds"] > 0 and row["train_seconds_mean"] > 0

    # the run used the external cluster: a flwr-simulation driver in its job table ...
    assert res["ray_address"] == ray_head.address
    assert row["ray_cluster"]["used_cluster"], row["ray_cluster"]
    jobs = [j for j in B.cluster_jobs(ray_head.address)
            if "flwr-simulation" in j["entrypoint"] and j["start_time_ms"] >= since_ms - 5000]
    assert len(jobs) == 1 and jobs[0]["is_dead"], jobs
    # ... and ClientApp actors of that job ran on the head's node
    logs = glob.glob(str(ray_head.session_logs() / f"worker-*-{jobs[0]['job_id']}-*.out"))
    assert any(":actor_name:ClientAppActor" in Path(p).read_text(errors="replace") for p in logs), logs


def test_a_stopped_client_count_is_reported_with_its_reason() -> None:
    """The table names what stopped a count (and the counts not run after it) instead of numbers."""
    ok = {"strategy": "autoflip", "num_clients": 1000, "examples_per_client": 10.0, "explorers": 10,
          "handshake_seconds": 0.0, "explore_fraction": 0.01, "sampled_per_round": [10], "fraction_train": 0.01,
          "peak_rss_gib": 3.0,
          "peak_pss_gib": 2.5, "peak_rss_gib_by_kind": {}, "cpu_seconds_by_kind": {}, "train_seconds": [5.0],
          "train_seconds_mean": 5.0, "stage0_seconds": 30.0, "wall_seconds": 90.0, "loadavg_before": [2.0] * 3,
          "loadavg_after": [2.0] * 3, "handshake": "every node"}
    stopped = {"strategy": "autoflip", "num_clients": 100_000, "failed": "SimulationError: timed out after 3600 s",
               "wall_seconds": 3600.0, "peak_rss_gib": 9.0, "peak_pss_gib": 8.0, "output_tail": ["last line"]}
    res = {"settings": dataclasses.asdict(B.Settings.load("full")), "machine": {"cpus": 2}, "runs": [ok, stopped],
           "skipped": [200_000], "notes": []}
    text = B.markdown(res)
    assert "| 1000 |" in text and "| every node (0.0) |" in text
    assert "**100000 clients: stopped** after 3600 s" in text and "timed out after 3600 s" in text
    assert "last line" in text and "Not run after that: 200000 clients." in text


def test_handshake_seconds_are_read_from_the_strategy_log() -> None:
    lines = ["INFO :      Partition handshake: 100 of 100 nodes answered in 1.5 s",
             "INFO :      No node has answered yet: waiting up to 3600 s for the federation to start",
             "INFO :      Partition handshake: 10 of 10 nodes answered in 40.2 s; 0 marked absent", "other"]
    assert B.handshake_seconds(iter(lines)) == pytest.approx(41.7)

"""A private Ray cluster for benchmarks, and the evidence that a simulation ran on a cluster.

See ``benchmarks.bench_scale`` (its docstring's "Ray clusters") for why a simulation
attaches to a cluster through ``RAY_ADDRESS``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from runner.common import free_ports
from runner.processes import our_processes, stop_all

RUNNER_MARKER_VAR = "AUTOFLIP_RUNNER_MARKER"  # runner.simulation.MARKER_VAR
HEAD_MARKER_VAR = "AUTOFLIP_RAY_HEAD_MARKER"


def _ray_bin() -> str:
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else (shutil.which("ray") or "ray")


class RayHead:
    """A private single-node Ray cluster (``ray start --head --block``) on loopback.

    Its own ``--temp-dir`` (also ``RAY_TMPDIR``, so the ``ray_current_cluster``
    file that lets a bare ``ray.init()`` find a cluster is written there, not in
    ``/tmp/ray`` where other simulations on this machine would pick it up), its
    own free ports, and an environment marker on every process it starts.
    :meth:`stop` sends SIGTERM to the blocking ``ray start`` (which stops its
    daemons), then kills whatever still carries the marker; it never runs
    ``ray stop``, which kills every Ray process on the machine.

    Ray resolves ``--node-ip-address 127.0.0.1`` to the host's outward IP for its
    node records, and the GCS listens on all interfaces; clients connect through
    ``127.0.0.1:<port>`` all the same.
    """

    def __init__(self, num_cpus: int = 2) -> None:
        self.num_cpus = num_cpus
        self.marker = uuid.uuid4().hex
        self.temp_dir = ""
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self, chosen: list[int]) -> list[str]:
        """``ray start --head`` on ``self.port`` with the other six components on ``chosen`` (distinct ports:
        Ray refuses two components on one port)."""
        flags = ("--ray-client-server-port", "--dashboard-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
        ports = dict(zip(flags, chosen, strict=True))
        return [_ray_bin(), "start", "--head", "--port", str(self.port), "--node-ip-address", "127.0.0.1",
                "--num-cpus", str(self.num_cpus), "--disable-usage-stats", "--temp-dir", self.temp_dir,
                "--include-dashboard", "false", *[str(x) for kv in ports.items() for x in kv], "--block"]

    def start(self, timeout: float = 120.0) -> str:
        # A short path: Ray puts unix sockets under it (107-byte limit).
        self.temp_dir = tempfile.mkdtemp(prefix="afray-", dir="/tmp")
        env = dict(os.environ, RAY_TMPDIR=self.temp_dir, RAY_USAGE_STATS_ENABLED="0",
                   RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0", **{HEAD_MARKER_VAR: self.marker})
        env.pop("RAY_ADDRESS", None)
        env.pop(RUNNER_MARKER_VAR, None)
        self.port, *chosen = free_ports(7)
        log = Path(self.temp_dir) / "ray-start.log"
        with log.open("wb") as f:
            self.proc = subprocess.Popen(self.command(chosen), env=env, stdin=subprocess.DEVNULL, stdout=f,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if "Ray runtime started" in text:
                return self.address
            if self.proc.poll() is not None:
                break
            time.sleep(0.3)
        tail = log.read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"`ray start --head` did not come up:\n{tail}")

    def pids(self) -> list[int]:
        """Live processes of this cluster: those carrying its marker."""
        return sorted(our_processes([], HEAD_MARKER_VAR, self.marker))

    def session_logs(self) -> Path:
        return Path(self.temp_dir) / "session_latest" / "logs"

    def stop(self, keep_temp: bool = False) -> None:
        """SIGTERM to the blocking ``ray start`` first (it stops its daemons), then whatever carries the marker."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=20)
        stop_all([self.proc] if self.proc is not None else [], HEAD_MARKER_VAR, self.marker)
        if self.temp_dir and not keep_temp:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayHead:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def resolve_ray_address(value: str) -> str:
    """``auto``: the cluster last started with ``ray start`` (its ``ray_current_cluster`` file);
    anything else is taken as ``HOST:PORT`` (or ``ray://...``).

    Deliberately not Ray's own "auto" fallback, which connects to *any* GCS process
    it sees, e.g. the private Ray instance of another simulation on this machine.
    """
    if value != "auto":
        return value
    base = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    path = Path(base or "/tmp") / "ray" / "ray_current_cluster"
    if not path.is_file():
        raise SystemExit(f"--ray-address auto: no {path}; start a head with `ray start --head` "
                         "or pass HOST:PORT")
    return path.read_text().strip()


@contextlib.contextmanager
def ray_address_env(address: str | None) -> Iterator[None]:
    """Set ``RAY_ADDRESS`` for the SuperLinks started meanwhile (the runner copies os.environ)."""
    old = os.environ.get("RAY_ADDRESS")
    if address:
        os.environ["RAY_ADDRESS"] = address
    else:
        os.environ.pop("RAY_ADDRESS", None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = old


def cluster_jobs(address: str) -> list[dict[str, Any]]:
    """The cluster's job table (from its GCS): one dict per driver that ever connected.

    Uses ``ray._raylet.GcsClient`` (no dashboard needed); an empty list where it is unavailable.
    """
    try:
        from ray._raylet import GcsClient

        table = GcsClient(address=address).get_all_job_info()
    except Exception as exc:  # private API: degrade, the worker logs remain as evidence
        print(f"cannot read the job table of {address}: {exc!r}", file=sys.stderr)
        return []
    jobs = []
    for job_id, info in table.items():
        jobs.append({"job_id": job_id.hex(), "driver_pid": int(info.driver_pid), "is_dead": bool(info.is_dead),
                     "start_time_ms": int(info.start_time), "end_time_ms": int(info.end_time),
                     "entrypoint": str(info.entrypoint)[:300]})
    return jobs


def cluster_evidence(address: str, since_ms: int, session_logs: Path | None = None) -> dict[str, Any]:
    """Did a Flower simulation run on the cluster at ``address`` after ``since_ms``?

    ``flwr_jobs``: jobs whose driver was ``flwr-simulation``; ``actor_workers``:
    worker logs of those jobs that name ``ClientAppActor`` (only when the head's
    log folder is local, i.e. a :class:`RayHead`).
    """
    jobs = [j for j in cluster_jobs(address) if j["start_time_ms"] >= since_ms - 5000]
    flwr = [j for j in jobs if "flwr-simulation" in j["entrypoint"]]
    actors: list[str] = []
    if session_logs is not None:
        for job in flwr:
            for path in glob.glob(str(session_logs / f"worker-*-{job['job_id']}-*.out")):
                if ":actor_name:ClientAppActor" in Path(path).read_text(errors="replace"):
                    actors.append(os.path.basename(path))
    return {"address": address, "flwr_jobs": flwr, "actor_workers": sorted(actors),
            "used_cluster": bool(flwr) and (session_logs is None or bool(actors))}

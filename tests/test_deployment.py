"""AutoFLIP on a real Flower deployment: SuperLink and 2 SuperNodes as processes on 127.0.0.1.

Each test starts its own federation with ``runner.deployment.LoopbackFederation``,
runs the reference app (ServerApp + ClientApp of this repository) on the default
``digits`` data, and checks the ServerApp's ``results.json`` (not just the CLI's
exit code: ``flwr run`` exits 0 even when a run fails). Afterwards no process that
the federation started (SuperLink, SuperNodes, their SuperExecs, ServerApp and
ClientApp processes, ``flwr`` CLI calls) may be alive, and an unrelated process
started by the test must survive.

Cost: every Flower message starts a fresh ClientApp process that imports torch and
the app (several seconds of CPU each), so the runs are kept to the minimum that
still exercises exploration, pruning and training on more than one node (2: each
node is a SuperNode, a SuperExec and one ClientApp process per message, about 7 s
of CPU per node and round). Partitioning is IID so that one or two rounds reliably
reach an accuracy far above chance (the runs are deterministic for a given seed).

The two federations (plain, and TLS with SuperNode authentication) run at the same
time, each in its own thread with its own SuperLink, ports, homes and marker (the
``scenarios`` fixture of ``tests/conftest.py``): most of a deployment run is Flower
polling every 3 s, so the two overlap well on 2 cores. Each test checks its own
federation, with the same assertions as when the tests ran one after the other.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.deployment import LoopbackFederation, load_results
from runner.processes import pid_exists

REPO_ROOT = Path(__file__).resolve().parents[1]
NODES = 2
CHANCE = 0.1  # digits has 10 classes
SPARSITY = 0.5
RUN_TIMEOUT = 420.0  # generous: the suite shares 2 cores with other work

BASE_CONFIG = {
    "dataset": "digits",
    "partitioning": "iid",
    "explore-epochs": 1,
    "local-epochs": 1,
    "fraction-train": 1.0,
    "min-available-nodes": NODES,
    "min-train-nodes": NODES,
    "sparsity": SPARSITY,
    "explore-fraction": 1.0,  # every node takes part in every stage (the default explores on 10 %, at least one)
    "seed": 0,
}
# ClientApps of the nodes share 2 cores: one thread each avoids oversubscription.
PROCESS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc (Linux)")
TLS_TOOLS = bool(shutil.which("openssl") and shutil.which("ssh-keygen"))
needs_tls_tools = pytest.mark.skipif(not TLS_TOOLS, reason="docker/generate_certs.sh needs openssl and ssh-keygen")


@pytest.fixture(scope="module")
def bystander():
    """An unrelated process of the test itself: stopping a federation must not touch it."""
    proc = subprocess.Popen(["sleep", "infinity"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def federations(bystander, scenarios, tmp_path_factory):
    """Both federations' scenarios, started at once (each test waits for its own)."""
    root = tmp_path_factory.mktemp("deployment")
    scenarios.start("insecure", ["test_insecure_federation_runs_autoflip"], _insecure_federation,
                    root / "insecure", bystander)
    if TLS_TOOLS:
        scenarios.start("tls-auth", ["test_tls_auth_federation_runs_autoflip_and_refuses_unknown_node"],
                        _tls_auth_federation, root / "tls-auth", bystander)
    return scenarios


def _explain(fed: LoopbackFederation) -> str:
    run = fed.runs[-1] if fed.runs else None
    out = "\n".join(run.output[-60:]) if run else "(no run)"
    return f"\n--- flwr run output ---\n{out}\n{fed.diagnostics()}"


def _check_results(fed: LoopbackFederation, path: Path, rounds: int, min_accuracy: float) -> dict:
    why = _explain(fed)
    results = load_results(path)
    assert results["status"] == "completed", why
    assert fed.runs[-1].status == "finished:completed", why
    assert (path.parent / "final_model.pt").is_file() and (path.parent / "final_mask.pt").is_file(), why
    history = results["rounds"]
    assert [r["phase"] for r in history] == ["explore"] + ["train"] * rounds, why
    for r in history:
        assert sorted(r["sampled"]) == list(range(NODES)), (r, why)
        assert sorted(r["replied"]) == list(range(NODES)), (r, why)
        assert not r["dropped"] and not r["rejected"], (r, why)
    assert history[0]["density"] == pytest.approx(1.0), why
    assert history[-1]["density"] == pytest.approx(1 - SPARSITY, abs=0.02), why
    # the mask goes to each node once: SuperNodes keep it in context.state across ClientApp processes
    assert [r["masks_sent"] for r in history[1:]] == [NODES] + [0] * (rounds - 1), why
    final = history[-1]["accuracy"]
    assert final is not None and final >= min_accuracy, (final, why)
    assert final > history[0]["accuracy"] + 0.2, (history[0]["accuracy"], final, why)
    return results


def _check_stopped(fed: LoopbackFederation, bystander: subprocess.Popen) -> None:
    seen = fed.seen_processes
    # what a federation starts: the SuperLink, the SuperNodes, and the SuperExecs they spawn
    cmds = " ".join(seen.values())
    for exe in ("flower-superlink", "flower-supernode", "flower-superexec"):
        assert exe in cmds, f"{exe} was never observed among {seen}"
    left = fed.alive_processes()
    assert not left, f"processes of the federation still alive: {left}"
    # independent of the launcher's bookkeeping: same PID running the same command line
    still = {pid: cmd for pid, cmd in seen.items() if pid_exists(pid) and _cmdline(pid) == cmd}
    assert not still, f"started PIDs still alive: {still}"
    assert bystander.poll() is None, "stopping the federation killed an unrelated process"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _insecure_federation(tmp_path: Path, bystander: subprocess.Popen) -> None:
    cfg = {**BASE_CONFIG, "num-server-rounds": 2, "output-dir": str(tmp_path / "out"), "run-name": "dep",
           "value-precision": "int8"}  # issue 14: int8 both ways, error feedback kept across ClientApp processes
    t0 = time.monotonic()
    with LoopbackFederation(NODES, workdir=tmp_path / "fed", env=PROCESS_ENV) as fed:
        assert sorted(fed.node_ids) == list(range(NODES)) and len(set(fed.node_ids.values())) == NODES
        path = fed.run(REPO_ROOT, cfg, timeout=RUN_TIMEOUT)
        assert path == (tmp_path / "out" / "dep" / "results.json").resolve(), _explain(fed)
        _check_results(fed, path, rounds=2, min_accuracy=0.5)
    _check_stopped(fed, bystander)
    print(f"insecure federation: run {fed.runs[-1].seconds:.1f} s, total {time.monotonic() - t0:.1f} s")


def _tls_auth_federation(tmp_path: Path, bystander: subprocess.Popen) -> None:
    cfg = {**BASE_CONFIG, "num-server-rounds": 1, "local-epochs": 2, "output-dir": str(tmp_path / "out"),
           "run-name": "dep-tls", "value-precision": "float16"}  # issue 14: float16 both ways
    t0 = time.monotonic()
    with LoopbackFederation(NODES, tls=True, auth=True, workdir=tmp_path / "fed", env=PROCESS_ENV) as fed:
        # the SuperLink speaks HTTPS only, with the generated CA, and requires node keys
        assert fed.certs.joinpath("ca.crt").is_file()
        path = fed.run(REPO_ROOT, cfg, timeout=RUN_TIMEOUT)
        _check_results(fed, path, rounds=1, min_accuracy=0.4)

        refused = fed.start_unregistered_supernode(timeout=60)
        why = f"\n--- refused SuperNode log ---\n{refused.log[-3000:]}{_explain(fed)}"
        # Flower logs "Exit Code: 305" but the process itself exits with status 1 (any error code >= 100).
        assert refused.returncode is not None and refused.returncode != 0, (refused.returncode, why)
        assert refused.flower_exit_code == 305, (refused.flower_exit_code, why)
        assert refused.node_id is None, why
        # the SuperLink knows only the registered nodes (whatever their status)
        known = {int(n["node-id"]) for n in fed.list_supernodes()}
        assert known == set(fed.node_ids.values()), (known, fed.node_ids, why)
    _check_stopped(fed, bystander)
    print(f"TLS+auth federation: run {fed.runs[-1].seconds:.1f} s, refusal {refused.seconds:.1f} s, "
          f"total {time.monotonic() - t0:.1f} s")


def test_insecure_federation_runs_autoflip(federations):
    federations.result("insecure")


@needs_tls_tools
def test_tls_auth_federation_runs_autoflip_and_refuses_unknown_node(federations):
    federations.result("tls-auth")

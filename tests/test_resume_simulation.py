"""Kill a real Flower simulation mid-run, resume it, and get the uninterrupted run's model.

The launcher of a real simulation is SIGTERMed once the ServerApp has checkpointed
round 2 of 4 (it then stops every process of the run, as on a Ctrl-C); the run is
resumed with ``resume=true`` in the same output folder.

Exact equality only holds when no client reply is lost. Once in several runs here
a Ray actor of the *resumed* simulation died (SIGTERM) shortly after the killed
run's cleanup, so one reply was dropped (the strategy recorded it correctly) and
the models differed; it did not recur in later attempts (3 of 3 under load, no
wait). The test therefore keeps a copy of the interrupted run's folder and, if the
resumed run records a lost reply, warns with the reason and resumes once more from
the copy. Two runs in a row with lost replies fail the test.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from autoflip_strategy.checkpoint import load_checkpoint
from runner.simulation import load_results, run_simulation, toml_value

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 4
CONFIG = {"num-server-rounds": ROUNDS, "explore-epochs": 1, "local-epochs": 1, "partitioning": "iid",
          "run-name": "r", "seed": 3}


def _lost_replies(results_path: Path) -> list[dict]:
    return [d for r in load_results(results_path)["rounds"] for d in r["dropped"]]


def _kill_mid_run(output_dir: Path) -> int:
    """Start the launcher as a separate process, SIGTERM it after round 2; return the last checkpointed round."""
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in CONFIG.items())
    launcher = subprocess.Popen(
        [sys.executable, "-m", "runner.simulation", "--num-supernodes", "4", "--client-cpus", "2",
         "--output-dir", str(output_dir), "--run-config", overrides],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = output_dir / "r" / "checkpoint.pt"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and launcher.poll() is None:
            if checkpoint.exists() and load_checkpoint(checkpoint)["round"] >= 2:
                break
            time.sleep(0.2)
    finally:
        os.killpg(launcher.pid, signal.SIGTERM)  # the launcher stops every process of the run
        launcher.wait(timeout=60)
    return load_checkpoint(checkpoint)["round"]


def test_killed_and_resumed_run_ends_with_the_uninterrupted_model(tmp_path):
    full = run_simulation(CONFIG, 4, output_dir=tmp_path / "full", client_cpus=2)
    assert not _lost_replies(full), f"infrastructure fault in the uninterrupted run: {_lost_replies(full)}"

    killed = tmp_path / "killed"
    stopped_after = _kill_mid_run(killed)
    assert 1 <= stopped_after < ROUNDS, "the run was not interrupted mid-way"
    assert load_results(killed / "r" / "results.json")["status"] != "completed"
    shutil.copytree(killed, tmp_path / "interrupted")

    for attempt in range(2):
        resumed = run_simulation({**CONFIG, "resume": True}, 4, output_dir=killed, client_cpus=2)
        lost = _lost_replies(resumed)
        if not lost:
            break
        warnings.warn(f"resumed run {attempt + 1} lost client replies (infrastructure): {lost}", stacklevel=1)
        shutil.rmtree(killed)
        shutil.copytree(tmp_path / "interrupted", killed)
    assert not lost, f"two resumed runs in a row lost client replies: {lost}"
    assert load_results(resumed)["status"] == "completed"
    a = torch.load(full.parent / "final_model.pt", weights_only=True)
    b = torch.load(resumed.parent / "final_model.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert max(float((a[n] - b[n]).abs().max()) for n in a) <= 1e-6

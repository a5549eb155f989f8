"""Kill a real Flower simulation mid-run, resume it, and get the uninterrupted run's model.

Marked slow: in one of three runs here a Ray actor of the *resumed* simulation received a
SIGTERM shortly after the killed run was cleaned up (suspected: the killed run's Ray processes
shutting down), so one client reply was dropped and the models differed. The strategy handled
the drop correctly; the exact-equality check cannot tell that apart. The in-process resume test
(tests/test_strategy.py) covers exact equality in the default suite.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from autoflip_strategy.checkpoint import load_checkpoint
from runner.simulation import load_results, run_simulation, toml_value

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"num-server-rounds": 6, "explore-epochs": 1, "local-epochs": 1, "partitioning": "iid",
          "run-name": "r", "seed": 3}


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_the_uninterrupted_model(tmp_path):
    full = run_simulation(CONFIG, 4, output_dir=tmp_path / "full", client_cpus=2)

    killed_dir = tmp_path / "killed"
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in CONFIG.items())
    launcher = subprocess.Popen(
        [sys.executable, "-m", "runner.simulation", "--num-supernodes", "4", "--client-cpus", "2",
         "--output-dir", str(killed_dir), "--run-config", overrides],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = killed_dir / "r" / "checkpoint.pt"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and launcher.poll() is None:
            if checkpoint.exists() and load_checkpoint(checkpoint)["round"] >= 2:
                break
            time.sleep(0.2)
    finally:
        os.killpg(launcher.pid, signal.SIGTERM)  # the launcher stops every process of the run
        launcher.wait(timeout=60)
    time.sleep(10)  # let the killed run's Ray processes finish shutting down
    stopped_after = load_checkpoint(checkpoint)["round"]
    assert 1 <= stopped_after < CONFIG["num-server-rounds"], "the run was not interrupted mid-way"

    resumed = run_simulation({**CONFIG, "resume": True}, 4, output_dir=killed_dir, client_cpus=2)
    dropped = [d for r in load_results(resumed)["rounds"] for d in r["dropped"]]
    assert not dropped, f"infrastructure fault during the resumed run: {dropped}"
    a = torch.load(full.parent / "final_model.pt", weights_only=True)
    b = torch.load(resumed.parent / "final_model.pt", weights_only=True)
    assert max(float((a[n] - b[n]).abs().max()) for n in a) <= 1e-6

"""Adopting AutoFLIP in a Flower quickstart-style app (tests/quickstart_app), as a new user would.

The app has Flower's quickstart-pytorch shape: its own CNN with a fixed ``view``,
its own train/test loops, a FedAvg server and its own train/evaluate logic.
``fedavg_original/`` is the app before adoption, ``quickstart/`` after it; the
runs go through ``flwr run`` in simulation (runner.simulation). The two runs (the
adopted app, and one whose model cannot train) run at the same time, each on its own
SuperLink (the ``scenarios`` fixture of tests/conftest.py).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import pytest
import torch

from runner.simulation import SimulationError, load_results, run_simulation

APP_DIR = Path(__file__).resolve().parent / "quickstart_app"
ROUNDS = 2
NODES = 4
MAX_CHANGED_LINES = 15


def changed_lines(name: str) -> tuple[int, int]:
    """(lines added or rewritten, lines deleted) from the FedAvg original to the AutoFLIP version."""
    before = (APP_DIR / "fedavg_original" / name).read_text().splitlines()
    after = (APP_DIR / "quickstart" / name).read_text().splitlines()
    diff = list(difflib.unified_diff(before, after, lineterm="", n=0))
    added = sum(1 for d in diff if d.startswith("+") and not d.startswith("+++"))
    deleted = sum(1 for d in diff if d.startswith("-") and not d.startswith("---"))
    return added, deleted


def test_adoption_takes_at_most_fifteen_written_lines() -> None:
    added = {name: changed_lines(name)[0] for name in ("server_app.py", "client_app.py")}
    assert sum(added.values()) <= MAX_CHANGED_LINES, added
    original = (APP_DIR / "fedavg_original" / "server_app.py").read_text()
    assert "FedAvg(fraction_train=fraction_train)" in original  # really the FedAvg app it claims to be
    assert "@app.evaluate()" in (APP_DIR / "fedavg_original" / "client_app.py").read_text()
    assert "x.view(-1, 16 * 5 * 5)" in (APP_DIR / "quickstart" / "task.py").read_text()


def _quickstart_run(output_dir: Path) -> tuple[Path, dict[str, Any], list[str]]:
    lines: list[str] = []
    path = run_simulation({"num-server-rounds": ROUNDS}, NODES, output_dir=output_dir,
                          app_dir=APP_DIR, timeout=600, client_cpus=2, stream_to=lines.append)
    return path, load_results(path), lines


@pytest.fixture(scope="module")
def runs(scenarios, tmp_path_factory: pytest.TempPathFactory):
    """Both simulations of this module, started at once (each test waits for its own)."""
    scenarios.start("adopted", ["test_adopted_quickstart_completes_and_really_prunes"], _quickstart_run,
                    tmp_path_factory.mktemp("quickstart"))
    scenarios.start("cannot-train", ["test_quickstart_whose_model_cannot_train_fails_with_the_clients_error"],
                    _quickstart_that_cannot_train, tmp_path_factory.mktemp("cannot-train"))
    return scenarios


@pytest.fixture(scope="module")
def quickstart_run(runs) -> tuple[Path, dict[str, Any], list[str]]:
    return runs.result("adopted")


def test_adopted_quickstart_completes_and_really_prunes(quickstart_run: tuple[Path, dict[str, Any], list[str]]) -> None:
    path, results, lines = quickstart_run
    assert results["status"] == "completed"
    train = {int(r): m for r, m in results["train"].items()}
    assert sorted(train) == list(range(1, ROUNDS + 1))
    for metrics in train.values():  # density, bytes and FLOPs are in Flower's Result metrics
        assert metrics["density"] == pytest.approx(0.5, abs=0.02)
        assert metrics["bytes_up"] > 0 and metrics["train_flops"] > 0 and "train_loss" in metrics
    # each reply carried at most ~half of the dense model (kept values only)
    state = torch.load(path.parent / "final_model.pt", weights_only=True)
    dense_bytes = sum(4 * t.numel() for t in state.values())
    replies = NODES // 2
    assert train[ROUNDS]["bytes_up"] / replies < 0.6 * dense_bytes
    # the final model is pruned: about half of the prunable weights are exactly zero
    weights = [state[n] for n in ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight")]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.5, abs=0.03)
    # its own evaluation logic ran on the clients, through evaluate_fn
    evaluate = {int(r): m for r, m in results["evaluate"].items()}
    assert sorted(evaluate) == list(range(1, ROUNDS + 1)) and 0.0 <= evaluate[ROUNDS]["eval_acc"] <= 1.0
    # Flower-style round lines, with AutoFLIP's density and bytes
    text = "\n".join(lines)
    assert f"[ROUND {ROUNDS}/{ROUNDS}]" in text and "configure_train: Sampled 2 nodes" in text
    assert f"AutoFLIP train {ROUNDS}: density 0.5" in text


def test_quickstart_whose_model_cannot_train_fails_with_the_clients_error(runs) -> None:
    """Every client raises (SGD refuses a negative learning rate): the run fails, it does not 'complete'."""
    runs.result("cannot-train")


def _quickstart_that_cannot_train(tmp_path: Path) -> None:
    with pytest.raises(SimulationError) as err:
        run_simulation({"num-server-rounds": 4, "lr": -1.0}, NODES, output_dir=tmp_path, app_dir=APP_DIR,
                       timeout=600, client_cpus=2)
    text = str(err.value)
    assert "Invalid learning rate" in text
    assert "finished:failed" in text and "rounds in a row without an accepted client reply" in text
    assert "most common error: client error: ValueError: Invalid learning rate: -1.0" in text
    assert not list(tmp_path.glob("*/results.json"))  # nothing claims success

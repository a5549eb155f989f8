"""The reference app through real Flower simulations, launched by :mod:`runner.simulation`.

One module-scoped fixture starts two runs *at the same time* (each on its own
SuperLink, port and FLWR_HOME): a small AutoFLIP run that must complete, and
one whose ServerApp fails (MNIST from a folder that does not exist) and must
end ``failed`` with that reason. (An invalid run-config value no longer gets
that far: the launcher refuses it before starting anything, see
``tests/test_run_config_attacks.py``.) The tests then inspect
what each left behind, so the whole file costs about one run's wall time.
"""

from __future__ import annotations

import json
import math
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from autoflip_strategy import discover_structure
from autoflip_task.data import load_federated_data
from autoflip_task.models import build_model, example_input
from runner.simulation import (
    SimulationError,
    federation_config,
    load_results,
    parse_overrides,
    run_simulation,
    toml_document,
    toml_value,
)

SPARSITY = 0.5
STRUCTURED = 0.2
ROUNDS = 3
NUM_SUPERNODES = 4
CONFIG: dict[str, Any] = {
    "num-server-rounds": ROUNDS, "explore-epochs": 1, "local-epochs": 1, "fraction-train": 0.5,
    "sparsity": SPARSITY, "structured-sparsity": STRUCTURED,
    # IID splits keep 3 short rounds well above chance: seeds 0, 1, 2 reached 0.77, 0.78, 0.81.
    "partitioning": "iid", "seed": 0,
}
MIN_ACCURACY = 0.5  # 10 classes: chance is 0.1
TIMEOUT = 300


@dataclass
class Outcome:
    path: Path | None = None
    error: Exception | None = None
    lines: list[str] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0

    def results(self) -> dict[str, Any]:
        if self.error is not None:
            raise AssertionError(f"the run failed: {self.error}") from self.error
        assert self.path is not None
        return load_results(self.path)


def _launch(config: dict[str, Any], output_dir: Path) -> Outcome:
    out = Outcome(started=time.monotonic())
    try:
        # One Ray actor with both cores: on a 2-core machine faster than two actors.
        out.path = run_simulation(config, NUM_SUPERNODES, output_dir=output_dir, timeout=TIMEOUT, client_cpus=2,
                                  stream_to=out.lines.append)
    except Exception as exc:  # noqa: BLE001 - each test inspects the outcome it cares about
        out.error = exc
    out.ended = time.monotonic()
    return out


@dataclass
class Runs:
    good: Outcome
    bad: Outcome
    root: Path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("simulation")
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(_launch, {**CONFIG, "dataset": "mnist", "data-dir": str(root / "no-such-data")}, root / "bad")
        good = pool.submit(_launch, CONFIG, root / "good")
        return Runs(good.result(), bad.result(), root)


@pytest.fixture(scope="module")
def good(runs: Runs) -> tuple[Path, dict[str, Any]]:
    outcome = runs.good
    results = outcome.results()
    assert outcome.path is not None
    return outcome.path, results


# ------------------------------------------------------------------ the good run
def test_run_completes_with_exploration_then_training(good: tuple[Path, dict[str, Any]], runs: Runs) -> None:
    _, results = good
    assert results["status"] == "completed"
    assert [(r["round"], r["phase"]) for r in results["rounds"]] == [(0, "explore")] + [
        (i, "train") for i in range(1, ROUNDS + 1)]
    assert results["rounds"][0]["replied"], "no client explored"
    assert all(r["replied"] for r in results["rounds"][1:]), "a round had no valid replies"
    # The ServerApp's progress lines came through the stream, one per round.
    progress = [line for line in runs.good.lines if line.startswith("[")]
    assert len(progress) == ROUNDS + 1 and "explore" in progress[0]


def test_final_density_is_one_minus_sparsity(good: tuple[Path, dict[str, Any]]) -> None:
    _, results = good
    assert results["rounds"][0]["density"] == 1.0
    for r in results["rounds"][1:]:
        assert abs(r["density"] - (1 - SPARSITY)) <= 0.02, r


def test_accuracy_well_above_chance(good: tuple[Path, dict[str, Any]]) -> None:
    _, results = good
    final = results["rounds"][-1]["accuracy"]
    assert final is not None and final >= MIN_ACCURACY, [r["accuracy"] for r in results["rounds"]]


def test_training_uplink_is_smaller_than_the_dense_model(good: tuple[Path, dict[str, Any]]) -> None:
    path, results = good
    state = torch.load(path.parent / "final_model.pt", weights_only=True)
    dense = sum(4 * t.numel() for t in state.values() if t.is_floating_point())  # float32 on the wire
    for r in results["rounds"][1:]:
        per_reply = r["bytes_up"] / len(r["replied"])
        # Density 0.5 plus bitmaps: well under the dense model (FedAvg sends all of it).
        assert per_reply < 0.7 * dense, (r["round"], per_reply, dense)


def _structure() -> Any:
    data = load_federated_data("digits")
    model = build_model("cnn", data.input_shape, data.num_classes)
    return discover_structure(model, example_input(data.input_shape, data.num_classes))


def test_final_model_is_zero_wherever_the_saved_mask_prunes(good: tuple[Path, dict[str, Any]]) -> None:
    path, results = good
    state = torch.load(path.parent / "final_model.pt", weights_only=True)
    masks = torch.load(path.parent / "final_mask.pt", weights_only=True)
    structure = _structure()
    assert set(structure.prunable) <= set(masks) <= set(state)
    for name, keep in masks.items():
        assert keep.dtype == torch.bool and keep.shape == state[name].shape, name
        assert torch.count_nonzero(state[name][~keep]) == 0, f"{name}: pruned coordinates are not zero"
    kept = sum(int(masks[n].sum()) for n in structure.prunable)
    total = sum(masks[n].numel() for n in structure.prunable)
    assert abs(kept / total - results["rounds"][-1]["density"]) < 1e-9


def test_final_model_is_pruned(good: tuple[Path, dict[str, Any]]) -> None:
    """What the model alone shows, independent of the saved mask."""
    path, results = good
    assert results["model"] == "cnn"
    state = torch.load(path.parent / "final_model.pt", weights_only=True)
    structure = _structure()
    assert set(structure.shapes) <= set(state)

    # Unstructured + structured: the share of non-zero prunable weights is the density.
    nonzero = sum(int((state[n] != 0).sum()) for n in structure.prunable)
    total = sum(state[n].numel() for n in structure.prunable)
    assert abs(nonzero / total - (1 - SPARSITY)) <= 0.02, nonzero / total

    # Structured: in every unit group at least floor(STRUCTURED * size) units are removed
    # entirely - fan-in weights, bias and the next layer's columns all exactly zero.
    for group in structure.groups:
        alive = torch.zeros(group.size, dtype=torch.bool)
        for member in group.members:
            t = state[member.tensor].movedim(member.dim, 0)
            per_unit = t.reshape(member.chunks, group.size, member.block, -1) != 0
            alive |= per_unit.permute(1, 0, 2, 3).reshape(group.size, -1).any(1)
        removed = int((~alive).sum())
        assert removed >= math.floor(STRUCTURED * group.size), (group.name, removed, group.size)
        assert removed < group.size, f"{group.name}: every unit was removed"
    assert results["structure"] == {g.name: g.size for g in structure.groups}


# ------------------------------------------------------------------- the bad run
def test_a_failing_server_app_fails_the_launcher_with_its_reason(runs: Runs) -> None:
    bad = runs.bad
    assert isinstance(bad.error, RuntimeError), bad.path
    assert isinstance(bad.error, SimulationError)
    first = str(bad.error).splitlines()[0]
    assert "status 'failed'" in first and "no-such-data" in first, first  # the reason the ServerApp recorded
    (record,) = (runs.root / "bad").glob("*/results.json")
    results = load_results(record)
    assert results["status"] == "failed" and "FileNotFoundError" in results["reason"], results


def test_runs_in_parallel_do_not_collide(runs: Runs) -> None:
    good, bad = runs.good, runs.bad
    assert good.started < bad.ended and bad.started < good.ended  # they overlapped in time
    ports = {line.split("127.0.0.1:")[1].rstrip(")") for o in (good, bad) for line in o.lines
             if line.startswith("Using SuperLink")}
    assert len(ports) == 2, ports


def test_unknown_key_is_rejected_before_anything_starts(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(SimulationError, match="no-such-key"):
        run_simulation({"no-such-key": 1}, 2, output_dir=tmp_path)
    assert time.monotonic() - start < 5


# ------------------------------------------------------------- launcher helpers
@pytest.mark.parametrize("value", [
    "plain", "with 'single' and \"double\" quotes", "back\\slash\nnewline", "ünïcödé ✓", "",
    True, False, 0, -7, 2**40, 0.5, 1e-12, 3.0, float("inf"), float("-inf"),
])
def test_toml_values_round_trip(value: Any) -> None:
    parsed = tomllib.loads(f"k = {toml_value(value)}")["k"]
    assert parsed == value and type(parsed) is type(value)


def test_toml_document_and_overrides() -> None:
    values = {"output-dir": "/tmp/a b", "sparsity": 0.7, "regrowth": True, "seed": 3, "strategy": "fedavg"}
    assert tomllib.loads(toml_document(values)) == values
    assert parse_overrides("sparsity=0.7 regrowth=true seed=3 strategy='fedavg' output-dir=\"/tmp/a b\"") == values
    assert math.isnan(tomllib.loads(f"k = {toml_value(float('nan'))}")["k"])
    with pytest.raises(TypeError):
        toml_value([1, 2])
    with pytest.raises(ValueError):
        parse_overrides("sparsity")
    assert federation_config(10, 1) == "num-supernodes=10 client-resources-num-cpus=1"
    assert federation_config(3, 2.0, {"init-args-num-cpus": 2}).endswith("client-resources-num-cpus=2 "
                                                                          "init-args-num-cpus=2")
    with pytest.raises(ValueError):
        federation_config(3, 0.5)


# ------------------------------------------------- the same run without Ray (runner.inprocess)
def test_inprocess_runner_reproduces_the_simulation(good: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """The GPU benchmarks use runner.inprocess (Ray does not fit there): same seed, same run."""
    from runner.inprocess import run_inprocess

    _, sim = good
    path = run_inprocess({**CONFIG, "device": "cpu"}, NUM_SUPERNODES, output_dir=tmp_path)
    local = load_results(path)
    keys = ("round", "phase", "sampled", "replied", "density", "bytes_down", "bytes_up", "train_flops")
    assert [{k: r[k] for k in keys} for r in local["rounds"]] == [{k: r[k] for k in keys} for r in sim["rounds"]]
    for a, b in zip(local["rounds"], sim["rounds"]):
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=0.02), (a["round"], a["accuracy"], b["accuracy"])
    # Flower's protobuf serialisation of every message and reply, against the strategy's accounting.
    wire = json.loads((path.parent / "wire_bytes.json").read_text())
    counted = {"down": sum(r["bytes_down"] for r in local["rounds"]), "up": sum(r["bytes_up"] for r in local["rounds"])}
    for way in ("down", "up"):
        assert counted[way] <= wire[way] <= 1.02 * counted[way] + 20_000, (way, wire, counted)

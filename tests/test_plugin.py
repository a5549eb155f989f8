"""AutoFLIP as a plug-in: a separate Flower app (tests/plugin_app) with its own MLP and data.

The app uses only the public API of ``autoflip_strategy`` and runs through the
same launcher as the reference app. Unlike the reference app it saves the
final mask, so the exact-zero property is checked coordinate by coordinate.
"""

from __future__ import annotations

import ast
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch

import autoflip_strategy
from runner.simulation import load_results, run_simulation

APP_DIR = Path(__file__).resolve().parent / "plugin_app"
APP_CONFIG = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
SPARSITY = 0.6
STRUCTURED = 0.25
ROUNDS = 3
MIN_ACCURACY = 0.6  # 4 classes: chance is 0.25 (seeds 0, 1, 2, 4 reached 0.96, 0.82, 0.91, 0.95)


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], list[str]]:
    lines: list[str] = []
    config = {"num-server-rounds": ROUNDS, "sparsity": SPARSITY, "structured-sparsity": STRUCTURED,
              "explore-epochs": 1, "local-epochs": 2, "fraction-train": 0.5, "seed": 0}
    path = run_simulation(config, 4, output_dir=tmp_path_factory.mktemp("plugin"), app_dir=APP_DIR,
                          timeout=300, client_cpus=2, stream_to=lines.append)
    return path, load_results(path), lines


def test_plugin_uses_only_the_public_api() -> None:
    public = set(autoflip_strategy.__all__)
    for source in (APP_DIR / "blobs_plugin").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("autoflip"):
                assert node.module == "autoflip_strategy", f"{source.name}: imports {node.module}"
                assert {a.name for a in node.names} <= public, f"{source.name}: {[a.name for a in node.names]}"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("autoflip") for a in node.names), source.name


def test_plugin_run_completes(plugin_run: tuple[Path, dict[str, Any], list[str]]) -> None:
    _, results, lines = plugin_run
    assert results["status"] == "completed"
    assert [(r["round"], r["phase"]) for r in results["rounds"]] == [(0, "explore")] + [
        (i, "train") for i in range(1, ROUNDS + 1)]
    assert sum(line.startswith("[") for line in lines) == ROUNDS + 1  # its own progress lines, streamed


def test_plugin_prunes_and_learns(plugin_run: tuple[Path, dict[str, Any], list[str]]) -> None:
    path, results, _ = plugin_run
    final = results["rounds"][-1]
    assert abs(final["density"] - (1 - SPARSITY)) <= 0.02
    assert final["accuracy"] >= MIN_ACCURACY, [r["accuracy"] for r in results["rounds"]]
    state = torch.load(path.parent / "final_model.pt", weights_only=True)
    dense = sum(4 * t.numel() for t in state.values())
    for r in results["rounds"][1:]:
        assert r["bytes_up"] / len(r["replied"]) < dense, r


def test_plugin_final_model_is_zero_wherever_the_mask_prunes(
        plugin_run: tuple[Path, dict[str, Any], list[str]]) -> None:
    path, results, _ = plugin_run
    state = torch.load(path.parent / "final_model.pt", weights_only=True)
    mask = torch.load(path.parent / "final_mask.pt", weights_only=True)
    tensors, units = mask["tensors"], mask["units"]
    assert set(results["prunable"]) <= set(tensors)
    for name, keep in tensors.items():
        assert keep.dtype == torch.bool and keep.shape == state[name].shape, name
        assert torch.count_nonzero(state[name][~keep]) == 0, f"{name}: pruned coordinates are not zero"
    # Density of the saved mask over the prunable weights is the reported one.
    kept = sum(int(tensors[n].sum()) for n in results["prunable"])
    total = sum(tensors[n].numel() for n in results["prunable"])
    assert abs(kept / total - results["rounds"][-1]["density"]) < 1e-9
    # Removed units take their bias and the next layer's input column with them.
    consumers = {"inp": "mid", "mid": "out"}
    for group, size in results["structure"].items():
        keep = units[group]
        removed = torch.nonzero(~keep).flatten()
        assert len(removed) == math.floor(STRUCTURED * size), (group, len(removed))
        assert torch.count_nonzero(state[f"{group}.weight"][removed]) == 0
        assert torch.count_nonzero(state[f"{group}.bias"][removed]) == 0
        assert torch.count_nonzero(state[f"{consumers[group]}.weight"][:, removed]) == 0
        assert torch.count_nonzero(state[f"{group}.bias"][keep]) > 0  # kept units still learn


def test_plugin_config_keys_match_its_pyproject() -> None:
    """The overrides used above are declared by the app (the launcher rejects unknown keys)."""
    assert {"num-server-rounds", "sparsity", "structured-sparsity", "explore-epochs", "local-epochs",
            "fraction-train", "seed", "output-dir"} <= set(APP_CONFIG)

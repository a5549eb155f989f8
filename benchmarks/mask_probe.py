"""Is a run's mask trainable at all? Train its model centrally under that fixed mask and compare.

Federated runs mix many effects (non-IID drift, sampling, exploration cost). This probe removes
them: it takes the keep-masks a run ended with (``final_mask.pt``, or the weight masks in the
``checkpoint.pt`` of a run that was cut off), trains a fresh model of the run's dataset on the
pooled training data with Adam under ``enforce_mask``, and reports test accuracy next to a dense
model trained the same way. ``--refill-empty-rows`` also tries each mask with every emptied output
row of a layer that cannot lose units (the classifier) given back, to test whether those rows
are what blocks learning. ``--report-only`` trains nothing and prints, per run, the
classifier rows: how many are empty, the smallest row density, the share of training targets
whose row is empty, and (from the run's last ``checkpoint.pt``, where present) the rank correlation
between a row's mean guidance and how often its class is the target.

    python -m benchmarks.mask_probe benchmarks/results/shakespeare/runs/shakespeare-roles/autoflip-seed0 \\
        --steps 200 --refill-empty-rows
    python -m benchmarks.mask_probe --report-only benchmarks/results/shakespeare/runs/shakespeare-roles/*
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from autoflip_strategy import discover_structure
from autoflip_strategy.enforce import enforce_mask
from autoflip_strategy.masks import empty_output_rows, fixed_output_tensors
from autoflip_task.config import model_name
from autoflip_task.data import load_federated_data
from autoflip_task.models import build_model, example_input
from autoflip_task.training import evaluate


def run_masks(run_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the run's config, its keep-masks of the prunable weights)."""
    [results] = run_dir.glob("*/results.json")
    cfg = json.loads(results.read_text())["config"]
    if (results.parent / "final_mask.pt").exists():
        masks = torch.load(results.parent / "final_mask.pt", weights_only=True)
    else:
        masks = torch.load(results.parent / "checkpoint.pt", weights_only=False)["mask_weights"]
    return cfg, masks


def data_dir_of(run: Path, cfg: dict, override: str = "") -> str:
    """``override``, else where the suite finds the run's setting's data here, else the run's own data-dir."""
    from benchmarks.suite import SETTINGS

    found = [s.data_dir()[0] for settings in SETTINGS.values() for s in settings if s.name == run.parent.name]
    return override or (found[0] if found else cfg["data-dir"])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [np.argsort(np.argsort(x)).astype(float) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def row_report(run: Path, data_dir: str = "") -> str:
    """One table row on the classifier rows of a run's mask (no training)."""
    cfg, masks = run_masks(run)
    data = load_federated_data(cfg["dataset"], data_dir_of(run, cfg, data_dir), cfg["seed"])
    model = build_model(model_name(cfg), data.input_shape, data.num_classes)
    [name] = fixed_output_tensors(discover_structure(model, example_input(data.input_shape, data.num_classes)))
    keep = masks[name].reshape(masks[name].shape[0], -1)
    empty = ~keep.any(1)
    counts = np.bincount(data.train_y.numpy(), minlength=keep.shape[0])
    cut = "" if (run / "run" / "final_mask.pt").exists() else " (cut off)"
    rho = ""
    if (ckpt := next(run.glob("*/checkpoint.pt"), None)) is not None:  # the guidance at the last round saved
        scores = torch.load(ckpt, weights_only=False)["scores"][name]
        rho = f"{_spearman(scores.reshape(keep.shape[0], -1).mean(1).numpy(), counts):+.2f}"
    return (f"| {run.name}{cut} | {name} | {int(empty.sum())} of {keep.shape[0]} | {keep.float().mean(1).min():.3f} "
            f"| {counts[empty.numpy()].sum() / counts.sum():.2f} | {rho} |")


def train_under(masks: dict[str, torch.Tensor] | None, cfg: dict, data, steps: int, batch: int, seed: int) -> float:
    torch.manual_seed(seed)
    model = build_model(model_name(cfg), data.input_shape, data.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["learning-rate"])
    generator = torch.Generator().manual_seed(seed)
    with enforce_mask(model, masks or {}):
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(data.train_x), (batch,), generator=generator)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(data.train_x[idx]), data.train_y[idx]).backward()
            optimizer.step()
    return evaluate(model, data.test_x[:2000], data.test_y[:2000])[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (<suite>/runs/<setting>/<method>-seed<k>)")
    parser.add_argument("--data-dir", default="", help="the dataset folder (default: the suite's, else the run's)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refill-empty-rows", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="no training: the classifier rows of each run")
    args = parser.parse_args(argv)
    if args.report_only:
        print("| run | classifier | empty rows | min row density | targets in empty rows "
              "| guidance vs target frequency (Spearman) |\n|---|---|---|---|---|---|")
        for run in args.runs:
            print(row_report(run, args.data_dir), flush=True)
        return

    rows, dense_done = [], False
    for run in args.runs:
        cfg, masks = run_masks(run)
        data = load_federated_data(cfg["dataset"], data_dir_of(run, cfg, args.data_dir), cfg["seed"])
        model = build_model(model_name(cfg), data.input_shape, data.num_classes)
        structure = discover_structure(model, example_input(data.input_shape, data.num_classes))
        variants = [] if dense_done else [("dense", None)]
        dense_done = True
        variants.append((run.name, masks))
        empty = empty_output_rows(masks, structure)
        if args.refill_empty_rows and empty:
            refilled = dict(masks)
            for n in empty:
                dead = ~masks[n].reshape(masks[n].shape[0], -1).any(1)
                refilled[n] = masks[n] | dead.reshape(-1, *[1] * (masks[n].dim() - 1))
            variants.append((f"{run.name} + emptied rows refilled", refilled))
        for name, m in variants:
            start = time.time()
            acc = train_under(m, cfg, data, args.steps, args.batch_size, args.seed)
            density = (sum(int(v.sum()) for v in m.values()) / sum(v.numel() for v in m.values())) if m else 1.0
            note = (", ".join(f"{n}: {k} of {masks[n].shape[0]} rows empty" for n, k in empty.items())
                    if m is masks else "")
            rows.append(f"| {name} | {density:.2f} | {acc:.3f} | {note} |")
            print(f"{name}: acc {acc:.3f} ({time.time() - start:.0f}s)", flush=True)
    print(f"\ncentral training, {args.steps} Adam steps of batch {args.batch_size}, masks fixed\n")
    print("| mask | density | test acc | classifier rows |\n|---|---|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()

"""2. Local-epoch time: a physically compact model against dense training, with and without the mask."""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from autoflip_strategy.geometry import Layout
from autoflip_strategy.compact import compact_model
from autoflip_strategy.costs import training_flops_per_example
from autoflip_strategy.enforce import enforce_mask
from autoflip_strategy.masks import compute_hybrid_mask
from autoflip_task.training import train_epochs
from benchmarks.savings.common import (
    LR,
    MODEL_LABELS,
    MODELS,
    SEED,
    Settings,
    fmt,
    md_table,
    random_scores,
    subject,
)


def one_epoch(model: nn.Module, masks: Mapping[str, torch.Tensor] | None, x: torch.Tensor,
              y: torch.Tensor, batch: int, seed: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one local epoch, mask enforcement included."""
    torch.manual_seed(seed)  # the same batch order for every variant of one repetition
    wall, cpu = time.perf_counter(), time.process_time()
    with enforce_mask(model, masks) if masks is not None else contextlib.nullcontext():
        train_epochs(model, x, y, epochs=1, batch_size=batch, lr=LR)
    return time.perf_counter() - wall, time.process_time() - cpu


VARIANTS = ("dense", "dense_masked", "compact", "compact_no_enforce")
NOISY_CPU_SHARE = 0.9  # below this, other processes took the CPU for over 10 % of the timed epochs


def timing_rows(settings: Settings) -> list[dict[str, Any]]:
    rows = []
    for name in settings.timing_models:
        sub = subject(name)
        shape, classes = MODELS[name]
        gen = torch.Generator().manual_seed(SEED)
        x = torch.randn((settings.examples, *shape), generator=gen)
        y = torch.randint(0, classes, (settings.examples,), generator=gen)
        dense_flops = training_flops_per_example(copy.deepcopy(sub.model), sub.example)
        scores = random_scores(sub.structure)
        for structured in settings.timing_structured:
            mask = compute_hybrid_mask(scores, sub.structure, 0.0, structured)  # unstructured part: none
            layout = Layout.build(sub.structure, mask)
            compact = compact_model(sub.model, layout.kept)
            compact_flops = training_flops_per_example(copy.deepcopy(compact), sub.example)
            params = dict(sub.model.named_parameters())
            global_masks = {n: m for n, m in layout.tensor_masks.items() if n in params}
            runs = {  # every variant trains its own copy
                "dense": (copy.deepcopy(sub.model), None),
                "dense_masked": (copy.deepcopy(sub.model), global_masks),
                "compact": (copy.deepcopy(compact), layout.compact_masks),
                "compact_no_enforce": (copy.deepcopy(compact), None),
            }
            wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
            cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for rep in range(settings.warmup + settings.reps):
                for i in range(len(VARIANTS)):
                    variant = VARIANTS[(rep + i) % len(VARIANTS)]
                    model, masks = runs[variant]
                    w, c = one_epoch(model, masks, x, y, settings.batch, seed=rep)
                    if rep >= settings.warmup:
                        wall[variant].append(w)
                        cpu[variant].append(c)
            med = {v: statistics.median(wall[v]) for v in VARIANTS}
            med_cpu = {v: statistics.median(cpu[v]) for v in VARIANTS}
            ratio = compact_flops / dense_flops
            speedup = med["dense"] / med["compact"]
            rows.append({
                "model": name, "structured": structured, "unstructured": 0.0,
                "examples": settings.examples, "batch": settings.batch, "threads": settings.threads,
                "reps": settings.reps, "warmup": settings.warmup,
                "seconds": med, "cpu_seconds": med_cpu, "wall_samples": wall, "cpu_samples": cpu,
                "dense_flops_per_example": dense_flops, "compact_flops_per_example": compact_flops,
                "flops_ratio": ratio, "speedup": speedup, "realised_fraction": speedup * ratio,
                "cpu_speedup": med_cpu["dense"] / med_cpu["compact"],
                "cpu_realised_fraction": med_cpu["dense"] / med_cpu["compact"] * ratio,
                "min_speedup": min(wall["dense"]) / min(wall["compact"]),
                # share of the wall-clock time that the process was computing: ~1 on an idle host
                # with one thread, lower when other processes took the CPU away
                "cpu_share": sum(map(sum, cpu.values())) / sum(map(sum, wall.values())),
                "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                "dense_masked_speedup": med["dense"] / med["dense_masked"],
                "cpu_dense_masked_speedup": med_cpu["dense"] / med_cpu["dense_masked"],
                "enforce_overhead": med["compact"] / med["compact_no_enforce"] - 1.0,
                "cpu_enforce_overhead": med_cpu["compact"] / med_cpu["compact_no_enforce"] - 1.0,
            })
    return rows


def timing_markdown(rows: list[dict[str, Any]]) -> str:
    header = ["model", "structured", "dense s/epoch", "dense-masked s/epoch", "compact s/epoch",
              "speedup (dense/compact)", "CPU s/epoch dense / compact", "CPU-time speedup",
              "FLOPs ratio (compact/dense)", "ideal speedup (1/ratio)", "realised fraction wall / CPU",
              "dense-masked speedup (CPU)", "enforce overhead (CPU)", "CPU share"]
    out = [[MODEL_LABELS[r["model"]], f"{r['structured']:g}", fmt(r["seconds"]["dense"]),
            fmt(r["seconds"]["dense_masked"]), fmt(r["seconds"]["compact"]), f"{r['speedup']:.2f}x",
            f"{fmt(r['cpu_seconds']['dense'])} / {fmt(r['cpu_seconds']['compact'])}", f"{r['cpu_speedup']:.2f}x",
            fmt(r["flops_ratio"]), f"{1 / r['flops_ratio']:.2f}x",
            f"{100 * r['realised_fraction']:.0f} % / {100 * r['cpu_realised_fraction']:.0f} %",
            f"{r['cpu_dense_masked_speedup']:.2f}x", f"{100 * r['cpu_enforce_overhead']:+.1f} %",
            f"{r['cpu_share']:.2f}" + (" ⚠" if r["cpu_share"] < NOISY_CPU_SHARE else "")] for r in rows]
    return md_table(header, out)


def acceptance(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's target: structured 0.5 makes a CNN local epoch ≥ 1.8x faster than dense."""
    for r in rows:
        if r["model"] == "cnn" and abs(r["structured"] - 0.5) < 1e-9:
            return {"target": 1.8, "speedup": r["speedup"], "met": r["speedup"] >= 1.8,
                    "cpu_speedup": r["cpu_speedup"], "cpu_share": r["cpu_share"]}
    return {"target": 1.8, "speedup": None, "met": None, "cpu_speedup": None, "cpu_share": None}


def section(results: dict[str, Any]) -> str:
    """This benchmark's part of savings.md: heading, method, table, checks."""
    m, s = results["machine"], results["settings"]
    acc = results["acceptance"]
    verdict = ("met" if acc["met"] else "NOT met") if acc["met"] is not None else "not measured"
    parts = [
        "### 2. Local-epoch time: compact vs dense",
        "",
        f"One epoch = `train_epochs` (Adam lr {LR}, forward, backward, step) over {s['examples']} random "
        f"examples in batches of {s['batch']}, inside `enforce_mask`; unstructured sparsity 0. "
        f"{s['threads']} torch thread(s), {s['warmup']} warm-up + {s['reps']} repetitions, variants interleaved "
        "in rotating order; medians of wall-clock time, and of process CPU time. Realised fraction = "
        "speedup × FLOPs ratio (1 = the FLOPs saving fully realised). Dense-masked: the global model with "
        "the same mask enforced (what masking-only FL pruning trains). Enforce overhead: compact with vs "
        "without `enforce_mask`. CPU share = CPU time / wall time over the row's timed epochs: about 1 "
        f"on an idle host with one thread; below {NOISY_CPU_SHARE} (⚠) other processes took the CPU away "
        f"(this host has {m['usable_cpus']} CPU(s) shared with other work), the wall-clock columns are "
        "then inflated and noisy, and the CPU-time columns are the better estimate.",
        "",
        timing_markdown(results["timing"]),
        "",
        f"Target (structured 0.5 ⇒ CNN local epoch ≥ {acc['target']}x faster than dense, wall clock): "
        f"**{verdict}**"
        + (f" ({acc['speedup']:.2f}x wall clock, {acc['cpu_speedup']:.2f}x CPU time, "
           f"CPU share {acc['cpu_share']:.2f})." if acc["speedup"] is not None else "."),
        "",
    ]
    return "\n".join(parts)

"""What the savings benchmarks share: the models measured, a fixed θ₀ per model, and table formatting."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autoflip_strategy.geometry import Layout
from autoflip_strategy.structure import ModelStructure, discover_structure
from autoflip_task.models import build_model, example_input
from benchmarks.settings import CONF, load_profile

# name -> (shape of one example, classes or vocabulary)
MODELS: dict[str, tuple[tuple[int, ...], int]] = {
    "cnn": ((1, 28, 28), 10),     # MNIST / Fashion-MNIST
    "resnet": ((3, 32, 32), 10),  # CIFAR-10
    "lstm": ((80,), 65),          # tinyshakespeare characters, LEAF's 80-character windows
}
MODEL_LABELS = {"cnn": "CNN (1x28x28)", "resnet": "ResNet (3x32x32)", "lstm": "CharLSTM (65, len 80)"}
SEED = 0
LR = 0.003  # the app's default Adam learning rate


SETTINGS_FILE = CONF / "savings.toml"


@dataclass(frozen=True)
class Settings:
    """One run's settings; the values live in ``benchmarks/conf/savings.toml``."""

    densities: tuple[float, ...]
    hybrid_structured: float
    timing_models: tuple[str, ...]
    timing_structured: tuple[float, ...]
    examples: int  # one client's local data: MNIST's 60 000 over 100 clients (FedAvg)
    batch: int  # the app's default batch-size
    warmup: int
    reps: int
    threads: int  # Flower's simulation gives every client one CPU (client-resources-num-cpus=1)
    codec_reps: int
    explorers: int
    explore_examples: int
    explore_epochs: int
    precision_models: tuple[str, ...]
    precision_densities: tuple[float, ...]
    precision_modes: tuple[str, ...]

    @classmethod
    def load(cls, profile: str, path: Path = SETTINGS_FILE, **overrides: Any) -> Settings:
        """A profile (``full`` or ``quick``) of the settings file, with ``overrides`` on top."""
        return load_profile(cls, path, profile, **overrides)


# ------------------------------------------------------------------- helpers
@dataclass
class Subject:
    """One architecture, its structure and a fixed θ₀."""

    name: str
    model: nn.Module
    example: torch.Tensor
    structure: ModelStructure


_SUBJECTS: dict[str, Subject] = {}


def subject(name: str) -> Subject:
    if name not in _SUBJECTS:
        shape, classes = MODELS[name]
        torch.manual_seed(SEED)
        model = build_model(name, shape, classes)
        example = example_input(shape, classes)
        _SUBJECTS[name] = Subject(name, model, example, discover_structure(model, example))
    return _SUBJECTS[name]


def random_scores(structure: ModelStructure, seed: int = SEED) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(structure.shapes[n], generator=gen) for n in structure.prunable}


def float_state(model: nn.Module, structure: ModelStructure) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items() if n in structure.shapes}


def masked_compact_state(model: nn.Module, layout: Layout) -> dict[str, torch.Tensor]:
    """The compact state a client would send: removed units cut out, pruned weights zero."""
    compact = layout.to_compact(float_state(model, layout.structure))
    for name, m in layout.compact_masks.items():
        compact[name] = compact[name] * m
    return compact


def states_equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


def median_seconds(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    """Median wall-clock seconds of ``fn`` over ``reps`` calls, after one warm-up call."""
    result = fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def fmt_bytes(n: float) -> str:
    return f"{int(n):,}"


def fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_facts(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import flwr

    return {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }



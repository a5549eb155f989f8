"""Atomic, code-free checkpoints of the strategy's state.

Written with ``torch.save`` (tensors, dicts, lists, strings, numbers only) via
a temporary file and ``os.replace``, so a crash mid-write leaves the previous
checkpoint intact; read with ``torch.load(weights_only=True)``, which refuses
to unpickle code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(Path(path), weights_only=True)

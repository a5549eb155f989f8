"""Atomic, code-free checkpoints of the strategy's state.

Written with ``torch.save`` (tensors, dicts, lists, strings, numbers only) via
a temporary file and ``os.replace``, so a crash mid-write leaves the previous
checkpoint intact; read with ``torch.load(weights_only=True)``, which refuses
to unpickle code.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (empty, cut off, not a checkpoint) or does not fit the run."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A checkpoint that holds pickled code, which ``weights_only`` loading refuses to run."""


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _gist(exc: BaseException) -> str:
    """The exception's type and first sentence (torch's messages run to a paragraph)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text.split(". ")[0][:120]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's payload; an unreadable file is a one-line :class:`CheckpointError` naming it.

    Why: torch reports an empty file as a bare ``EOFError`` and a cut-off one as a
    zip-reader ``RuntimeError``; neither says which file or what to do."""
    path = Path(path)
    advice = "delete it to start over, or use another run-name"
    try:
        payload = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            raise UnsafeCheckpointError(f"checkpoint {path} holds objects other than tensors and plain data, "
                                        f"which are never loaded ({_gist(exc)})") from exc
        raise CheckpointError(f"checkpoint {path} is corrupt ({_gist(exc)}); {advice}") from exc
    except Exception as exc:  # EOFError, RuntimeError (zip reader), IndexError, OSError, ...
        what = "is empty" if path.is_file() and path.stat().st_size == 0 else f"is corrupt ({_gist(exc)})"
        raise CheckpointError(f"checkpoint {path} {what}; {advice}") from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(payload).__name__}, not a checkpoint; {advice}")
    return payload

"""Atomic, code-free checkpoints of the strategy's state (:class:`StrategyState`).

Written with ``torch.save`` (tensors, dicts, lists, strings, numbers only) via
a temporary file and ``os.replace``, so a crash mid-write leaves the previous
checkpoint intact; read with ``torch.load(weights_only=True)``, which refuses
to unpickle code.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .config import RESUME_NEUTRAL, AutoFLIPConfig, recorded_config
from .masks import HybridMask


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


STRATEGY_KEYS = ("round", "config", "state", "mask_units", "mask_weights", "mask_version", "scores", "history")


@dataclass(frozen=True)
class StrategyState:
    """Everything the strategy needs to continue after ``round`` (tensors and JSON only on disk)."""

    round: int
    config: AutoFLIPConfig
    state: dict[str, torch.Tensor]
    mask: HybridMask
    mask_version: int
    scores: dict[str, torch.Tensor] | None
    history: list[dict[str, Any]]

    def payload(self) -> dict[str, Any]:
        return {"round": self.round, "config": json.dumps(asdict(self.config), sort_keys=True), "state": self.state,
                "mask_units": self.mask.units, "mask_weights": self.mask.weights, "mask_version": self.mask_version,
                "scores": self.scores if self.scores is not None else {}, "history": json.dumps(self.history)}


def restore_strategy_state(payload: Mapping[str, Any], config: AutoFLIPConfig,
                           shapes: Mapping[str, tuple[int, ...]]) -> StrategyState:
    """A :meth:`StrategyState.payload` read back for a run under ``config`` with tensors ``shapes``.

    Refuses (one :class:`CheckpointError` listing every difference) a checkpoint written under other
    settings (except :data:`~.config.RESUME_NEUTRAL` ones) or for a model with other tensor names or shapes."""
    lacks = sorted(set(STRATEGY_KEYS) - set(payload))
    if lacks:
        raise CheckpointError(f"checkpoint lacks {lacks}: not written by this strategy")
    try:
        saved = asdict(recorded_config(json.loads(payload["config"])))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint settings are unreadable: {exc}") from None
    mine = asdict(config)
    differs = [f"{k}: {saved.get(k)!r} -> {mine[k]!r}" for k in sorted(mine)
               if k not in RESUME_NEUTRAL and saved.get(k) != mine[k]]
    state = payload["state"]
    differs += [f"tensor {n}: only in the checkpoint" for n in sorted(set(state) - set(shapes))]
    differs += [f"tensor {n}: not in the checkpoint" for n in sorted(set(shapes) - set(state))]
    differs += [f"tensor {n}: shape {tuple(state[n].shape)} -> {tuple(shapes[n])}" for n in sorted(shapes)
                if n in state and tuple(state[n].shape) != tuple(shapes[n])]
    if differs:
        raise CheckpointError("checkpoint does not fit this run (checkpoint -> now): " + "; ".join(differs))
    return StrategyState(int(payload["round"]), config, {n: t.float() for n, t in state.items()},
                         HybridMask(dict(payload["mask_units"]), dict(payload["mask_weights"])),
                         int(payload["mask_version"]), dict(payload["scores"]) or None,
                         json.loads(payload["history"]))

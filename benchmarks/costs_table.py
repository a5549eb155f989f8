"""The suite's cost breakdown: pure functions on the ``rounds`` lists of results.json.

Round 0 is the one-off stage (AutoFLIP's exploration; for methods without one it still exists, at little
or no cost), rounds 1..R the training rounds, each with ``cum_*`` running totals from round 0 on. Bytes
are what the messages carried, down + up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

Rounds = Sequence[dict[str, Any]]


def round_mb(record: dict[str, Any]) -> float:
    """One round's traffic, down + up, in MB."""
    return (record["bytes_down"] + record["bytes_up"]) / 1e6


def one_off_mb(rounds: Rounds) -> float:
    """The one-off stage's traffic (round 0), in MB; 0 when the run has no round 0."""
    return sum(round_mb(r) for r in rounds if r["round"] == 0)


def per_round_mb(rounds: Rounds) -> float:
    """Mean traffic of the training rounds (1..R), in MB; NaN without any."""
    per = [round_mb(r) for r in rounds if r["round"] >= 1]
    return float(np.mean(per)) if per else math.nan


def cumulative_bytes(runs: Sequence[Rounds]) -> np.ndarray:
    """Cumulative bytes (down + up) after each round 0, 1, ..., mean over ``runs`` (seeds) round by round,
    up to the round the shortest run reached."""
    length = min(len(r) for r in runs)
    return np.mean([[x["cum_bytes_down"] + x["cum_bytes_up"] for x in r[:length]] for r in runs], axis=0)


def break_even(runs: Sequence[Rounds], reference: Sequence[Rounds]) -> int | None:
    """The first round r >= 0 from which on the cumulative bytes of ``runs`` stay at most those of
    ``reference`` (both averaged over their seeds round by round) through the last round both have; 0 when
    they never exceed it, None when they are above it at that last round."""
    ours, theirs = cumulative_bytes(runs), cumulative_bytes(reference)
    length = min(len(ours), len(theirs))
    below = ours[:length] <= theirs[:length]
    stays = np.flip(np.logical_and.accumulate(np.flip(below)))  # below at r and at every later round
    hits = np.flatnonzero(stays)
    return int(hits[0]) if hits.size else None


def mean_churn(rounds: Rounds, first: int = 2) -> float | None:
    """Mean ``mask_churn`` (fraction of prunable weights that switched) over rounds ``first``..R.

    None: the run predates the field; NaN: no mask was recomputed in those rounds (FedAvg, a fixed mask)."""
    if not any("mask_churn" in r for r in rounds):
        return None
    values = [r["mask_churn"] for r in rounds if r["round"] >= first and r.get("mask_churn") is not None]
    return float(np.mean(values)) if values else math.nan


def mean_churn_over_seeds(runs: Sequence[Rounds], first: int = 2) -> float | None:
    """:func:`mean_churn` averaged over the seeds that have the field (None: none has it)."""
    found = [c for c in (mean_churn(r, first) for r in runs) if c is not None]
    if not found:
        return None
    known = [c for c in found if not math.isnan(c)]
    return float(np.mean(known)) if known else math.nan


def break_even_cell(runs: Sequence[Rounds], reference: Sequence[Rounds] | None) -> int | str:
    """:func:`break_even` for the table and csv: the round, "never", or "" (no reference runs)."""
    if not reference:
        return ""
    found = break_even(runs, reference)
    return "never" if found is None else found


def churn_text(value: float | None) -> str:
    """Mean mask churn for the table: "–" (runs predate the field), "n/a" (no mask recomputed), else the fraction."""
    if value is None:
        return "–"
    return "n/a" if math.isnan(value) else f"{value:.4f}"

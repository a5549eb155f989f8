"""The round ledger: one typed record per round, and the failed-round streak.

The strategy fills a :class:`RoundRecord` while a round runs (bytes and FLOPs as they are spent,
who was sampled, who replied, every failure with its reason) and closes it into the plain dict that
``history``, ``results.json`` and ``on_round`` see (:meth:`RoundRecord.close`, which adds the round's
outcome and the running totals). :class:`FailedRounds` turns rounds without an accepted reply into
:class:`~.failures.RunFailed` after ``max-failed-rounds`` of them in a row.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from logging import ERROR, WARNING
from typing import Any

from flwr.app import MetricRecord
from flwr.common.logger import log

from . import protocol as P
from .failures import RunFailed, condense, most_common_error, with_hint
from .masks import MaskChurn

CUMULATIVE = ("bytes_down", "bytes_up", "analytic_bytes_down", "analytic_bytes_up", "train_flops",
              "client_train_seconds")  # each gets a cum_* running total in the closed record
FAILURE_LISTS = ("dropped", "rejected", "eval_dropped", "eval_rejected")
CHURN = ("mask_churn_weights", "mask_churn_units", "mask_churn")  # always in the closed record, None or counts


def plus(total: int | float | None, per_unit: int | float | None, count: int) -> int | float | None:
    """total + per_unit * count, where an unknown (None) term makes the sum unknown, never wrong."""
    return None if total is None or per_unit is None else total + per_unit * count


@dataclass
class RoundRecord:
    """What happened in one round (round 0: exploration or the initial model), as it happens."""

    round: int
    phase: str  # "explore", "init" or "train"
    bytes_down: int = 0  # realised: the arrays' bytes in the messages
    bytes_up: int = 0
    analytic_bytes_down: int = 0  # b bits per value sent (costs.py, geometry.Layout.analytic_bytes)
    analytic_bytes_up: int = 0
    train_flops: int | None = 0  # None: the model's FLOPs cannot be counted
    client_train_seconds: float = 0.0
    masks_sent: int = 0
    sampled: list[int] = field(default_factory=list)  # partition ids
    replied: list[int] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)  # {partition, node, reason}
    rejected: list[dict[str, Any]] = field(default_factory=list)
    eval_dropped: list[dict[str, Any]] = field(default_factory=list)
    eval_rejected: list[dict[str, Any]] = field(default_factory=list)
    partition_refused: list[dict[str, Any]] | None = None  # once sampling has asked nodes for partitions
    absent: list[dict[str, Any]] | None = None  # absent nodes (nodes.py), once sampling or replies looked
    empty_output_rows: int | None = None  # classifier rows with no kept input (methods that prune)
    # Against the mask in force before, when this round recomputed the mask: 0 when it came out the same.
    # None: no mask recomputed (a fixed mask after its first round, a method that never prunes) or the
    # first mask (nothing was pruned before it; its cost shows in density instead).
    mask_churn_weights: int | None = None  # prunable weights that switched kept <-> pruned
    mask_churn_units: int | None = None  # units that switched kept <-> removed
    mask_churn: float | None = None  # mask_churn_weights / prunable weights
    failed: bool = False  # no sampled client's reply was accepted
    # working state, never in the closed record
    filing: str = ""  # prefix of the failure lists ("" train/explore, "eval_" client evaluation)
    train_aggregated: bool = False
    federated: MetricRecord | None = None  # client evaluation's aggregate, for the closed record
    closed: dict[str, Any] | None = None
    started: float = field(default_factory=time.perf_counter)

    def refused(self, refusals: list[dict[str, Any]]) -> None:
        """Partition-handshake refusals (nodes.py) of this round."""
        self.partition_refused = (self.partition_refused or []) + list(refusals)

    def note_failure(self, kind: str, node: int, partition: int, reason: str) -> None:
        """A dropped (no or error reply) or rejected (invalid) reply, logged and filed under the round."""
        reason = condense(reason)  # a client's traceback (Ray names its pid) becomes its root exception line
        what = f"{self.filing}{'dropped' if kind == 'dropped' else 'rejected'}"
        log(WARNING, "%s reply from node %d (partition %d): %s", what.replace("_", " "), node, partition, reason)
        getattr(self, what).append({"partition": partition, "node": node, "reason": reason})

    def churned(self, churn: MaskChurn) -> None:
        """This round's mask recomputation against the mask in force before (masks.mask_churn)."""
        self.mask_churn_weights, self.mask_churn_units, self.mask_churn = churn.weights, churn.units, churn.fraction

    def failures(self, prefix: str = "") -> list[dict[str, Any]]:
        return getattr(self, f"{prefix}dropped") + getattr(self, f"{prefix}rejected")

    def metrics(self, density: float, mask_version: int) -> dict[str, float | int]:
        """What AutoFLIP adds to Flower's per-round MetricRecords (and so to the returned Result)."""
        metrics = {"density": density, "mask_version": mask_version, "bytes_down": self.bytes_down,
                   "bytes_up": self.bytes_up, "train_flops": self.train_flops, "mask_churn": self.mask_churn}
        return {k: v for k, v in metrics.items() if v is not None}  # unknown FLOPs, no recomputed mask: absent

    def close(self, previous: Mapping[str, Any], density: float, mask_version: int,
              evaluation: MetricRecord | None) -> dict[str, Any]:
        """The record for ``history``: the round's counts, its outcome and the running totals after it
        (``previous``: the last closed record, empty before the first)."""
        record: dict[str, Any] = {
            "round": self.round, "phase": self.phase, "bytes_down": self.bytes_down, "bytes_up": self.bytes_up,
            "analytic_bytes_down": self.analytic_bytes_down, "analytic_bytes_up": self.analytic_bytes_up,
            "train_flops": self.train_flops, "client_train_seconds": self.client_train_seconds,
            "masks_sent": self.masks_sent, "sampled": self.sampled, "replied": self.replied,
            **{k: getattr(self, k) for k in FAILURE_LISTS}, **{k: getattr(self, k) for k in CHURN}}
        for key in ("partition_refused", "absent", "empty_output_rows"):
            if getattr(self, key) is not None:
                record[key] = getattr(self, key)
        if self.failed:
            record["failed"] = True
        record["seconds"] = time.perf_counter() - self.started
        record["density"] = density
        record["mask_version"] = mask_version
        record["accuracy"] = float(evaluation["accuracy"]) if evaluation and "accuracy" in evaluation else None
        record["loss"] = float(evaluation["loss"]) if evaluation and "loss" in evaluation else None
        if self.federated is not None:
            for ours, theirs in (("client_accuracy", P.EVAL_ACC), ("client_loss", P.EVAL_LOSS)):
                if theirs in self.federated:
                    record[ours] = float(self.federated[theirs])
        for key in CUMULATIVE:
            record[f"cum_{key}"] = plus(previous.get(f"cum_{key}", 0), record[key], 1)
        self.closed = record
        return record


class FailedRounds:
    """No silent success: counts rounds in a row in which no sampled client's reply was accepted."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.count = 0
        self.reasons: list[str] = []  # failure reasons of the current run of failed rounds

    def observe(self, record: RoundRecord, accepted: int, close: Callable[[], object]) -> None:
        """Count ``record``'s round; after ``maximum`` failed rounds in a row, ``close`` it and raise
        :class:`RunFailed` with the most common error."""
        if accepted or not record.sampled:
            self.count, self.reasons = 0, []
            return
        self.count += 1
        self.reasons += [f["reason"] for f in record.failures()] or ["no reply"]
        record.failed = True
        reason = with_hint(most_common_error(self.reasons))
        log(ERROR, "Round %d failed: no sampled client's reply was accepted (%d failed round(s) in a row, "
            "max-failed-rounds=%d): %s", record.round, self.count, self.maximum, reason)
        if self.count >= self.maximum:
            close()
            raise RunFailed(f"{self.count} rounds in a row without an accepted client reply; most common "
                            f"error: {reason}", record.round)

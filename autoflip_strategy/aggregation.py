"""Checking client replies and averaging the accepted ones.

Every reply the strategy reads passes one validator here: :func:`validate_train_reply`
(training), :func:`validate_explore_reply` (exploration's guidance matrices) and
:func:`validate_eval_reply` (client evaluation), after :func:`normalised_reply` has put the example
count under AutoFLIP's key. Each turns every kind of bad input (missing records, absurd example counts,
a stale mask, anything the codec rejects) into a :class:`RejectedReply` with a reason the strategy
logs. :class:`WeightedAverage` is the one weighted mean of the library (training replies, exploration's
guidance, the guidance refresh's update statistics): streamed in float64, so hundreds of clients need no
more memory than one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from . import protocol as P
from .codec import CodecError, decode_guidance, decode_state
from .geometry import Layout
from .structure import ModelStructure


MAX_TRAIN_SECONDS = 1e7  # ~4 months: any larger claimed training time is not plausible


class RejectedReply(ValueError):
    """A client reply that must not reach the global model."""


@dataclass(frozen=True)
class TrainReply:
    state: dict[str, torch.Tensor]  # global layout, float32
    num_examples: int
    loss: float
    seconds: float


def example_count(metrics: MetricRecord, max_examples: int) -> int:
    """The reply's example count, if it is a plausible positive integer."""
    n = metrics.get(P.NUM_EXAMPLES)
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if not isinstance(n, int) or isinstance(n, bool):
        raise RejectedReply(f"{P.NUM_EXAMPLES} must be an integer, got {n!r}")
    if not 0 < n <= max_examples:
        raise RejectedReply(f"{P.NUM_EXAMPLES}={n} is outside (0, {max_examples}]")
    return n


def finite_metric(metrics: MetricRecord, key: str) -> float:
    """A numeric metric (0 when absent); NaN and non-numbers are rejected."""
    value = metrics.get(key, 0.0)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise RejectedReply(f"{key} must be a finite number, got {value!r}")
    return float(value)


def bounded_metric(metrics: MetricRecord, key: str, low: float, high: float) -> float:
    """A finite metric (0 when absent) inside ``[low, high]``.

    Why: a finite but absurd value (``train-seconds=-1e12``) would still poison
    the round's cost accounting, so plausibility is checked as well.
    """
    value = finite_metric(metrics, key)
    if not low <= value <= high:
        raise RejectedReply(f"{key}={value!r} is outside [{low:g}, {high:g}]")
    return value


def train_seconds(metrics: MetricRecord) -> float:
    """A reply's training time: finite, non-negative and below :data:`MAX_TRAIN_SECONDS`."""
    return bounded_metric(metrics, P.TRAIN_SECONDS, 0.0, MAX_TRAIN_SECONDS)


def validate_train_reply(content: RecordDict, layout: Layout, mask_version: int, transport: str,
                         max_examples: int, max_bytes: int, precision: str = "float32") -> TrainReply:
    """Decode one training reply into the global layout, or raise :class:`RejectedReply`."""
    arrays, metrics = content.get(P.ARRAYS), content.get(P.METRICS)
    if not isinstance(arrays, ArrayRecord) or not isinstance(metrics, MetricRecord):
        raise RejectedReply(f"reply needs an ArrayRecord {P.ARRAYS!r} and a MetricRecord {P.METRICS!r}")
    n = example_count(metrics, max_examples)
    if metrics.get(P.MASK_VERSION) != mask_version:
        raise RejectedReply(f"trained under mask version {metrics.get(P.MASK_VERSION)!r}, expected {mask_version}")
    try:
        compact = decode_state(arrays, layout, transport, max_bytes, precision)
    except CodecError as exc:
        raise RejectedReply(str(exc)) from None
    return TrainReply(layout.to_global(compact), n, finite_metric(metrics, P.TRAIN_LOSS), train_seconds(metrics))


@dataclass(frozen=True)
class ExploreReply:
    matrix: dict[str, torch.Tensor]  # one non-negative matrix per prunable weight
    num_examples: int
    epochs: int
    seconds: float


def validate_explore_reply(content: RecordDict, structure: ModelStructure, precision: str, max_examples: int,
                           max_bytes: int, max_epochs: int) -> ExploreReply:
    """Decode one explorer's reply (its guidance matrix and metrics), or raise :class:`RejectedReply`."""
    guidance, metrics = content.get(P.GUIDANCE), content.get(P.METRICS)
    if not isinstance(guidance, ArrayRecord) or not isinstance(metrics, MetricRecord):
        raise RejectedReply("exploration reply needs 'guidance' and 'metrics' records")
    n = example_count(metrics, max_examples)
    try:
        matrix = decode_guidance(guidance, structure, precision, max_bytes=max_bytes)
    except CodecError as exc:
        raise RejectedReply(str(exc)) from None
    epochs = metrics.get(P.EPOCHS_RUN, max_epochs)
    if not isinstance(epochs, int) or not 1 <= epochs <= max_epochs:
        raise RejectedReply(f"{P.EPOCHS_RUN}={epochs!r} is outside [1, {max_epochs}]")
    return ExploreReply(matrix, n, epochs, train_seconds(metrics))


def normalised_reply(content: RecordDict, weighted_by_key: str) -> tuple[RecordDict, MetricRecord]:
    """The reply with its example count under AutoFLIP's key (FedAvg's ``weighted_by_key`` may differ)."""
    metrics = content.get(P.METRICS)
    if not isinstance(metrics, MetricRecord):
        records = list(content.metric_records.values())
        metrics = records[0] if len(records) == 1 else None
    if not isinstance(metrics, MetricRecord):
        raise RejectedReply(f"reply needs one MetricRecord (under {P.METRICS!r})")
    if weighted_by_key != P.NUM_EXAMPLES and weighted_by_key in metrics:
        metrics = MetricRecord({**dict(metrics), P.NUM_EXAMPLES: metrics[weighted_by_key]})
    out = RecordDict({P.METRICS: metrics})
    if isinstance(arrays := content.get(P.ARRAYS), ArrayRecord):
        out[P.ARRAYS] = arrays
    elif len(content.array_records) == 1:
        out[P.ARRAYS] = next(iter(content.array_records.values()))
    return out, metrics


def validate_eval_reply(content: RecordDict, weighted_by_key: str, max_examples: int) -> MetricRecord:
    """A client evaluation's metrics for the user's aggregation: a plausible example count, every metric
    finite; AutoFLIP's own example-count key is left out unless it is ``weighted_by_key``."""
    _, metrics = normalised_reply(content, weighted_by_key)
    example_count(metrics, max_examples)
    for key in metrics:
        finite_metric(metrics, key)
    return MetricRecord({k: v for k, v in metrics.items() if k != P.NUM_EXAMPLES or k == weighted_by_key})


class WeightedAverage:
    """Streams Σ w·x / Σ w over state dicts, in float64."""

    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] = {}
        self.weight = 0.0
        self.count = 0

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        for name, t in state.items():
            acc = self._sum.get(name)
            if acc is None:
                acc = self._sum[name] = torch.zeros(t.shape, dtype=torch.float64)
            acc.add_(t.double(), alpha=weight)
        self.weight += weight
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        if not self.count or self.weight <= 0:
            raise ValueError("nothing to average")
        return {n: (t / self.weight).float() for n, t in self._sum.items()}

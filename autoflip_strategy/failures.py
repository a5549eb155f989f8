"""No silent success: a run whose sampled clients all fail, round after round, fails.

A round in which no sampled client's reply was accepted leaves the model as it
was; if that happens ``max-failed-rounds`` times in a row the run cannot be
making progress, so the strategy raises :class:`RunFailed` (whose ``reason``
names the most common client error) instead of reporting a completed run with
an untrained model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable


class RunFailed(RuntimeError):
    """The run stopped because ``max-failed-rounds`` rounds in a row had no accepted reply."""

    def __init__(self, reason: str, server_round: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.server_round = server_round


def most_common_error(reasons: Iterable[str]) -> str:
    """The reason seen most often (ties: the first seen), or a note that there was none."""
    counts = Counter(r for r in reasons if r)
    if not counts:
        return "no client replied"
    reason, n = counts.most_common(1)[0]
    total = sum(counts.values())
    return reason if n == total else f"{reason} ({n} of {total} failures)"


HINTS: tuple[tuple[str, str], ...] = (
    ("No query function registered", "the ClientApp lacks AutoFLIP's handlers: call "
     "AutoFLIPClient(model_fn, train_fn, evaluate_fn).register(app) on it"),
    ("No evaluate function registered", "the ClientApp has no evaluate handler: pass evaluate_fn to "
     "AutoFLIPClient or set fraction_evaluate=0.0 on the strategy"),
    ("No train function registered", "the ClientApp lacks AutoFLIP's handlers: call "
     "AutoFLIPClient(model_fn, train_fn, evaluate_fn).register(app) on it"),
)


def with_hint(reason: str) -> str:
    """The reason, plus the fix where the error is one AutoFLIP knows (e.g. a ClientApp without its handlers)."""
    for signature, fix in HINTS:
        if signature in reason:
            return f"{reason} (fix: {fix})"
    return reason

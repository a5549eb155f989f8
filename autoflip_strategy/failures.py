"""No silent success: a run whose sampled clients all fail, round after round, fails.

A round in which no sampled client's reply was accepted leaves the model as it
was; if that happens ``max-failed-rounds`` times in a row the run cannot be
making progress, so the strategy raises :class:`RunFailed` (whose ``reason``
names the most common client error) instead of reporting a completed run with
an untrained model.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED = re.compile(r"^\s*((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Failed|Exit)\w*): (\S.*)$")
_PROCESS_NOISE = re.compile(r"\((?:pid|actor_id|ip)=[^)]*\)|0x[0-9a-f]+")
MAX_REASON_CHARS = 700


class RunFailed(RuntimeError):
    """The run stopped because ``max-failed-rounds`` rounds in a row had no accepted reply."""

    def __init__(self, reason: str, server_round: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.server_round = server_round


def _capped(text: str) -> str:
    """Head and tail of a long message (the fix is often at its end, e.g. a state_dict's unexpected keys)."""
    text = " ".join(text.split())
    if len(text) <= MAX_REASON_CHARS:
        return text
    head = MAX_REASON_CHARS * 2 // 5
    return f"{text[:head]} ... {text[-(MAX_REASON_CHARS - head):]}"


def condense(reason: str) -> str:
    """One line per cause: a traceback (e.g. Ray's, which names the actor's pid) becomes its root exception
    and message, so the same client error from different processes counts as one error."""
    text = _ANSI.sub("", reason).strip()
    prefix = "client error: " if text.startswith("client error: ") else ""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if m := _RAISED.match(line):
            message = [m.group(2)]
            for more in lines[i + 1:]:  # a message can span lines (e.g. missing and unexpected keys)
                if not more.strip() or more.startswith(("The above exception", "During handling", "Traceback")):
                    break
                message.append(more)
            return f"{prefix}{m.group(1).rsplit('.', 1)[-1]}: {_capped(' '.join(message))}"
    return _capped(_PROCESS_NOISE.sub("", text))


def most_common_error(reasons: Iterable[str]) -> str:
    """The reason seen most often, condensed (ties: the first seen), or a note that there was none."""
    counts = Counter(condense(r) for r in reasons if r)
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

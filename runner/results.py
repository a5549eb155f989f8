"""An app's results files: finding the one a run wrote, and judging whether the run completed.

The convention every launcher relies on: the ServerApp writes
``<output-dir>/<run folder>/results.json`` with a ``status`` that ends as ``"completed"``
(or ``"failed"`` with a ``reason``); see ``server_app/app.py``. ``flwr run`` exits 0 even
when a run failed, so this file, with Flower's run status, is the verdict.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

RESULTS_PATTERN = "*/results.json"
"""Where an app's results file lies, relative to ``output_dir``."""
FINAL_STATUSES = ("completed", "failed")
FINAL_GRACE = 30.0
"""Seconds a launcher still waits for Flower to report the run finished once the ServerApp wrote
its final record (``status`` completed or failed); then it stops the run's processes anyway
(``flwr-simulation`` can hang in Ray's shutdown after the ServerApp returned)."""


def find_results(output_dir: Path, pattern: str = RESULTS_PATTERN) -> dict[Path, int]:
    """Every results file under ``output_dir`` (resolved path -> modification time in ns)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return {}
    return {p.resolve(): p.stat().st_mtime_ns for p in output_dir.glob(pattern) if p.is_file()}


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def run_outcome(path: Path) -> tuple[str | None, str | None]:
    """(status, reason) of a results file; status ``unreadable (...)`` when it cannot be parsed."""
    try:
        results = load_results(path)
    except (OSError, ValueError) as exc:
        return f"unreadable ({exc})", None
    return results.get("status"), results.get("reason")


def run_candidates(output_dir: Path, before: Mapping[Path, int], lines: Iterable[str],
                   pattern: str = RESULTS_PATTERN) -> list[Path]:
    """Results files this run wrote: new or rewritten ones (a resumed run reuses its folder), those
    the run's output names first (another run may write beside it)."""
    new = sorted(p for p, mtime in find_results(output_dir, pattern).items() if before.get(p) != mtime)
    text = list(lines)
    mentioned = [p for p in new if any(str(p) in line for line in text)]
    return mentioned or new


def final_record(output_dir: Path, before: Mapping[Path, int], lines: Iterable[str],
                 pattern: str = RESULTS_PATTERN) -> Path | None:
    """This run's results file once its ServerApp wrote a final status (completed or failed), else None."""
    candidates = run_candidates(output_dir, before, lines, pattern)
    if len(candidates) != 1:
        return None
    return candidates[0] if run_outcome(candidates[0])[0] in FINAL_STATUSES else None


def not_completed(path: Path, flower_status: str | None) -> str | None:
    """Why a results file does not show a completed run (its status and reason), or None."""
    status, reason = run_outcome(path)
    if status == "completed":
        return None
    why = f": {reason}" if reason else ""
    flower = f" (Flower run status {flower_status!r})" if flower_status else ""
    return f"{path} has status {status!r}, not 'completed'{why}{flower}"


def judge_run(candidates: list[Path], run_id: str | None, status: str | None, status_details: str | None,
              where: str) -> tuple[Path | None, str | None]:
    """(results file, None) for a completed run, else (None, why): the ServerApp's own reason
    first, then Flower's run status, then a missing or ambiguous results file."""
    if len(candidates) == 1 and run_outcome(candidates[0])[0] == "failed":
        return None, not_completed(candidates[0], status)
    if status and status.startswith("finished") and status != "finished:completed":
        return None, f"run {run_id} ended with status {status!r} ({status_details or ''})"
    if len(candidates) != 1:
        return None, f"expected one new or updated results file {where}, found {[str(p) for p in candidates]}"
    why = not_completed(candidates[0], status)
    return (None, why) if why else (candidates[0], None)


class FinalGrace:
    """Whether :data:`FINAL_GRACE` has passed since this run's ServerApp wrote its final record."""

    def __init__(self, output_dir: Path, before: Mapping[Path, int], lines: Callable[[], Iterable[str]],
                 pattern: str = RESULTS_PATTERN, grace: float = FINAL_GRACE) -> None:
        self.output_dir, self.before, self.lines, self.pattern, self.grace = output_dir, before, lines, pattern, grace
        self.final_at: float | None = None

    def __call__(self) -> bool:
        self._look()
        return self.final_at is not None and time.monotonic() - self.final_at > self.grace

    def completed(self) -> bool:
        """Whether the final record says ``completed``: the ServerApp writes it last (after the model, mask
        and checkpoint files), so nothing the run produces is still to come."""
        path = self._look()
        return path is not None and run_outcome(path)[0] == "completed"

    def _look(self) -> Path | None:
        path = final_record(self.output_dir, self.before, self.lines(), self.pattern)
        if path is not None and self.final_at is None:
            self.final_at = time.monotonic()
        return path


def report(path: Path) -> str:
    """What a launcher's command line prints for a completed run: the file, then the summary."""
    return f"results: {path}\n{summarise(load_results(path))}"


def summarise(results: Mapping[str, Any]) -> str:
    """A few lines: final accuracy and density, total traffic (exploration included), and that traffic split
    into the one-off stage (round 0: exploration or the initial record) and the mean per training round."""
    rounds = list(results.get("rounds", []))
    if not rounds:
        return f"status {results.get('status')}: no rounds recorded"
    accs = [r["accuracy"] for r in rounds if r.get("accuracy") is not None]
    last = rounds[-1]
    down = sum(r.get("bytes_down", 0) for r in rounds) / 1e6
    up = sum(r.get("bytes_up", 0) for r in rounds) / 1e6
    acc = f"{accs[-1]:.4f}" if accs else "n/a"
    density = last.get("density")
    dens = f"{density:.4f}" if isinstance(density, (int, float)) else "n/a"
    trained = [r for r in rounds if r.get("phase") == "train"]
    one_off = sum(r.get("bytes_down", 0) + r.get("bytes_up", 0) for r in rounds if r.get("phase") != "train") / 1e6
    per_round = sum(r.get("bytes_down", 0) + r.get("bytes_up", 0) for r in trained) / 1e6 / max(len(trained), 1)
    return (f"status {results.get('status')} | rounds {len(trained)} | "
            f"final accuracy {acc} | final density {dens} | "
            f"total down {down:.3f} MB, up {up:.3f} MB (exploration included) | "
            f"one-off {one_off:.3f} MB, per round {per_round:.3f} MB")

"""Where a benchmark's results go: ``<stem>.md`` (the tables) and ``<stem>.json`` (every raw number)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def benchmark_parser(module: str, doc: str, quick_help: str, out: Path, stem: str) -> argparse.ArgumentParser:
    """The options every benchmark has: ``--quick`` (the smoke test's profile) and ``--out`` (where the report goes)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=out, help=f"folder for {stem}.md and {stem}.json")
    return parser


def write_report(out: Path, stem: str, results: dict[str, Any], default: Callable[[Any], Any] = str) -> None:
    """Print the Markdown and write both files (written once, at the end of a run)."""
    print(results["markdown"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(results["markdown"])
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=default))

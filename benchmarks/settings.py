"""Benchmark settings are data: profiles in ``benchmarks/conf/*.toml``, read into frozen dataclasses."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

CONF = Path(__file__).resolve().parent / "conf"
T = TypeVar("T")


def load_profile(cls: type[T], path: Path, profile: str, **overrides: Any) -> T:
    """``cls`` from table ``[<profile>]`` of a TOML file (kebab-case keys become field names, lists tuples);
    ``overrides`` that are not None win (command-line options)."""
    with path.open("rb") as f:
        table = tomllib.load(f)[profile]
    values = {k.replace("-", "_"): tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    return cls(**(values | {k: v for k, v in overrides.items() if v is not None}))

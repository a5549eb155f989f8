"""Run configs for launchers: TOML writing, ``--run-config`` parsing, and checks before anything starts.

Why one module: ``runner.simulation``, ``runner.deployment`` and ``runner.inprocess`` all take
Flower-style overrides, write them for ``flwr run`` and refuse a bad config in seconds, before a
SuperLink or Ray has started.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

OUTPUT_DIR_KEY = "output-dir"
PATH_KEYS = ("data-dir", OUTPUT_DIR_KEY)
"""Run-config keys that name folders: resolved against the caller's working directory, since the
ServerApp runs in a folder of Flower's own."""
MIN_NODES_KEY = "min-available-nodes"
REFERENCE_SERVERAPP = "server_app.app:app"
"""The reference ServerApp: launchers parse its whole run config up front (``autoflip_task.config``)."""

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")


# ---------------------------------------------------------------- TOML
def toml_value(value: Any) -> str:
    """One value as TOML: strings quoted and escaped, bools lowercase, floats exact (inf/nan allowed)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        # A JSON string (ASCII, \uXXXX escapes) is a valid TOML basic string.
        return json.dumps(os.fspath(value), ensure_ascii=True)
    raise TypeError(f"run-config values must be str, bool, int or float, got {value!r} ({type(value).__name__})")


def toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=True)


def toml_document(values: Mapping[str, Any]) -> str:
    """A flat TOML document ``key = value`` per line (round-trips through ``tomllib``)."""
    return "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in values.items())


def toml_pairs(values: Mapping[str, Any]) -> str:
    """``k=v k2=v2``: Flower's one-line syntax of ``--node-config`` and ``--federation-config``."""
    return " ".join(f"{toml_key(k)}={toml_value(v)}" for k, v in values.items())


# ------------------------------------------------------------ overrides
def parse_overrides(text: str) -> dict[str, Any]:
    """Parse ``"k=v k2='text' k3=true"`` (Flower's ``--run-config`` syntax) into typed values, or, like
    ``flwr run``, read a ``.toml`` file of such keys (a profile such as ``conf/paper.toml``)."""
    if text.strip().endswith(".toml") and "=" not in text:
        path = Path(text.strip()).expanduser()
        try:
            with path.open("rb") as f:
                return _flat(tomllib.load(f))
        except OSError as exc:
            raise ValueError(f"cannot read run-config file {str(path)!r}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"run-config file {str(path)!r} is not valid TOML: {exc}") from None
    pairs = _PAIR.findall(text)
    leftover = _PAIR.sub("", text).strip()
    if leftover:
        raise ValueError(f"cannot parse {leftover!r} in {text!r}: expected key=value pairs")
    try:
        return tomllib.loads("\n".join(f"{toml_key(k)} = {v}" for k, v in pairs))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"invalid override {text!r}: values are TOML (strings in quotes): {exc}") from None


def _flat(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables as dotted keys, as Flower flattens a run config."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def parse_override_args(parser: argparse.ArgumentParser, texts: Iterable[str]) -> dict[str, Any]:
    """The ``--run-config`` arguments of a CLI, merged; a parse error ends the CLI with ``parser.error``."""
    overrides: dict[str, Any] = {}
    try:
        for text in texts:
            overrides.update(parse_overrides(text))
    except ValueError as exc:
        parser.error(str(exc))
    return overrides


def federation_config(num_supernodes: int, client_cpus: float,
                      extra: Mapping[str, Any] | None = None) -> str:
    """The ``--federation-config`` argument (keys as in Flower's ``SimulationConfig``, kebab-case)."""
    if client_cpus != int(client_cpus) or client_cpus < 1:
        # SimulationConfig.client_resources_num_cpus is a uint32 in Flower 1.41.
        raise ValueError(f"client_cpus must be a whole number >= 1 in Flower 1.41, got {client_cpus!r}")
    values: dict[str, Any] = {"num-supernodes": int(num_supernodes), "client-resources-num-cpus": int(client_cpus)}
    values.update(extra or {})
    return toml_pairs(values)


# ------------------------------------------------------- the app's table
def _app_table(app_dir: Path) -> dict[str, Any]:
    with (Path(app_dir) / "pyproject.toml").open("rb") as f:
        return dict(tomllib.load(f).get("tool", {}).get("flwr", {}).get("app", {}))


def app_config_keys(app_dir: Path) -> set[str]:
    """The run-config keys an app declares in ``[tool.flwr.app.config]`` (nested tables flattened with dots)."""
    def flat(d: Mapping[str, Any], prefix: str = "") -> Iterable[str]:
        for k, v in d.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else [f"{prefix}{k}"]

    return set(flat(_app_table(app_dir).get("config", {})))


def serverapp_component(app_dir: Path) -> str | None:
    """The app's ``serverapp`` reference (``module:attribute``) from its ``pyproject.toml``."""
    return _app_table(app_dir).get("components", {}).get("serverapp")


def app_defaults(app_dir: Path) -> dict[str, Any]:
    """The app's declared run config (``[tool.flwr.app.config]``), which Flower merges under the overrides."""
    return dict(_app_table(app_dir).get("config", {}))


def resolve_path_keys(overrides: Mapping[str, Any], cwd: Path) -> dict[str, Any]:
    """Relative folder values (``data-dir``, ``output-dir``) made absolute against ``cwd``.

    Why: ``flwr run`` starts the ServerApp and ClientApps in Flower's own folders, where
    ``data-dir='../shared/data/mnist'`` points nowhere; the user meant their working directory."""
    out = dict(overrides)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            out[key] = str((Path(cwd) / value).resolve())
        elif isinstance(value, str) and value.startswith("~"):
            out[key] = str(Path(value).expanduser())
    return out


def check_run_config(overrides: Mapping[str, Any], app_dir: Path, num_nodes: int) -> None:
    """Everything about a run config that can be refused before any process starts (ValueError).

    Names unknown keys (Flower's own error is a bare "Invalid run configuration"); refuses a
    federation smaller than ``min-available-nodes`` (the ServerApp would wait silently until
    its round timeout); for the reference app, parses the whole config as the ServerApp
    will (values, ranges, cross-key rules), so a bad value fails in seconds, not after the
    SuperLink and Ray started."""
    defaults = app_defaults(app_dir)
    unknown = sorted(set(overrides) - set(app_config_keys(app_dir)))
    if unknown:
        raise ValueError(f"unknown run-config key(s) {unknown} for the app in {app_dir}; "
                         f"its keys are {sorted(app_config_keys(app_dir))}")
    for value in overrides.values():
        toml_value(value)  # a TypeError now rather than after the SuperLink started
    merged = {**defaults, **overrides}
    if serverapp_component(app_dir) == REFERENCE_SERVERAPP:  # this project's app, or a copy of it
        from autoflip_task.config import app_config  # imports torch: only for the reference app

        app_config(merged)
    need = merged.get(MIN_NODES_KEY)
    if isinstance(need, int) and not isinstance(need, bool) and need > num_nodes:
        raise ValueError(f"{MIN_NODES_KEY}={need} but the federation has only {num_nodes} node(s): the run would "
                         f"wait for nodes that never come; use at least {need} nodes or set "
                         f"{MIN_NODES_KEY}<={num_nodes}")

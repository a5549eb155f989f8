"""Run-config options of the reference app (on top of the strategy's own options).

Both apps parse the same run config through :func:`app_config`, so a typo or
an out-of-range value stops the run before any client trains.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import autoflip_strategy.config as _strategy_config
from autoflip_strategy.config import (
    DEFAULTS_WHEN_ADDED,
    LEFT_TO_RULE,
    STRATEGY_OPTIONS,
    AutoFLIPConfig,
    ConfigError,
    Option,
    parse_options,
)

from .data import DATASETS, PARTITIONINGS
from .models import MODELS

APP_OPTIONS: tuple[Option, ...] = (
    Option("num-server-rounds", 10, "Federated rounds after the exploration stage.", low=1),
    Option("dataset", "digits", "Dataset; digits ships inside scikit-learn, the others read data-dir.",
           choices=DATASETS),
    Option("model", "auto", "Model: auto picks cnn for digits/MNIST/Fashion-MNIST, resnet for CIFAR-10, "
           "lstm for Shakespeare.", choices=("auto", *MODELS)),
    Option("partitioning", "dirichlet", "How training data is split across clients (flwr-datasets partitioners).",
           choices=PARTITIONINGS),
    Option("dirichlet-alpha", 0.3, "Concentration of the Dirichlet label split (smaller = more skewed).", low=1e-6),
    Option("classes-per-partition", 2, "Labels per client in the pathological split.", low=1),
    Option("local-epochs", 2, "Local epochs per training round.", low=1),
    Option("batch-size", 32, "Local mini-batch size.", low=1),
    Option("learning-rate", 0.003, "Adam learning rate in round 1.", low=0.0),
    Option("lr-decay", 0.99, "Learning rate multiplier per round.", low=0.0, high=1.0),
    Option("weight-decay", 0.0, "Adam L2 weight decay (never revives pruned weights).", low=0.0),
    Option("data-dir", "", "Folder with the dataset's files (IDX .gz, CIFAR-10 tree or tar.gz, tinyshakespeare).",),
    Option("output-dir", "outputs", "Where each run writes its folder with results.json."),
    Option("run-name", "", "Folder name of this run under output-dir: one name, no '/' or '..' (empty: "
           "time-strategy-dataset-seed)."),
    Option("resume", False, "Continue the run in output-dir/run-name from its last checkpoint."),
    Option("max-eval-examples", 10_000, "Cap on central test examples (keeps evaluation cheap on CPU).", low=1),
    Option("device", "auto", "Where clients train and the server evaluates: auto picks cuda when PyTorch sees a GPU.",
           choices=("auto", "cpu", "cuda")),
)

ALL_OPTIONS: tuple[Option, ...] = APP_OPTIONS + STRATEGY_OPTIONS


NEUTRAL_KEYS = frozenset({"data-dir", "output-dir", "run-name", "resume", "device", "num-server-rounds",
                          "max-eval-examples"}
                         | {k.replace("_", "-")
                            for k in getattr(_strategy_config, "RESUME_NEUTRAL", {"round_timeout"})})
"""Keys that do not change the trained model: where data and results live, where it trains (CUDA and CPU
differ only in float rounding), how long the run goes on (a resume may extend it), how much of the test
set is scored, plus the strategy's own resume-neutral settings (timeouts, failure tolerance). A resume
compares every other key."""


def check_run_name(run_name: str) -> str:
    """``run-name`` is one folder under ``output-dir``: never a path that leads elsewhere.

    Why: the server writes results.json, checkpoint.pt and the final model under
    ``output-dir/run-name``; ``../x`` or ``/x`` would write them outside ``output-dir``."""
    name = run_name.strip()
    if run_name and not name:
        raise ConfigError(f"run-name: {run_name!r} is blank (leave it empty for a generated name)")
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ConfigError(f"run-name: {run_name!r} must be a single folder name under output-dir "
                          "(no '/', '\\', '..' or absolute path)")
    return name


def app_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Validated values for every key (defaults filled in); unknown keys are an error.

    Runs the strategy's own cross-key checks too, so everything that would stop the
    ServerApp stops a launcher before it starts any process."""
    values = parse_options(dict(run_config), ALL_OPTIONS)
    values["run-name"] = check_run_name(values["run-name"])
    if values["resume"] and not values["run-name"]:
        raise ConfigError("resume: needs run-name, the folder under output-dir of the run to continue")
    return {**values, **_ruled(values)}


def _ruled(values: Mapping[str, Any]) -> dict[str, Any]:
    """The strategy keys left to a rule (``sparsity-initial -1``, ``value-precision auto``), resolved by it."""
    strategy = AutoFLIPConfig.from_run_config(values)
    return {f.replace("_", "-"): getattr(strategy, f) for f in LEFT_TO_RULE}


def model_settings_changes(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: was -> now`` for every key outside :data:`NEUTRAL_KEYS` whose value differs.

    ``stored`` is a run's recorded config; a key it lacks was added later, so that run used
    the key's default of then (:data:`DEFAULTS_WHEN_ADDED`, as the strategy's checkpoint check does)."""
    when_added = {k.replace("_", "-"): v for k, v in DEFAULTS_WHEN_ADDED.items()}
    old = {**app_config({}), **when_added, **stored}
    old.update(_ruled(old))
    return [f"{k}: {old[k]!r} -> {current[k]!r}" for k in sorted(current)
            if k not in NEUTRAL_KEYS and k in old and old[k] != current[k]]


def model_name(cfg: Mapping[str, Any]) -> str:
    if cfg["model"] != "auto":
        return cfg["model"]
    return {"cifar10": "resnet", "shakespeare": "lstm"}.get(cfg["dataset"], "cnn")

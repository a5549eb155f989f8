"""Run-config options of the reference app (on top of the strategy's own options).

Both apps parse the same run config through :func:`app_config`, so a typo or
an out-of-range value stops the run before any client trains.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from autoflip_strategy.config import STRATEGY_OPTIONS, Option, parse_options

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
    Option("run-name", "", "Folder name of this run under output-dir (empty: time-strategy-dataset-seed)."),
    Option("resume", False, "Continue the run in output-dir/run-name from its last checkpoint."),
    Option("max-eval-examples", 10_000, "Cap on central test examples (keeps evaluation cheap on CPU).", low=1),
    Option("device", "auto", "Where clients train and the server evaluates: auto picks cuda when PyTorch sees a GPU.",
           choices=("auto", "cpu", "cuda")),
)

ALL_OPTIONS: tuple[Option, ...] = APP_OPTIONS + STRATEGY_OPTIONS


def app_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Validated values for every key (defaults filled in); unknown keys are an error."""
    values = parse_options(dict(run_config), ALL_OPTIONS)
    if "sparsity-initial" not in run_config:
        values["sparsity-initial"] = values["sparsity"]
    return values


def model_name(cfg: Mapping[str, Any]) -> str:
    if cfg["model"] != "auto":
        return cfg["model"]
    return {"cifar10": "resnet", "shakespeare": "lstm"}.get(cfg["dataset"], "cnn")

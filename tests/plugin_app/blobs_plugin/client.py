"""ClientApp: the user's model and loops handed to ``AutoFLIPClient``."""

from __future__ import annotations

from flwr.app import Context
from torch import nn

from autoflip_strategy import AutoFLIPClient, EvalOutcome, EvalTask, TrainOutcome, TrainTask

from .task import BlobMLP, client_data, evaluate, train

HELD_OUT = 40  # examples of each client's data kept for client-side evaluation


def _data(context: Context):
    cfg = context.run_config
    x, y = client_data(int(context.node_config["partition-id"]), int(cfg["examples-per-client"]), int(cfg["seed"]))
    return (x[HELD_OUT:], y[HELD_OUT:]), (x[:HELD_OUT], y[:HELD_OUT])


def model_fn(context: Context) -> nn.Module:
    return BlobMLP()


def train_fn(model: nn.Module, task: TrainTask) -> TrainOutcome:
    (x, y), _ = _data(task.context)
    # "learning-rate" travels in the strategy's train_config (see server.py).
    loss = train(model, x, y, task.epochs, float(task.config["learning-rate"]))
    return TrainOutcome(len(x), loss)


def evaluate_fn(model: nn.Module, task: EvalTask) -> EvalOutcome:
    _, (x, y) = _data(task.context)
    loss, acc = evaluate(model, x, y)
    return EvalOutcome(len(x), loss, acc)


app = AutoFLIPClient(model_fn, train_fn, evaluate_fn).build_app()

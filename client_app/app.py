"""The reference ClientApp: the shared task (models, data) plugged into AutoFLIPClient.

Everything AutoFLIP-specific (mask caching, compact model, mask enforcement,
codec) happens in :class:`autoflip_strategy.AutoFLIPClient`; this file only
says which model to build, which data this node holds and how to train.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from torch import nn

from autoflip_strategy import AutoFLIPClient, EvalOutcome, EvalTask, TrainOutcome, TrainTask
from autoflip_task.config import app_config, model_name
from autoflip_task.data import FederatedData, load_federated_data, partition_indices
from autoflip_task.models import build_model
from autoflip_task.training import evaluate, resolve_device, train_epochs

LOCAL_EVAL_FRACTION = 0.1  # of each partition, held out for client-side evaluation


def _data(context: Context) -> tuple[dict, FederatedData, np.ndarray, np.ndarray]:
    """This node's config, dataset, and its train / local-eval indices."""
    cfg = app_config(context.run_config)
    data = load_federated_data(cfg["dataset"], cfg["data-dir"], cfg["seed"])
    idx = _partition(context, cfg, data)
    n_eval = int(len(idx) * LOCAL_EVAL_FRACTION) if len(idx) >= 10 else 0
    return cfg, data, idx[n_eval:], idx[:n_eval]


def _partition(context: Context, cfg: dict, data: FederatedData) -> np.ndarray:
    """This node's indices, cached in ``context.state``: deployed nodes start a fresh process per message."""
    num = int(context.node_config["num-partitions"])
    key = "|".join(str(cfg[k]) for k in ("dataset", "partitioning", "dirichlet-alpha", "classes-per-partition", "seed"))
    key += f"|{num}"
    cached = context.state.get("partition")
    if isinstance(cached, ConfigRecord) and cached["key"] == key:
        return np.asarray(cached["indices"], dtype=np.int64)
    parts = partition_indices(data, num, cfg["partitioning"], alpha=cfg["dirichlet-alpha"],
                              classes_per_partition=cfg["classes-per-partition"], seed=cfg["seed"])
    idx = parts[int(context.node_config["partition-id"])]
    if len(idx):
        context.state["partition"] = ConfigRecord({"key": key, "indices": [int(i) for i in idx]})
    return idx


def model_fn(context: Context) -> nn.Module:
    cfg, data, _, _ = _data(context)
    return build_model(model_name(cfg), data.input_shape, data.num_classes)


def train_fn(model: nn.Module, task: TrainTask) -> TrainOutcome:
    cfg, data, train_idx, _ = _data(task.context)
    lr = cfg["learning-rate"] * cfg["lr-decay"] ** max(task.server_round - 1, 0)
    t = torch.as_tensor(train_idx.copy())
    loss = train_epochs(model, data.train_x[t], data.train_y[t], task.epochs, cfg["batch-size"], lr,
                        cfg["weight-decay"])
    return TrainOutcome(len(train_idx), loss)


def evaluate_fn(model: nn.Module, task: EvalTask) -> EvalOutcome:
    _, data, _, eval_idx = _data(task.context)
    t = torch.as_tensor(eval_idx.copy())
    loss, acc = evaluate(model, data.train_x[t], data.train_y[t])
    return EvalOutcome(max(len(eval_idx), 1), loss, acc)


def device_fn(context: Context) -> torch.device:
    return resolve_device(app_config(context.run_config)["device"])


app = AutoFLIPClient(model_fn, train_fn, evaluate_fn, device=device_fn).build_app()

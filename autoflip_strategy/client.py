"""Client side of AutoFLIP: plug your model and training loop into a ``ClientApp``.

One training message, as the client sees it:

1. read the structure and mask (from the message, or from ``context.state``
   when this mask version was delivered before);
2. decode the compact global model and build a *physically smaller* copy of
   the user's architecture (:func:`.compact.compact_model`);
3. run the user's ``train_fn`` inside :func:`.enforce.enforce_mask`, so pruned
   weights stay exactly zero whatever optimizer the user picks;
4. reply with the kept values only (:func:`.codec.encode_state`).

Usage::

    client = AutoFLIPClient(model_fn=lambda ctx: Net(), train_fn=my_train, evaluate_fn=my_eval)
    app = client.build_app()      # or client.register(existing_app)

With ``device`` (a ``torch.device``, a string, or a function of the node's
``Context``), the handlers move the model there before calling ``train_fn`` /
``evaluate_fn`` (which move their batches to the model's device) and bring it
back to the CPU before encoding, so everything on the wire is CPU memory.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from . import protocol as P
from .codec import Layout, decode_mask, decode_state, encode_guidance, encode_state
from .compact import compact_model
from .enforce import enforce_mask
from .guidance import local_guidance
from .masks import HybridMask, dense_mask
from .structure import ModelStructure, prunable_weights, structure_from_json

_STATE_KEY = "autoflip"  # context.state: ConfigRecord with version + structure, ArrayRecord with the mask


@dataclass(frozen=True)
class TrainTask:
    """What ``train_fn`` is asked to do."""

    context: Context
    epochs: int
    server_round: int  # 0 during exploration
    phase: str  # "explore" or "train"
    config: dict[str, Any]  # the message's config (train_config of the strategy and more)


@dataclass(frozen=True)
class TrainOutcome:
    num_examples: int
    loss: float  # mean training loss of the last epoch


@dataclass(frozen=True)
class EvalOutcome:
    num_examples: int
    loss: float
    accuracy: float


TrainFn = Callable[[nn.Module, TrainTask], TrainOutcome]
EvalFn = Callable[[nn.Module, Context], EvalOutcome]
DeviceSpec = torch.device | str | Callable[[Context], torch.device | str] | None


class ClientProtocolError(RuntimeError):
    """The server's message cannot be served (e.g. a mask version this node never got)."""


def client_seed(seed: int, server_round: int, context: Context) -> int:
    """A per-(run seed, round, partition) seed, stable across processes and restarts."""
    who = context.node_config.get("partition-id", context.node_id)
    return zlib.crc32(f"{seed}:{server_round}:{who}".encode())


class AutoFLIPClient:
    """Registers the AutoFLIP message handlers around the user's model and loops."""

    def __init__(self, model_fn: Callable[[Context], nn.Module], train_fn: TrainFn,
                 evaluate_fn: EvalFn | None = None, device: DeviceSpec = None) -> None:
        self.model_fn = model_fn
        self.train_fn = train_fn
        self.evaluate_fn = evaluate_fn
        self.device = device

    def device_for(self, context: Context) -> torch.device:
        """Where this node trains and evaluates (the CPU unless ``device`` says otherwise)."""
        spec = self.device(context) if callable(self.device) else self.device
        return torch.device(spec if spec is not None else "cpu")

    def build_app(self) -> ClientApp:
        return self.register(ClientApp())

    def register(self, app: ClientApp) -> ClientApp:
        app.query("describe")(self.describe)
        app.query("explore")(self.explore)
        app.train()(self.train)
        if self.evaluate_fn is not None:
            app.evaluate()(self.evaluate)
        return app

    # ---------------------------------------------------------------- handlers
    def describe(self, msg: Message, context: Context) -> Message:
        pid = context.node_config.get("partition-id", -1)
        return Message(RecordDict({P.METRICS: MetricRecord({P.PARTITION_ID: int(pid)})}), reply_to=msg)

    def explore(self, msg: Message, context: Context) -> Message:
        """Train from θ₀ with early stopping and return (θ_k - θ₀)² per prunable weight."""
        cfg = dict(msg.content[P.CONFIG])
        model = self.model_fn(context)
        theta0 = {k: v.float() for k, v in msg.content[P.ARRAYS].to_torch_state_dict().items()}
        model.load_state_dict(theta0, strict=False)
        model.to(self.device_for(context))
        torch.manual_seed(client_seed(int(cfg[P.SEED]), 0, context))
        best, stale, epochs, outcome, seconds = float("inf"), 0, 0, None, 0.0
        for epochs in range(1, int(cfg[P.EPOCHS]) + 1):
            start = time.perf_counter()
            outcome = self.train_fn(model, TrainTask(context, 1, 0, "explore", cfg))
            seconds += time.perf_counter() - start
            if outcome.loss < best - 1e-6:
                best, stale = outcome.loss, 0
            else:
                stale += 1
                if stale >= int(cfg[P.PATIENCE]):
                    break
        trained = model.cpu().state_dict()
        names = [n for n in prunable_weights(model) if n in theta0]
        matrix = local_guidance(theta0, trained, names)
        metrics = MetricRecord({P.NUM_EXAMPLES: int(outcome.num_examples), P.EPOCHS_RUN: epochs,
                                P.TRAIN_LOSS: float(outcome.loss), P.TRAIN_SECONDS: seconds})
        return Message(RecordDict({P.GUIDANCE: encode_guidance(matrix, str(cfg[P.PRECISION])), P.METRICS: metrics}),
                       reply_to=msg)

    def train(self, msg: Message, context: Context) -> Message:
        cfg = dict(msg.content[P.CONFIG])
        model, layout = self._receive(msg, context)
        model.to(self.device_for(context))
        server_round = int(cfg[P.ROUND])
        torch.manual_seed(client_seed(int(cfg[P.SEED]), server_round, context))
        epochs = int(cfg.get("local-epochs", 1))
        start = time.perf_counter()
        with enforce_mask(model, layout.compact_masks):
            outcome = self.train_fn(model, TrainTask(context, epochs, server_round, "train", cfg))
        seconds = time.perf_counter() - start
        state = {n: t for n, t in model.cpu().state_dict().items() if n in layout.structure.shapes}
        metrics = MetricRecord({P.NUM_EXAMPLES: int(outcome.num_examples), P.TRAIN_LOSS: float(outcome.loss),
                                P.TRAIN_SECONDS: seconds, P.MASK_VERSION: int(cfg[P.MASK_VERSION])})
        arrays = encode_state(state, layout, str(cfg[P.TRANSPORT]))
        return Message(RecordDict({P.ARRAYS: arrays, P.METRICS: metrics}), reply_to=msg)

    def evaluate(self, msg: Message, context: Context) -> Message:
        model, _ = self._receive(msg, context)
        model.to(self.device_for(context)).eval()
        outcome = self.evaluate_fn(model, context)
        metrics = MetricRecord({P.NUM_EXAMPLES: int(outcome.num_examples), "loss": float(outcome.loss),
                                "accuracy": float(outcome.accuracy)})
        return Message(RecordDict({P.METRICS: metrics}), reply_to=msg)

    # ----------------------------------------------------------------- helpers
    def _receive(self, msg: Message, context: Context) -> tuple[nn.Module, Layout]:
        """The compact model and its layout for this message (caching the mask per node)."""
        cfg = msg.content[P.CONFIG]
        version, transport = int(cfg[P.MASK_VERSION]), str(cfg[P.TRANSPORT])
        structure, mask = self._mask(msg, context, version, transport)
        layout = Layout.build(structure, mask)
        model = self.model_fn(context)
        shapes = {n: tuple(t.shape) for n, t in model.state_dict().items() if n in structure.shapes}
        if shapes != structure.shapes:
            raise ClientProtocolError("the server's model structure does not match this client's model")
        compact = compact_model(model, layout.kept)
        compact.load_state_dict(decode_state(msg.content[P.ARRAYS], layout, transport), strict=False)
        return compact, layout

    def _mask(self, msg: Message, context: Context, version: int,
              transport: str) -> tuple[ModelStructure, HybridMask]:
        cfg = msg.content[P.CONFIG]
        if P.STRUCTURE in cfg:
            meta = ConfigRecord({P.STRUCTURE: str(cfg[P.STRUCTURE]), P.MASK_VERSION: version,
                                 P.TRANSPORT: transport})
            context.state[_STATE_KEY] = meta
            if P.MASK in msg.content:
                context.state[_STATE_KEY + ".mask"] = msg.content[P.MASK]
        meta = context.state.get(_STATE_KEY)
        if not isinstance(meta, ConfigRecord) or int(meta[P.MASK_VERSION]) != version:
            raise ClientProtocolError(f"mask version {version} was never delivered to this node")
        structure = structure_from_json(str(meta[P.STRUCTURE]))
        if version == 0:
            return structure, dense_mask(structure)
        record = context.state.get(_STATE_KEY + ".mask")
        if not isinstance(record, ArrayRecord):
            raise ClientProtocolError(f"mask version {version} is missing from this node's state")
        return structure, decode_mask(record, structure, str(meta[P.TRANSPORT]))


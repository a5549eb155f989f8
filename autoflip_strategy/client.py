"""Client side of AutoFLIP: plug your model and training loop into a ``ClientApp``.

One training message, as the client sees it:

1. read the structure and mask (from the message, or from ``context.state``
   when this mask version was delivered before);
2. decode the compact global model and build a *physically smaller* copy of
   the user's architecture (:func:`.compact.compact_model`);
3. run the user's ``train_fn`` inside :func:`.enforce.enforce_mask`, so pruned
   weights stay exactly zero whatever optimizer the user picks;
4. reply with the kept values only (:func:`.codec.encode_update`), at the
   ``value-precision`` the server asks for; at int8 with stochastic rounding and
   error feedback, the residual kept in ``context.state`` (see :mod:`.quantise`).

The user's functions have one signature style, ``fn(model, task) -> outcome``::

    def train_fn(model: nn.Module, task: TrainTask) -> TrainOutcome: ...
    def evaluate_fn(model: nn.Module, task: EvalTask) -> EvalOutcome: ...

    app = ClientApp()
    AutoFLIPClient(model_fn=lambda context: Net(), train_fn=train_fn, evaluate_fn=evaluate_fn).register(app)

``task.config`` is the user's config exactly as the server sent it (the
strategy's ``train_config`` / ``evaluate_config`` plus Flower's
``server-round``); AutoFLIP's own keys travel separately. ``task.epochs`` is
``local-epochs`` from that config, else from the node's run config (as
Flower's templates read it), else 1.

With ``device`` (a ``torch.device``, a string, or a function of the node's
``Context``), the handlers move the model there before calling ``train_fn`` /
``evaluate_fn`` (which move their batches to the model's device) and bring it
back to the CPU before encoding, so everything on the wire is CPU memory.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from . import protocol as P
from .codec import decode_layout, decode_state, encode_guidance, encode_update
from .compact import compact_model
from .enforce import enforce_mask
from .guidance import local_guidance
from .saliency import first_gradients, snip_scores
from .signs import encode_signs, kept_signs, signs_state
from .supermask import sign_training
from .geometry import Layout
from .masks import dense_mask
from .structure import prunable_weights, structure_from_json

_STATE_KEY = "autoflip"  # context.state: ConfigRecord with version + structure, ArrayRecord with the mask
EPOCHS_KEY = "local-epochs"  # read from the message config, else the run config (Flower's templates)
_MAGNITUDES = "autoflip.magnitudes"  # context.state: HideNseek's first values payload (|θ₀| kept) and its version
_FEEDBACK_KEY = "autoflip.feedback"  # context.state: int8 residuals (ArrayRecord) and what they belong to (".of")


@dataclass(frozen=True)
class TrainTask:
    """What ``train_fn`` is asked to do."""

    context: Context
    epochs: int
    server_round: int  # 0 during exploration
    phase: str  # "explore" or "train"
    config: dict[str, Any]  # the user's config as sent (train_config, run-config keys, "server-round")


@dataclass(frozen=True)
class EvalTask:
    """What ``evaluate_fn`` is asked to do."""

    context: Context
    server_round: int
    config: dict[str, Any]  # the user's config as sent (evaluate_config, "server-round")


@dataclass(frozen=True)
class TrainOutcome:
    num_examples: int
    loss: float  # mean training loss of the last epoch
    metrics: Mapping[str, float] = field(default_factory=dict)  # more metrics for the reply (Flower names)


@dataclass(frozen=True)
class EvalOutcome:
    num_examples: int
    loss: float
    accuracy: float
    metrics: Mapping[str, float] = field(default_factory=dict)  # more metrics for the reply (Flower names)


TrainFn = Callable[[nn.Module, TrainTask], TrainOutcome]
EvalFn = Callable[[nn.Module, EvalTask], EvalOutcome]
DeviceSpec = torch.device | str | Callable[[Context], torch.device | str] | None


class ClientProtocolError(RuntimeError):
    """The server's message cannot be served (e.g. a mask version this node never got)."""


def client_seed(seed: int, server_round: int, context: Context) -> int:
    """A per-(run seed, round, partition) seed, stable across processes and restarts."""
    who = context.node_config.get("partition-id", context.node_id)
    return zlib.crc32(f"{seed}:{server_round}:{who}".encode())


def local_epochs(config: Mapping[str, Any], run_config: Mapping[str, Any]) -> int:
    """``local-epochs``: the server's config wins, then the node's run config, then 1."""
    value = config.get(EPOCHS_KEY, run_config.get(EPOCHS_KEY, 1))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        raise ClientProtocolError(f"{EPOCHS_KEY} must be a positive integer, got {value!r}")
    return int(value)


def split_config(msg: Message) -> tuple[dict[str, Any], dict[str, Any]]:
    """(AutoFLIP's settings, the user's config) of a request; fails clearly on a non-AutoFLIP message."""
    settings = msg.content.get(P.SETTINGS)
    if not isinstance(settings, ConfigRecord):
        raise ClientProtocolError(f"message of type {msg.metadata.message_type!r} was not sent by the AutoFLIP "
                                  "strategy (no AutoFLIP settings): use AutoFLIPClient with the AutoFLIP strategy")
    ours = dict(settings)
    user = msg.content.get(str(ours.get(P.CONFIG_KEY, P.CONFIG)))
    return ours, dict(user) if isinstance(user, ConfigRecord) else {}


def value_precision(cfg: Mapping[str, Any]) -> str:
    """The precision of model values in this message (float32 from a server that does not say)."""
    return str(cfg.get(P.VALUE_PRECISION, "float32"))


def load_residual(context: Context, belongs_to: str) -> dict[str, np.ndarray] | None:
    """The error-feedback residual kept for ``belongs_to`` (mask version, transport, precision), if any."""
    meta, record = context.state.get(_FEEDBACK_KEY + ".of"), context.state.get(_FEEDBACK_KEY)
    if not isinstance(meta, ConfigRecord) or meta.get("key") != belongs_to or not isinstance(record, ArrayRecord):
        return None  # none yet, or another layout: start from zero
    return {name: array.numpy() for name, array in record.items()}


def keep_residual(context: Context, belongs_to: str, residual: Mapping[str, np.ndarray]) -> None:
    """Remember what this reply could not carry, for the next reply under the same layout."""
    context.state[_FEEDBACK_KEY] = ArrayRecord(array_dict={n: Array(np.ascontiguousarray(r))
                                                           for n, r in residual.items()})
    context.state[_FEEDBACK_KEY + ".of"] = ConfigRecord({"key": belongs_to})


def _metrics(base: Mapping[str, float | int], extra: Mapping[str, float]) -> MetricRecord:
    clash = sorted(set(base) & set(extra))
    if clash:
        raise ValueError(f"outcome metrics {clash} clash with AutoFLIP's own reply metrics")
    return MetricRecord({**base, **{k: float(v) for k, v in extra.items()}})


class AutoFLIPClient:
    """Registers the AutoFLIP message handlers around the user's model and loops.

    ``train_fn(model, task: TrainTask) -> TrainOutcome`` and
    ``evaluate_fn(model, task: EvalTask) -> EvalOutcome`` get a (compact) model
    already on its device. Without ``evaluate_fn`` an evaluation message fails
    with an error that says so (set ``fraction_evaluate=0.0`` on the strategy).
    """

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
        """Register AutoFLIP's handlers on ``app``; a handler of the app's own for the same message fails here."""
        taken = set(getattr(app, "_registered_funcs", {}))
        for kind in ("train", "evaluate"):
            if f"{kind}.default" in taken:
                raise ValueError(
                    f"this ClientApp already has its own @app.{kind}() handler, which cannot read AutoFLIP's "
                    f"compressed model: remove it and pass {kind}_fn(model, task) to AutoFLIPClient")
        app.query("describe")(self.describe)
        app.query("explore")(self.explore)
        app.train()(self.train)
        app.evaluate()(self.evaluate)
        return app

    # ---------------------------------------------------------------- handlers
    def describe(self, msg: Message, context: Context) -> Message:
        pid = context.node_config.get("partition-id", -1)
        return Message(RecordDict({P.METRICS: MetricRecord({P.PARTITION_ID: int(pid)})}), reply_to=msg)

    def explore(self, msg: Message, context: Context) -> Message:
        """Train from θ₀ with early stopping and return (θ_k - θ₀)² per prunable weight."""
        cfg, user = split_config(msg)
        kind = str(cfg.get(P.EXPLORE_KIND, "guidance"))
        if kind not in ("guidance", "snip"):
            raise ClientProtocolError(f"this client cannot explore for {kind!r} (it returns 'guidance' or 'snip')")
        model = self.model_fn(context)
        theta0 = {k: v.float() for k, v in msg.content[P.MODEL].to_torch_state_dict().items()}
        model.load_state_dict(theta0, strict=False)
        model.to(self.device_for(context))
        torch.manual_seed(client_seed(int(cfg[P.SEED]), 0, context))
        if kind == "snip":  # |g·θ₀| from the first batch of the user's loop (saliency.py)
            start = time.perf_counter()
            grads, n = first_gradients(model, lambda: self.train_fn(model, TrainTask(context, 1, 0, "explore", user)))
            matrix = snip_scores(theta0, grads, [n_ for n_ in prunable_weights(model) if n_ in theta0])
            metrics = MetricRecord({P.NUM_EXAMPLES: n, P.EPOCHS_RUN: 1, P.TRAIN_SECONDS: time.perf_counter() - start})
            return Message(RecordDict({P.GUIDANCE: encode_guidance(matrix, str(cfg[P.PRECISION])),
                                       P.METRICS: metrics}), reply_to=msg)
        best, stale, epochs, outcome, seconds = float("inf"), 0, 0, None, 0.0
        for epochs in range(1, int(cfg[P.EPOCHS]) + 1):
            start = time.perf_counter()
            outcome = self.train_fn(model, TrainTask(context, 1, 0, "explore", user))
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
        cfg, user = split_config(msg)
        model, layout = self._receive(msg, context, cfg)
        model.to(self.device_for(context))
        server_round = int(cfg[P.ROUND])
        torch.manual_seed(client_seed(int(cfg[P.SEED]), server_round, context))
        epochs = local_epochs(user, context.run_config)
        start = time.perf_counter()
        supermask = bool(cfg.get(P.SUPERMASK, False))  # HideNseek: train signs only (supermask.py)
        with (sign_training if supermask else enforce_mask)(model, layout.compact_masks):
            outcome = self.train_fn(model, TrainTask(context, epochs, server_round, "train", user))
        seconds = time.perf_counter() - start
        state = {n: t for n, t in model.cpu().state_dict().items() if n in layout.structure.shapes}
        weight_key = str(cfg.get(P.WEIGHT_KEY, P.NUM_EXAMPLES))
        metrics = _metrics({weight_key: int(outcome.num_examples), P.TRAIN_LOSS: float(outcome.loss),
                            P.TRAIN_SECONDS: seconds, P.EPOCHS_RUN: epochs,
                            P.MASK_VERSION: int(cfg[P.MASK_VERSION])}, outcome.metrics)
        transport, precision = str(cfg[P.TRANSPORT]), value_precision(cfg)
        if supermask:
            arrays = encode_signs(kept_signs(state, layout), state, layout)
        elif precision == "int8":  # stochastic rounding, error feedback
            belongs_to = f"{int(cfg[P.MASK_VERSION])}:{transport}:{precision}"
            rng = np.random.default_rng([client_seed(int(cfg[P.SEED]), server_round, context), 8])
            arrays, residual = encode_update(state, layout, transport, precision, rng,
                                             load_residual(context, belongs_to))
            keep_residual(context, belongs_to, residual)
        else:
            arrays, _ = encode_update(state, layout, transport, precision)
        return Message(RecordDict({P.ARRAYS: arrays, P.METRICS: metrics}), reply_to=msg)

    def evaluate(self, msg: Message, context: Context) -> Message:
        if self.evaluate_fn is None:
            raise ClientProtocolError("AutoFLIPClient has no evaluate_fn: pass evaluate_fn(model, task) -> "
                                      "EvalOutcome, or set fraction_evaluate=0.0 on the AutoFLIP strategy")
        cfg, user = split_config(msg)
        model, _ = self._receive(msg, context, cfg)
        model.to(self.device_for(context)).eval()
        outcome = self.evaluate_fn(model, EvalTask(context, int(cfg[P.ROUND]), user))
        weight_key = str(cfg.get(P.WEIGHT_KEY, P.NUM_EXAMPLES))
        metrics = _metrics({weight_key: int(outcome.num_examples), P.EVAL_LOSS: float(outcome.loss),
                            P.EVAL_ACC: float(outcome.accuracy)}, outcome.metrics)
        return Message(RecordDict({P.METRICS: metrics}), reply_to=msg)

    # ----------------------------------------------------------------- helpers
    def _receive(self, msg: Message, context: Context, cfg: Mapping[str, Any]) -> tuple[nn.Module, Layout]:
        """The compact model and its layout for this message (caching the mask per node)."""
        version, transport = int(cfg[P.MASK_VERSION]), str(cfg[P.TRANSPORT])
        layout = self._layout(msg, context, cfg, version, transport)
        structure = layout.structure
        model = self.model_fn(context)
        shapes = {n: tuple(t.shape) for n, t in model.state_dict().items() if n in structure.shapes}
        if shapes != structure.shapes:
            raise ClientProtocolError("the server's model structure does not match this client's model")
        compact = compact_model(model, layout.kept)
        compact.load_state_dict(self._model_state(msg, context, cfg, layout), strict=False)
        return compact, layout

    def _model_state(self, msg: Message, context: Context, cfg: Mapping[str, Any], layout: Layout) -> dict:
        """The compact state in the message: values, or (HideNseek) signs times the magnitudes this node
        keeps from its first delivery of the mask version."""
        version, transport = int(cfg[P.MASK_VERSION]), str(cfg[P.TRANSPORT])
        if str(cfg.get(P.MODEL_CODEC, "values")) == "signs":
            kept = context.state.get(_MAGNITUDES)
            meta = context.state.get(_MAGNITUDES + ".of")
            delivered = isinstance(meta, ConfigRecord) and meta.get("version") == version
            if not (isinstance(kept, ArrayRecord) and delivered):
                raise ClientProtocolError(f"the magnitudes of mask version {version} were never delivered to this node")
            return signs_state(msg.content[P.MODEL], decode_state(kept, layout, transport), layout)
        if cfg.get(P.SUPERMASK):
            context.state[_MAGNITUDES] = msg.content[P.MODEL]
            context.state[_MAGNITUDES + ".of"] = ConfigRecord({"version": version})
        return decode_state(msg.content[P.MODEL], layout, transport, precision=value_precision(cfg))

    def _layout(self, msg: Message, context: Context, cfg: Mapping[str, Any], version: int,
                transport: str) -> Layout:
        """This message's mask as a :class:`Layout` (from the message, or from ``context.state`` when this
        version was delivered before): its kept entries are computed once per message."""
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
            return Layout.build(structure, dense_mask(structure))
        record = context.state.get(_STATE_KEY + ".mask")
        if not isinstance(record, ArrayRecord):
            raise ClientProtocolError(f"mask version {version} is missing from this node's state")
        return decode_layout(record, structure, str(meta[P.TRANSPORT]))

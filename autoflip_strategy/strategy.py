"""The AutoFLIP strategy: thin orchestration of exploration, masks, codec and aggregation in Flower's hooks.

AutoFLIP follows Flower's data flow, so Flower's own ``Strategy.start`` and
Flower's strategy wrappers (e.g. ``DifferentialPrivacyServerSideFixedClipping``)
drive it like FedAvg. One round, as the hooks see it:

1. :meth:`configure_train` takes the global ``arrays`` it is given as the
   model (round 1: θ₀, and before it the exploration stage, for methods that
   explore), recomputes the hybrid mask from the method's scores
   (:mod:`.scoring`: one object per method; never a branch on its name),
   zeroes pruned coordinates in ``arrays`` itself (so a wrapper that keeps a
   reference sees the pruned model), samples clients (seeded, by partition
   id, so every method sees the same clients) and sends each the compact
   model, plus the packed mask to those that do not have this mask version.
2. :meth:`aggregate_train` validates every raw reply (any error in one reply
   rejects that reply only), averages the accepted ones (weighted by
   examples), re-applies the mask and lets the method refresh its scores. A round in which
   no sampled client's reply was accepted is a failed round; after
   ``max-failed-rounds`` of them in a row the run raises :class:`RunFailed`.
3. :meth:`configure_evaluate` / :meth:`aggregate_evaluate` do the same for
   client-side evaluation (``fraction-evaluate`` > 0); then the round's
   :class:`~.rounds.RoundRecord` is closed into :attr:`history` with realised and analytic bytes and FLOPs
   (after the central ``evaluate_fn`` when :meth:`start` was given one), the
   checkpoint is written and ``on_round`` is called.

:meth:`start` adds checkpoint/resume around Flower's ``Strategy.start``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from torch import nn

from . import guidance as G
from . import protocol as P
from .aggregation import (RejectedReply, TrainReply, WeightedAverage, normalised_reply, validate_eval_reply,
                          validate_explore_reply, validate_train_reply)
from .checkpoint import StrategyState, load_checkpoint, restore_strategy_state, save_checkpoint
from .codec import decode_state, encode_mask, encode_state, record_nbytes
from .config import AutoFLIPConfig, resolve_config
from .costs import FlopsByMask
from .failures import most_common_error, with_hint
from .geometry import Layout
from .intake import IntakeReport, intake_model, log_report
from .masks import HybridMask, apply_mask, dense_mask, empty_output_rows, mask_churn
from .nodes import NodeRegistry, one_reply_per_node, wait_for_nodes
from .rounds import FailedRounds, RoundRecord, plus
from .scoring import Method, MethodContext, build_method, round_mask
from .signs import analytic_sign_bytes, encode_signs, kept_signs, signs_as_values, vote
from .structure import ModelStructure, structure_to_json

RoundCallback = Callable[[dict[str, Any]], None]
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
MetricsAggrFn = Callable[[list[RecordDict], str], MetricRecord]
FORWARDED_RUN_CONFIG = ("local-epochs", "lr", "learning-rate")  # run-config keys sent to clients (Flower templates)
INTERNAL_METRICS = (P.MASK_VERSION, P.TRAIN_SECONDS, P.EPOCHS_RUN)  # reply metrics the user's aggregation never sees


def forwarded_train_config(run_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The run-config keys a Flower template's clients read (local epochs, learning rate), to send with training."""
    return {k: run_config[k] for k in FORWARDED_RUN_CONFIG if run_config and k in run_config}


def user_config(defaults: Mapping[str, Any], given: ConfigRecord | None, server_round: int) -> ConfigRecord:
    """The user's config for one message: the strategy's defaults, then what start() was given, then the round."""
    return ConfigRecord({**defaults, **dict(given or {}), P.ROUND: server_round})


def clipping_wrapper(caller: object) -> str | None:
    """The name of the Flower wrapper ``caller`` when it clips replies against the global arrays (Flower's
    server-side DP), which needs replies in the global layout (``transport="dense"``)."""
    from flwr.serverapp.strategy import (DifferentialPrivacyServerSideAdaptiveClipping,
                                         DifferentialPrivacyServerSideFixedClipping)

    clipping = (DifferentialPrivacyServerSideFixedClipping, DifferentialPrivacyServerSideAdaptiveClipping)
    return type(caller).__name__ if isinstance(caller, clipping) else None


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f} MB"


def plain_handler_hint() -> ArrayRecord:
    """What a plain Flower handler finds under ``arrayrecord_key``: a tensor whose name says what to do."""
    return ArrayRecord({P.PLAIN_HANDLER_HINT: Array(np.zeros(0, dtype=np.float32))})


def adopted_state(arrays: ArrayRecord, shapes: Mapping[str, tuple[int, ...]],
                  masks: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Flower's global arrays as the model (float32 copies), masked when ``masks`` is given (the wrapped
    pipeline may have changed them); fails when a tensor of the model is missing."""
    given = arrays.to_torch_state_dict()
    missing = set(shapes) - set(given)
    if missing:
        raise ValueError(f"the arrays lack tensors of the model: {sorted(missing)}")
    state = {n: given[n].detach().float().clone() for n in shapes}
    if masks is not None:
        apply_mask(state, masks)
    return state


def write_back(arrays: ArrayRecord, state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned coordinates in the caller's record too, so whoever holds it (Flower's start, a DP
    wrapper's clipping reference, central evaluation) works with the pruned model."""
    for name in masks:
        if name in arrays:
            arrays[name] = Array(state[name].numpy().astype(arrays[name].numpy().dtype, copy=False))


def warn_empty_rows(mask: HybridMask, version: int, structure: ModelStructure, changed: bool) -> int:
    """Classifier rows the mask leaves with no input (warned when the mask is new); their count."""
    empty = empty_output_rows(mask.weights, structure)
    if changed and empty:
        log(WARNING, "Mask v%d leaves output rows with no input (%s): those outputs keep only their bias; "
            "min-output-density (e.g. 0.5) reserves a share of every row", version,
            ", ".join(f"{n}: {k} of {structure.shapes[n][0]}" for n, k in empty.items()))
    return sum(empty.values())


class AutoFLIP(Strategy):
    """Federated hybrid pruning guided by federated loss exploration (and its baselines), shaped like FedAvg.

    Replace ``FedAvg(...)`` with ``AutoFLIP(model, example_input, ...)`` and keep FedAvg's arguments.

    Parameters
    ----------
    model : nn.Module
        The global architecture (its weights are not used; the strategy takes the arrays Flower gives it).
    example_input : torch.Tensor
        A batch shaped like the data, used to trace unit couplings and count FLOPs.
    config : AutoFLIPConfig, optional
        All settings at once (method, sparsity, exploration, sampling).
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes
        FedAvg's sampling arguments, with FedAvg's defaults (1.0, 1.0, 2, 2, 2) when neither ``config`` nor
        ``run_config`` sets them.
    weighted_by_key, arrayrecord_key, configrecord_key, train_metrics_aggr_fn, evaluate_metrics_aggr_fn
        As in FedAvg: the metric with the example count; the request keys of the arrays (AutoFLIP puts a
        note there for plain handlers; the compressed model travels under ``autoflip.model``) and of the
        user's config; how the replies' metrics are aggregated (default: weighted average).
    run_config : Mapping, optional
        The app's ``context.run_config``: keys named like AutoFLIP's options (``fraction-train``,
        ``sparsity``, ...) set them, and ``local-epochs``, ``lr``, ``learning-rate`` are sent to clients.
    train_config, evaluate_config : Mapping, optional
        Values sent to clients with every training / evaluation message (under ``configrecord_key``);
        ``start(train_config=...)`` adds to and overrides them.
    on_round : callable, optional
        Called with each round's record as soon as it is complete.
    ignored_layers : tuple of str
        Module names whose units are never removed.
    strict : bool
        Refuse (``UnsupportedModelError``) a model with units the intake cannot remove exactly,
        instead of pruning those layers element-wise only (see :mod:`.intake`).
    checkpoint : path, optional
        Where to write the strategy's state after every round (atomically); ``start(..., resume=True)``
        continues from it.
    **options
        Any other :class:`AutoFLIPConfig` field by name (``sparsity=0.5``, ``max_failed_rounds=3``, ...).

    Precedence (later wins): defaults, ``config``, ``run_config``, keyword arguments. For the values sent to
    clients: forwarded run-config keys, ``train_config``, ``start(train_config=...)``.
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        config: AutoFLIPConfig | None = None,
        *,
        fraction_train: float | None = None,
        fraction_evaluate: float | None = None,
        min_train_nodes: int | None = None,
        min_evaluate_nodes: int | None = None,
        min_available_nodes: int | None = None,
        weighted_by_key: str = P.NUM_EXAMPLES,
        arrayrecord_key: str = "arrays",
        configrecord_key: str = P.CONFIG,
        train_metrics_aggr_fn: MetricsAggrFn | None = None,
        evaluate_metrics_aggr_fn: MetricsAggrFn | None = None,
        run_config: Mapping[str, Any] | None = None,
        train_config: Mapping[str, Any] | None = None,
        evaluate_config: Mapping[str, Any] | None = None,
        on_round: RoundCallback | None = None,
        ignored_layers: tuple[str, ...] = (),
        strict: bool = False,
        checkpoint: str | Path | None = None,
        **options: Any,
    ) -> None:
        if config is not None and not isinstance(config, AutoFLIPConfig):
            raise TypeError("AutoFLIP's third argument is an AutoFLIPConfig; pass FedAvg's arguments by keyword "
                            "(fraction_train=..., ...)")
        sampling = {"fraction_train": fraction_train, "fraction_evaluate": fraction_evaluate,
                    "min_train_nodes": min_train_nodes, "min_evaluate_nodes": min_evaluate_nodes,
                    "min_available_nodes": min_available_nodes}
        self.config = resolve_config(config, run_config, {**{k: v for k, v in sampling.items() if v is not None},
                                                          **options})
        if P.SETTINGS in (arrayrecord_key, configrecord_key) or arrayrecord_key == configrecord_key:
            raise ValueError("arrayrecord_key and configrecord_key must differ from each other and from "
                             f"{P.SETTINGS!r}")
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.train_metrics_aggr_fn = train_metrics_aggr_fn or aggregate_metricrecords
        self.evaluate_metrics_aggr_fn = evaluate_metrics_aggr_fn or aggregate_metricrecords
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.train_config = {**forwarded_train_config(run_config), **dict(train_config or {})}
        self.evaluate_config = dict(evaluate_config or {})
        self.on_round = on_round
        intake = intake_model(model, example_input, ignored_layers, strict=strict)  # names what it leaves whole
        self.structure: ModelStructure = intake.structure
        self.intake: IntakeReport = intake.report
        log_report(self.intake)
        self._structure_json = structure_to_json(self.structure)
        self.method: Method = build_method(MethodContext(self.config, self.structure, model, example_input))
        self._flops = FlopsByMask(model, example_input)
        self.state: dict[str, torch.Tensor] = {}
        self.mask: HybridMask = dense_mask(self.structure)
        self.mask_version = 0
        self.layout = Layout.build(self.structure, self.mask)
        self.scores: dict[str, torch.Tensor] | None = None
        self._sent_model: dict[str, torch.Tensor] = {}  # the rounded model clients train from (value-precision < 32)
        self.delivered: dict[int, int] = {}  # node id -> mask version it holds
        self.nodes = NodeRegistry()  # partition handshake and absent nodes (nodes.py)
        self.partitions: dict[int, int] = self.nodes.partitions  # node id -> partition id (or -1)
        self.history: list[dict[str, Any]] = []
        self._round = RoundRecord(0, "init")
        self._started = False  # stage 0 (exploration / initial record) done
        self._offset = 0  # rounds done before this start() (resume): Flower's round r is our round r + offset
        self._central_pending = False  # start() evaluates centrally after aggregate_evaluate and closes the round
        self._central0: MetricRecord | None = None
        self._sent: dict[str, list[Message]] = {}
        self._failed = FailedRounds(self.config.max_failed_rounds)


    # ------------------------------------------------------------------ Flower's strategy interface
    def summary(self) -> None:
        c, prunes = self.config, self.method.prunes
        log(INFO, "\t├──> Sampling:")
        log(INFO, "\t│\t├──Fraction: train (%.2f) | evaluate ( %.2f)", c.fraction_train, c.fraction_evaluate)
        log(INFO, "\t│\t├──Minimum nodes: train (%d) | evaluate (%d)", c.min_train_nodes,
            c.min_evaluate_nodes if c.fraction_evaluate > 0 else 0)
        log(INFO, "\t│\t└──Minimum available nodes: %d", c.min_available_nodes)
        log(INFO, "\t├──> Keys in records:")
        log(INFO, "\t│\t├── Weighted by: '%s'", self.weighted_by_key)
        log(INFO, "\t│\t├── ArrayRecord key: '%s'", self.arrayrecord_key)
        log(INFO, "\t│\t└── ConfigRecord key: '%s'", self.configrecord_key)
        log(INFO, "\t├──> Method: %s | sparsity %.2f (structured %.2f) | transport %s, values %s | max failed "
            "rounds %d", c.strategy, c.sparsity if prunes else 0.0, c.structured_sparsity if prunes else 0.0,
            c.transport, c.value_precision, c.max_failed_rounds)
        log(INFO, "\t├──> Units: %s", ", ".join(f"{g.name}[{g.size}]" for g in self.structure.groups))
        log(INFO, "\t└──> Prunable weights: %d in %d tensors", self.structure.num_prunable,
            len(self.structure.prunable))

    def global_arrays(self) -> ArrayRecord:
        """The current global model (global layout, pruned coordinates zero)."""
        return ArrayRecord({n: t.clone() for n, t in self.state.items()})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Exploration before round 1, then this round's mask and one message per sampled node."""
        c, r, method = self.config, server_round + self._offset, self.method
        caller = sys._getframe(1).f_locals.get("self")  # a wrapper that calls us (Flower's start does not)
        if c.transport != "dense" and (wrapper := clipping_wrapper(caller)):
            raise ValueError(f"{wrapper} clips each reply against the global arrays, so AutoFLIP must send "
                             f"replies in the global layout: use transport=\"dense\" (now {c.transport!r})")
        self.state = adopted_state(arrays, self.structure.shapes, self.layout.tensor_masks if method.prunes else None)
        if not self._started:
            self._stage0(grid)
        self._round = RoundRecord(r, "train")
        if method.prunes:
            changed = False
            if not (method.fixed and self.mask_version):  # a fixed mask is computed once
                previous = self.mask if self.mask_version else None
                self.scores, mask = round_mask(method, self.scores, self.state, previous, r)
                if previous is not None:  # the first mask has nothing to churn against
                    self._round.churned(mask_churn(previous, mask))
                if changed := not mask.equals(self.mask):
                    self.mask, self.mask_version = mask, self.mask_version + 1
                    self.layout = Layout.build(self.structure, mask)
                apply_mask(self.state, self.layout.tensor_masks)
            self._round.empty_output_rows = warn_empty_rows(self.mask, self.mask_version, self.structure, changed)
            write_back(arrays, self.state, self.layout.tensor_masks)
        if c.fraction_train <= 0:
            self._sent["train"] = []
            return []
        nodes = self._sample(grid, r, c.fraction_train, c.min_train_nodes, "train")
        self._round.sampled = [self.partitions.get(n, -1) for n in nodes]
        messages = self._model_messages(r, nodes, MessageType.TRAIN, user_config(self.train_config, config, r))
        self._sent["train"] = messages
        log(INFO, "configure_train: Sampled %d nodes (out of %d) | mask v%d, density %.3f | down %s",
            len(nodes), len(list(grid.get_node_ids())), self.mask_version, self.mask.density(),
            _mb(self._round.bytes_down))
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each raw reply (a bad one is rejected, never fatal), average, re-mask, refresh the scores."""
        c, rec = self.config, self._round
        rec.train_aggregated = True
        average, stats, contents, accepted, examples = WeightedAverage(), G.UpdateStatistics(), [], [], []
        fallback_epochs = int(self.train_config.get("local-epochs", 1))
        hidden = (set(INTERNAL_METRICS) | {P.NUM_EXAMPLES}) - {self.weighted_by_key}  # not the user's metrics
        magnitudes = self.layout.to_compact(self.state) if self.method.signs else None
        for reply in self._replies(self._sent.pop("train", []), replies):
            node = reply.metadata.src_node_id
            try:
                content, metrics = normalised_reply(reply.content, self.weighted_by_key)
                if isinstance(arrays := content.get(P.ARRAYS), ArrayRecord):
                    rec.bytes_up += record_nbytes(arrays)
                if magnitudes is not None:  # sign bits up: validated as the values they stand for (signs.py)
                    content = signs_as_values(content, magnitudes, self.layout, c.transport,
                                              int(c.max_payload_mb * 2**20))
                result: TrainReply = validate_train_reply(
                    content, self.layout, self.mask_version, c.transport, c.max_examples,
                    int(c.max_payload_mb * 2**20), c.value_precision)
                start = self._sent_model or self.state  # updates are measured from what the client started from
                delta = {n: result.state[n] - start[n] for n in self.structure.prunable}
            except Exception as exc:  # no single reply can stop a run
                reason = str(exc) if isinstance(exc, RejectedReply) else f"{type(exc).__name__}: {exc}"
                rec.note_failure("rejected", node, self.partitions.get(node, -1), reason)
                continue
            self.delivered[node] = self.mask_version
            rec.analytic_bytes_up += analytic_sign_bytes(self.layout) if magnitudes is not None else \
                self.layout.analytic_bytes(False, c.value_precision)
            rec.client_train_seconds += result.seconds
            rec.replied.append(self.partitions.get(node, -1))
            average.add(result.state, result.num_examples)
            stats.add(delta, result.num_examples)
            epochs = metrics.get(P.EPOCHS_RUN, fallback_epochs)
            examples.append((result.num_examples,
                             epochs if isinstance(epochs, int) and epochs > 0 else fallback_epochs))
            accepted.append(result.num_examples)
            contents.append(RecordDict({P.METRICS: MetricRecord(
                {k: v for k, v in metrics.items() if k not in hidden})}))
        log(INFO, "aggregate_train: Received %d results and %d failures (%d rejected) | up %s",
            len(accepted), len(rec.failures()), len(rec.rejected), _mb(rec.bytes_up))
        self._failed.observe(rec, len(accepted), self._finish_round)
        if len(accepted) < c.min_train_replies:
            log(WARNING, "Round %d: %d valid replies, fewer than min-train-replies=%d; the model is unchanged",
                rec.round, len(accepted), c.min_train_replies)
            return None, None
        mean = average.result()
        if self.method.signs:  # the weighted sign vote; magnitudes stay |θ₀|
            mean.update(vote(mean, self.state, self.structure.prunable))
        self.state.update(mean)
        apply_mask(self.state, self.layout.tensor_masks)
        rec.train_flops = plus(rec.train_flops, self._flops.at(self.mask_version, self.layout),
                               sum(n * e for n, e in examples))
        if self.scores is not None:
            self.scores = self.method.refresh(self.scores, stats)
        try:
            metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        except Exception as exc:  # the user's aggregation must not lose the round's model
            log(WARNING, "train_metrics_aggr_fn failed (%s: %s); reporting AutoFLIP's metrics only",
                type(exc).__name__, exc)
            metrics = MetricRecord()
        metrics = MetricRecord({**dict(metrics), **rec.metrics(self.mask.density(), self.mask_version)})
        return self.global_arrays(), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        c, r = self.config, server_round + self._offset
        self._sent["evaluate"] = []
        if c.fraction_evaluate <= 0:
            return []
        masks = self.layout.tensor_masks if self.method.prunes else None
        self.state = adopted_state(arrays, self.structure.shapes, masks)
        if masks is not None:
            write_back(arrays, self.state, masks)
        nodes = self._sample(grid, r, c.fraction_evaluate, c.min_evaluate_nodes, "evaluate")
        self._sent["evaluate"] = messages = self._model_messages(
            r, nodes, MessageType.EVALUATE, user_config(self.evaluate_config, config, r))
        log(INFO, "configure_evaluate: Sampled %d nodes (out of %d)", len(nodes), len(list(grid.get_node_ids())))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Aggregate client evaluations (failures filed under the round's ``eval_*``), then close the round."""
        sent, contents, rec = self._sent.pop("evaluate", []), [], self._round
        rec.filing = "eval_"
        try:
            for reply in self._replies(sent, replies) if sent else []:
                node = reply.metadata.src_node_id
                try:
                    metrics = validate_eval_reply(reply.content, self.weighted_by_key, self.config.max_examples)
                except Exception as exc:
                    reason = str(exc) if isinstance(exc, RejectedReply) else f"{type(exc).__name__}: {exc}"
                    rec.note_failure("rejected", node, self.partitions.get(node, -1), reason)
                    continue
                self.delivered[node] = self.mask_version
                contents.append(RecordDict({P.METRICS: metrics}))
        finally:
            rec.filing = ""
        failed = rec.failures("eval_")
        if sent:
            log(INFO, "aggregate_evaluate: Received %d results and %d failures", len(contents), len(failed))
        if failed:
            log(WARNING, "Client evaluation failed on %d of %d nodes: %s", len(failed), len(sent),
                with_hint(most_common_error(f["reason"] for f in failed)))
        federated = self.evaluate_metrics_aggr_fn(contents, self.weighted_by_key) if contents else None
        if not rec.train_aggregated:  # a wrapper skipped aggregate_train (e.g. DP on errors)
            self._failed.observe(rec, 0, self._finish_round)
        rec.federated = federated
        if not self._central_pending:
            self._finish_round(None)
        return federated

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
        resume: bool = False,
        **flower_options: Any,
    ) -> Result:
        """Flower's ``Strategy.start`` (exploration happens in round 1's ``configure_train``), plus resume.

        With ``resume`` and an existing checkpoint, continue after its last round. ``timeout`` defaults to
        ``round-timeout``. Other keyword arguments (e.g. Flower 1.43's ``should_stop``) go to Flower.
        """
        if timeout is not None:
            self.config = replace(self.config, round_timeout=float(timeout))
        self._started, self._offset, self._central0 = False, 0, None
        self._failed = FailedRounds(self.config.max_failed_rounds)
        initial = initial_arrays
        if resume and self.checkpoint is not None and self.checkpoint.exists():
            saved = restore_strategy_state(load_checkpoint(self.checkpoint), self.config, self.structure.shapes)
            self.state, self.mask, self.mask_version = saved.state, saved.mask, saved.mask_version
            self.scores, self.history = saved.scores, saved.history
            self.layout = Layout.build(self.structure, self.mask)
            self.delivered = {}  # node ids and client state do not survive a restart: resend masks
            log(INFO, "Resuming after round %d from %s", saved.round, self.checkpoint)
            self._started, self._offset = True, saved.round
            initial = self.global_arrays()
        else:  # fail before any message if the arrays do not fit the model
            self.state = adopted_state(initial_arrays, self.structure.shapes,
                                       self.layout.tensor_masks if self.method.prunes else None)
        rounds = num_rounds - self._offset
        if rounds <= 0:
            return Result(arrays=self.global_arrays())

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            """Flower's central evaluation hook, closing each round's record once its central metrics are in."""
            if server_round == 0:
                if self._started:  # resumed: the initial model was evaluated and recorded by the first run
                    return None
                self._central0 = evaluate_fn(0, arrays)
                return self._central0
            evaluation = evaluate_fn(server_round + self._offset, arrays)
            self._finish_round(evaluation)
            return evaluation

        self._central_pending = evaluate_fn is not None
        try:
            result = Strategy.start(self, grid, initial, rounds, self.config.round_timeout, train_config,
                                    evaluate_config, central if evaluate_fn else None, **flower_options)
        finally:
            self._central_pending = False
        if not self._started:  # no round ran: still record stage 0
            self._stage0(grid)
        if self._offset:
            for name in ("train_metrics_clientapp", "evaluate_metrics_clientapp", "evaluate_metrics_serverapp"):
                setattr(result, name, {k + self._offset if k else k: v for k, v in getattr(result, name).items()})
        if not len(result.arrays):
            result.arrays = self.global_arrays()
        return result

    # ------------------------------------------------------------------ nodes (nodes.py)
    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        return wait_for_nodes(grid, self.config.min_available_nodes, self.config.round_timeout)

    def _describe(self, grid: Grid, nodes: Iterable[int]) -> None:
        """Ask nodes not known yet (nor absent) which partition they hold, under one handshake-timeout (nodes.py)."""
        nodes = list(nodes)
        new = [n for n in nodes if n not in self.partitions and n not in self.nodes.absent]
        timeout = min(self.config.handshake_timeout, self.config.round_timeout)
        refused = self.nodes.handshake(grid, new, nodes, timeout, self._round.round, self.config.round_timeout)
        self._round.refused(refused)

    def _sample(self, grid: Grid, server_round: int, fraction: float, minimum: int, purpose: str) -> list[int]:
        """Seeded sample of present nodes, ordered by partition id so node ids (random per run) do not matter
        (handshake, absent nodes, and partition ids learnt lazily above handshake-max-nodes: nodes.py)."""
        c = self.config
        nodes = self._wait_for_nodes(grid)
        chosen, refused = self.nodes.sample(
            grid, nodes, fraction, minimum, seed=c.seed, purpose=purpose, server_round=server_round,
            handshake_timeout=min(c.handshake_timeout, c.round_timeout), handshake_max_nodes=c.handshake_max_nodes,
            probe_ttl=max(c.round_timeout, 1.0), first_contact=c.round_timeout)
        self._round.refused(refused)
        self._round.absent = self.nodes.absent_record()
        return chosen

    def _replies(self, sent: list[Message], replies: Iterable[Message]) -> list[Message]:
        """Replies that carry content, in partition order (so aggregation is reproducible);
        errors and missing replies are recorded as dropped, nodes that did not answer as absent,
        and any reply beyond the first for a node as rejected (one reply per node per message)."""
        kept, extra = one_reply_per_node(sent, replies)
        for node, reason in extra:
            self._round.note_failure("rejected", node, self.partitions.get(node, -1), reason)
        got, ok = set(), []
        for node, reply in kept:
            got.add(node)
            if reply.metadata.src_node_id == node:  # not the SuperLink reporting the node offline
                self.nodes.seen(node)
            if reply.has_error():
                self._round.note_failure("dropped", node, self.partitions.get(node, -1),
                                         f"client error: {reply.error.reason}")
            else:
                ok.append(reply)
        for msg in sent:
            if (node := msg.metadata.dst_node_id) not in got:
                self._round.note_failure("dropped", node, self.partitions.get(node, -1), "no reply before the timeout")
                self.nodes.mark_absent(node, self._round.round,
                                       f"no reply to {msg.metadata.message_type} before the timeout")
        self._round.absent = self.nodes.absent_record()
        return sorted(ok, key=lambda m: (self.partitions.get(m.metadata.src_node_id, -1), m.metadata.src_node_id))

    # ------------------------------------------------------------------ stage 0, messages, ledger
    def _stage0(self, grid: Grid) -> None:
        """Round 0: exploration (methods that explore) or just the initial record, before round 1 trains.

        Explorers train from θ₀ and return one matrix per prunable weight; their weighted mean is streamed
        (the memory of one matrix) and becomes the method's initial scores."""
        c, method = self.config, self.method
        rec = self._round = RoundRecord(0, "explore" if method.explores else "init")
        if method.explores:
            log(INFO, "")
            log(INFO, "[EXPLORATION]")
            nodes = self._sample(grid, 0, c.explore_fraction, 1, "explore")
            rec.sampled = [self.partitions.get(n, -1) for n in nodes]
            theta0 = ArrayRecord({n: t.clone() for n, t in self.state.items()})
            size, config = record_nbytes(theta0), user_config(self.train_config, None, 0)
            settings = ConfigRecord({P.ROUND: 0, P.SEED: c.seed, P.EPOCHS: c.explore_epochs,
                                     P.PATIENCE: c.explore_patience, P.PRECISION: c.guidance_precision,
                                     P.CONFIG_KEY: self.configrecord_key, P.EXPLORE_KIND: method.explore_kind})
            sent = [Message(RecordDict({self.arrayrecord_key: plain_handler_hint(), self.configrecord_key: config,
                                        P.MODEL: theta0, P.SETTINGS: settings}), dst_node_id=node,
                            message_type=P.EXPLORE) for node in nodes]
            rec.bytes_down += size * len(sent)
            rec.analytic_bytes_down += 4 * sum(t.numel() for t in self.state.values()) * len(sent)
            log(INFO, "configure_explore: Sampled %d nodes (out of %d) | θ₀ %s each", len(sent),
                len(list(grid.get_node_ids())), _mb(size))
            average, dense_flops = WeightedAverage(), self._flops.at(self.mask_version, self.layout)
            for reply in self._replies(sent, grid.send_and_receive(sent, timeout=c.round_timeout)):
                node = reply.metadata.src_node_id
                try:
                    if isinstance(guidance := reply.content.get(P.GUIDANCE), ArrayRecord):
                        rec.bytes_up += record_nbytes(guidance)  # received, accepted or not
                    got = validate_explore_reply(reply.content, self.structure, c.guidance_precision,
                                                 c.max_examples, int(c.max_payload_mb * 2**20), c.explore_epochs)
                except Exception as exc:  # no single reply can stop a run
                    reason = str(exc) if isinstance(exc, RejectedReply) else f"{type(exc).__name__}: {exc}"
                    rec.note_failure("rejected", node, self.partitions.get(node, -1), reason)
                    continue
                rec.analytic_bytes_up += (16 if c.guidance_precision == "float16" else 32) * \
                    self.structure.num_prunable // 8
                rec.train_flops = plus(rec.train_flops, dense_flops, got.num_examples * got.epochs)
                rec.client_train_seconds += got.seconds
                rec.replied.append(self.partitions.get(node, -1))
                average.add(got.matrix, float(got.num_examples) if c.explore_weighting == "examples" else 1.0)
            log(INFO, "aggregate_explore: Received %d guidance matrices and %d failures", average.count,
                len(rec.failures()))
            if not average.count:
                log(WARNING, "Exploration returned no valid guidance: falling back to weight magnitudes")
            self.scores = method.explored(average.result() if average.count else None, self.state)
        self._started = True
        evaluation, self._central0 = self._central0, None
        if method.explores:
            self._failed.observe(rec, len(rec.replied), self._finish_round)
        self._finish_round(evaluation)

    def _model_messages(self, server_round: int, nodes: list[int], message_type: str,
                        config: ConfigRecord) -> list[Message]:
        """One message per node: shared model arrays and user config, the mask (and the structure) only where
        the node lacks this mask version, plus the method's per-round records on training messages."""
        c, layout = self.config, self.layout
        compact = layout.to_compact(self.state)
        arrays = encode_state(compact, layout, c.transport, c.value_precision)  # a rounded copy: master stays float32
        if message_type == MessageType.TRAIN:  # the guidance refresh measures updates from the rounded copy
            self._sent_model = {} if c.value_precision == "float32" else layout.to_global(
                decode_state(arrays, layout, c.transport, precision=c.value_precision))
        mask = encode_mask(layout, c.transport) if self.mask_version else None
        hint = plain_handler_hint()
        extra = self.method.request_records(self.state, layout) if message_type == MessageType.TRAIN else {}
        model_bytes = record_nbytes(hint) + sum(record_nbytes(r) for r in extra.values())
        signs = encode_signs(kept_signs(compact, layout), compact, layout) \
            if self.method.signs else None  # HideNseek: values on a node's first delivery, then signs (signs.py)
        sizes = {id(r): record_nbytes(r) for r in (arrays, signs) if r is not None}  # once, not per node
        mask_bytes = record_nbytes(mask) if mask else 0
        settings = {P.ROUND: server_round, P.SEED: c.seed, P.TRANSPORT: c.transport,
                    P.VALUE_PRECISION: c.value_precision, P.MASK_VERSION: self.mask_version,
                    P.CONFIG_KEY: self.configrecord_key, P.WEIGHT_KEY: self.weighted_by_key}
        messages = []
        for node in nodes:
            needs_mask = self.delivered.get(node) != self.mask_version  # the structure travels with a new version
            model = signs if signs is not None and not needs_mask else arrays
            codec = {} if signs is None else {P.SUPERMASK: True, P.MODEL_CODEC: "signs" if model is signs else "values"}
            ours = ConfigRecord({**settings, **codec, **({P.STRUCTURE: self._structure_json} if needs_mask else {})})
            content = RecordDict({self.arrayrecord_key: hint, self.configrecord_key: config, P.MODEL: model,
                                  P.SETTINGS: ours, **extra})
            if needs_mask and mask is not None:
                content[P.MASK] = mask
            structure_bytes = len(self._structure_json) if needs_mask else 0
            self._round.bytes_down += model_bytes + sizes[id(model)] + (mask_bytes if needs_mask else 0) + \
                structure_bytes
            self._round.analytic_bytes_down += analytic_sign_bytes(layout) if model is signs else \
                layout.analytic_bytes(needs_mask and mask is not None, c.value_precision)
            self._round.masks_sent += int(needs_mask and mask is not None)
            messages.append(Message(content, dst_node_id=node, message_type=message_type))
        return messages

    def _finish_round(self, evaluation: MetricRecord | None = None) -> dict[str, Any]:
        """Close the round's record once (history, log, checkpoint, ``on_round``); later calls return it."""
        if self._round.closed is not None:
            return self._round.closed
        record = self._round.close(self.history[-1] if self.history else {}, self.mask.density(),
                                   self.mask_version, evaluation)
        self.history.append(record)
        flops = "n/a" if record["train_flops"] is None else f"{record['train_flops'] / 1e9:.3g}"
        log(INFO, "\t└──> AutoFLIP %s %d: density %.3f (mask v%d) | down %s, up %s | %s GFLOPs | %d/%d replies",
            record["phase"], record["round"], record["density"], self.mask_version, _mb(record["bytes_down"]),
            _mb(record["bytes_up"]), flops, len(record["replied"]), len(record["sampled"]))
        if self.checkpoint is not None:
            save_checkpoint(self.checkpoint, StrategyState(record["round"], self.config, self.state, self.mask,
                                                           self.mask_version, self.scores, self.history).payload())
        if self.on_round:
            self.on_round(record)
        return record

"""The AutoFLIP strategy: thin orchestration of exploration, masks, codec and aggregation.

One round, as the server sees it:

1. :meth:`AutoFLIP._update_mask` recomputes the hybrid mask from the current
   scores (guidance for AutoFLIP, |θ| for the magnitude baseline, fixed random
   scores for the random baseline; nothing for FedAvg).
2. :meth:`configure_train` samples clients (seeded, by partition id, so every
   method sees the same clients) and sends each the pruned global model, plus
   the packed mask to those that do not have this mask version yet.
3. :meth:`aggregate_train` validates every reply, averages the accepted ones
   (weighted by examples), re-applies the mask and refreshes the guidance.
4. The global model is evaluated (centrally via ``evaluate_fn``, and on
   clients when ``fraction-evaluate`` > 0) and one record is appended to
   :attr:`history` with realised and analytic bytes and FLOPs.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, replace
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import nn

from . import guidance as G
from . import protocol as P
from .aggregation import (RejectedReply, TrainReply, WeightedAverage, example_count, finite_metric,
                          validate_train_reply)
from .codec import CodecError, Layout, decode_guidance, encode_mask, encode_state, record_nbytes
from .checkpoint import load_checkpoint, save_checkpoint
from .config import AutoFLIPConfig
from .costs import training_flops_per_example
from .masks import HybridMask, apply_mask, compute_hybrid_mask, dense_mask, empty_output_rows, scheduled_sparsity
from .structure import ModelStructure, discover_structure, structure_to_json

DESCRIBE_CHUNK = 100  # handshake messages in flight at once
RoundCallback = Callable[[dict[str, Any]], None]
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class AutoFLIP(Strategy):
    """Federated hybrid pruning guided by federated loss exploration (and its baselines).

    Parameters
    ----------
    model : nn.Module
        The global architecture (its weights are not used; ``start`` takes θ₀).
    example_input : torch.Tensor
        A batch shaped like the data, used to trace unit couplings and count FLOPs.
    config : AutoFLIPConfig
        Method, sparsity targets, exploration and sampling settings.
    train_config : Mapping, optional
        Extra values sent to clients with every training message
        (e.g. ``{"local-epochs": 5, "learning-rate": 3e-4}``).
    on_round : callable, optional
        Called with each round's record as soon as it is complete.
    ignored_layers : tuple of str
        Module names whose units are never removed.
    checkpoint : path, optional
        Where to write the strategy's state after every round (atomically).
        ``start(..., resume=True)`` continues from it.
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        config: AutoFLIPConfig | None = None,
        train_config: Mapping[str, Any] | None = None,
        on_round: RoundCallback | None = None,
        ignored_layers: tuple[str, ...] = (),
        checkpoint: str | Path | None = None,
    ) -> None:
        self.config = config or AutoFLIPConfig()
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.train_config = dict(train_config or {})
        self.on_round = on_round
        self.structure: ModelStructure = discover_structure(model, example_input, ignored_layers)
        self._structure_json = structure_to_json(self.structure)
        self._model = model
        self._example_input = example_input
        self._flops_per_example: dict[int, int] = {}
        self.state: dict[str, torch.Tensor] = {}
        self.mask: HybridMask = dense_mask(self.structure)
        self.mask_version = 0
        self.layout = Layout.build(self.structure, self.mask)
        self.scores: dict[str, torch.Tensor] | None = None
        self.delivered: dict[int, int] = {}  # node id -> mask version it holds
        self.partitions: dict[int, int] = {}  # node id -> partition id (or -1)
        self.history: list[dict[str, Any]] = []
        self._round: dict[str, Any] = {}

    # ------------------------------------------------------------------ helpers
    def summary(self) -> None:
        c = self.config
        log(INFO, "\t├──> Method: %s | sparsity %.2f (structured %.2f) | transport %s",
            c.strategy, c.sparsity if c.prunes else 0.0, c.structured_sparsity if c.prunes else 0.0, c.transport)
        log(INFO, "\t├──> Units: %s", ", ".join(f"{g.name}[{g.size}]" for g in self.structure.groups))
        log(INFO, "\t└──> Prunable weights: %d in %d tensors", self.structure.num_prunable, len(self.structure.prunable))

    def global_arrays(self) -> ArrayRecord:
        """The current global model (global layout, pruned coordinates zero)."""
        return ArrayRecord({n: t.clone() for n, t in self.state.items()})

    def _flops(self) -> int:
        """Training FLOPs per example at the current mask (compact structure, kept weights per layer)."""
        if self.mask_version not in self._flops_per_example:
            from .compact import compact_model

            compact = compact_model(self._model, self.layout.kept)
            self._flops_per_example[self.mask_version] = training_flops_per_example(
                compact, self._example_input, self.layout.compact_masks)
        return self._flops_per_example[self.mask_version]

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        deadline = time.time() + self.config.round_timeout
        while len(nodes := list(grid.get_node_ids())) < self.config.min_available_nodes:
            if time.time() > deadline:
                raise TimeoutError(f"only {len(nodes)} of {self.config.min_available_nodes} nodes connected")
            log(INFO, "Waiting for nodes: %d of %d connected", len(nodes), self.config.min_available_nodes)
            time.sleep(1)
        return nodes

    def _describe(self, grid: Grid, nodes: Iterable[int]) -> None:
        """Ask new nodes which partition they hold, so sampling is reproducible across runs."""
        new = [n for n in nodes if n not in self.partitions]
        if not new:
            return
        # in chunks: Flower's simulation engine polls every node against every message in flight
        for start in range(0, len(new), DESCRIBE_CHUNK):
            msgs = [Message(RecordDict(), dst_node_id=n, message_type=P.DESCRIBE)
                    for n in new[start:start + DESCRIBE_CHUNK]]
            for reply in grid.send_and_receive(msgs, timeout=self.config.round_timeout):
                pid = -1
                if not reply.has_error() and isinstance(m := reply.content.get(P.METRICS), MetricRecord):
                    value = m.get(P.PARTITION_ID, -1)
                    pid = int(value) if isinstance(value, (int, float)) else -1
                self.partitions[reply.metadata.src_node_id] = pid
        for n in new:
            self.partitions.setdefault(n, -1)

    def _sample(self, grid: Grid, server_round: int, fraction: float, minimum: int, purpose: str) -> list[int]:
        """Seeded sample, ordered by partition id so node ids (random per run) do not matter."""
        nodes = self._wait_for_nodes(grid)
        self._describe(grid, nodes)
        ordered = sorted(nodes, key=lambda n: (self.partitions.get(n, -1) < 0, self.partitions.get(n, -1), n))
        k = min(len(ordered), max(int(len(ordered) * fraction), minimum))
        rng = random.Random(f"{self.config.seed}:{purpose}:{server_round}")
        return sorted(rng.sample(ordered, k), key=ordered.index)

    def _config(self, server_round: int, node: int, **extra: Any) -> ConfigRecord:
        cfg = {**self.train_config, **extra, P.ROUND: server_round, P.SEED: self.config.seed,
               P.TRANSPORT: self.config.transport, P.MASK_VERSION: self.mask_version}
        if self.delivered.get(node) != self.mask_version:
            cfg[P.STRUCTURE] = self._structure_json
        return ConfigRecord(cfg)

    def _model_messages(self, server_round: int, nodes: list[int], message_type: str) -> list[Message]:
        """One message per node: shared model arrays, the mask only where it is missing."""
        arrays = encode_state(self.layout.to_compact(self.state), self.layout, self.config.transport)
        mask = encode_mask(self.layout, self.config.transport) if self.mask_version else None
        model_bytes, mask_bytes = record_nbytes(arrays), record_nbytes(mask) if mask else 0
        messages = []
        for node in nodes:
            needs_mask = self.delivered.get(node) != self.mask_version
            content = RecordDict({P.ARRAYS: arrays, P.CONFIG: self._config(server_round, node)})
            if needs_mask and mask is not None:
                content[P.MASK] = mask
            structure_bytes = len(self._structure_json) if needs_mask else 0  # sent with a new mask version
            self._round["bytes_down"] += model_bytes + (mask_bytes if needs_mask else 0) + structure_bytes
            self._round["analytic_bytes_down"] += self.layout.analytic_bytes(needs_mask and mask is not None)
            self._round["masks_sent"] += int(needs_mask and mask is not None)
            messages.append(Message(content, dst_node_id=node, message_type=message_type))
        return messages

    def _new_round(self, server_round: int, phase: str) -> None:
        self._round = {"round": server_round, "phase": phase, "bytes_down": 0, "bytes_up": 0,
                       "analytic_bytes_down": 0, "analytic_bytes_up": 0, "train_flops": 0,
                       "client_train_seconds": 0.0, "masks_sent": 0, "sampled": [], "replied": [],
                       "dropped": [], "rejected": [], "_t0": time.perf_counter()}

    def _note_failure(self, kind: str, node: int, reason: str) -> None:
        log(WARNING, "%s reply from node %d (partition %d): %s", kind, node, self.partitions.get(node, -1), reason)
        self._round["dropped" if kind == "dropped" else "rejected"].append(
            {"partition": self.partitions.get(node, -1), "node": node, "reason": reason})

    def _replies(self, sent: list[Message], replies: Iterable[Message]) -> list[Message]:
        """Replies that carry content, in partition order (so aggregation is reproducible);
        errors and missing replies are recorded as dropped."""
        got, ok = set(), []
        for reply in replies:
            node = reply.metadata.src_node_id
            got.add(node)
            if reply.has_error():
                self._note_failure("dropped", node, f"client error: {reply.error.reason}")
            else:
                ok.append(reply)
        for msg in sent:
            if msg.metadata.dst_node_id not in got:
                self._note_failure("dropped", msg.metadata.dst_node_id, "no reply before the timeout")
        return sorted(ok, key=lambda m: (self.partitions.get(m.metadata.src_node_id, -1), m.metadata.src_node_id))

    # --------------------------------------------------------------- stage 0
    def explore(self, grid: Grid) -> None:
        """Stage 0: explorers train from θ₀ and return local guidance matrices."""
        c = self.config
        nodes = self._sample(grid, 0, c.explore_fraction, 1, "explore")
        self._round["sampled"] = [self.partitions[n] for n in nodes]
        theta0 = ArrayRecord({n: t.clone() for n, t in self.state.items()})
        size = record_nbytes(theta0)
        sent = []
        for node in nodes:
            cfg = ConfigRecord({**self.train_config, P.ROUND: 0, P.SEED: c.seed, P.EPOCHS: c.explore_epochs,
                                P.PATIENCE: c.explore_patience, P.PRECISION: c.guidance_precision})
            sent.append(Message(RecordDict({P.ARRAYS: theta0, P.CONFIG: cfg}), dst_node_id=node, message_type=P.EXPLORE))
            self._round["bytes_down"] += size
            self._round["analytic_bytes_down"] += 4 * sum(t.numel() for t in self.state.values())
        matrices, weights = [], []
        dense_flops = self._flops()
        for reply in self._replies(sent, grid.send_and_receive(sent, timeout=c.round_timeout)):
            node = reply.metadata.src_node_id
            if isinstance(guidance := reply.content.get(P.GUIDANCE), ArrayRecord):
                self._round["bytes_up"] += record_nbytes(guidance)  # received, accepted or not
            try:
                matrix, n, epochs = self._validate_guidance(reply.content)
                seconds = finite_metric(reply.content[P.METRICS], P.TRAIN_SECONDS)
            except RejectedReply as exc:
                self._note_failure("rejected", node, str(exc))
                continue
            self._round["analytic_bytes_up"] += (16 if c.guidance_precision == "float16" else 32) * \
                self.structure.num_prunable // 8
            self._round["train_flops"] += dense_flops * n * epochs
            self._round["client_train_seconds"] += seconds
            self._round["replied"].append(self.partitions[node])
            matrices.append(matrix)
            weights.append(float(n) if c.explore_weighting == "examples" else 1.0)
        if matrices:
            self.scores = G.normalise(G.weighted_mean(matrices, weights), c.guidance_norm)
        else:
            log(WARNING, "Exploration returned no valid guidance: falling back to weight magnitudes")
            self.scores = G.magnitude(self.state, self.structure.prunable, c.guidance_norm)

    def _validate_guidance(self, content: RecordDict) -> tuple[dict[str, torch.Tensor], int, int]:
        guidance, metrics = content.get(P.GUIDANCE), content.get(P.METRICS)
        if not isinstance(guidance, ArrayRecord) or not isinstance(metrics, MetricRecord):
            raise RejectedReply("exploration reply needs 'guidance' and 'metrics' records")
        n = example_count(metrics, self.config.max_examples)
        try:
            matrix = decode_guidance(guidance, self.structure, self.config.guidance_precision)
        except CodecError as exc:
            raise RejectedReply(str(exc)) from None
        epochs = metrics.get(P.EPOCHS_RUN, self.config.explore_epochs)
        if not isinstance(epochs, int) or not 1 <= epochs <= self.config.explore_epochs:
            raise RejectedReply(f"{P.EPOCHS_RUN}={epochs!r} is outside [1, {self.config.explore_epochs}]")
        return matrix, n, epochs

    # ----------------------------------------------------------- each round
    def _update_mask(self, server_round: int) -> None:
        c = self.config
        if not c.prunes:
            return
        # a random mask is drawn once
        changed = not (c.strategy == "random" and self.mask_version) and self._recompute_mask(server_round)
        empty = empty_output_rows(self.mask.weights, self.structure)
        if changed and empty:
            log(WARNING, "Mask v%d leaves output rows with no input (%s): those outputs keep only their bias; "
                "min-output-density (e.g. 0.5) reserves a share of every row", self.mask_version,
                ", ".join(f"{n}: {k} of {self.structure.shapes[n][0]}" for n, k in empty.items()))
        self._round["empty_output_rows"] = sum(empty.values())

    def _recompute_mask(self, server_round: int) -> bool:
        """Recompute the mask from the current scores and apply it; True when it changed."""
        c = self.config
        if c.strategy == "random" and self.scores is None:
            gen = torch.Generator().manual_seed(c.seed)
            self.scores = {n: torch.rand(self.structure.shapes[n], generator=gen) for n in self.structure.prunable}
        elif c.strategy == "magnitude":
            self.scores = G.magnitude(self.state, self.structure.prunable, c.guidance_norm)
        ramp = 0 if c.strategy == "random" else c.sparsity_ramp_rounds
        sparsity = scheduled_sparsity(server_round, c.sparsity_initial, c.sparsity, ramp)
        structured = c.structured_sparsity * (sparsity / c.sparsity) if c.sparsity > 0 else c.structured_sparsity
        previous = self.mask if self.mask_version else None
        mask = compute_hybrid_mask(self.scores, self.structure, sparsity, structured, previous, c.regrowth,
                                   c.min_output_density)
        changed = not mask.equals(self.mask)
        if changed:
            self.mask, self.mask_version = mask, self.mask_version + 1
            self.layout = Layout.build(self.structure, mask)
        apply_mask(self.state, self.layout.tensor_masks)
        return changed

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        c = self.config
        nodes = self._sample(grid, server_round, c.fraction_train, c.min_train_nodes, "train")
        self._round["sampled"] = [self.partitions[n] for n in nodes]
        return self._model_messages(server_round, nodes, MessageType.TRAIN)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        c = self.config
        average, stats, losses, accepted = WeightedAverage(), G.UpdateStatistics(), [], []
        for reply in replies:
            node = reply.metadata.src_node_id
            arrays = reply.content.get(P.ARRAYS)
            if isinstance(arrays, ArrayRecord):
                self._round["bytes_up"] += record_nbytes(arrays)
            try:
                result: TrainReply = validate_train_reply(
                    reply.content, self.layout, self.mask_version, c.transport, c.max_examples,
                    int(c.max_payload_mb * 2**20))
            except RejectedReply as exc:
                self._note_failure("rejected", node, str(exc))
                continue
            self.delivered[node] = self.mask_version
            self._round["analytic_bytes_up"] += self.layout.analytic_bytes(False)
            self._round["client_train_seconds"] += result.seconds
            self._round["replied"].append(self.partitions.get(node, -1))
            average.add(result.state, result.num_examples)
            stats.add({n: result.state[n] - self.state[n] for n in self.structure.prunable}, result.num_examples)
            losses.append((result.loss, result.num_examples))
            accepted.append(result.num_examples)
        if len(accepted) < c.min_train_replies:
            log(WARNING, "Round %d: %d valid replies, fewer than min-train-replies=%d; the model is unchanged",
                server_round, len(accepted), c.min_train_replies)
            return None, None
        self.state.update(average.result())
        apply_mask(self.state, self.layout.tensor_masks)
        epochs = int(self.train_config.get("local-epochs", 1))
        self._round["train_flops"] += self._flops() * sum(accepted) * epochs
        if c.strategy == "autoflip" and self.scores is not None:
            self.scores = G.refresh(self.scores, stats, c.guidance_decay, c.agreement_weight, c.guidance_norm)
        loss = sum(l * n for l, n in losses) / sum(n for _, n in losses)
        return self.global_arrays(), MetricRecord({"train-loss": loss, "num-examples": sum(accepted)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        c = self.config
        if c.fraction_evaluate <= 0:
            return []
        nodes = self._sample(grid, server_round, c.fraction_evaluate, 1, "evaluate")
        return self._model_messages(server_round, nodes, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        totals, count = {"loss": 0.0, "accuracy": 0.0}, 0
        for reply in replies:
            m = reply.content.get(P.METRICS)
            try:
                if not isinstance(m, MetricRecord):
                    raise RejectedReply("evaluate reply without metrics")
                n = example_count(m, self.config.max_examples)
                values = {k: finite_metric(m, k) for k in totals}
            except RejectedReply as exc:
                self._note_failure("rejected", reply.metadata.src_node_id, str(exc))
                continue
            self.delivered[reply.metadata.src_node_id] = self.mask_version
            for k in totals:
                totals[k] += values[k] * n
            count += n
        return MetricRecord({k: v / count for k, v in totals.items()}) if count else None

    # ------------------------------------------------------------- checkpoint
    def checkpoint_state(self, server_round: int) -> dict[str, Any]:
        """Everything needed to continue after ``server_round`` (tensors and JSON only)."""
        return {
            "round": server_round,
            "config": json.dumps(asdict(self.config), sort_keys=True),
            "state": self.state,
            "mask_units": self.mask.units,
            "mask_weights": self.mask.weights,
            "mask_version": self.mask_version,
            "scores": self.scores if self.scores is not None else {},
            "history": json.dumps(self.history),
        }

    def load_checkpoint_state(self, payload: Mapping[str, Any]) -> int:
        """Restore :meth:`checkpoint_state`; returns the last completed round.

        Refuses (one :class:`CheckpointError`, a ValueError, listing every difference) a checkpoint
        written under other settings or for a model with other tensor names or shapes."""
        from .checkpoint import CheckpointError

        lacks = sorted({"round", "config", "state", "mask_units", "mask_weights", "mask_version", "scores",
                        "history"} - set(payload))
        if lacks:
            raise CheckpointError(f"checkpoint lacks {lacks}: not written by this strategy")
        saved, mine = json.loads(payload["config"]), asdict(self.config)
        # An option the checkpoint lacks did not exist when it was written: that run used its default.
        saved = {**asdict(type(self.config)()), **saved}
        differs = [f"{k}: {saved.get(k)!r} -> {mine[k]!r}" for k in sorted(mine)
                   if k != "round_timeout" and saved.get(k) != mine[k]]
        state, shapes = payload["state"], self.structure.shapes
        differs += [f"tensor {n}: only in the checkpoint" for n in sorted(set(state) - set(shapes))]
        differs += [f"tensor {n}: not in the checkpoint" for n in sorted(set(shapes) - set(state))]
        differs += [f"tensor {n}: shape {tuple(state[n].shape)} -> {tuple(shapes[n])}" for n in sorted(shapes)
                    if n in state and tuple(state[n].shape) != tuple(shapes[n])]
        if differs:
            raise CheckpointError("checkpoint does not fit this run (checkpoint -> now): " + "; ".join(differs))
        self.state = {n: t.float() for n, t in payload["state"].items()}
        self.mask = HybridMask(dict(payload["mask_units"]), dict(payload["mask_weights"]))
        self.mask_version = int(payload["mask_version"])
        self.layout = Layout.build(self.structure, self.mask)
        self.scores = dict(payload["scores"]) or None
        self.history = json.loads(payload["history"])
        self.delivered = {}  # node ids and client state do not survive a restart: resend masks
        return int(payload["round"])

    # ------------------------------------------------------------------ driver
    def _finish_round(self, evaluation: MetricRecord | None, federated: MetricRecord | None) -> dict[str, Any]:
        r = self._round
        record = {k: v for k, v in r.items() if not k.startswith("_")}
        record["seconds"] = time.perf_counter() - r["_t0"]
        record["density"] = self.mask.density() if self.config.prunes else 1.0
        record["mask_version"] = self.mask_version
        record["accuracy"] = float(evaluation["accuracy"]) if evaluation and "accuracy" in evaluation else None
        record["loss"] = float(evaluation["loss"]) if evaluation and "loss" in evaluation else None
        if federated is not None:
            record["client_accuracy"] = float(federated["accuracy"])
            record["client_loss"] = float(federated["loss"])
        previous = self.history[-1] if self.history else {}
        for key in ("bytes_down", "bytes_up", "analytic_bytes_down", "analytic_bytes_up", "train_flops",
                    "client_train_seconds"):
            record[f"cum_{key}"] = previous.get(f"cum_{key}", 0) + record[key]
        self.history.append(record)
        if self.checkpoint is not None:
            save_checkpoint(self.checkpoint, self.checkpoint_state(record["round"]))
        if self.on_round:
            self.on_round(record)
        return record

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
    ) -> Result:
        """Stage 0 (exploration, AutoFLIP only), then ``num_rounds`` pruned FL rounds.

        With ``resume`` and an existing checkpoint, continue after its last round.
        """
        if timeout is not None:
            self.config = replace(self.config, round_timeout=float(timeout))
        if train_config is not None:
            self.train_config.update(dict(train_config))
        initial = initial_arrays.to_torch_state_dict()
        missing = set(self.structure.shapes) - set(initial)
        if missing:
            raise ValueError(f"initial_arrays lack tensors of the model: {sorted(missing)}")
        self.state = {n: initial[n].detach().float().clone() for n in self.structure.shapes}
        log(INFO, "Starting AutoFLIP strategy (%s)", self.config.strategy)
        self.summary()
        result = Result()

        done = -1
        if resume and self.checkpoint is not None and self.checkpoint.exists():
            done = self.load_checkpoint_state(load_checkpoint(self.checkpoint))
            log(INFO, "Resuming after round %d from %s", done, self.checkpoint)
        if done < 0:
            self._new_round(0, "explore" if self.config.strategy == "autoflip" else "init")
            if self.config.strategy == "autoflip":
                self.explore(grid)
            evaluation = evaluate_fn(0, self.global_arrays()) if evaluate_fn else None
            if evaluation is not None:
                result.evaluate_metrics_serverapp[0] = evaluation
            self._finish_round(evaluation, None)

        arrays = None  # the global model as an ArrayRecord: serialised once per round and shared
        for server_round in range(max(done, 0) + 1, num_rounds + 1):
            self._new_round(server_round, "train")
            self._update_mask(server_round)
            sent = list(self.configure_train(server_round, self.global_arrays(), ConfigRecord(), grid))
            replies = self._replies(sent, grid.send_and_receive(sent, timeout=self.config.round_timeout))
            arrays, metrics = self.aggregate_train(server_round, replies)
            arrays = arrays if arrays is not None else self.global_arrays()
            if metrics is not None:
                result.train_metrics_clientapp[server_round] = metrics
            federated = None
            sent = list(self.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
            if sent:
                federated = self.aggregate_evaluate(
                    server_round, self._replies(sent, grid.send_and_receive(sent, timeout=self.config.round_timeout)))
                if federated is not None:
                    result.evaluate_metrics_clientapp[server_round] = federated
            evaluation = evaluate_fn(server_round, arrays) if evaluate_fn else None
            if evaluation is not None:
                result.evaluate_metrics_serverapp[server_round] = evaluation
            self._finish_round(evaluation, federated)
        result.arrays = arrays if arrays is not None else self.global_arrays()
        return result


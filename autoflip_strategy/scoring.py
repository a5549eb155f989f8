"""The pluggable *method*: what decides which weights matter, one object per method.

The strategy never branches on the method's name; it asks the :class:`Method` object the questions
below, at fixed points of a run. A method is built once per strategy (``METHODS[name](MethodContext)``)
and holds no run state of its own: the current scores live in the strategy (and its checkpoint), and are
handed in and returned, so a resumed run continues with the same scores.

What the strategy asks (and when)
---------------------------------
``prunes``
    False only for plain FedAvg: no mask, no scores, dense everything.
``explores``
    Whether stage 0 (before round 1) runs the exploration stage: sampled explorers train from θ₀ and
    each returns one non-negative matrix per prunable weight (``guidance`` record, checked by
    :func:`.aggregation.validate_explore_reply`). The server streams them into one weighted mean
    (weighted by examples or uniformly, ``explore-weighting``).
``explore_kind``
    What the explorers are asked to return (sent to them under ``P.EXPLORE_KIND``): ``"guidance"`` is
    AutoFLIP's ``(θ_k - θ₀)²``; a new method picks a new name and the client side answers it
    (:meth:`.client.AutoFLIPClient.explore`).
``explored(mean, state)``
    The initial scores from the explorers' mean (``None``: no valid reply; the default falls back to
    weight magnitudes, as AutoFLIP does).
``round_scores(scores, state)``
    The scores this round's mask is computed from, given the current scores (``None`` before the first
    mask of a method that does not explore) and the current global model: magnitude recomputes |θ|,
    random draws its scores once, AutoFLIP returns its guidance. Called every round unless ``fixed``.
``ranking(scores, state)``
    What the mask ranks, from those scores; the scores themselves are what the strategy keeps and refreshes.
    Default: the scores (AutoFLIP's ``guidance-score = deviation-magnitude``: guidance × |θ|).
``fixed``
    The mask is computed once (its first non-trivial version) and never again (random, and the
    at-initialisation methods).
``ramps``
    Whether ``sparsity-ramp-rounds`` applies (a fixed random mask does not ramp).
``refresh(scores, stats)``
    After each round's aggregation, the scores for the next round from the round's update statistics
    (:class:`.guidance.UpdateStatistics`, measured from the model the clients received). Default: unchanged.
``request_records(state, layout)``
    Extra per-round payload for every training message (``{record key: ArrayRecord}``), counted in the
    round's bytes down. Default: none.
``initial_mask(state)``
    ``(scores, mask)`` computed directly, before the first mask, instead of ranking ``round_scores``
    once (HideNseek's iterative SynFlow prunes through many masks). Default: ``None``.
``value_precision``
    The values' wire precision when the ``value-precision`` option is ``auto`` (its default). Default:
    float32, as the baselines' papers send; AutoFLIP's is int8 (docs/evidence.md, "Savings").
``signs``
    The model travels as sign bits (:mod:`.signs`): float32 values only on a node's first delivery of
    a mask version (the magnitudes it keeps), then the global signs down and the clients' signs up,
    aggregated by a weighted vote; clients train sign scores (:mod:`.supermask`). Default: False.

Adding a method (e.g. ``snip``): subclass :class:`Method`, set the flags, override what differs, add it to
:data:`METHODS` (the ``strategy`` option's choices are read from it), and, when it explores with a new
``explore_kind``, answer that kind on the client.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from flwr.app import ArrayRecord
from torch import nn

from . import guidance as G
from .masks import HybridMask, compute_hybrid_mask, scheduled_sparsity

if TYPE_CHECKING:  # config imports this module (the method names); only the type is needed here
    from .config import AutoFLIPConfig
    from .geometry import Layout
    from .structure import ModelStructure

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MethodContext:
    """What a method may know about the run: its settings and the model (architecture, example batch)."""

    config: AutoFLIPConfig
    structure: ModelStructure
    model: nn.Module
    example_input: torch.Tensor


class Method:
    """A method with AutoFLIP's defaults for every question (see the module docstring)."""

    name: ClassVar[str] = ""
    prunes: ClassVar[bool] = True
    explores: ClassVar[bool] = False
    explore_kind: ClassVar[str] = "guidance"
    fixed: ClassVar[bool] = False
    ramps: ClassVar[bool] = True
    signs: ClassVar[bool] = False
    value_precision: ClassVar[str] = "float32"

    def __init__(self, context: MethodContext) -> None:
        self.context = context

    def explored(self, mean: Tensors | None, state: Mapping[str, torch.Tensor]) -> Tensors:
        """Initial scores from the explorers' mean: normalised, or |θ| when no explorer's reply was valid."""
        c = self.context.config
        if mean is None:
            return G.magnitude(state, self.context.structure.prunable, c.guidance_norm)
        return G.normalise(mean, c.guidance_norm)

    def round_scores(self, scores: Tensors | None, state: Mapping[str, torch.Tensor]) -> Tensors:
        if scores is None:
            raise ValueError(f"method {self.name!r} has no scores yet (exploration did not run)")
        return scores

    def refresh(self, scores: Tensors, stats: G.UpdateStatistics) -> Tensors:
        return scores

    def ranking(self, scores: Tensors, state: Mapping[str, torch.Tensor]) -> Tensors:
        """What the mask ranks this round, from the scores the method keeps (default: the scores themselves)."""
        return scores

    def request_records(self, state: Mapping[str, torch.Tensor], layout: Layout) -> dict[str, ArrayRecord]:
        return {}

    def initial_mask(self, state: Mapping[str, torch.Tensor]) -> tuple[Tensors, HybridMask] | None:
        return None


class FedAvgMethod(Method):
    """Plain FedAvg: nothing is pruned."""

    name = "fedavg"
    prunes = False


class GuidanceMethod(Method):
    """AutoFLIP: exploration's guidance, refreshed every round by the clients' agreeing updates."""

    name = "autoflip"
    explores = True
    value_precision = "int8"

    def refresh(self, scores: Tensors, stats: G.UpdateStatistics) -> Tensors:
        c = self.context.config
        return G.refresh(scores, stats, c.guidance_decay, c.agreement_weight, c.guidance_norm)

    def ranking(self, scores: Tensors, state: Mapping[str, torch.Tensor]) -> Tensors:
        """The guidance, or (``guidance-score = deviation-magnitude``) guidance × |θ| renormalised per tensor:
        a weight is kept for moving under the clients' losses *and* for mattering to the output now. Only
        the mask sees the product; the guidance kept and refreshed across rounds stays unweighted."""
        c = self.context.config
        if c.guidance_score == "deviation":
            return scores
        return G.normalise({n: s * state[n].detach().abs().to(s.dtype) for n, s in scores.items()}, c.guidance_norm)


class MagnitudeMethod(Method):
    """PruneFL-style global magnitude pruning: |θ| of the current global model, every round."""

    name = "magnitude"

    def round_scores(self, scores: Tensors | None, state: Mapping[str, torch.Tensor]) -> Tensors:
        return G.magnitude(state, self.context.structure.prunable, self.context.config.guidance_norm)


class RandomMethod(Method):
    """A random mask (seeded scores drawn once), fixed after its first computation and not ramped."""

    name = "random"
    fixed = True
    ramps = False

    def round_scores(self, scores: Tensors | None, state: Mapping[str, torch.Tensor]) -> Tensors:
        if scores is not None:
            return scores
        s = self.context.structure
        gen = torch.Generator().manual_seed(self.context.config.seed)
        return {n: torch.rand(s.shapes[n], generator=gen) for n in s.prunable}


class SnipMethod(Method):
    """SNIP at initialisation, as the SSFL baseline: one global mask from the explorers' mean |g·θ₀| on one
    batch each (reusing the exploration stage), ranked globally without per-tensor normalisation, fixed."""

    name = "snip"
    explores = True
    explore_kind = "snip"
    fixed = True
    ramps = False

    def explored(self, mean: Tensors | None, state: Mapping[str, torch.Tensor]) -> Tensors:
        if mean is None:
            return super().explored(None, state)
        return G.normalise(mean, "none")


class HideNseekMethod(Method):
    """HideNseek: a data-free iterative SynFlow mask of θ₀ on the server, fixed; magnitudes stay |θ₀| and
    the clients learn the kept weights' signs (weighted vote); non-prunable tensors train in float32."""

    name = "hidenseek"
    fixed = True
    ramps = False
    signs = True

    def initial_mask(self, state: Mapping[str, torch.Tensor]) -> tuple[Tensors, HybridMask]:
        from .saliency import synflow_mask, synflow_scores

        c, ctx = self.context.config, self.context
        model = copy.deepcopy(ctx.model)
        model.load_state_dict(dict(state), strict=False)
        mask = synflow_mask(model, ctx.structure, ctx.example_input, c.sparsity, c.structured_sparsity,
                            c.synflow_iterations, c.min_output_density)
        return synflow_scores(model, ctx.structure, ctx.example_input, mask), mask


METHODS: dict[str, type[Method]] = {
    "autoflip": GuidanceMethod,
    "fedavg": FedAvgMethod,
    "random": RandomMethod,
    "magnitude": MagnitudeMethod,
    "snip": SnipMethod,
    "hidenseek": HideNseekMethod,
}
"""Every method by its ``strategy`` option value; the option's choices are these keys."""


def build_method(context: MethodContext) -> Method:
    """The method object for ``context.config.strategy``."""
    try:
        return METHODS[context.config.strategy](context)
    except KeyError:
        raise ValueError(f"unknown method {context.config.strategy!r}; known: {sorted(METHODS)}") from None


def round_mask(method: Method, scores: Tensors | None, state: Mapping[str, torch.Tensor],
               previous: HybridMask | None, server_round: int) -> tuple[Tensors, HybridMask]:
    """This round's scores and the hybrid mask they give, at the round's (ramped) sparsity.

    Structured sparsity ramps in proportion to the total; ``previous`` (the mask in force, ``None`` before
    the first) keeps pruned weights pruned unless ``regrowth``."""
    c, structure = method.context.config, method.context.structure
    if previous is None and (preset := method.initial_mask(state)) is not None:
        return preset
    scores = method.round_scores(scores, state)
    sparsity = scheduled_sparsity(server_round, c.sparsity_initial, c.sparsity,
                                  c.sparsity_ramp_rounds if method.ramps else 0)
    structured = c.structured_sparsity * (sparsity / c.sparsity) if c.sparsity > 0 else c.structured_sparsity
    mask = compute_hybrid_mask(method.ranking(scores, state), structure, sparsity, structured, previous, c.regrowth,
                               c.min_output_density, c.layer_budget)
    return scores, mask

"""The *what*: guidance matrices that say how much each weight matters.

Stage 0 (exploration): each explorer trains from the common θ₀ and reports
``D_k = (θ_k - θ₀)²`` per prunable weight; the server averages them (weighted
by examples) and normalises each tensor so layers of different scale compete
fairly in one global ranking. Every round the guidance is refreshed with the
round's aggregated squared updates, scaled by how much clients agree on the
update's sign (AutoFLIP v4/v5 "client agreement").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .aggregation import WeightedAverage

Tensors = dict[str, torch.Tensor]
NORMALISATIONS = ("mean", "max", "none")


def local_guidance(initial: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor],
                   names: Iterable[str]) -> Tensors:
    """Element-wise squared deviation of the explored weights from θ₀."""
    return {n: (trained[n].detach().float() - initial[n].detach().float()).pow(2) for n in names}


def weighted_mean(matrices: list[Mapping[str, torch.Tensor]], weights: list[float]) -> Tensors:
    """Σ w_k M_k / Σ w_k, tensor by tensor, for matrices already in memory (the strategy streams
    explorers' matrices into a :class:`~.aggregation.WeightedAverage` instead)."""
    if not matrices or len(matrices) != len(weights):
        raise ValueError("need one weight per matrix and at least one matrix")
    average = WeightedAverage()
    for m, w in zip(matrices, weights):
        average.add(m, w)
    return average.result()


def normalise(matrix: Mapping[str, torch.Tensor], how: str = "mean") -> Tensors:
    """Scale each tensor to mean 1 (``mean``) or max 1 (``max``); all-zero tensors stay zero."""
    if how not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {how!r}")
    out: Tensors = {}
    for name, t in matrix.items():
        t = t.float()
        scale = t.mean() if how == "mean" else t.max() if how == "max" else torch.tensor(1.0)
        out[name] = t / scale if scale > 0 else t.clone()
    return out


class UpdateStatistics:
    """Streams the round's client updates into the weighted means of Δ² and sign(Δ)."""

    def __init__(self) -> None:
        self._sq = WeightedAverage()
        self._sign = WeightedAverage()

    def add(self, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        d = {n: t.double() for n, t in delta.items()}
        self._sq.add({n: t * t for n, t in d.items()}, weight)
        self._sign.add({n: torch.sign(t) for n, t in d.items()}, weight)

    @property
    def empty(self) -> bool:
        return self._sq.weight == 0.0

    def squared_update(self) -> Tensors:
        return self._sq.result()

    def sign_agreement(self) -> Tensors:
        """|weighted mean sign| in [0, 1]: 1 when every client moved a weight the same way."""
        return {n: t.abs() for n, t in self._sign.result().items()}


def refresh(guidance: Mapping[str, torch.Tensor], stats: UpdateStatistics, decay: float,
            agreement_weight: float, how: str = "mean") -> Tensors:
    """G ← norm(decay·G + (1-decay)·norm(Σw Δ²)·((1-γ) + γ·agreement))."""
    if stats.empty:
        return dict(guidance)
    fresh = normalise(stats.squared_update(), how)
    agreement = stats.sign_agreement()
    mixed = {}
    for name, g in guidance.items():
        r = fresh[name] * ((1.0 - agreement_weight) + agreement_weight * agreement[name])
        mixed[name] = decay * g + (1.0 - decay) * r
    return normalise(mixed, how)


def magnitude(state: Mapping[str, torch.Tensor], names: Iterable[str], how: str = "mean") -> Tensors:
    """|θ| per weight: the PruneFL-style score used by the magnitude baseline."""
    return normalise({n: state[n].detach().abs().float() for n in names}, how)

"""The *which*: the hybrid mask, computed from per-weight scores.

Structured part: each unit group (see :mod:`.structure`) is scored by the mean
score of its units' fan-in weights, and the lowest ``structured_sparsity``
fraction of units in every group is removed. Unstructured part: among the
weights that remain, one global ranking keeps the highest-scoring weights
until the total density (units and single weights together) is
``1 - sparsity``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .geometry import remove_units, tensor_masks  # noqa: F401 (tensor_masks: importable from here too)
from .structure import ModelStructure, UnitGroup


@dataclass(frozen=True)
class HybridMask:
    """Keep-vectors per unit group and keep-masks per prunable weight (global shapes).

    ``weights`` already has the rows/columns of removed units cleared, so it is
    the complete answer for prunable weights; :func:`tensor_masks` adds the
    biases and norm channels that removed units take with them.
    """

    units: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]

    def density(self) -> float:
        kept = sum(int(m.sum()) for m in self.weights.values())
        total = sum(m.numel() for m in self.weights.values())
        return kept / total if total else 1.0

    def equals(self, other: HybridMask | None) -> bool:
        if other is None or self.units.keys() != other.units.keys() or self.weights.keys() != other.weights.keys():
            return False
        return all(torch.equal(v, other.units[k]) for k, v in self.units.items()) and all(
            torch.equal(v, other.weights[k]) for k, v in self.weights.items()
        )


@dataclass(frozen=True)
class MaskChurn:
    """How much a mask recomputation changed: prunable weights and units that switched kept <-> pruned."""

    weights: int  # prunable weights whose keep bit differs
    units: int  # units (all groups together) whose keep bit differs
    prunable: int  # prunable weights in all

    @property
    def fraction(self) -> float:
        """Changed weights as a fraction of all prunable weights."""
        return self.weights / self.prunable if self.prunable else 0.0


def mask_churn(before: HybridMask, after: HybridMask) -> MaskChurn:
    """What changed from ``before`` (the mask in force) to ``after`` (the one recomputed), in both directions."""
    if before.units.keys() != after.units.keys() or before.weights.keys() != after.weights.keys():
        raise ValueError("masks of different models: their unit groups or prunable weights differ")
    for kind, old, new in (("unit group", before.units, after.units), ("weight", before.weights, after.weights)):
        for name, keep in old.items():
            if keep.shape != new[name].shape:
                raise ValueError(f"{kind} {name}: shape {tuple(keep.shape)} before, {tuple(new[name].shape)} after")
    weights = sum(int((keep != after.weights[n]).sum()) for n, keep in before.weights.items())
    units = sum(int((keep != after.units[g]).sum()) for g, keep in before.units.items())
    return MaskChurn(weights, units, sum(keep.numel() for keep in before.weights.values()))


def dense_mask(structure: ModelStructure) -> HybridMask:
    """The mask that keeps everything (FedAvg)."""
    return HybridMask(
        {g.name: torch.ones(g.size, dtype=torch.bool) for g in structure.groups},
        {n: torch.ones(structure.shapes[n], dtype=torch.bool) for n in structure.prunable},
    )


def scheduled_sparsity(server_round: int, initial: float, final: float, ramp_rounds: int) -> float:
    """Linear ramp from ``initial`` (round 1) to ``final`` (round ``ramp_rounds`` and later)."""
    if ramp_rounds <= 1 or server_round >= ramp_rounds:
        return final
    progress = (max(server_round, 1) - 1) / (ramp_rounds - 1)
    return initial + (final - initial) * progress


def _unit_view(tensor: torch.Tensor, group: UnitGroup, member) -> torch.Tensor:
    """Reshape so that dim 1 indexes the group's units: (chunks, units, block * rest)."""
    moved = tensor.movedim(member.dim, 0)
    return moved.reshape(member.chunks, group.size, -1)


def unit_scores(scores: Mapping[str, torch.Tensor], structure: ModelStructure) -> dict[str, torch.Tensor]:
    """Mean score of each unit's fan-in weights (averaged over the group's fan-in tensors)."""
    out = {}
    for group in structure.groups:
        parts = [
            _unit_view(scores[m.tensor], group, m).mean(dim=(0, 2))
            for m in group.members
            if m.fan_in and m.tensor in scores
        ]
        out[group.name] = torch.stack(parts).mean(0) if parts else torch.zeros(group.size)
    return out


def _choose_units(score: torch.Tensor, n_remove: int, forced: torch.Tensor | None) -> torch.Tensor:
    """Keep-vector removing ``n_remove`` units: forced removals first, then lowest scores."""
    score = score.clone().double()
    if forced is not None:
        score[forced] = -math.inf
        n_remove = max(n_remove, int(forced.sum()))
    order = torch.sort(score, stable=True).indices
    keep = torch.ones_like(score, dtype=torch.bool)
    keep[order[:n_remove]] = False
    return keep


def fixed_output_tensors(structure: ModelStructure) -> list[str]:
    """Prunable weights whose output rows belong to no unit group (the classifier's): never removable."""
    fan_in = {m.tensor for g in structure.groups for m in g.members if m.fan_in}
    return [n for n in structure.prunable if n not in fan_in]


def empty_output_rows(weights: Mapping[str, torch.Tensor], structure: ModelStructure) -> dict[str, int]:
    """Per classifier weight (:func:`fixed_output_tensors`), how many output rows keep no input.

    ``weights``: keep-masks by weight name (``HybridMask.weights``, or a run's ``final_mask.pt``). Such
    an output is left with its bias alone: the global ranking can do this to the rows of frequent
    classes (docs/evidence.md, Shakespeare), which ``min_output_density`` prevents. Weights with none are left out."""
    out = {}
    for name in fixed_output_tensors(structure):
        keep = weights[name]
        if empty := int((~keep.reshape(keep.shape[0], -1).any(1)).sum()):
            out[name] = empty
    return out


def _reserved_rows(candidates: torch.Tensor, score: torch.Tensor, share: float) -> torch.Tensor:
    """Per output row, the ceil(share * candidates in the row) best-scored candidates."""
    rows = candidates.reshape(candidates.shape[0], -1)
    ranked = torch.where(rows, score.reshape(rows.shape).double(), torch.tensor(-math.inf, dtype=torch.float64))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    quota = torch.ceil(share * rows.sum(1).double() - 1e-9).long()
    take = torch.arange(rows.shape[1])[None, :] < quota[:, None]
    reserved = torch.zeros_like(rows)
    reserved.scatter_(1, order, take)
    return (reserved & rows).reshape(candidates.shape)


def compute_hybrid_mask(
    scores: Mapping[str, torch.Tensor],
    structure: ModelStructure,
    sparsity: float,
    structured_sparsity: float,
    previous: HybridMask | None = None,
    regrowth: bool = False,
    min_output_density: float = 0.0,
    layer_budget: str = "global",
) -> HybridMask:
    """The global hybrid mask for per-weight ``scores`` (higher = more important).

    ``sparsity`` is the fraction of all prunable weights removed in total;
    ``structured_sparsity`` the fraction of units removed from each group
    (at least one unit always survives). Without ``regrowth`` nothing that
    ``previous`` pruned comes back. ``min_output_density`` reserves, in every
    row of a :func:`fixed_output_tensors` weight, that share of its candidates
    (best scores first) before the global ranking fills the rest of the budget;
    when the ranking keeps them anyway the mask is the same as without it.
    ``layer_budget`` splits the unstructured budget: ``global`` (one ranking across tensors), ``uniform``
    (every tensor keeps the same share of its candidates) or ``erk`` (Erdős–Rényi-kernel shares, as in
    RigL: larger for tensors with few weights per fan-in + fan-out), each ranked within itself.
    """
    sticky = previous is not None and not regrowth
    unit_score = unit_scores(scores, structure)
    units = {}
    for group in structure.groups:
        n_remove = min(int(math.floor(structured_sparsity * group.size + 1e-9)), group.size - 1)
        forced = ~previous.units[group.name] if sticky else None
        units[group.name] = _choose_units(unit_score[group.name], n_remove, forced)

    candidates = {n: torch.ones(structure.shapes[n], dtype=torch.bool) for n in structure.prunable}
    remove_units(candidates, structure, units)
    if sticky:
        candidates = {n: c & previous.weights[n] for n, c in candidates.items()}

    names = list(structure.prunable)
    counts = {n: int(candidates[n].sum()) for n in names}
    target = int(round((1.0 - sparsity) * sum(candidates[n].numel() for n in names)))
    if sum(counts.values()) <= target:
        return HybridMask(units, candidates)
    fixed = fixed_output_tensors(structure) if min_output_density > 0 else []
    reserved = {n: _reserved_rows(candidates[n], scores[n], min_output_density) for n in fixed}
    if layer_budget != "global":
        quotas = layer_quotas(counts, {n: structure.shapes[n] for n in names}, target, layer_budget,
                              {n: int(r.sum()) for n, r in reserved.items()})
        return HybridMask(units, {n: _keep_top(candidates[n], scores[n], quotas[n], reserved.get(n)) for n in names})
    # One global ranking: the same selection over every prunable tensor at once, then split back.
    def flat(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([parts[n].reshape(-1) for n in names])

    pinned = flat({n: reserved.get(n, torch.zeros_like(candidates[n])) for n in names}) if reserved else None
    keep = _keep_top(flat(candidates), flat({n: scores[n].double() for n in names}), target, pinned)
    weights, offset = {}, 0
    for n in names:
        size = candidates[n].numel()
        weights[n] = keep[offset:offset + size].reshape(candidates[n].shape).clone()
        offset += size
    return HybridMask(units, weights)


def layer_quotas(counts: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]], target: int, how: str,
                 floors: Mapping[str, int] | None = None) -> dict[str, int]:
    """Weights each tensor keeps out of its ``counts`` candidates so that the total is ``target``.

    ``uniform``: the same share everywhere. ``erk``: shares ∝ (Σ dims) / (Π dims) of the tensor's shape.
    A tensor whose share would exceed its candidates keeps them all, one below its ``floors`` (e.g. the
    classifier rows that ``min_output_density`` reserves) keeps its floor, and the rest of the budget is
    shared again among the others (RigL's ERK capping, with floors)."""
    if how not in ("uniform", "erk"):
        raise ValueError(f"layer budget must be global, uniform or erk, got {how!r}")
    if sum(counts.values()) <= target:
        return dict(counts)
    floor = {n: min(int((floors or {}).get(n, 0)), counts[n]) for n in counts}
    weight = {n: 1.0 if how == "uniform" else sum(shapes[n]) / math.prod(shapes[n]) for n in counts}
    pinned: dict[str, float] = {}
    while True:  # every pass pins at least one more tensor, so this ends
        free = [n for n in counts if n not in pinned]
        mass = sum(weight[n] * counts[n] for n in free)
        eps = (target - sum(pinned.values())) / mass if mass > 0 else 0.0
        raw = {n: eps * weight[n] * counts[n] for n in free}
        over = {n for n in free if raw[n] > counts[n]}
        under = {n for n in free if raw[n] < floor[n]} - over
        if not over and not under:
            break
        pinned.update({n: float(counts[n]) for n in over} | {n: float(floor[n]) for n in under})
    raw.update(pinned)
    quotas = {n: min(counts[n], max(floor[n], int(math.floor(v)))) for n, v in raw.items()}
    by_remainder = sorted(counts, key=lambda n: raw[n] - math.floor(raw[n]), reverse=True)
    for n in by_remainder:  # largest remainders first, until the total is exact
        if sum(quotas.values()) >= target:
            break
        if quotas[n] < counts[n]:
            quotas[n] += 1
    return quotas


def _keep_top(candidates: torch.Tensor, score: torch.Tensor, quota: int, reserved: torch.Tensor | None) -> torch.Tensor:
    """Keep-mask of the ``quota`` best-scored candidates of one tensor, ``reserved`` ones first."""
    flat = candidates.reshape(-1)
    ranked = torch.where(flat, score.reshape(-1).double(), torch.tensor(-math.inf, dtype=torch.float64))
    keep = torch.zeros_like(flat)
    if reserved is not None:
        keep |= reserved.reshape(-1) & flat
        ranked = torch.where(keep, torch.tensor(-math.inf, dtype=torch.float64), ranked)
    order = torch.sort(ranked, descending=True, stable=True).indices
    keep[order[:max(quota - int(keep.sum()), 0)]] = True
    return (keep & flat).reshape(candidates.shape)


def apply_mask(state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero, in place, every masked-out coordinate of ``state``."""
    with torch.no_grad():
        for name, m in masks.items():
            state[name].mul_(m.to(state[name].dtype))

"""Mask geometry: which entries of which tensors a hybrid mask keeps, and the compact view of the model.

A removed unit (see :mod:`.structure`) owns slices of several tensors. :func:`removed_slices` is the
one place that turns unit keep-vectors into those slices; :func:`remove_units` clears them in keep-masks
and :func:`kept_entries` lists what survives per dimension. :class:`Layout` is what both ends of the wire
derive once from (structure, mask): kept entries, compact shapes and compact weight masks, and the moves
between the global layout (server) and the compact one (the client's physically smaller model,
:mod:`.compact`). The codec (:mod:`.codec`) encodes in a layout; it does not define it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch

from .quantise import value_bits
from .structure import ModelStructure

if TYPE_CHECKING:  # masks.py imports this module
    from .masks import HybridMask

Kept = dict[str, tuple[torch.Tensor | None, ...]]


def removed_slices(structure: ModelStructure,
                   units: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, int, torch.Tensor]]:
    """``(tensor, dim, positions)`` for every slice that a removed unit owns.

    ``units`` maps group name to a bool keep-vector; missing groups (and groups that keep all) remove nothing."""
    for group in structure.groups:
        keep = units.get(group.name)
        if keep is None or bool(keep.all()):
            continue
        removed = torch.nonzero(~keep).flatten()
        for member in group.members:
            yield member.tensor, member.dim, group.entries(member, removed)


def remove_units(mask_tensors: dict[str, torch.Tensor], structure: ModelStructure,
                 units: Mapping[str, torch.Tensor]) -> None:
    """Clear, in place, every entry that a removed unit owns in the given tensors."""
    for tensor, dim, index in removed_slices(structure, units):
        if tensor in mask_tensors:
            mask_tensors[tensor].index_fill_(dim, index, False)


def kept_entries(structure: ModelStructure, units: Mapping[str, torch.Tensor]) -> Kept:
    """Per tensor and dimension, the kept positions (``None``: the whole dimension).

    Only tensors with at least one narrowed dimension appear in the result."""
    alive: dict[str, list[torch.Tensor | None]] = {}
    for tensor, dim, index in removed_slices(structure, units):
        shape = structure.shapes[tensor]
        dims = alive.setdefault(tensor, [None] * len(shape))
        if dims[dim] is None:
            dims[dim] = torch.ones(shape[dim], dtype=torch.bool)
        dims[dim][index] = False
    return {name: tuple(None if a is None else torch.nonzero(a).flatten() for a in dims)
            for name, dims in alive.items()}


def select(tensor: torch.Tensor, dims: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
    """Cut the kept rows/columns out of a global-layout tensor."""
    for d, idx in enumerate(dims):
        if idx is not None:
            tensor = tensor.index_select(d, idx)
    return tensor


def scatter(compact: torch.Tensor, dims: tuple[torch.Tensor | None, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """Place a compact tensor back into a zero global-layout tensor (inverse of :func:`select`)."""
    out = torch.zeros(shape, dtype=compact.dtype)
    index = tuple(
        (torch.arange(s) if idx is None else idx).reshape([-1 if j == d else 1 for j in range(len(shape))])
        for d, (idx, s) in enumerate(zip(dims, shape))
    )
    out[index] = compact
    return out


def compact_shapes(structure: ModelStructure, kept: Kept) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape once the removed units are cut out."""
    return {name: tuple(s if d is None else len(d) for s, d in zip(shape, kept.get(name, (None,) * len(shape))))
            for name, shape in structure.shapes.items()}


def tensor_masks(mask: HybridMask, structure: ModelStructure) -> dict[str, torch.Tensor]:
    """Keep-masks (global layout) for every tensor the mask touches: prunable weights plus coupled
    biases/norms."""
    out = {n: m.clone() for n, m in mask.weights.items()}
    for group in structure.groups:
        for member in group.members:
            out.setdefault(member.tensor, torch.ones(structure.shapes[member.tensor], dtype=torch.bool))
    remove_units(out, structure, mask.units)
    return out


@dataclass(frozen=True)
class Layout:
    """What both ends derive from (structure, mask): kept entries, compact shapes and masks."""

    structure: ModelStructure
    mask: HybridMask
    kept: Kept
    compact_shapes: dict[str, tuple[int, ...]]
    compact_masks: dict[str, torch.Tensor]

    @classmethod
    def build(cls, structure: ModelStructure, mask: HybridMask, kept: Kept | None = None) -> Layout:
        """The layout of ``mask``; ``kept`` when the caller has already computed ``kept_entries`` for its units."""
        kept = kept_entries(structure, mask.units) if kept is None else kept
        masks = {n: select(mask.weights[n], kept[n]) if n in kept else mask.weights[n] for n in structure.prunable}
        return cls(structure, mask, kept, compact_shapes(structure, kept), masks)

    def kept_values(self) -> int:
        """Values on the wire per model copy (prunable: kept only; others: compact dense)."""
        prunable = set(self.structure.prunable)
        return sum(int(self.compact_masks[n].sum()) if n in prunable else int(np.prod(s))
                   for n, s in self.compact_shapes.items())

    def kept_counts(self) -> dict[str, int]:
        """Kept values per prunable tensor (the length of its sparse value vector)."""
        return {n: int(self.compact_masks[n].sum()) for n in self.structure.prunable}

    def analytic_bytes(self, with_mask: bool, precision: str = "float32") -> int:
        """b bits per kept prunable value (+32 per block scale when quantised), 32 per other value sent,
        plus 1 bit per prunable weight and unit when the mask travels (headers not counted)."""
        kept = self.kept_counts()
        bits = sum(value_bits(k, precision) for k in kept.values()) + 32 * (self.kept_values() - sum(kept.values()))
        if with_mask:
            bits += self.structure.num_prunable + sum(g.size for g in self.structure.groups)
        return (bits + 7) // 8

    def to_compact(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: select(t, self.kept[n]) if n in self.kept else t for n, t in state.items()}

    def to_global(self, compact: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shapes = self.structure.shapes
        return {n: scatter(t, self.kept[n], shapes[n]) if n in self.kept else t for n, t in compact.items()}

    @cached_property
    def tensor_masks(self) -> dict[str, torch.Tensor]:
        """Keep-masks in global layout for every tensor that the mask touches."""
        return tensor_masks(self.mask, self.structure)

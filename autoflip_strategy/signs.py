"""Sign supermask transport and aggregation (HideNseek).

Under HideNseek a kept weight is ``|θ₀| · s`` with ``s ∈ {−1, +1}``: the magnitudes are fixed at
round 0 and known to both ends, so only the signs travel. Both ways a payload is

* ``signs/packed``: one ``numpy.packbits`` bitmap of the kept weights' signs (1 = +1, 0 = −1), all
  prunable tensors concatenated in ``structure.prunable`` order, each in its compact keep-mask
  order (:attr:`.codec.Layout.compact_masks`). One array, so one header for the whole model: the
  realised size is ``ceil(kept / 8)`` bytes plus one ``.npy`` header, the physical limit.
* every non-prunable tensor (biases, norms, embeddings that are not pruned) as compact float32,
  trained and averaged in float as under FedAvg (they are few, and a sign alone cannot train a
  bias from its initial value, which is usually zero).

Decoding goes through the codec's strict reader (:func:`.codec._take`: names, dtype, length,
no pickles, no trailing bytes, optional byte cap) and requires the padding bits to be zero.

Aggregation (:func:`vote`) is a weighted majority vote, ``s = sign(Σ_k w_k s_k)`` with ties keeping
the previous global sign, read off the strategy's streamed weighted mean of the signed weights.
Why a vote and not the mean of the clients' real-valued scores: the scores would cost 32 bits per
weight on the uplink, which is what HideNseek is built to avoid; a vote needs exactly the bits
that travel.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict

from . import protocol as P
from .codec import NO_LIMIT, _array, _check_names, _take, _unpack, encode_state

if TYPE_CHECKING:
    from .codec import Layout

SIGNS = "signs/packed"  # a "/" never occurs in a state-dict name
Bits = dict[str, torch.Tensor]  # per prunable tensor: bool vector over its kept weights (True = +1)


def kept_signs(compact: Mapping[str, torch.Tensor], layout: Layout) -> Bits:
    """The sign bits of the kept weights of a compact state (``>= 0`` counts as +1)."""
    return {n: (compact[n].detach().cpu()[layout.compact_masks[n]] >= 0) for n in layout.structure.prunable}


def signed_weights(magnitudes: Mapping[str, torch.Tensor], bits: Mapping[str, torch.Tensor],
                   layout: Layout) -> dict[str, torch.Tensor]:
    """Compact prunable tensors ``|θ₀| · s`` (zero where pruned) from magnitudes and sign bits."""
    out = {}
    for name in layout.structure.prunable:
        keep = layout.compact_masks[name]
        value = torch.zeros(keep.shape, dtype=torch.float32)
        sign = bits[name].to(torch.float32) * 2 - 1
        value[keep] = magnitudes[name].detach().cpu().float().abs()[keep] * sign
        out[name] = value
    return out


def encode_signs(bits: Mapping[str, torch.Tensor], others: Mapping[str, torch.Tensor], layout: Layout) -> ArrayRecord:
    """One payload: the packed sign bits plus the non-prunable tensors in compact float32."""
    counts = layout.kept_counts()
    for name, count in counts.items():
        if bits[name].shape != (count,):
            raise ValueError(f"{name!r}: {tuple(bits[name].shape)} sign bits for {count} kept weights")
    flat = np.concatenate([bits[n].numpy().astype(bool) for n in layout.structure.prunable]) \
        if counts else np.zeros(0, dtype=bool)
    arrays = {SIGNS: _array(np.packbits(flat))}
    prunable = set(layout.structure.prunable)
    for name in layout.structure.shapes:
        if name not in prunable:
            arrays[name] = _array(others[name].detach().cpu().float())
    return ArrayRecord(array_dict=arrays)


def decode_signs(record: ArrayRecord, layout: Layout,
                 max_bytes: int | None = None) -> tuple[Bits, dict[str, torch.Tensor]]:
    """Validate and split a sign payload: (sign bits per prunable tensor, non-prunable compact tensors)."""
    limit = max_bytes if max_bytes is not None else NO_LIMIT
    structure = layout.structure
    prunable = set(structure.prunable)
    _check_names(record, {SIGNS} | (set(structure.shapes) - prunable), "sign payload")
    counts = layout.kept_counts()
    total = sum(counts.values())
    flat = _unpack(_take(record, SIGNS, "uint8", ((total + 7) // 8,), limit), total, SIGNS).astype(bool)
    bits, start = {}, 0
    for name in structure.prunable:
        bits[name] = torch.from_numpy(flat[start:start + counts[name]].copy())
        start += counts[name]
    others = {n: torch.from_numpy(_take(record, n, "float32", layout.compact_shapes[n], limit))
              for n in structure.shapes if n not in prunable}
    return bits, others


def analytic_sign_bytes(layout: Layout) -> int:
    """1 bit per kept weight (rounded up to whole bytes once) plus 32 bits per non-prunable value."""
    prunable = set(layout.structure.prunable)
    others = sum(int(np.prod(s)) for n, s in layout.compact_shapes.items() if n not in prunable)
    return (sum(layout.kept_counts().values()) + 7) // 8 + 4 * others


def signs_state(record: ArrayRecord, magnitudes: Mapping[str, torch.Tensor], layout: Layout,
                max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """The compact state a sign payload stands for: ``|magnitudes| · s`` for prunable tensors (the
    receiver's own magnitudes, never the sender's), the payload's floats for the others."""
    bits, others = decode_signs(record, layout, max_bytes)
    return {**signed_weights(magnitudes, bits, layout), **others}


def signs_as_values(content: RecordDict, magnitudes: Mapping[str, torch.Tensor], layout: Layout, transport: str,
                    max_bytes: int | None = None) -> RecordDict:
    """A training reply whose sign payload is replaced by the float32 values it stands for (the server's
    magnitudes), so the one reply validator checks it; a malformed payload raises :class:`.codec.CodecError`."""
    record = content.get(P.ARRAYS)
    if not isinstance(record, ArrayRecord):
        return content
    out = RecordDict({k: v for k, v in content.items()})
    out[P.ARRAYS] = encode_state(signs_state(record, magnitudes, layout, max_bytes), layout, transport)
    return out


def vote(mean: Mapping[str, torch.Tensor], previous: Mapping[str, torch.Tensor],
         names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The weighted sign vote, from the weighted mean of the clients' signed weights ``|θ₀| · s_k``.

    Every client's value at a coordinate has the same magnitude ``m`` (the server's own, see
    :func:`signs_state`), so ``mean = m · Σ w_k s_k / Σ w_k`` and ``sign(mean)`` is the weighted
    majority. The result is ``|previous| · sign(mean)``; where ``mean`` is 0 (a tie: integer example
    counts make the float64 sum exact) the previous sign stays."""
    out = {}
    for name in names:
        prev, m = previous[name], mean[name]
        out[name] = torch.where(m == 0, prev, prev.abs() * torch.sign(m)).to(prev.dtype)
    return out

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

Aggregation (:class:`SignVote`) is a weighted majority vote, streamed client by client:
``s = sign(Σ_k w_k s_k)`` with ties keeping the previous global sign. Why a vote and not the mean
of the clients' real-valued scores: the scores would cost 32 bits per weight on the uplink,
which is what HideNseek is built to avoid; a vote needs exactly the bits that travel.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord

from .codec import NO_LIMIT, Layout, _array, _check_names, _take, _unpack

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


def decode_signs(record: ArrayRecord, layout: Layout, max_bytes: int | None = None) -> tuple[Bits, dict[str, torch.Tensor]]:
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


class SignVote:
    """Streams clients' sign bits into the weighted vote ``Σ_k w_k s_k`` (float64, one tensor per name)."""

    def __init__(self) -> None:
        self._votes: dict[str, torch.Tensor] = {}
        self._weight = 0.0

    def add(self, bits: Mapping[str, torch.Tensor], weight: float) -> None:
        if not weight > 0:
            raise ValueError(f"vote weight must be positive, got {weight!r}")
        for name, b in bits.items():
            s = b.to(torch.float64) * 2 - 1
            if name not in self._votes:
                self._votes[name] = torch.zeros_like(s)
            self._votes[name] += weight * s
        self._weight += weight

    @property
    def empty(self) -> bool:
        return self._weight == 0.0

    def result(self, previous: Mapping[str, torch.Tensor]) -> Bits:
        """The global sign bits: the weighted majority, a tie keeps ``previous``."""
        if self.empty:
            return {n: b.clone() for n, b in previous.items()}
        return {n: torch.where(v == 0, previous[n], v > 0) for n, v in self._votes.items()}

    def agreement(self) -> float:
        """Mean over kept weights of |Σ w s| / Σ w: 1 when every client sent the same signs."""
        if self.empty:
            return 1.0
        total = sum(v.numel() for v in self._votes.values())
        return float(sum(v.abs().sum() for v in self._votes.values()) / (self._weight * total)) if total else 1.0


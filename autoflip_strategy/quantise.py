"""Value precision on the wire: block-scaled float16 / int8 codes for the kept values.

``value-precision`` decides how the *kept values of the prunable weights* travel,
in both directions; the bitmap, structured removal and non-prunable tensors
(biases, norm parameters and statistics, embeddings: a small share of the
bytes, and the ones that least tolerate rounding) are untouched and travel as
float32.

Design choices (also in docs/method.md):

* **Blocks.** A tensor's values as they go on the wire (the kept-value vector
  in ``sparse`` transport, the flattened masked tensor in ``dense``) are cut
  into blocks of :data:`BLOCK` = 64 consecutive values; each block has one
  float32 scale, its largest absolute value (1.0 for an all-zero block). Per
  block rather than per row because the sparse vector has no rows of equal
  length, and 64 keeps the scale overhead at 0.5 bit per value while one
  outlier can only coarsen 63 neighbours.
* **Codes.** ``float16``: value / scale, in [-1, 1], rounded to nearest.
  ``int8``: value / scale x 127, in [-127, 127] (-128 is never produced and
  is refused, so the code range is symmetric and 0 stays exactly 0: pruned
  coordinates in dense transport remain zero).
* **Rounding.** Deterministic (nearest) on the downlink: every client gets the
  same model and the server knows exactly what it sent. Stochastic on the int8
  uplink (``floor(y + u)``, u ~ U[0, 1) from a seeded generator), so the
  rounding is unbiased and averages out across clients.
* **Error feedback** (int8 uplink): the client quantises value + residual and
  keeps the new residual (what the code could not carry) for its next reply,
  so the quantisation error is delayed, not lost (:func:`quantise_with_feedback`).
  The residual lives in the client's ``context.state``, keyed by mask version,
  transport and precision, and starts from zero when any of them changes (the
  value vector then has another layout).
* **Master weights.** The server keeps float32 master weights and averages the
  decoded replies in float64 as before; a quantised downlink only means that
  clients train from a rounded copy.

Analytic bytes per model copy: ``b`` bits per kept prunable value (32, 16 or
8), plus 32 bits per block scale (none for float32), plus 32 bits per
non-prunable value, plus 1 bit per prunable weight and unit when the mask
travels (:meth:`.codec.Layout.analytic_bytes`). The physical limit of the
values alone is ``b x d`` bits per prunable weight at density ``d``.
"""

from __future__ import annotations

import math

import numpy as np

PRECISIONS = ("float32", "float16", "int8")
BLOCK = 64  # values per scale
VALUE_BITS = {"float32": 32, "float16": 16, "int8": 8}
SCALE_BITS = 32  # scales are float32
CODE_DTYPE = {"float16": "float16", "int8": "int8"}
CODE_MAX = {"float16": 1.0, "int8": 127.0}
# the largest scale a decoder accepts (exact in float32): 127 x 2**120 < 2**127, so code x scale stays a
# finite float32 for every valid code
MAX_VALUE_SCALE = 2.0**120


def is_quantised(precision: str) -> bool:
    """Whether ``precision`` sends codes plus scales (anything but float32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"value precision {precision!r} is not one of {list(PRECISIONS)}")
    return precision != "float32"


def num_blocks(count: int) -> int:
    """Scales needed for ``count`` values."""
    return math.ceil(count / BLOCK)


def value_bits(count: int, precision: str) -> int:
    """Analytic bits of ``count`` values at ``precision``: codes plus one float32 scale per block."""
    scales = num_blocks(count) * SCALE_BITS if is_quantised(precision) else 0
    return VALUE_BITS[precision] * count + scales


def block_scales(values: np.ndarray) -> np.ndarray:
    """One float32 scale per :data:`BLOCK` values: the block's largest absolute value (1.0 if all zero)."""
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    padded = np.zeros(num_blocks(flat.size) * BLOCK, dtype=np.float32)
    padded[:flat.size] = np.abs(flat)
    scales = padded.reshape(-1, BLOCK).max(axis=1) if flat.size else np.zeros(0, dtype=np.float32)
    scales[scales == 0] = 1.0
    return scales.astype(np.float32)


def _per_value(scales: np.ndarray, count: int) -> np.ndarray:
    return np.repeat(scales.astype(np.float32), BLOCK)[:count]


def quantise(values: np.ndarray, precision: str,
             rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, scales)`` of a float32 array (any shape; codes keep it).

    Rounding is to nearest without ``rng``, stochastic with it (int8 only: float16
    always rounds to nearest, its 11-bit mantissa leaves nothing worth dithering).
    """
    if not is_quantised(precision):
        raise ValueError("float32 values are sent as they are, not quantised")
    values = np.asarray(values, dtype=np.float32)
    scales = block_scales(values)
    unit = values.reshape(-1) / _per_value(scales, values.size)  # in [-1, 1]
    if precision == "float16":
        codes = unit.astype(np.float16)
    else:
        y = unit.astype(np.float64) * CODE_MAX["int8"]  # float64: y + u must not round up to the next integer
        y = np.floor(y + rng.random(y.size)) if rng is not None else np.rint(y)
        codes = np.clip(y, -CODE_MAX["int8"], CODE_MAX["int8"]).astype(np.int8)
    return codes.reshape(values.shape), scales


def dequantise(codes: np.ndarray, scales: np.ndarray, precision: str) -> np.ndarray:
    """Float32 values of ``codes`` (same shape) under their block ``scales``."""
    unit = codes.reshape(-1).astype(np.float32)
    if precision == "int8":
        unit /= np.float32(CODE_MAX["int8"])
    return (unit * _per_value(scales, codes.size)).reshape(codes.shape)


def quantise_with_feedback(values: np.ndarray, residual: np.ndarray | None, precision: str,
                           rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(codes, scales, new_residual)`` of ``values + residual`` (error feedback).

    Why: the part of a value that a code cannot carry is added to the next reply
    instead of being dropped, so over rounds the sum of what was sent tracks the
    sum of what was meant. A residual of another shape (a new mask) is ignored.
    """
    values = np.asarray(values, dtype=np.float32)
    meant = values + residual if residual is not None and residual.shape == values.shape else values
    codes, scales = quantise(meant, precision, rng)
    return codes, scales, (meant - dequantise(codes, scales, precision)).astype(np.float32)

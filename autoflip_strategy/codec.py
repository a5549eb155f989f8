"""The transport codec: what goes on the wire, and strict checks on what comes off it.

Both ends derive a :class:`~.geometry.Layout` from the model structure and the
hybrid mask (:mod:`.geometry`); this module only encodes and decodes in it.
``sparse`` transport (the default) sends, per prunable weight, only the
kept values of the compact tensor (removed units are absent, not zero), other
tensors as compact dense arrays, and the mask as ``numpy.packbits`` bitmaps
only when the receiver does not have it yet. ``dense`` transport sends
global-layout masked tensors and bool masks; it exists so that tests and
benchmarks can show the sparse codec loses nothing.

Every decoder validates names, dtypes, shapes/lengths, finiteness and (dense)
zeros at pruned coordinates, and raises :class:`CodecError` on any violation.
Bytes become arrays only through :func:`_read_npy`: a strict ``.npy`` parser
(no zip archives, no pickles, no trailing bytes), behind an optional per-array
byte cap (``max_bytes``) that every decoder accepts.

``value-precision`` (:mod:`.quantise`): at ``float16`` / ``int8`` each prunable
tensor travels as codes of that dtype (same length or shape as its float32
form) and all their block scales as one float32 array under :data:`SCALES`
(one header, not one per tensor), in ``structure.prunable`` order. The decoder
checks the codes' range ([-1, 1] for float16, [-127, 127] for int8), that every
scale is finite, positive and at most :data:`~.quantise.MAX_VALUE_SCALE`, and
that the decoded values are finite. Non-prunable tensors stay float32.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from .geometry import Layout, compact_shapes, kept_entries, remove_units, scatter, select
from .masks import HybridMask
from .quantise import (CODE_DTYPE, CODE_MAX, MAX_VALUE_SCALE, dequantise, is_quantised, num_blocks, quantise,
                       quantise_with_feedback)
from .structure import ModelStructure

TRANSPORTS = ("sparse", "dense")
ARRAY_HEADER_BYTES = 128  # np.save header of one Flower Array
NPY_STYPE = "numpy.ndarray"  # the only serialisation type the decoders read
NPY_MAX_HEADER_BYTES = 1024  # our headers are 128 bytes; numpy's own cap is 10 000
NO_LIMIT = 2**62
# float16 guidance scales: large enough for any real guidance, small enough that
# the largest float16 (65504) times the scale is still a finite float32
MAX_GUIDANCE_SCALE = float(np.finfo(np.float32).max) / float(np.finfo(np.float16).max) / 2
SCALES = "autoflip/scales"  # block scales of a quantised payload; a "/" never occurs in a state-dict name


class CodecError(ValueError):
    """A payload that does not match the layout it claims to follow."""


def record_nbytes(record: ArrayRecord) -> int:
    """Bytes that the record's arrays occupy in a Flower message."""
    return sum(len(a.data) for a in record.values())


def _array(values: torch.Tensor | np.ndarray) -> Array:
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values
    return Array(np.ascontiguousarray(arr))


def _read_npy(data: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Parse one ``.npy`` body without ``np.load``.

    Why: ``np.load`` also opens zip archives (``np.savez`` bodies) and object
    arrays, and ignores trailing bytes. Here only a version 1.0/2.0 header with
    exactly the expected dtype (byte order included) and shape is accepted, the
    body must be exactly ``itemsize * count`` bytes, and the values are copied
    out of the buffer with ``np.frombuffer`` (never unpickled).
    """
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        if version == (1, 0):
            header = np.lib.format.read_array_header_1_0(buffer, max_header_size=NPY_MAX_HEADER_BYTES)
        elif version == (2, 0):
            header = np.lib.format.read_array_header_2_0(buffer, max_header_size=NPY_MAX_HEADER_BYTES)
        else:
            raise CodecError(f"unsupported .npy version {version}")
    except CodecError:
        raise
    except Exception as exc:  # bad magic (zip, pickle, garbage) or a malformed header
        raise CodecError(f"not a .npy array ({type(exc).__name__}: {exc})") from None
    got_shape, fortran, got_dtype = header
    if got_dtype != dtype or got_dtype.hasobject:
        raise CodecError(f"buffer holds dtype {got_dtype.str}, expected {dtype.str}")
    if tuple(got_shape) != tuple(shape):
        raise CodecError(f"buffer holds shape {list(got_shape)}, expected {list(shape)}")
    count = math.prod(shape)
    body = len(data) - buffer.tell()
    if body != count * dtype.itemsize:
        raise CodecError(f"body of {body} bytes, expected {count * dtype.itemsize} (truncated or trailing bytes)")
    if count == 0:
        return np.empty(shape, dtype=dtype)
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=buffer.tell())
    return np.array(flat.reshape(shape, order="F" if fortran else "C"), order="C")


def _take(record: ArrayRecord, name: str, dtype: str, shape: tuple[int, ...], limit: int) -> np.ndarray:
    """One validated array from a record: a fresh, writable ndarray of exactly ``dtype[shape]``."""
    try:
        array = record[name]
    except KeyError:
        raise CodecError(f"missing tensor {name!r}") from None
    if not isinstance(array, Array) or not isinstance(array.data, bytes):
        raise CodecError(f"{name!r}: not an array with a byte buffer")
    if len(array.data) > limit:
        raise CodecError(f"{name!r}: payload of {len(array.data)} bytes exceeds {limit}")
    if array.stype != NPY_STYPE:
        raise CodecError(f"{name!r}: serialisation type {array.stype!r}, expected {NPY_STYPE!r}")
    if array.dtype != dtype or not isinstance(array.shape, (tuple, list)) or tuple(array.shape) != tuple(shape):
        raise CodecError(f"{name!r}: expected {dtype}{list(shape)}, got {array.dtype}{array.shape!r}")
    try:
        value = _read_npy(array.data, np.dtype(dtype), tuple(shape))
    except CodecError as exc:
        raise CodecError(f"{name!r}: {exc}") from None
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise CodecError(f"{name!r}: contains NaN or Inf")
    return value


def _check_names(record: ArrayRecord, expected: set[str], what: str) -> None:
    got = set(record.keys())
    if got != expected:
        extra, missing = sorted(got - expected), sorted(expected - got)
        raise CodecError(f"{what}: unexpected tensors {extra}, missing tensors {missing}")


def _wire_values(compact: Mapping[str, torch.Tensor], layout: Layout, transport: str) -> dict[str, np.ndarray]:
    """The float32 arrays of a payload as they go on the wire at float32 precision."""
    prunable = set(layout.structure.prunable)
    out: dict[str, np.ndarray] = {}
    for name in layout.structure.shapes:
        t = compact[name].detach().float()
        if transport == "dense":
            t = layout.to_global({name: t})[name] if name in layout.kept else t
        elif name in prunable:
            t = t[layout.compact_masks[name]]
        out[name] = t.cpu().numpy()
    return out


def encode_state(compact: Mapping[str, torch.Tensor], layout: Layout, transport: str = "sparse",
                 precision: str = "float32") -> ArrayRecord:
    """Serialise a compact-layout state dict (float32) for the wire; quantised values round to nearest."""
    record, _ = encode_update(compact, layout, transport, precision)
    return record


def encode_update(compact: Mapping[str, torch.Tensor], layout: Layout, transport: str = "sparse",
                  precision: str = "float32", rng: np.random.Generator | None = None,
                  residual: Mapping[str, np.ndarray] | None = None) -> tuple[ArrayRecord, dict[str, np.ndarray]]:
    """A client's reply: like :func:`encode_state`, with stochastic rounding (``rng``) and error feedback.

    Returns the record and the new residuals (prunable tensors, wire layout; empty at float32).
    ``residual`` is what the previous reply under the same layout could not carry.
    """
    values = _wire_values(compact, layout, transport)
    arrays: dict[str, Array] = {}
    scales, new_residual = [], {}
    quantised = is_quantised(precision)
    for name, value in values.items():
        if quantised and name in layout.compact_masks:
            if rng is not None:
                codes, block, new_residual[name] = quantise_with_feedback(
                    value, (residual or {}).get(name), precision, rng)
            else:
                codes, block = quantise(value, precision)
            arrays[name] = _array(codes)
            scales.append(block)
        else:
            arrays[name] = _array(value)
    if quantised:
        arrays[SCALES] = _array(np.concatenate(scales) if scales else np.zeros(0, dtype=np.float32))
    return ArrayRecord(array_dict=arrays), new_residual


def _scales(record: ArrayRecord, layout: Layout, transport: str, limit: int) -> dict[str, np.ndarray]:
    """Each prunable tensor's block scales: finite, positive and at most ``MAX_VALUE_SCALE``."""
    shapes = layout.structure.shapes
    kept = layout.kept_counts()
    counts = {n: kept[n] if transport == "sparse" else math.prod(shapes[n]) for n in layout.structure.prunable}
    total = sum(num_blocks(c) for c in counts.values())
    scales = _take(record, SCALES, "float32", (total,), limit)
    if total and not (float(scales.min()) > 0 and float(scales.max()) <= MAX_VALUE_SCALE):
        raise CodecError(f"{SCALES!r}: scales must lie in (0, {MAX_VALUE_SCALE:.3g}]")
    out, start = {}, 0
    for name, count in counts.items():
        out[name] = scales[start:start + num_blocks(count)]
        start += num_blocks(count)
    return out


def _take_values(record: ArrayRecord, name: str, shape: tuple[int, ...], precision: str,
                 scales: Mapping[str, np.ndarray], limit: int) -> np.ndarray:
    """One tensor's float32 values: read as they are, or decoded from range-checked codes and scales."""
    if name not in scales:
        return _take(record, name, "float32", shape, limit)
    codes = _take(record, name, CODE_DTYPE[precision], shape, limit)
    if codes.size and float(np.abs(codes.astype(np.float32)).max()) > CODE_MAX[precision]:
        raise CodecError(f"{name!r}: {precision} codes must lie in [-{CODE_MAX[precision]:g}, "
                         f"{CODE_MAX[precision]:g}]")
    values = dequantise(codes, scales[name], precision)
    if not np.isfinite(values).all():  # cannot happen under the scale bound; kept as the invariant
        raise CodecError(f"{name!r}: code times scale is not finite")
    return values


def decode_state(record: ArrayRecord, layout: Layout, transport: str = "sparse",
                 max_bytes: int | None = None, precision: str = "float32") -> dict[str, torch.Tensor]:
    """Validate and deserialise a state from the wire into the compact layout."""
    structure = layout.structure
    quantised = is_quantised(precision)
    _check_names(record, set(structure.shapes) | ({SCALES} if quantised else set()), "model payload")
    limit = max_bytes if max_bytes is not None else NO_LIMIT
    prunable = set(structure.prunable)
    scales = _scales(record, layout, transport, limit) if quantised else {}
    global_masks = layout.tensor_masks if transport == "dense" else {}
    out: dict[str, torch.Tensor] = {}
    for name, shape in structure.shapes.items():
        if transport == "dense":
            value = torch.from_numpy(_take_values(record, name, shape, precision, scales, limit))
            mask = global_masks.get(name)
            if mask is not None and bool((value[~mask] != 0).any()):
                raise CodecError(f"{name!r}: non-zero values at pruned coordinates")
            out[name] = select(value, layout.kept[name]) if name in layout.kept else value
        elif name in prunable:
            cmask = layout.compact_masks[name]
            values = _take_values(record, name, (int(cmask.sum()),), precision, scales, limit)
            full = torch.zeros(cmask.shape, dtype=torch.float32)
            full[cmask] = torch.from_numpy(values)
            out[name] = full
        else:
            out[name] = torch.from_numpy(_take(record, name, "float32", layout.compact_shapes[name], limit))
    return out


def encode_mask(layout: Layout, transport: str = "sparse") -> ArrayRecord:
    """The mask for the wire: unit keep-bits plus the compact weight bitmaps."""
    arrays: dict[str, Array] = {}
    for name, keep in layout.mask.units.items():
        bits = keep.numpy().astype(np.uint8) if transport == "dense" else np.packbits(keep.numpy())
        arrays[f"units/{name}"] = _array(bits)
    for name in layout.structure.prunable:
        m = layout.mask.weights[name] if transport == "dense" else layout.compact_masks[name].reshape(-1)
        arrays[f"weights/{name}"] = _array(m.numpy().astype(np.uint8) if transport == "dense"
                                           else np.packbits(m.numpy()))
    return ArrayRecord(array_dict=arrays)


def _unpack(packed: np.ndarray, n: int, key: str) -> np.ndarray:
    """The first ``n`` bits of a ``numpy.packbits`` bitmap; the padding bits must be zero."""
    bits = np.unpackbits(packed)
    if bits[n:].any():
        raise CodecError(f"{key!r}: padding bits after the {n} mask bits must be zero")
    return bits[:n]


def decode_mask(record: ArrayRecord, structure: ModelStructure, transport: str = "sparse",
                max_bytes: int | None = None) -> HybridMask:
    """Validate and rebuild a global-layout :class:`HybridMask` from the wire."""
    return decode_layout(record, structure, transport, max_bytes).mask


def decode_layout(record: ArrayRecord, structure: ModelStructure, transport: str = "sparse",
                  max_bytes: int | None = None) -> Layout:
    """Validate a mask from the wire and return its :class:`Layout` (kept entries computed once)."""
    limit = max_bytes if max_bytes is not None else NO_LIMIT
    expected = {f"units/{g.name}" for g in structure.groups} | {f"weights/{n}" for n in structure.prunable}
    _check_names(record, expected, "mask payload")
    units = {}
    for g in structure.groups:
        key = f"units/{g.name}"
        if transport == "dense":
            bits = _take(record, key, "uint8", (g.size,), limit)
        else:
            bits = _unpack(_take(record, key, "uint8", ((g.size + 7) // 8,), limit), g.size, key)
        if bits.max(initial=0) > 1:
            raise CodecError(f"{key!r}: mask values must be 0 or 1")
        units[g.name] = torch.from_numpy(bits.astype(bool))
        if not bool(units[g.name].any()):
            raise CodecError(f"{key!r}: a group must keep at least one unit")
    kept = kept_entries(structure, units)
    cshapes = compact_shapes(structure, kept)
    weights = {}
    for name in structure.prunable:
        key, shape = f"weights/{name}", structure.shapes[name]
        if transport == "dense":
            bits = _take(record, key, "uint8", shape, limit)
            if bits.max(initial=0) > 1:
                raise CodecError(f"{key!r}: mask values must be 0 or 1")
            weights[name] = torch.from_numpy(bits.astype(bool))
            continue
        dims, cshape = kept.get(name, (None,) * len(shape)), cshapes[name]
        n = int(np.prod(cshape))
        packed = _take(record, key, "uint8", ((n + 7) // 8,), limit)
        compact = torch.from_numpy(_unpack(packed, n, key).astype(bool)).reshape(cshape)
        weights[name] = scatter(compact, dims, shape) if name in kept else compact
    mask = HybridMask(units, weights)
    # a dense mask must not keep weights of removed units
    cleared = {n: m.clone() for n, m in weights.items()}
    remove_units(cleared, structure, units)
    if any(not torch.equal(cleared[n], weights[n]) for n in weights):
        raise CodecError("mask payload keeps weights of removed units")
    return Layout.build(structure, mask, kept)


def encode_guidance(matrix: Mapping[str, torch.Tensor], precision: str) -> ArrayRecord:
    """Exploration uplink; float16 is scaled per tensor so that small deviations survive."""
    arrays = {}
    for name, t in matrix.items():
        t = t.detach().float()
        if precision == "float16":
            scale = float(t.max()) if t.numel() and float(t.max()) > 0 else 1.0
            arrays[name] = Array((t / scale).numpy().astype(np.float16))
            arrays[f"scale/{name}"] = Array(np.array([scale], dtype=np.float32))
        else:
            arrays[name] = Array(t.numpy())
    return ArrayRecord(array_dict=arrays)


def _guidance_scale(record: ArrayRecord, name: str, limit: int) -> float:
    """A float16 tensor's scale: finite, positive and at most :data:`MAX_GUIDANCE_SCALE`."""
    scale = float(_take(record, name, "float32", (1,), limit)[0])
    if not 0 < scale <= MAX_GUIDANCE_SCALE:
        raise CodecError(f"{name!r}: scale {scale!r} is outside (0, {MAX_GUIDANCE_SCALE:.3g}]")
    return scale


def decode_guidance(record: ArrayRecord, structure: ModelStructure, precision: str,
                    max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Validate and decode one explorer's guidance matrix (non-negative, finite, right shapes)."""
    limit = max_bytes if max_bytes is not None else NO_LIMIT
    names = set(structure.prunable)
    if precision == "float16":
        names |= {f"scale/{n}" for n in structure.prunable}
    _check_names(record, names, "guidance payload")
    out = {}
    for name in structure.prunable:
        shape = structure.shapes[name]
        if precision == "float16":
            values = _take(record, name, "float16", shape, limit).astype(np.float32)
            values *= np.float32(_guidance_scale(record, f"scale/{name}", limit))
            if not np.isfinite(values).all():  # cannot happen under the scale bound; kept as the invariant
                raise CodecError(f"{name!r}: value times scale is not finite")
        else:
            values = _take(record, name, "float32", shape, limit)
        if (values < 0).any():
            raise CodecError(f"{name!r}: guidance must be non-negative")
        out[name] = torch.from_numpy(np.ascontiguousarray(values))
    return out

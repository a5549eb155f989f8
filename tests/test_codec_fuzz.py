"""Fuzzing the wire decoders (issue 17): every mutated payload either raises CodecError or decodes
into tensors that fit the layout.

Payloads of all ten kinds (sparse/dense state at float32, float16 and int8 value precision, sparse/dense
mask, float32/float16 guidance) are built
from the reference models' real structures and hybrid masks, then mutated at the byte, header,
metadata and record level. A mutation that can never be valid (truncation, trailing bytes, a zip or
pickle body, a wrong dtype/shape, NaN, a missing key, ...) must be rejected; any other mutation may
be accepted, and then the decoded value is checked against the layout.
"""

from __future__ import annotations

import io
import pickle
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from autoflip_strategy.codec import (
    SCALES,
    CodecError,
    Layout,
    decode_guidance,
    decode_mask,
    decode_state,
    encode_guidance,
    encode_mask,
    encode_state,
)
from autoflip_strategy.masks import HybridMask, apply_mask, compute_hybrid_mask, remove_units
from autoflip_strategy.structure import ModelStructure, discover_structure
from models_under_test import ALL

# payloads per model in the default run: 20 000 in all, ~65 s on the loaded 2-core machine
# (the bigger models decode more slowly); the slow run does 40 000 per model
FUZZ_CASES = {"lstm": 10_000, "cnn": 6_000, "resnet": 4_000}
SLOW_FUZZ_CASES = 40_000
SEED = 17
STACK_EVERY = 7  # every 7th case gets a second, random mutation on top (7: coprime to the 10 kinds)
MAX_DECODE_SECONDS = 2.0  # "no hang": a valid decode takes milliseconds
HANG_SECONDS = 30  # a decode still running after this is interrupted and reported


@dataclass(frozen=True)
class Payload:
    kind: str
    record: ArrayRecord
    decode: Callable[[ArrayRecord], object]
    check: Callable[[object], None]


# --- what an accepted payload must satisfy -----------------------------------------------------

def check_state(layout: Layout, out: object) -> None:
    assert isinstance(out, dict) and set(out) == set(layout.structure.shapes)
    for name, t in out.items():
        assert t.dtype == torch.float32 and tuple(t.shape) == tuple(layout.compact_shapes[name]), name
        assert bool(torch.isfinite(t).all()), name
        if name in layout.compact_masks:
            assert not bool(t[~layout.compact_masks[name]].any()), f"{name}: values at pruned coordinates"


def check_mask(structure: ModelStructure, mask: object) -> None:
    assert isinstance(mask, HybridMask)
    assert set(mask.units) == {g.name for g in structure.groups}
    for g in structure.groups:
        keep = mask.units[g.name]
        assert keep.dtype == torch.bool and tuple(keep.shape) == (g.size,) and bool(keep.any()), g.name
    assert set(mask.weights) == set(structure.prunable)
    for name, m in mask.weights.items():
        assert m.dtype == torch.bool and tuple(m.shape) == tuple(structure.shapes[name]), name
    cleared = {n: m.clone() for n, m in mask.weights.items()}
    remove_units(cleared, structure, mask.units)
    assert all(torch.equal(cleared[n], mask.weights[n]) for n in cleared), "weights of removed units kept"
    layout = Layout.build(structure, mask)  # the mask is usable
    assert all(tuple(layout.compact_masks[n].shape) == tuple(layout.compact_shapes[n]) for n in structure.prunable)


def check_guidance(structure: ModelStructure, out: object) -> None:
    assert isinstance(out, dict) and set(out) == set(structure.prunable)
    for name, t in out.items():
        assert t.dtype == torch.float32 and tuple(t.shape) == tuple(structure.shapes[name]), name
        assert bool(torch.isfinite(t).all()) and not bool((t < 0).any()), name


def payloads(model_name: str) -> list[Payload]:
    """The ten reply kinds for one reference model under a hybrid mask, with their decoders."""
    torch.manual_seed(0)
    model, x = ALL[model_name]()
    s = discover_structure(model, x)
    mask = compute_hybrid_mask({n: torch.rand(s.shapes[n]) for n in s.prunable}, s, 0.6, 0.25)
    layout = Layout.build(s, mask)
    state = {n: t.float() for n, t in model.state_dict().items() if n in s.shapes}
    apply_mask(state, layout.tensor_masks)
    compact = layout.to_compact(state)
    guidance = {n: torch.rand(s.shapes[n]) ** 4 for n in s.prunable}
    out = []
    for t in ("sparse", "dense"):
        record = encode_state(compact, layout, t)
        cap = 4 * max(len(record[k].data) for k in record.keys())
        out.append(Payload(f"state-{t}", record, lambda r, t=t, cap=cap: decode_state(r, layout, t, cap),
                           lambda v: check_state(layout, v)))
        record = encode_mask(layout, t)
        cap = 4 * max(len(record[k].data) for k in record.keys())
        out.append(Payload(f"mask-{t}", record, lambda r, t=t, cap=cap: decode_mask(r, s, t, max_bytes=cap),
                           lambda v: check_mask(s, v)))
        for p in ("float16", "int8"):  # value precision: codes plus one array of block scales
            record = encode_state(compact, layout, t, p)
            cap = 4 * max(len(record[k].data) for k in record.keys())
            out.append(Payload(f"state-{t}-{p}", record,
                               lambda r, t=t, p=p, cap=cap: decode_state(r, layout, t, cap, precision=p),
                               lambda v: check_state(layout, v)))
    for p in ("float32", "float16"):
        record = encode_guidance(guidance, p)
        cap = 4 * max(len(record[k].data) for k in record.keys())
        out.append(Payload(f"guidance-{p}", record, lambda r, p=p, cap=cap: decode_guidance(r, s, p, max_bytes=cap),
                           lambda v: check_guidance(s, v)))
    return out


# --- mutations: each replaces Arrays in ``arrays`` (a copy of the record's dict) ---------------

Arrays = dict[str, Array]


def _with(a: Array, data: bytes | None = None, **meta) -> Array:
    """A forged Array: ``a``'s metadata (overridden by ``meta``) around ``data``."""
    return Array(dtype=meta.get("dtype", a.dtype), shape=tuple(meta.get("shape", a.shape)),
                 stype=meta.get("stype", a.stype), data=a.data if data is None else data)


def _body_offset(data: bytes) -> int:
    if data[6:8] == b"\x01\x00":
        return min(len(data), 10 + int.from_bytes(data[8:10], "little"))
    if data[6:8] in (b"\x02\x00", b"\x03\x00"):
        return min(len(data), 12 + int.from_bytes(data[8:12], "little"))
    return min(len(data), 128)


def _header(descr: str, shape: tuple, fortran: bool = False, version: int = 1) -> bytes:
    buffer = io.BytesIO()
    write = np.lib.format.write_array_header_1_0 if version == 1 else np.lib.format.write_array_header_2_0
    write(buffer, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return buffer.getvalue()


def _saved(value: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=allow_pickle)
    return buffer.getvalue()


class Inapplicable(Exception):
    """A stacked mutation that finds nothing to act on (say, a header already destroyed)."""


def _pick(rng: np.random.Generator, options: list):
    if not options:
        raise Inapplicable
    return options[int(rng.integers(len(options)))]


def _key(rng: np.random.Generator, arrays: Arrays, where: Callable[[str], bool] = lambda k: True) -> str:
    return _pick(rng, sorted(k for k in arrays if where(k)))


def _base_key(rng: np.random.Generator, arrays: Arrays, p: Payload,
              where: Callable[[str], bool] = lambda k: True) -> str:
    """A key that the unmutated record also holds (mutations that start from its valid array)."""
    return _key(rng, arrays, lambda k: k in p.record and where(k))


def _value_key(arrays: Arrays) -> Callable[[str], bool]:
    """Keys of arrays that hold values or codes (int8 codes too)."""
    return lambda k: arrays[k].dtype in ("float32", "float16", "int8")


def _element(rng: np.random.Generator, a: Array, itemsize: int) -> int | None:
    """Byte offset of a random element of ``a``'s body, if it has one."""
    offset = _body_offset(a.data)
    count = (len(a.data) - offset) // itemsize
    return None if count <= 0 else offset + itemsize * int(rng.integers(count))


def m_identity(rng, arrays, p):
    pass


def m_flip(rng, arrays, p):
    k = _key(rng, arrays)
    data = bytearray(arrays[k].data)
    if data:
        header = bool(rng.integers(2))
        lo, hi = (0, _body_offset(bytes(data))) if header else (_body_offset(bytes(data)), len(data))
        lo, hi = (0, len(data)) if hi <= lo else (lo, hi)
        for i in rng.integers(lo, hi, size=int(rng.integers(1, 5))):
            data[i] ^= 1 << int(rng.integers(8))
    arrays[k] = _with(arrays[k], bytes(data))


def m_truncate(rng, arrays, p):
    k = _key(rng, arrays)
    data = arrays[k].data
    arrays[k] = _with(arrays[k], data[: int(rng.integers(max(len(data), 1)))])


def m_extend(rng, arrays, p):
    k = _key(rng, arrays)
    data = arrays[k].data
    tail = _pick(rng, [rng.bytes(int(rng.integers(1, 65))), data[_body_offset(data):] or b"\0", data])
    arrays[k] = _with(arrays[k], data + tail)


def m_empty(rng, arrays, p):
    k = _key(rng, arrays)
    arrays[k] = _with(arrays[k], b"")


def m_header_dtype(rng, arrays, p):
    """A well-formed header naming another dtype, around the original body."""
    k = _base_key(rng, arrays, p)
    a = p.record[k]
    true = np.dtype(a.dtype).str
    descr = _pick(rng, [d for d in ("<f8", ">f4", "<f2", "|u1", "<i4", "|b1", "<c8", "<f4", ">u2", "|i1", "|O", "<u1")
                        if np.dtype(d) != np.dtype(true)])
    arrays[k] = _with(a, _header(descr, tuple(a.shape)) + a.data[_body_offset(a.data):])


def m_retyped(rng, arrays, p):
    """A complete, valid ``.npy`` of the same values in another dtype (byte order included)."""
    k = _base_key(rng, arrays, p)
    value = p.record[k].numpy()
    other = _pick(rng, [d for d in ("float64", ">f4", "float16", "int32", "uint8", ">u1", "bool", "int8")
                        if np.dtype(d) != value.dtype])
    arrays[k] = _with(p.record[k], _saved(value.astype(other)))


def m_header_shape(rng, arrays, p):
    """A well-formed header with another shape; the body is kept or resized to fit that shape."""
    k = _base_key(rng, arrays, p)
    a = p.record[k]
    shape = tuple(a.shape)
    n = int(np.prod(shape))
    options = [(n + 1,), (max(n - 1, 0),), (1, *shape), (*shape, 1), (), (10**18,), (2**63 - 1,), (0,),
               shape[::-1], (n, n), (-1,), (2**31, 2**31)]
    new = _pick(rng, [o for o in options if o != shape])
    body = a.data[_body_offset(a.data):]
    if bool(rng.integers(2)) and all(d >= 0 for d in new) and np.prod(new, dtype=object) < 10**7:
        itemsize = np.dtype(a.dtype).itemsize
        want = int(np.prod(new, dtype=object)) * itemsize
        body = (body * (want // max(len(body), 1) + 1))[:want] if body else b"\0" * want
    arrays[k] = _with(a, _header(np.dtype(a.dtype).str, new) + body)


def m_header_text(rng, arrays, p):
    """Raw text edits inside the header, leaving its declared length as it was."""
    k = _key(rng, arrays)
    data = arrays[k].data
    offset = _body_offset(data)
    header = data[:offset]
    shape_text = repr(tuple(arrays[k].shape)).encode()
    edits = [(shape_text, b"(99999999999999999999999,)"), (shape_text, b"(-1,)"), (shape_text, b"[1, 2]"),
             (shape_text, b"(1.5,)"), (shape_text, b"((((((((((((((((((((((((((((((((((((("),
             (shape_text, b"None"), (b"'descr'", b"'dtype'"), (b"'descr': '", b"'descr': '>"),
             (b"'<f4'", b"'<f8'"), (b"'<f2'", b"'<f4'"), (b"'|u1'", b"'|O'"), (b"{", b"{'x': 1, "),
             (b"}", b"} + 1"), (b"\x93NUMPY", b"\x93NUMPZ"), (b"\x01\x00", b"\x03\x00"),
             (b"\x01\x00", b"\x09\x09")]
    old, new = _pick(rng, [e for e in edits if e[0] in header])
    arrays[k] = _with(arrays[k], header.replace(old, new, 1) + data[offset:])


def m_header_space(rng, arrays, p):
    """Whitespace edits that numpy's header parser tolerates (may be accepted)."""
    k = _key(rng, arrays)
    data = arrays[k].data
    offset = _body_offset(data)
    old, new = _pick(rng, [(b"\n", b" "), (b"  ", b"\t\t"), (b", }", b"}  "), (b": ", b":\t")])
    arrays[k] = _with(arrays[k], data[:offset].replace(old, new, 1) + data[offset:])


def m_fortran(rng, arrays, p):
    """The same body declared Fortran-ordered (valid, but another value unless 1-D)."""
    k = _base_key(rng, arrays, p)
    a = p.record[k]
    arrays[k] = _with(a, _header(np.dtype(a.dtype).str, tuple(a.shape), fortran=True) + a.data[_body_offset(a.data):])


def m_npy_v2(rng, arrays, p):
    """The same array behind a version 2.0 header (a valid encoding)."""
    k = _base_key(rng, arrays, p)
    a = p.record[k]
    arrays[k] = _with(a, _header(np.dtype(a.dtype).str, tuple(a.shape), version=2) + a.data[_body_offset(a.data):])


def m_meta_dtype(rng, arrays, p):
    k = _key(rng, arrays)
    dtype = _pick(rng, [d for d in ("float64", "float16", "uint8", "float32", "object", "", "<f4", "bool", "int64")
                        if d != arrays[k].dtype])
    arrays[k] = _with(arrays[k], dtype=dtype)


def m_meta_shape(rng, arrays, p):
    k = _key(rng, arrays)
    shape = tuple(arrays[k].shape)
    n = int(np.prod(shape, dtype=object))
    options = [(n + 1,), (2**40,), (10**18, 10**18), (), (1, *shape), shape[::-1], (-n,), (0,), (n, 0)]
    arrays[k] = _with(arrays[k], shape=_pick(rng, [o for o in options if o != shape]))


def m_meta_stype(rng, arrays, p):
    k = _key(rng, arrays)
    arrays[k] = _with(arrays[k], stype=_pick(rng, ["", "torch.Tensor", "numpy.ndarray ", "pickle", "numpy.npz"]))


def m_forged_both(rng, arrays, p):
    """Metadata and header agree on a huge shape that the body does not hold."""
    k = _base_key(rng, arrays, p)
    a = p.record[k]
    shape = _pick(rng, [(2**40,), (10**18,), (2**20, 2**20), (2**31 - 1, 3)])
    arrays[k] = _with(a, _header(np.dtype(a.dtype).str, shape) + a.data[_body_offset(a.data):], shape=shape)


def m_swap(rng, arrays, p):
    if len(arrays) > 1:
        k1 = _key(rng, arrays)
        k2 = _key(rng, arrays, lambda k: k != k1)
        arrays[k1], arrays[k2] = arrays[k2], arrays[k1]


def m_rename(rng, arrays, p):
    k = _key(rng, arrays)
    new = _pick(rng, [k + "_", k.upper() if k.upper() != k else k + "X", " " + k, k.replace(".", "/", 1) + "~",
                      "scale/" + k + "!"])
    arrays[new] = arrays.pop(k)


def m_missing(rng, arrays, p):
    del arrays[_key(rng, arrays)]


def m_extra(rng, arrays, p):
    k = _key(rng, arrays)
    arrays[_pick(rng, ["evil", k + ".extra", "scale/evil", "units/evil", "weights/" + k])] = arrays[k]


def m_poison(rng, arrays, p):
    """A value that no valid payload holds: NaN/Inf, negative guidance, an invalid mask byte, an empty group."""
    if p.kind == "mask-sparse":
        k = _base_key(rng, arrays, p, lambda k: k.startswith("units/"))
        a = p.record[k]
        offset = _body_offset(a.data)
        arrays[k] = _with(a, a.data[:offset] + b"\0" * (len(a.data) - offset))
        return
    k = _base_key(rng, arrays, p, _value_key(p.record) if p.kind != "mask-dense" else lambda k: True)
    a = p.record[k]
    dtype = np.dtype(a.dtype)
    if p.kind == "mask-dense":
        bad = np.array([int(rng.integers(2, 256))], dtype=np.uint8)
    elif k.startswith("scale/") or k == SCALES:
        bad = np.array([_pick(rng, [0.0, -1.0, np.inf, -np.inf, np.nan, 3e38, -0.0])], dtype=dtype)
    elif dtype == np.int8:  # the one int8 code outside the symmetric range
        bad = np.array([-128], dtype=dtype)
    elif p.kind.startswith("state-") and dtype == np.float16:  # float16 codes live in [-1, 1]
        bad = np.array([_pick(rng, [np.nan, np.inf, -np.inf, 1.5, -2.0, 65504.0])], dtype=dtype)
    else:
        choices = [np.nan, np.inf, -np.inf] + ([-1.0, -1e-3] if p.kind.startswith("guidance") else [])
        bad = np.array([_pick(rng, choices)], dtype=dtype)
    at = _element(rng, a, dtype.itemsize)
    if at is not None:
        data = bytearray(a.data)
        data[at:at + dtype.itemsize] = bad.tobytes()
        arrays[k] = _with(a, bytes(data))
    else:  # an empty tensor holds no value to poison: drop it instead
        del arrays[k]


def m_value(rng, arrays, p):
    """Plausible new values (may well be accepted): random floats, random mask bits."""
    k = _key(rng, arrays)
    a = arrays[k]
    try:
        dtype = np.dtype(a.dtype)
    except TypeError:
        return
    data = bytearray(a.data)
    for _ in range(int(rng.integers(1, 9))):
        at = _element(rng, a, dtype.itemsize)
        if at is None or at + dtype.itemsize > len(data):
            return
        if dtype.kind == "f":
            v = rng.random() * 2.0 if p.kind.startswith("guidance") else rng.standard_normal()
            value = np.array([v], dtype=dtype)
        elif dtype == np.int8:
            value = np.array([rng.integers(-128, 128)], dtype=dtype)
        elif p.kind == "mask-dense":
            value = np.array([rng.integers(2)], dtype=dtype)
        else:
            value = np.array([rng.integers(256)], dtype=dtype)
        data[at:at + dtype.itemsize] = value.tobytes()
    arrays[k] = _with(a, bytes(data))


def m_npz(rng, arrays, p):
    k = _base_key(rng, arrays, p)
    buffer = io.BytesIO()
    (np.savez if rng.integers(2) else np.savez_compressed)(buffer, p.record[k].numpy())
    arrays[k] = _with(p.record[k], buffer.getvalue())


def m_pickle(rng, arrays, p):
    k = _base_key(rng, arrays, p)
    value = p.record[k].numpy()
    body = _pick(rng, [_saved(value.astype(object), allow_pickle=True), pickle.dumps(value),
                       pickle.dumps(value.tolist())])
    arrays[k] = _with(p.record[k], body)


# (name, mutation, never valid on its own)
MUTATIONS: list[tuple[str, Callable, bool]] = [
    ("identity", m_identity, False), ("flip", m_flip, False), ("truncate", m_truncate, True),
    ("extend", m_extend, True), ("empty", m_empty, True), ("header-dtype", m_header_dtype, True),
    ("retyped", m_retyped, True), ("header-shape", m_header_shape, True), ("header-text", m_header_text, True),
    ("header-space", m_header_space, False),
    ("fortran", m_fortran, False), ("npy-v2", m_npy_v2, False), ("meta-dtype", m_meta_dtype, True),
    ("meta-shape", m_meta_shape, True), ("meta-stype", m_meta_stype, True), ("forged-both", m_forged_both, True),
    ("swap", m_swap, False), ("rename", m_rename, True), ("missing", m_missing, True), ("extra", m_extra, True),
    ("poison", m_poison, True), ("value", m_value, False), ("npz", m_npz, True), ("pickle", m_pickle, True),
]


class Hang(Exception):
    """A decode that did not return within :data:`HANG_SECONDS`."""


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Turn a hang into an exception (SIGALRM; the tests run in the main thread)."""
    def interrupt(signum, frame):
        raise Hang(f"still decoding after {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def fuzz(model_name: str, cases: int, seed: int = SEED) -> Counter:
    """Decode ``cases`` mutated payloads; fail on any other exception, hang, accepted invalid payload
    or accepted payload that breaks the layout. Returns counts per (kind, mutation, outcome)."""
    rng = np.random.default_rng(seed)
    kinds = payloads(model_name)
    outcomes: Counter = Counter()
    slowest = 0.0
    for i in range(cases):
        p = kinds[i % len(kinds)]
        name, mutate, never_valid = MUTATIONS[(i // len(kinds)) % len(MUTATIONS)]
        arrays = {k: p.record[k] for k in p.record.keys()}
        mutate(rng, arrays, p)
        applied = [name]
        if i % STACK_EVERY == STACK_EVERY - 1 and arrays:
            extra_name, extra, _ = MUTATIONS[int(rng.integers(len(MUTATIONS)))]
            try:
                extra(rng, arrays, p)
                applied.append(extra_name)
            except Inapplicable:
                pass
        what = f"case {i}: {p.kind} mutated by {' + '.join(applied)}"
        label = name if len(applied) == 1 else "stacked"
        record = ArrayRecord(array_dict=arrays)
        start = time.perf_counter()
        try:
            with _deadline(HANG_SECONDS):
                value = p.decode(record)
        except CodecError:
            outcomes[p.kind, label, "rejected"] += 1
            continue
        except Exception as exc:
            pytest.fail(f"{what}: {type(exc).__name__}: {exc}")
        finally:
            slowest = max(slowest, time.perf_counter() - start)
        assert not (never_valid and len(applied) == 1), f"{what}: accepted a payload that is never valid"
        try:
            p.check(value)
        except AssertionError as exc:
            raise AssertionError(f"{what}: accepted, but {exc}") from None
        outcomes[p.kind, label, "accepted"] += 1
    assert slowest < MAX_DECODE_SECONDS, f"slowest decode took {slowest:.2f} s"
    return outcomes


def _check_coverage(outcomes: Counter, cases: int) -> None:
    assert sum(outcomes.values()) == cases
    kinds = {k for k, _, _ in outcomes}
    assert len(kinds) == 10
    for kind in kinds:
        for name, _, _ in MUTATIONS:
            assert outcomes[kind, name, "accepted"] + outcomes[kind, name, "rejected"] > 0, (kind, name)
        assert outcomes[kind, "identity", "accepted"] > 0 and outcomes[kind, "identity", "rejected"] == 0
        assert outcomes[kind, "npy-v2", "rejected"] == 0, "a version 2.0 header is a valid encoding"


@pytest.mark.parametrize("model_name", list(ALL))
def test_mutated_payloads_raise_codec_error_or_decode_consistently(model_name):
    _check_coverage(fuzz(model_name, FUZZ_CASES[model_name]), FUZZ_CASES[model_name])


@pytest.mark.slow
@pytest.mark.parametrize("model_name", list(ALL))
def test_mutated_payloads_many_more(model_name):
    _check_coverage(fuzz(model_name, SLOW_FUZZ_CASES, seed=SEED + 1), SLOW_FUZZ_CASES)

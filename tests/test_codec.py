"""Round trips and fuzz-style checks of the transport codec."""

import io
import pickle

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
    record_nbytes,
)
from autoflip_strategy.masks import dense_mask
from autoflip_strategy.quantise import MAX_VALUE_SCALE
from models_under_test import ALL, masked_layout


def setup(name="cnn", sparsity=0.6, structured=0.25):
    return masked_layout(name, sparsity, structured)


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("transport", ["sparse", "dense"])
def test_round_trip_is_lossless(name, transport):
    s, layout, compact = setup(name)
    back = decode_state(encode_state(compact, layout, transport), layout, transport)
    assert all(torch.equal(back[n], compact[n]) for n in compact)
    mask = decode_mask(encode_mask(layout, transport), s, transport)
    assert mask.equals(layout.mask)


def test_sparse_payload_is_kept_values_only():
    s, layout, compact = setup("cnn", sparsity=0.7, structured=0.0)
    record = encode_state(compact, layout)
    kept = layout.kept_values()
    assert record_nbytes(record) == 4 * kept + sum(128 for _ in record.keys())
    dense = encode_state(compact, Layout.build(s, dense_mask(s)))
    assert record_nbytes(record) < 0.35 * record_nbytes(dense)
    bitmap = record_nbytes(encode_mask(layout))
    assert bitmap <= ((s.num_prunable + sum(g.size for g in s.groups)) / 8 + 128 * len(encode_mask(layout).keys())
                      + 8 * len(s.prunable))


def _replace(record: ArrayRecord, name: str, array: np.ndarray) -> ArrayRecord:
    arrays = {k: record[k] for k in record.keys()}
    arrays[name] = Array(array)
    return ArrayRecord(array_dict=arrays)


def _corruptions(record: ArrayRecord, name: str):
    good = record[name].numpy()
    yield "truncated", _replace(record, name, good[:-1])
    yield "oversized", _replace(record, name, np.concatenate([good, good]))
    if good.dtype.kind == "f":
        yield "nan", _replace(record, name, np.full_like(good, np.nan))
        yield "inf", _replace(record, name, np.full_like(good, np.inf))
    yield "float64", _replace(record, name, good.astype(np.float64))
    yield "int", _replace(record, name, good.astype(np.int32))
    yield "reshaped", _replace(record, name, good.reshape(1, -1))
    yield "missing", ArrayRecord(array_dict={k: record[k] for k in record.keys() if k != name})
    yield "extra", _replace(record, "evil.weight", good)
    broken = Array(good)
    broken.data = broken.data[:-3]
    yield "corrupt-buffer", ArrayRecord(array_dict={**{k: record[k] for k in record.keys()}, name: broken})


@pytest.mark.parametrize("transport", ["sparse", "dense"])
@pytest.mark.parametrize("tensor", ["fc1.weight", "conv2.bias"])
def test_decoder_rejects_every_malformed_payload_with_codec_error(transport, tensor):
    _, layout, compact = setup("cnn")
    record = encode_state(compact, layout, transport)
    for what, bad in _corruptions(record, tensor):
        with pytest.raises(CodecError):
            decode_state(bad, layout, transport)
            pytest.fail(f"{what} was accepted")


def test_dense_transport_rejects_values_at_pruned_coordinates():
    _, layout, compact = setup("cnn")
    record = encode_state(compact, layout, "dense")
    w = record["fc1.weight"].numpy().copy()
    pruned = ~layout.mask.weights["fc1.weight"].numpy()
    w[pruned.nonzero()[0][0], pruned.nonzero()[1][0]] = 1e-3
    with pytest.raises(CodecError, match="pruned"):
        decode_state(_replace(record, "fc1.weight", w), layout, "dense")


def test_decoder_enforces_the_payload_limit():
    _, layout, compact = setup("cnn")
    record = encode_state(compact, layout)
    with pytest.raises(CodecError, match="exceeds"):
        decode_state(record, layout, "sparse", max_bytes=1000)


def test_mask_decoder_rejects_malformed_masks():
    s, layout, _ = setup("cnn")
    record = encode_mask(layout)
    for _, bad in _corruptions(record, "weights/fc1.weight"):
        with pytest.raises(CodecError):
            decode_mask(bad, s)
    no_units = _replace(record, "units/conv1", np.zeros(4, dtype=np.uint8))
    with pytest.raises(CodecError, match="at least one unit"):
        decode_mask(no_units, s)
    dense = encode_mask(layout, "dense")
    weights = dense["weights/fc1.weight"].numpy().copy()
    weights[:] = 2
    with pytest.raises(CodecError, match="0 or 1"):
        decode_mask(_replace(dense, "weights/fc1.weight", weights), s, "dense")


def test_dense_mask_that_keeps_weights_of_removed_units_is_rejected():
    s, layout, _ = setup("cnn")
    dense = encode_mask(layout, "dense")
    removed = int((~layout.mask.units["fc1"]).nonzero()[0])
    w = dense["weights/fc1.weight"].numpy().copy()
    w[removed, :] = 1
    with pytest.raises(CodecError, match="removed units"):
        decode_mask(_replace(dense, "weights/fc1.weight", w), s, "dense")


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_guidance_codec(precision):
    s, _, _ = setup("cnn")
    torch.manual_seed(3)
    matrix = {n: torch.rand(s.shapes[n]) ** 4 * 1e-6 for n in s.prunable}
    back = decode_guidance(encode_guidance(matrix, precision), s, precision)
    for n in s.prunable:
        tol = 0 if precision == "float32" else 1e-3 * float(matrix[n].max())
        assert torch.allclose(back[n], matrix[n], atol=tol, rtol=1e-3 if tol else 0)
    negative = {**matrix, "fc2.weight": -matrix["fc2.weight"]}
    with pytest.raises(CodecError, match="non-negative"):
        decode_guidance(encode_guidance(negative, "float32"), s, "float32")
    with pytest.raises(CodecError):
        decode_guidance(encode_guidance(matrix, "float32"), s, "float16")


# --- attacks on the byte level (issue 17): metadata is right, the buffer is not -------------------

def _forged(like: Array, data: bytes) -> Array:
    """An Array whose metadata copies ``like`` but whose bytes are ``data``."""
    return Array(dtype=like.dtype, shape=tuple(like.shape), stype=like.stype, data=data)


def _npz(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, value)
    return buffer.getvalue()


def _pickled(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value.astype(object), allow_pickle=True)
    return buffer.getvalue()


def _payloads():
    """Every reply kind with its decoder and the tensor to attack."""
    s, layout, compact = setup("cnn")
    matrix = {n: torch.rand(s.shapes[n]) for n in s.prunable}
    for transport in ("sparse", "dense"):
        yield (f"state-{transport}", encode_state(compact, layout, transport), "fc1.weight",
               lambda r, t=transport: decode_state(r, layout, t))
        yield (f"mask-{transport}", encode_mask(layout, transport), "weights/fc1.weight",
               lambda r, t=transport: decode_mask(r, s, t))
    for precision in ("float32", "float16"):
        yield (f"guidance-{precision}", encode_guidance(matrix, precision), "fc1.weight",
               lambda r, p=precision: decode_guidance(r, s, p))


@pytest.mark.parametrize("body", ["npz", "pickle", "trailing", "raw-pickle"])
def test_every_decoder_rejects_non_npy_bodies_behind_correct_metadata(body):
    for kind, record, name, decode in _payloads():
        good = record[name]
        data = {"npz": lambda: _npz(good.numpy()), "pickle": lambda: _pickled(good.numpy()),
                "trailing": lambda: good.data + b"\0" * 8,
                "raw-pickle": lambda: pickle.dumps(good.numpy())}[body]()
        bad = ArrayRecord(array_dict={**{k: record[k] for k in record.keys()}, name: _forged(good, data)})
        with pytest.raises(CodecError, match=f"{name}.*(not a .npy array|dtype|trailing)"):
            decode(bad)
            pytest.fail(f"{kind}: {body} body accepted")


def test_fortran_order_npy_is_read_in_its_own_order():
    s, _, _ = setup("cnn")
    matrix = {n: torch.rand(s.shapes[n]) for n in s.prunable}
    transposed = {n: t.t().contiguous().t() if t.dim() == 2 else t for n, t in matrix.items()}
    back = decode_guidance(encode_guidance(transposed, "float32"), s, "float32")
    assert all(torch.equal(back[n], matrix[n]) for n in s.prunable)


def test_float16_guidance_whose_product_overflows_is_rejected():
    s, _, _ = setup("cnn")
    matrix = {n: torch.rand(s.shapes[n]) for n in s.prunable}
    record = encode_guidance(matrix, "float16")
    arrays = {k: record[k] for k in record.keys()}
    arrays["fc1.weight"] = Array(np.full(s.shapes["fc1.weight"], 2.0, dtype=np.float16))
    arrays["scale/fc1.weight"] = Array(np.array([3e38], dtype=np.float32))
    with pytest.raises(CodecError, match="scale/fc1.weight.*scale"):
        decode_guidance(ArrayRecord(array_dict=arrays), s, "float16")
    for scale in (0.0, -1.0, np.inf, np.nan):
        arrays["scale/fc1.weight"] = Array(np.array([scale], dtype=np.float32))
        with pytest.raises(CodecError, match="scale/fc1.weight"):
            decode_guidance(ArrayRecord(array_dict=arrays), s, "float16")


@pytest.mark.parametrize("kind", ["mask-sparse", "mask-dense", "guidance-float32", "guidance-float16"])
def test_mask_and_guidance_decoders_enforce_the_payload_limit(kind):
    s, _, _ = setup("cnn")
    record = {k: r for k, r, _, _ in _payloads()}[kind]
    decode = decode_mask if kind.startswith("mask") else decode_guidance
    largest = max(len(record[k].data) for k in record.keys())
    decode(record, s, kind.split("-")[1], max_bytes=largest)
    with pytest.raises(CodecError, match="exceeds"):
        decode(record, s, kind.split("-")[1], max_bytes=largest - 1)


def test_sparse_mask_with_set_padding_bits_is_rejected():
    s, layout, _ = setup("resnet")
    record = encode_mask(layout)
    sizes = {f"units/{g.name}": g.size for g in s.groups}
    sizes |= {f"weights/{n}": int(layout.compact_masks[n].numel()) for n in s.prunable}
    padded = [k for k, n in sizes.items() if n % 8]
    assert padded, "the test needs a bitmap with padding bits"
    for key in padded:
        packed = record[key].numpy().copy()
        packed[-1] |= 1
        with pytest.raises(CodecError, match="padding"):
            decode_mask(_replace(record, key, packed), s)


# --- value precision (issue 14): codes and scales are validated as strictly as float32 values ---------

@pytest.mark.parametrize("transport", ["sparse", "dense"])
@pytest.mark.parametrize("precision", ["float16", "int8"])
def test_quantised_payload_rejects_malformed_codes_and_scales(transport, precision):
    _, layout, compact = setup("cnn")
    record = encode_state(compact, layout, transport, precision)
    decode = lambda r: decode_state(r, layout, transport, precision=precision)  # noqa: E731
    decode(record)
    for tensor in ("fc1.weight", SCALES, "conv2.bias"):
        for what, bad in _corruptions(record, tensor):
            with pytest.raises(CodecError):
                decode(bad)
                pytest.fail(f"{tensor}: {what} was accepted")
    codes = record["fc1.weight"].numpy().copy()
    codes.flat[0] = -128 if precision == "int8" else 1.5
    with pytest.raises(CodecError, match="fc1.weight.*codes must lie"):
        decode(_replace(record, "fc1.weight", codes))
    for scale in (0.0, -0.0, -1.0, np.inf, -np.inf, np.nan, 2 * MAX_VALUE_SCALE, 3e38):
        scales = record[SCALES].numpy().copy()
        scales[len(scales) // 2] = scale
        with pytest.raises(CodecError, match="autoflip/scales"):
            decode(_replace(record, SCALES, scales))
            pytest.fail(f"scale {scale!r} was accepted")
    scales = record[SCALES].numpy().copy()
    scales[0] = MAX_VALUE_SCALE  # the largest allowed scale still decodes to finite float32 values
    assert all(bool(torch.isfinite(t).all()) for t in decode(_replace(record, SCALES, scales)).values())


def test_payload_at_one_precision_is_refused_at_another():
    _, layout, compact = setup("cnn")
    records = {p: encode_state(compact, layout, "sparse", p) for p in ("float32", "float16", "int8")}
    for sent, record in records.items():
        for expected in records:
            if expected != sent:
                with pytest.raises(CodecError):
                    decode_state(record, layout, "sparse", precision=expected)
                    pytest.fail(f"{sent} payload decoded as {expected}")


def test_quantised_payload_limit_covers_codes_and_scales():
    _, layout, compact = setup("cnn")
    record = encode_state(compact, layout, "sparse", "int8")
    largest = max(len(record[k].data) for k in record.keys())
    decode_state(record, layout, "sparse", max_bytes=largest, precision="int8")
    with pytest.raises(CodecError, match="exceeds"):
        decode_state(record, layout, "sparse", max_bytes=largest - 1, precision="int8")

"""Round trips and fuzz-style checks of the transport codec."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from autoflip_strategy.codec import (
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
from autoflip_strategy.masks import apply_mask, compute_hybrid_mask, dense_mask
from autoflip_strategy.structure import discover_structure
from models_under_test import ALL


def setup(name="cnn", sparsity=0.6, structured=0.25):
    torch.manual_seed(0)
    model, x = ALL[name]()
    s = discover_structure(model, x)
    mask = compute_hybrid_mask({n: torch.rand(s.shapes[n]) for n in s.prunable}, s, sparsity, structured)
    layout = Layout.build(s, mask)
    state = {n: t.float() for n, t in model.state_dict().items() if n in s.shapes}
    apply_mask(state, layout.tensor_masks)
    return s, layout, layout.to_compact(state)


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
    assert bitmap <= (s.num_prunable + sum(g.size for g in s.groups)) / 8 + 128 * len(encode_mask(layout).keys()) + 8 * len(s.prunable)


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

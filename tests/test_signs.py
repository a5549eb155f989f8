"""Sign supermask transport (lossless, ~1 bit per kept weight, strict) and the weighted sign vote."""

import io
import pickle

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from autoflip_strategy.codec import ARRAY_HEADER_BYTES, CodecError, record_nbytes
from autoflip_strategy.aggregation import WeightedAverage
from autoflip_strategy.signs import (SIGNS, analytic_sign_bytes, decode_signs, encode_signs, kept_signs, signed_weights,
                                     signs_state, vote)
from models_under_test import ALL, masked_layout


def setup(name="cnn", sparsity=0.6, structured=0.25):
    s, layout, compact = masked_layout(name, sparsity, structured, zero_pruned=False)
    bits = {n: torch.rand(c) < 0.5 for n, c in layout.kept_counts().items()}
    others = {n: t for n, t in compact.items() if n not in s.prunable}
    return layout, compact, bits, others


def others_of(compact, layout):
    return {n: t for n, t in compact.items() if n not in layout.structure.prunable}


def b(*values):
    return torch.tensor(values, dtype=torch.bool)


def test_vote_by_hand():
    """Three clients (weights 1, 2, 3) vote on 4 + 1 signs; the server's magnitudes are 0.5 and 2."""
    previous = {"w": torch.tensor([-0.5, 0.5, 0.5, -0.5]), "v": torch.tensor([[2.0]])}
    replies = [({"w": b(1, 1, 0, 0), "v": b(1)}, 1), ({"w": b(0, 1, 0, 1), "v": b(0)}, 2),
               ({"w": b(1, 0, 0, 1), "v": b(0)}, 3)]
    average = WeightedAverage()
    for bits, weight in replies:
        average.add({n: previous[n].abs() * (bits[n].float() * 2 - 1).reshape(previous[n].shape) for n in bits},
                    weight)
    # w: (+1-2+3, +1+2-3, -1-2-3, -1+2+3) = (2, 0, -6, 4); v: 1-2-3 = -4
    out = vote(average.result(), previous, ["w", "v"])
    assert out["w"].tolist() == [0.5, 0.5, -0.5, 0.5]  # the tie keeps the previous +; magnitudes stay
    assert out["v"].tolist() == [[-2.0]]
    pruned = vote({"w": torch.zeros(4)}, {"w": torch.tensor([0.0, 1.0, -1.0, 0.0])}, ["w"])
    assert pruned["w"].tolist() == [0.0, 1.0, -1.0, 0.0]


@pytest.mark.parametrize("name", list(ALL))
def test_signs_round_trip_is_lossless(name):
    layout, _, bits, others = setup(name)
    back_bits, back_others = decode_signs(encode_signs(bits, others, layout), layout)
    assert all(torch.equal(back_bits[n], bits[n]) for n in bits)
    assert all(torch.equal(back_others[n], others[n].float()) for n in others)


def test_signed_weights_keep_magnitudes_and_carry_the_signs():
    layout, compact, bits, _ = setup("cnn")
    signed = signed_weights(compact, bits, layout)
    assert all(torch.equal(kept_signs(signed, layout)[n], bits[n]) for n in bits)
    # the receiver's magnitudes, whatever the sender's values were
    state = signs_state(encode_signs(bits, others_of(compact, layout), layout), compact, layout)
    assert all(torch.equal(state[n], signed[n]) for n in signed)
    for n, keep in layout.compact_masks.items():
        assert torch.equal(signed[n].abs()[keep], compact[n].abs()[keep]) and not signed[n][~keep].any()


@pytest.mark.parametrize("name", list(ALL))
def test_realised_bytes_are_one_bit_per_kept_weight_plus_headers(name):
    layout, _, bits, others = setup(name, sparsity=0.5, structured=0.0)
    record = encode_signs(bits, others, layout)
    kept = sum(layout.kept_counts().values())
    limit = (kept + 7) // 8 + ARRAY_HEADER_BYTES
    signs_only = len(record[SIGNS].data)
    assert signs_only == limit  # exactly the physical limit: one header, ceil(kept / 8) bytes
    assert signs_only <= 1.05 * limit
    assert record_nbytes(record) == analytic_sign_bytes(layout) + ARRAY_HEADER_BYTES * len(record)
    assert 32 * kept / (8 * signs_only) > 20  # vs float32 values of the same kept weights


def replace(record: ArrayRecord, name: str, array) -> ArrayRecord:
    arrays = dict(record.items())
    arrays[name] = array
    return ArrayRecord(array_dict=arrays)


def test_malformed_sign_payloads_are_rejected():
    layout, _, bits, others = setup("cnn")
    good = encode_signs(bits, others, layout)
    packed = good[SIGNS].numpy()
    kept = sum(layout.kept_counts().values())
    assert kept % 8, "the test needs padding bits"
    padded = packed.copy()
    padded[-1] |= 1  # a padding bit set
    buffer = io.BytesIO()
    np.savez(buffer, packed)
    zipped = Array(dtype="uint8", shape=tuple(packed.shape), stype="numpy.ndarray", data=buffer.getvalue())
    pickled = Array(dtype="uint8", shape=tuple(packed.shape), stype="numpy.ndarray", data=pickle.dumps(packed))
    some_other = next(iter(others))
    nan = others[some_other].clone().float()
    nan.view(-1)[0] = float("nan")
    bad = {
        "padding": replace(good, SIGNS, Array(padded)),
        "short": replace(good, SIGNS, Array(packed[:-1])),
        "long": replace(good, SIGNS, Array(np.concatenate([packed, packed[:1]]))),
        "dtype": replace(good, SIGNS, Array(packed.astype(np.int16))),
        "zip": replace(good, SIGNS, zipped),
        "pickle": replace(good, SIGNS, pickled),
        "nan": replace(good, some_other, Array(nan.numpy())),
        "extra": replace(good, "signs/extra", Array(packed)),
        "missing": ArrayRecord(array_dict={k: v for k, v in good.items() if k != some_other}),
    }
    for why, record in bad.items():
        with pytest.raises(CodecError):
            decode_signs(record, layout)
            pytest.fail(why)
    with pytest.raises(CodecError, match="exceeds"):
        decode_signs(good, layout, max_bytes=8)

"""Value precision on the wire (issue 14, item 1): the quantisation math, the codec's byte formula,
and real in-process federations at float16 and int8."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoflip_strategy.client import load_residual
from autoflip_strategy.codec import (SCALES, CodecError, decode_state, encode_state, encode_update,
                                     record_nbytes)
from autoflip_strategy.masks import apply_mask
from autoflip_strategy.quantise import (BLOCK, CODE_MAX, block_scales, dequantise, num_blocks, quantise,
                                        quantise_with_feedback, value_bits)
from models_under_test import ALL, masked_layout
from former_defaults import FORMER_DEFAULTS

HEADER = 128  # np.save header of one Flower Array


def weights(n: int, seed: int = 0, scale: float = 0.05) -> np.ndarray:
    """Weight-like values with blocks of very different magnitude and some exact zeros (pruned)."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(n).astype(np.float32) * scale
    values *= np.repeat(10.0 ** rng.integers(-4, 2, num_blocks(n)), BLOCK)[:n].astype(np.float32)
    values[rng.random(n) < 0.3] = 0.0
    return values


# --- the math ---------------------------------------------------------------------------------

def test_one_scale_per_block_is_the_block_absmax():
    values = weights(3 * BLOCK + 5)
    scales = block_scales(values)
    assert scales.dtype == np.float32 and len(scales) == 4 == num_blocks(values.size)
    for b, s in enumerate(scales):
        assert s == np.abs(values[b * BLOCK:(b + 1) * BLOCK]).max()
    assert list(block_scales(np.zeros(BLOCK + 1, dtype=np.float32))) == [1.0, 1.0]


@pytest.mark.parametrize("precision,step", [("float16", 2.0 ** -11), ("int8", 0.5 / 127)])
def test_nearest_rounding_error_is_within_half_a_step_of_each_block_scale(precision, step):
    values = weights(10 * BLOCK + 17)
    codes, scales = quantise(values, precision)
    assert codes.dtype == np.dtype(precision) and codes.shape == values.shape
    assert float(np.abs(codes.astype(np.float32)).max()) == CODE_MAX[precision]  # the absmax maps to the end
    back = dequantise(codes, scales, precision)
    per_value = np.repeat(scales, BLOCK)[:values.size]
    assert np.all(np.abs(back - values) <= step * per_value * (1 + 1e-5))
    assert np.all(back[values == 0] == 0), "zeros (pruned coordinates) must stay exactly zero"


def test_int8_codes_are_symmetric_and_shapes_are_kept():
    values = -np.abs(weights(4 * BLOCK)).reshape(8, -1)
    for rng in (None, np.random.default_rng(0)):
        codes, _ = quantise(values, "int8", rng)
        assert codes.shape == values.shape and int(codes.min()) == -127


def test_stochastic_rounding_is_unbiased_and_seeded():
    values = np.full(BLOCK, 0.3, dtype=np.float32)
    values[0] = 1.0  # scale 1: 0.3 * 127 = 38.1 lies between two codes
    draws = np.stack([dequantise(*quantise(values, "int8", np.random.default_rng(s)), "int8") for s in range(400)])
    assert set(np.unique(draws[:, 1] * 127).round().astype(int)) == {38, 39}
    assert abs(float(draws[:, 1:].mean()) - 0.3) < 2e-4  # nearest rounding would sit at 38/127 = 0.2992
    a = quantise(values, "int8", np.random.default_rng(7))[0]
    assert np.array_equal(a, quantise(values, "int8", np.random.default_rng(7))[0])


def test_error_feedback_carries_what_a_reply_could_not():
    """Sent again and again, the sum of what arrived tracks the sum of what was meant within one step."""
    values = weights(5 * BLOCK + 3, seed=1)
    rng, residual = np.random.default_rng(0), None
    sent = np.zeros_like(values)
    for rounds in range(1, 51):
        codes, scales, residual = quantise_with_feedback(values, residual, "int8", rng)
        sent += dequantise(codes, scales, "int8")
        per_value = np.repeat(scales, BLOCK)[:values.size]
        assert np.all(np.abs(rounds * values - sent) <= per_value / 127 * 1.01)  # = |residual| <= one step
        assert np.allclose(rounds * values - sent, residual, atol=1e-5)
    # without feedback the error of the sum is a random walk: much larger after 50 rounds
    walk = sum(dequantise(*quantise(values, "int8", np.random.default_rng(s)), "int8") for s in range(50))
    assert np.abs(50 * values - walk).max() > 3 * np.abs(residual).max()
    # a residual of another shape (another mask) is ignored, not broadcast
    other = quantise_with_feedback(values, np.ones(3, dtype=np.float32), "int8", np.random.default_rng(1))
    fresh = quantise_with_feedback(values, None, "int8", np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(other, fresh))


def test_float32_is_not_quantised_and_bits_follow_the_formula():
    with pytest.raises(ValueError):
        quantise(weights(8), "float32")
    with pytest.raises(ValueError):
        value_bits(8, "bfloat16")
    assert value_bits(130, "float32") == 32 * 130
    assert value_bits(130, "float16") == 16 * 130 + 32 * 3
    assert value_bits(130, "int8") == 8 * 130 + 32 * 3


# --- the codec ----------------------------------------------------------------------------------

def setup(name: str, sparsity: float = 0.6, structured: float = 0.25):
    _, layout, compact = masked_layout(name, sparsity, structured)
    return layout, compact


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("transport", ["sparse", "dense"])
@pytest.mark.parametrize("precision", ["float16", "int8"])
def test_quantised_round_trip_is_close_and_keeps_pruned_coordinates_zero(name, transport, precision):
    layout, compact = setup(name)
    record = encode_state(compact, layout, transport, precision)
    assert set(record.keys()) == set(layout.structure.shapes) | {SCALES}
    back = decode_state(record, layout, transport, precision=precision)
    step = 2.0 ** -11 if precision == "float16" else 0.5 / 127
    for n, t in compact.items():
        if n in layout.compact_masks:
            assert record[n].dtype == precision
            bound = step * float(t.abs().max()) * 1.0001
            assert float((back[n] - t).abs().max()) <= bound, n
            assert not bool(back[n][~layout.compact_masks[n]].any()), n
        else:
            assert record[n].dtype == "float32" and torch.equal(back[n], t), n  # non-prunable: exact
    # a reply decoded at another precision is refused, never misread
    with pytest.raises(CodecError):
        decode_state(record, layout, transport, precision="float32")


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("precision", ["float32", "float16", "int8"])
@pytest.mark.parametrize("with_mask_density", [0.5, 0.1])
def test_realised_bytes_are_the_analytic_formula_plus_one_header_per_array(name, precision, with_mask_density):
    layout, compact = setup(name, sparsity=1 - with_mask_density, structured=0.0)
    record, _ = encode_update(compact, layout, "sparse", precision, np.random.default_rng(0))
    analytic = layout.analytic_bytes(False, precision)
    assert record_nbytes(record) == analytic + HEADER * len(record)
    kept = layout.kept_counts()
    other = layout.kept_values() - sum(kept.values())
    bits = {"float32": 32, "float16": 16, "int8": 8}[precision]
    scales = 0 if precision == "float32" else sum(num_blocks(k) for k in kept.values())
    assert analytic == (bits * sum(kept.values()) + 32 * scales + 32 * other + 7) // 8


def test_client_reply_with_feedback_returns_residuals_in_the_wire_layout():
    layout, compact = setup("cnn")
    record, residual = encode_update(compact, layout, "sparse", "int8", np.random.default_rng(0))
    assert set(residual) == set(layout.structure.prunable)
    for n, r in residual.items():
        assert r.shape == (layout.kept_counts()[n],) and r.dtype == np.float32
    _, none = encode_update(compact, layout, "sparse", "float16")
    assert none == {}


# --- real federations (in-process grid, real ClientApp handlers, Flower's serialisation) ------------

def run(**cfg):
    """Two rounds on 6 nodes, every message serialised to Flower's protobuf bytes and parsed back."""
    from flwr.app import ArrayRecord

    from autoflip_strategy import AutoFLIP, AutoFLIPConfig
    from autoflip_task.models import build_model, example_input
    from client_app.app import app as client_app
    from runner.inprocess import InProcessGrid

    shape = (1, 8, 8)
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model("cnn", shape, 10).state_dict())
    grid = InProcessGrid(client_app, 6, {"local-epochs": 1}, wire=True)
    config = AutoFLIPConfig(**{**FORMER_DEFAULTS, "explore_epochs": 1, "fraction_train": 0.5, "sparsity": 0.5,
                               "structured_sparsity": 0.2, "seed": 3, **cfg})
    strategy = AutoFLIP(build_model("cnn", shape, 10), example_input(shape, 10), config,
                        train_config={"local-epochs": 1})
    return strategy, strategy.start(grid, arrays, num_rounds=2), grid


@pytest.fixture(scope="module")
def plain():
    return run()[0]


@pytest.mark.parametrize("precision", ["float16", "int8"])
def test_federation_runs_at_reduced_precision(precision, plain):
    strategy, result, grid = run(value_precision=precision)
    h, base = strategy.history, plain.history
    assert [r["phase"] for r in h] == ["explore", "train", "train"]
    assert all(not r["rejected"] and not r["dropped"] for r in h)
    assert h[-1]["density"] == pytest.approx(0.5, abs=0.02)
    for r, b in zip(h[1:], base[1:]):
        assert r["analytic_bytes_up"] <= 1.05 * r["bytes_up"] and r["bytes_up"] <= 1.05 * r["analytic_bytes_up"]
        ratio = r["bytes_up"] / b["bytes_up"]
        assert ratio < (0.55 if precision == "float16" else 0.3), ratio  # float32: 32 bits per value
        assert r["bytes_down"] < b["bytes_down"]
    # the server's master weights stay float32 with pruned coordinates exactly zero
    final = result.arrays.to_torch_state_dict()
    for name, keep in strategy.layout.tensor_masks.items():
        assert final[name].dtype == torch.float32 and torch.count_nonzero(final[name][~keep]) == 0
    # int8 clients keep their residual for the mask they trained under (float16 rounds to nearest, no residual)
    last = {p for r in h[1:] if r["mask_version"] == strategy.mask_version for p in r["replied"]}
    assert last
    for context in grid.contexts.values():
        residual = load_residual(context, f"{strategy.mask_version}:sparse:int8")
        if precision == "int8" and context.node_config["partition-id"] in last:
            assert residual is not None and set(residual) == set(strategy.structure.prunable)
            assert load_residual(context, f"{strategy.mask_version + 1}:sparse:int8") is None  # another mask
        else:
            assert residual is None



@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8"])
def test_flower_simulation_runs_at_reduced_precision(precision, tmp_path):
    """Flower's simulation engine (Ray) with the reference app: 3 rounds, every reply accepted, far above chance."""
    from runner.simulation import load_results, run_simulation

    config = {"num-server-rounds": 3, "explore-epochs": 1, "local-epochs": 1, "fraction-train": 0.5,
              "sparsity": 0.5, "structured-sparsity": 0.2, "partitioning": "iid", "seed": 0,
              "value-precision": precision}
    results = load_results(run_simulation(config, 4, output_dir=tmp_path, timeout=300, client_cpus=2))
    assert results["status"] == "completed"
    rounds = results["rounds"]
    assert all(not r["rejected"] and not r["dropped"] for r in rounds)
    for r in rounds[1:]:
        assert r["analytic_bytes_up"] < r["bytes_up"] <= 1.05 * r["analytic_bytes_up"]
    assert rounds[-1]["density"] == pytest.approx(0.5, abs=0.02)
    assert rounds[-1]["accuracy"] >= 0.5  # 10 classes: chance is 0.1


def test_update_statistics_are_measured_from_the_model_clients_received():
    """At int8 the clients start from a rounded copy; the guidance refresh must measure their updates from it,
    not from the float32 master (the rounding offset would look like an update every client agrees on)."""
    from flwr.app import ArrayRecord
    from flwr.clientapp import ClientApp

    from autoflip_strategy import AutoFLIP, AutoFLIPClient, AutoFLIPConfig, TrainOutcome
    from autoflip_task.models import build_model, example_input
    from runner.inprocess import InProcessGrid

    shape, received = (1, 8, 8), []

    def train_fn(model, task):
        if task.phase == "train":
            received.append({n: t.detach().clone() for n, t in model.state_dict().items()})
        x, y = torch.randn(8, *shape), torch.randint(0, 10, (8,))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.01 * p.grad
        return TrainOutcome(num_examples=8, loss=float(loss.detach()))

    app = AutoFLIPClient(lambda context: build_model("cnn", shape, 10), train_fn).register(ClientApp())
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model("cnn", shape, 10).state_dict())
    config = AutoFLIPConfig(explore_epochs=1, fraction_train=1.0, fraction_evaluate=0.0, sparsity=0.5,
                            value_precision="int8")
    strategy = AutoFLIP(build_model("cnn", shape, 10), example_input(shape, 10), config)
    strategy.start(InProcessGrid(app, 2, wire=True), arrays, num_rounds=1)
    assert len(received) == 2
    sent = strategy.layout.to_compact(strategy._sent_model)
    for got in received:
        assert all(torch.equal(got[n], sent[n]) for n in strategy.structure.prunable)
    # ... which is not the float32 master it was rounded from (round 1: θ₀ under the mask)
    master = {n: t.float() for n, t in arrays.to_torch_state_dict().items()}
    apply_mask(master, strategy.layout.tensor_masks)
    master = strategy.layout.to_compact(master)
    for n in strategy.structure.prunable:
        assert not torch.equal(sent[n], master[n])
        assert float((sent[n] - master[n]).abs().max()) <= 0.5 / 127 * float(master[n].abs().max()) * 1.001

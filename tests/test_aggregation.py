import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from autoflip_strategy import protocol as P
from autoflip_strategy.aggregation import (MAX_TRAIN_SECONDS, RejectedReply, WeightedAverage, bounded_metric,
                                           train_seconds, validate_train_reply)
from autoflip_strategy.codec import Layout, encode_state
from autoflip_strategy.masks import compute_hybrid_mask
from autoflip_strategy.structure import discover_structure
from models_under_test import cnn


@pytest.fixture(scope="module")
def layout():
    torch.manual_seed(0)
    model, x = cnn()
    s = discover_structure(model, x)
    mask = compute_hybrid_mask({n: torch.rand(s.shapes[n]) for n in s.prunable}, s, 0.5, 0.2)
    lay = Layout.build(s, mask)
    state = {n: t for n, t in model.state_dict().items() if n in s.shapes}
    return lay, lay.to_compact(state)


def reply(layout, compact, **metrics):
    values = {P.NUM_EXAMPLES: 10, P.MASK_VERSION: 3, P.TRAIN_LOSS: 0.5, P.TRAIN_SECONDS: 1.0, **metrics}
    return RecordDict({P.ARRAYS: encode_state(compact, layout), P.METRICS: MetricRecord(values)})


def check(layout, content):
    return validate_train_reply(content, layout, 3, "sparse", max_examples=1000, max_bytes=2**30)


def test_valid_reply_is_decoded_into_the_global_layout(layout):
    lay, compact = layout
    result = check(lay, reply(lay, compact))
    assert result.num_examples == 10 and result.loss == 0.5
    assert result.state["fc1.weight"].shape == lay.structure.shapes["fc1.weight"]
    assert torch.count_nonzero(result.state["fc1.weight"][~lay.mask.weights["fc1.weight"]]) == 0


@pytest.mark.parametrize("metrics,reason", [
    ({P.NUM_EXAMPLES: 0}, "outside"),
    ({P.NUM_EXAMPLES: -5}, "outside"),
    ({P.NUM_EXAMPLES: 10**9}, "outside"),
    ({P.NUM_EXAMPLES: 2.5}, "integer"),
    ({P.MASK_VERSION: 2}, "mask version"),
    ({P.TRAIN_LOSS: float("nan")}, "finite"),
])
def test_bad_metrics_are_rejected(layout, metrics, reason):
    lay, compact = layout
    with pytest.raises(RejectedReply, match=reason):
        check(lay, reply(lay, compact, **metrics))


def test_missing_records_and_codec_errors_are_rejected(layout):
    lay, compact = layout
    with pytest.raises(RejectedReply, match="ArrayRecord"):
        check(lay, RecordDict({P.METRICS: MetricRecord({P.NUM_EXAMPLES: 1})}))
    bad = {**compact, "fc1.bias": torch.full_like(compact["fc1.bias"], float("nan"))}
    with pytest.raises(RejectedReply, match="NaN"):
        check(lay, reply(lay, bad))
    wrong = RecordDict({P.ARRAYS: ArrayRecord({"x": torch.zeros(3)}), P.METRICS: MetricRecord({P.NUM_EXAMPLES: 1, P.MASK_VERSION: 3})})
    with pytest.raises(RejectedReply, match="unexpected tensors"):
        check(lay, wrong)


def test_weighted_average():
    avg = WeightedAverage()
    avg.add({"w": torch.tensor([1.0, 0.0])}, 1)
    avg.add({"w": torch.tensor([3.0, 4.0])}, 3)
    assert torch.allclose(avg.result()["w"], torch.tensor([2.5, 3.0]))
    with pytest.raises(ValueError):
        WeightedAverage().result()


@pytest.mark.parametrize("metrics,reason", [
    ({P.TRAIN_SECONDS: -1e12}, P.TRAIN_SECONDS),
    ({P.TRAIN_SECONDS: -0.5}, P.TRAIN_SECONDS),
    ({P.TRAIN_SECONDS: 1e12}, P.TRAIN_SECONDS),
    ({P.TRAIN_SECONDS: float("inf")}, P.TRAIN_SECONDS),
    ({P.TRAIN_SECONDS: float("nan")}, P.TRAIN_SECONDS),
    ({P.TRAIN_LOSS: float("inf")}, P.TRAIN_LOSS),
    ({P.TRAIN_LOSS: float("-inf")}, P.TRAIN_LOSS),
])
def test_implausible_metrics_are_rejected_naming_the_key(layout, metrics, reason):
    lay, compact = layout
    with pytest.raises(RejectedReply, match=reason):
        check(lay, reply(lay, compact, **metrics))


def test_train_seconds_bounds():
    assert train_seconds(MetricRecord({})) == 0.0
    assert train_seconds(MetricRecord({P.TRAIN_SECONDS: MAX_TRAIN_SECONDS})) == MAX_TRAIN_SECONDS
    with pytest.raises(RejectedReply, match="outside"):
        train_seconds(MetricRecord({P.TRAIN_SECONDS: MAX_TRAIN_SECONDS * 1.01}))
    assert bounded_metric(MetricRecord({"x": -2.0}), "x", -3.0, 0.0) == -2.0

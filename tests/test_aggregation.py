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
    wrong = RecordDict({P.ARRAYS: ArrayRecord({"x": torch.zeros(3)}),
                        P.METRICS: MetricRecord({P.NUM_EXAMPLES: 1, P.MASK_VERSION: 3})})
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


def explore_reply(structure, precision="float32", **metrics):
    from autoflip_strategy.codec import encode_guidance

    matrix = {n: torch.rand(structure.shapes[n]) for n in structure.prunable}
    values = {P.NUM_EXAMPLES: 12, P.EPOCHS_RUN: 2, P.TRAIN_LOSS: 0.1, P.TRAIN_SECONDS: 3.0, **metrics}
    return matrix, RecordDict({P.GUIDANCE: encode_guidance(matrix, precision), P.METRICS: MetricRecord(values)})


def test_exploration_replies_are_validated_next_to_training_replies(layout):
    from autoflip_strategy.aggregation import validate_explore_reply

    s = layout[0].structure
    matrix, content = explore_reply(s)
    got = validate_explore_reply(content, s, "float32", max_examples=100, max_bytes=2**30, max_epochs=3)
    assert (got.num_examples, got.epochs, got.seconds) == (12, 2, 3.0)
    assert all(torch.equal(got.matrix[n], matrix[n]) for n in s.prunable)
    for bad, reason in [({P.EPOCHS_RUN: 4}, "epochs_run=4"), ({P.NUM_EXAMPLES: 0}, "num-examples"),
                        ({P.TRAIN_SECONDS: -1.0}, "train_seconds")]:
        with pytest.raises(RejectedReply, match=reason):
            validate_explore_reply(explore_reply(s, **bad)[1], s, "float32", 100, 2**30, 3)
    with pytest.raises(RejectedReply, match="guidance payload"):  # the codec's error, as a rejection
        validate_explore_reply(content, s, "float16", 100, 2**30, 3)
    with pytest.raises(RejectedReply, match="'guidance' and 'metrics'"):
        validate_explore_reply(RecordDict({P.METRICS: MetricRecord({P.NUM_EXAMPLES: 1})}), s, "float32", 100,
                               2**30, 3)


def test_evaluation_replies_keep_the_users_metrics_under_their_key():
    from autoflip_strategy.aggregation import normalised_reply, validate_eval_reply

    content = RecordDict({"m": MetricRecord({"n": 7, "eval_acc": 0.5})})
    _, metrics = normalised_reply(content, "n")  # FedAvg's weighted_by_key "n", under any record key
    assert metrics[P.NUM_EXAMPLES] == 7
    assert dict(validate_eval_reply(content, "n", 100)) == {"n": 7, "eval_acc": 0.5}
    with pytest.raises(RejectedReply, match="eval_acc"):
        validate_eval_reply(RecordDict({P.METRICS: MetricRecord({P.NUM_EXAMPLES: 7, "eval_acc": float("nan")})}),
                            P.NUM_EXAMPLES, 100)
    with pytest.raises(RejectedReply, match="one MetricRecord"):
        validate_eval_reply(RecordDict(), P.NUM_EXAMPLES, 100)


def test_one_streaming_average_serves_exploration_and_training():
    """Hundreds of explorers: the stream holds one accumulator per tensor, and equals the list-based mean."""
    from autoflip_strategy.guidance import weighted_mean

    gen = torch.Generator().manual_seed(0)
    matrices = [{"w": torch.rand(3, 4, generator=gen), "v": torch.rand(5, generator=gen)} for _ in range(300)]
    weights = [float(i % 7 + 1) for i in range(300)]
    stream = WeightedAverage()
    for m, w in zip(matrices, weights):
        stream.add(m, w)
    assert stream.count == 300 and len(stream._sum) == 2
    expected = {n: sum(m[n].double() * w for m, w in zip(matrices, weights)) / sum(weights) for n in ("w", "v")}
    for name, got in stream.result().items():
        assert torch.allclose(got, expected[name].float(), atol=1e-6)
        assert torch.equal(got, weighted_mean(matrices, weights)[name])

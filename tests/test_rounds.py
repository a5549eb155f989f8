import pytest
from flwr.app import MetricRecord

from autoflip_strategy import protocol as P
from autoflip_strategy.failures import RunFailed
from autoflip_strategy.masks import MaskChurn
from autoflip_strategy.rounds import FailedRounds, RoundRecord, plus


def test_closed_record_has_the_round_its_outcome_and_running_totals():
    first = RoundRecord(0, "explore", bytes_down=100, bytes_up=40, train_flops=5, client_train_seconds=1.5)
    closed0 = first.close({}, 1.0, 0, None)
    assert closed0["cum_bytes_down"] == 100 and closed0["accuracy"] is None and "failed" not in closed0
    assert "partition_refused" not in closed0 and "absent" not in closed0 and "empty_output_rows" not in closed0
    second = RoundRecord(1, "train", bytes_down=10, bytes_up=4, train_flops=None, sampled=[0, 1], replied=[1])
    second.empty_output_rows, second.absent = 0, []
    second.refused([{"node": 9}])
    second.federated = MetricRecord({P.EVAL_ACC: 0.25, P.EVAL_LOSS: 2.0})
    closed1 = second.close(closed0, 0.5, 2, MetricRecord({"accuracy": 0.75, "loss": 0.5}))
    assert (closed1["cum_bytes_down"], closed1["cum_bytes_up"]) == (110, 44)
    assert closed1["cum_train_flops"] is None  # an uncountable round makes the total unknown, never wrong
    assert closed1["cum_client_train_seconds"] == 1.5
    assert (closed1["accuracy"], closed1["loss"], closed1["client_accuracy"], closed1["client_loss"]) == (
        0.75, 0.5, 0.25, 2.0)
    assert (closed1["density"], closed1["mask_version"], closed1["empty_output_rows"]) == (0.5, 2, 0)
    assert closed1["partition_refused"] == [{"node": 9}] and closed1["absent"] == []
    assert not {"filing", "federated", "closed", "started", "train_aggregated"} & set(closed1)
    assert second.closed is closed1 and plus(3, 2, 4) == 11 and plus(None, 2, 4) is None


def test_mask_churn_is_none_until_a_recomputation_and_zero_when_it_changed_nothing():
    untouched = RoundRecord(1, "train")
    closed = untouched.close({}, 1.0, 0, None)
    assert (closed["mask_churn_weights"], closed["mask_churn_units"], closed["mask_churn"]) == (None, None, None)
    assert "mask_churn" not in untouched.metrics(1.0, 0)
    same = RoundRecord(2, "train")
    same.churned(MaskChurn(0, 0, 18))
    assert same.metrics(0.5, 1)["mask_churn"] == 0.0
    closed = same.close(closed, 0.5, 1, None)
    assert (closed["mask_churn_weights"], closed["mask_churn_units"], closed["mask_churn"]) == (0, 0, 0.0)
    moved = RoundRecord(3, "train")
    moved.churned(MaskChurn(9, 2, 36))
    closed = moved.close(closed, 0.5, 2, None)
    assert (closed["mask_churn_weights"], closed["mask_churn_units"], closed["mask_churn"]) == (9, 2, 0.25)


def test_failures_are_filed_under_the_stage_that_saw_them():
    record = RoundRecord(2, "train")
    record.note_failure("dropped", 5, 1, "client error: boom")
    record.filing = "eval_"
    record.note_failure("rejected", 6, -1, "bad metric")
    record.filing = ""
    assert [f["reason"] for f in record.dropped] == ["client error: boom"] and record.rejected == []
    assert record.eval_rejected == [{"partition": -1, "node": 6, "reason": "bad metric"}]
    assert record.failures() == record.dropped and record.failures("eval_") == record.eval_rejected


def test_failed_rounds_raise_after_the_maximum_with_the_most_common_error():
    streak, closed = FailedRounds(2), []
    first = RoundRecord(1, "train", sampled=[0])
    first.note_failure("dropped", 1, 0, "client error: ValueError: boom")
    streak.observe(first, 0, lambda: closed.append(1))
    assert first.failed and streak.count == 1 and not closed
    streak.observe(RoundRecord(2, "train", sampled=[0]), 1, lambda: closed.append(2))  # an accepted reply resets
    assert streak.count == 0
    streak.observe(RoundRecord(3, "train"), 0, lambda: closed.append(3))  # nothing sampled: not a failed round
    assert streak.count == 0
    streak.observe(first, 0, lambda: closed.append(4))
    second = RoundRecord(5, "train", sampled=[0])
    with pytest.raises(RunFailed, match="2 rounds in a row") as err:
        streak.observe(second, 0, lambda: closed.append(5))
    assert "boom" in str(err.value) and closed == [5]

"""The suite's cost breakdown (benchmarks/costs_table.py, suite.summarise/markdown), on hand-made rounds."""

import math

import pytest

from benchmarks import costs_table as C
from benchmarks.suite import Setting, markdown, summarise


def rounds(per_round_bytes, churn=None, accuracy=0.5):
    """A results.json "rounds" list: round r moves per_round_bytes[r] bytes, half down, half up."""
    out, cum = [], 0
    for r, b in enumerate(per_round_bytes):
        cum += b
        record = {"round": r, "phase": "train" if r else "init", "bytes_down": b // 2, "bytes_up": b - b // 2,
                  "cum_bytes_down": cum // 2, "cum_bytes_up": cum - cum // 2, "accuracy": accuracy, "density": 1.0,
                  "cum_train_flops": 1, "cum_client_train_seconds": 1.0}
        if churn is not None:
            record["mask_churn"] = churn[r]
        out.append(record)
    return out


# FedAvg: nothing in round 0, then 10 MB a round. A method that explores: 25 MB once, then 4 MB a round.
FEDAVG = rounds([0, 10_000_000, 10_000_000, 10_000_000, 10_000_000, 10_000_000])
EXPLORER = rounds([25_000_000, 4_000_000, 4_000_000, 4_000_000, 4_000_000, 4_000_000])


def test_one_off_and_per_round_mb():
    assert C.one_off_mb(EXPLORER) == 25.0 and C.one_off_mb(FEDAVG) == 0.0
    assert C.per_round_mb(EXPLORER) == 4.0 and C.per_round_mb(FEDAVG) == 10.0
    assert C.per_round_mb(rounds([1_000_000, 2_000_000, 3_000_000])) == 2.5  # round 0 left out
    assert math.isnan(C.per_round_mb(rounds([1_000_000])))
    assert C.one_off_mb([]) == 0.0


def test_break_even_is_the_round_from_which_the_bytes_stay_at_or_below_the_reference():
    # cumulative MB: explorer 25, 29, 33, 37, 41, 45; FedAvg 0, 10, 20, 30, 40, 50 -> round 5 (45 <= 50)
    assert C.break_even([EXPLORER], [FEDAVG]) == 5
    assert C.break_even([FEDAVG], [FEDAVG]) == 0  # equal counts as even
    # FedAvg starts below the explorer (0 vs 25) but is above it at round 5 (50 > 45): it never stays below
    assert C.break_even([FEDAVG], [EXPLORER]) is None
    assert C.break_even([FEDAVG[:5]], [EXPLORER[:5]]) == 0  # below through round 4 (40 <= 41)
    crossing = rounds([20_000_000, 20_000_000, 1_000_000, 1_000_000, 1_000_000, 1_000_000])
    # cumulative 20, 40, 41, 42, 43, 44 vs FedAvg 0, 10, 20, 30, 40, 50: below only from round 5 on
    assert C.break_even([crossing], [FEDAVG]) == 5
    dips = rounds([0, 15_000_000, 5_000_000, 10_000_000, 10_000_000, 5_000_000])
    # cumulative 0, 15, 20, 30, 40, 45 vs 0, 10, 20, 30, 40, 50: at or below at round 0, above at 1, then below
    assert C.break_even([dips], [FEDAVG]) == 2
    assert C.break_even([EXPLORER[:4]], [FEDAVG]) is None  # 37 > 30 at round 3, the last one both have
    # seeds are averaged round by round: (25 + 5) / 2 = 15 once, then (4 + 4) / 2 = 4 a round; FedAvg 10 a round
    # -> cumulative 15, 19, 23 vs 0, 10, 20 ... 15 + 4r <= 10r from r = 2.5, so round 3 (27 <= 30)
    cheap = rounds([5_000_000, 4_000_000, 4_000_000, 4_000_000, 4_000_000, 4_000_000])
    assert C.break_even([EXPLORER, cheap], [FEDAVG]) == 3
    assert C.break_even([cheap], [FEDAVG]) == 1  # 9 <= 10
    assert C.break_even_cell([EXPLORER[:4]], [FEDAVG]) == "never"
    assert C.break_even_cell([EXPLORER], None) == "" and C.break_even_cell([EXPLORER], [FEDAVG]) == 5


def test_mean_churn_over_rounds_two_on():
    with_churn = rounds([0, 1, 1, 1], churn=[None, None, 0.25, 0.05])  # round 1: the first mask, None
    assert C.mean_churn(with_churn) == pytest.approx(0.15)
    assert C.mean_churn(rounds([0, 1, 1], churn=[None, 0.5, 0.0])) == 0.0  # round 1 left out
    assert math.isnan(C.mean_churn(rounds([0, 1, 1], churn=[None, None, None])))  # no recomputation
    assert C.mean_churn(FEDAVG) is None  # predates the field
    assert C.mean_churn_over_seeds([with_churn, rounds([0, 1, 1], churn=[None, None, 0.05])]) == pytest.approx(0.1)
    assert C.mean_churn_over_seeds([FEDAVG]) is None
    assert C.churn_text(None) == "–" and C.churn_text(math.nan) == "n/a" and C.churn_text(0.0) == "0.0000"


def test_summary_rows_and_table_carry_the_breakdown_and_keep_the_old_columns():
    setting = Setting("toy", "digits", 4, 2, 5)
    runs = {"fedavg": [{"rounds": FEDAVG}],
            "autoflip": [{"rounds": rounds([25_000_000] + [4_000_000] * 5, churn=[None, None, 0.0, 0.0, 0.1, 0.1])}]}
    rows = {r["method"]: r for r in summarise(setting, runs)}
    fedavg, autoflip = rows["fedavg"], rows["autoflip"]
    assert autoflip["comm_vs_fedavg"] == pytest.approx(45 / 50) and fedavg["comm_vs_fedavg"] == 1.0
    assert (autoflip["one_off_mb"], autoflip["per_round_mb"], autoflip["per_round_vs_fedavg"]) == (25.0, 4.0, 0.4)
    assert (autoflip["break_even_vs_fedavg"], fedavg["break_even_vs_fedavg"]) == (5, 0)
    assert autoflip["break_even_vs_magnitude"] == ""  # no magnitude runs
    assert autoflip["mask_churn"] == pytest.approx(0.05) and fedavg["mask_churn"] is None
    text = markdown(list(rows.values()), {})
    assert "| toy | autoflip | 1 | 0.500 ± 0.000 |" in text  # the summary table as before
    assert "| toy | autoflip | 0.500 | 25.0 | 4.00 | 0.40 | 5 | – | 0.0500 |" in text
    assert "| toy | fedavg | 0.500 | 0.0 | 10.00 | 1.00 | 0 | – | – |" in text
    runs["magnitude"] = [{"rounds": rounds([0] + [5_000_000] * 5)}]  # cumulative 0, 5, 10, ... 25: 45 > 25
    rows = {r["method"]: r for r in summarise(setting, runs)}
    assert rows["autoflip"]["break_even_vs_magnitude"] == "never" and rows["magnitude"]["break_even_vs_magnitude"] == 0
    assert "| toy | autoflip | 0.500 | 25.0 | 4.00 | 0.40 | 5 | never |" in markdown(list(rows.values()), {})

"""The benchmark suite's tiny configuration, end to end.

The runs go through the suite's in-process engine (``--engine inprocess``, the one every benchmark in
docs/ was run with: the real ServerApp and ClientApp over Flower's wire format, each run in its own
process), started once for the module: the table, CSV and plot checks and the resume check read the
same two runs. The suite's simulation engine is one call of ``runner.simulation.run_simulation``,
which tests/test_simulation.py runs for real.
"""

import csv
import dataclasses
import json
import shutil

import pytest
import torch

from benchmarks.suite import METHODS, SETTINGS, run_suite


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """The smoke suite's two runs, ``--engine inprocess --jobs 2`` (both at once, each in its own process)."""
    out = tmp_path_factory.mktemp("suite")
    return out, run_suite("smoke", seeds=[0], methods=["fedavg", "autoflip"], out=out, engine="inprocess", jobs=2)


def test_smoke_suite_writes_table_csv_and_plots(suite, monkeypatch):
    tmp_path, summary = suite
    text = summary.read_text()
    assert "| digits-iid-4 | fedavg |" in text and "| digits-iid-4 | autoflip |" in text
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "summary.csv"))}
    assert float(rows["fedavg"]["comm_vs_fedavg"]) == 1.0
    assert float(rows["autoflip"]["density"]) == 0.5
    # exploration is counted; each pruned round then sends and computes less than FedAvg's
    runs = {m: json.loads(next(tmp_path.glob(f"runs/digits-iid-4/{m}-seed0/*/results.json")).read_text())
            for m in ("fedavg", "autoflip")}
    assert runs["autoflip"]["rounds"][0]["bytes_up"] > 0 and runs["fedavg"]["rounds"][0]["bytes_up"] == 0
    for key in ("bytes_up", "train_flops"):
        assert runs["autoflip"]["rounds"][1][key] < 0.7 * runs["fedavg"]["rounds"][1][key]
    # "last-5 acc" averages the training rounds (both here), not the exploration round
    train_accs = [r["accuracy"] for r in runs["autoflip"]["rounds"] if r["phase"] == "train"]
    assert len(train_accs) == 2 and float(rows["autoflip"]["last5_acc"]) == pytest.approx(sum(train_accs) / 2)
    for kind in ("round", "mb"):
        assert (tmp_path / f"digits-iid-4-accuracy-vs-{kind}.png").stat().st_size > 1000
    # a second call reuses the completed runs instead of training again
    before = sorted(p.stat().st_mtime for p in tmp_path.glob("runs/**/results.json"))
    run_suite("smoke", seeds=[0], methods=["fedavg", "autoflip"], out=tmp_path)
    assert sorted(p.stat().st_mtime for p in tmp_path.glob("runs/**/results.json")) == before
    # --summary-only rebuilds the same table from the runs on disk (any seeds found), running nothing
    (tmp_path / "summary.md").unlink()
    rebuilt = run_suite("smoke", seeds=[5], methods=["fedavg", "autoflip"], out=tmp_path, summary_only=True)
    assert rebuilt.read_text() == text and "| digits-iid-4 | autoflip | 1 |" in text
    assert sorted(p.stat().st_mtime for p in tmp_path.glob("runs/**/results.json")) == before
    # After a setting changes, its old runs are refused (named, with what changed), not reported or reused.
    smoke = SETTINGS["smoke"][0]
    longer = dataclasses.replace(smoke, rounds=3, run_config={**smoke.run_config, "learning-rate": 0.01})
    monkeypatch.setitem(SETTINGS, "smoke", [longer])
    for summary_only in (True, False):
        with pytest.raises(ValueError, match=r"fedavg-seed0/.*learning-rate: ran 0.003, now 0.01, "
                                             r"num-server-rounds: ran 2, now 3"):
            run_suite("smoke", seeds=[0], methods=["fedavg"], out=tmp_path, summary_only=summary_only)
    assert sorted(p.stat().st_mtime for p in tmp_path.glob("runs/**/results.json")) == before


def test_suite_settings_are_runnable_configs():
    from autoflip_task.config import app_config

    for settings in SETTINGS.values():
        for s in settings:
            for method in METHODS.values():
                app_config({**s.run_config, **method, "dataset": s.dataset})
            assert 1 <= s.per_round <= s.num_clients


def test_inprocess_engine_runs_in_parallel_and_resumes_a_cut_off_run(suite, tmp_path_factory):
    """``--engine inprocess --jobs 2`` (how the evidence was run), and resuming from a checkpoint."""
    shared, summary = suite
    tmp_path = tmp_path_factory.mktemp("resume") / "suite"
    shutil.copytree(shared, tmp_path)  # this test cuts a run off: the other test's runs stay as they were
    assert "| digits-iid-4 | fedavg |" in summary.read_text() and "| digits-iid-4 | autoflip |" in summary.read_text()
    path = tmp_path / "runs/digits-iid-4/autoflip-seed0/run/results.json"
    results = json.loads(path.read_text())
    wire = json.loads((path.parent / "wire_bytes.json").read_text())
    assert wire["up"] >= sum(r["bytes_up"] for r in results["rounds"]) > 0
    # The classifier-row report of benchmarks.mask_probe counts what the saved mask holds.
    from benchmarks.mask_probe import row_report

    keep = torch.load(path.parent / "final_mask.pt", weights_only=True)["fc2.weight"]
    assert row_report(path.parent.parent).startswith(
        f"| autoflip-seed0 | fc2.weight | {int((~keep.any(1)).sum())} of 10 | {keep.float().mean(1).min():.3f} |")
    # As if cut off after its last checkpoint: the suite resumes it instead of starting over.
    path.write_text(json.dumps({**results, "status": "running", "rounds": results["rounds"][:2]}))
    table = run_suite("smoke", seeds=[0], methods=["fedavg", "autoflip"], out=tmp_path, summary_only=True).read_text()
    fedavg_round_1 = json.loads(next(tmp_path.glob("runs/digits-iid-4/fedavg-seed0/*/results.json")).read_text())
    assert (f"| digits-iid-4 | autoflip | cut off (seed 0: round 1/2, acc {results['rounds'][1]['accuracy']:.3f}; "
            f"FedAvg at round 1: {fedavg_round_1['rounds'][1]['accuracy']:.3f}) |") in table
    run_suite("smoke", seeds=[0], methods=["autoflip"], out=tmp_path, engine="inprocess")
    resumed = json.loads(path.read_text())
    assert resumed["status"] == "completed" and resumed["rounds"] == results["rounds"]
    assert "Resuming after round 2" in (path.parent.parent / "log.txt").read_text()

"""Smoke test of ``python -m benchmarks.bench_savings --quick``.

It runs in a subprocess (the benchmark fixes torch's thread count for its whole
process) and checks the deterministic parts only: every table is there, and
the byte properties hold. Timings are never asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict, str]:
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_savings", "--quick", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,  # a loaded 2-core host
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "savings.json").read_text())
    return proc.stdout, results, (out / "savings.md").read_text()


def test_prints_and_writes_every_table(quick_run):
    stdout, results, markdown = quick_run
    for heading in ("### 1. Bytes per round", "### 2. Local-epoch time", "### 3. Codec throughput",
                    "### 4. Exploration uplink precision", "### 5. Value precision on the wire"):
        assert heading in stdout
        assert heading in markdown
    assert "Machine:" in stdout and "torch" in stdout
    assert results["quick"] is True
    for key in ("bytes", "timing", "codec", "guidance", "precision"):
        assert results[key], key


def test_bytes_table_covers_models_densities_and_modes(quick_run):
    _, results, _ = quick_run
    rows = results["bytes"]
    for model in ("cnn", "resnet"):
        for mode in ("unstructured", "hybrid"):
            densities = {r["target_density"] for r in rows if r["model"] == model and r["mode"] == mode}
            assert densities == {0.7, 0.5, 0.3, 0.1}
        # the unstructured-only masks reach every target density
        assert all("skipped" not in r for r in rows if r["model"] == model and r["mode"] == "unstructured")


def test_uplink_matches_analytic_formula_plus_headers(quick_run):
    _, results, _ = quick_run
    measured = [r for r in results["bytes"] if "skipped" not in r]
    assert measured
    for r in measured:
        formula = 4 * r["kept_prunable"] + 4 * r["non_prunable_values"] + 128 * r["arrays"]
        assert abs(r["uplink_bytes"] - formula) <= 0.02 * formula, r
        # analytic bytes are the same formula without headers
        assert r["uplink_analytic"] == 4 * (r["kept_prunable"] + r["non_prunable_values"])
        assert r["uplink_bytes"] <= r["dense_fedavg_bytes"]
        assert r["uplink_ok"] and r["lossless"]
    assert results["checks"]["uplink_within_2pct"] and results["checks"]["lossless"]


def test_bitmap_overhead_at_most_one_bit_per_prunable_weight(quick_run):
    _, results, _ = quick_run
    for r in (r for r in results["bytes"] if "skipped" not in r):
        payload = r["mask_bytes"] - 128 * r["mask_arrays"]
        assert payload == r["bitmap_payload_bytes"]
        assert payload <= r["bitmap_bound_bytes"]
        # one bit per prunable weight and per unit, plus at most one padding byte per array
        assert payload * 8 <= r["prunable"] + r["units"] + 8 * r["mask_arrays"], r
        assert r["bitmap_ok"]
    assert results["checks"]["bitmap_bound"]


def test_codec_and_guidance_tables_are_consistent(quick_run):
    _, results, _ = quick_run
    assert {(r["model"], r["transport"]) for r in results["codec"]} == {
        ("cnn", "sparse"), ("cnn", "dense"), ("lstm", "sparse"), ("lstm", "dense")}
    assert all(r["lossless"] for r in results["codec"])
    for r in results["guidance"]:
        assert r["float16_bytes"] < r["float32_bytes"]
        assert 0.0 <= r["fraction_differ"] <= 1.0
    # timing rows exist for both models and both structured sparsities (values are not asserted)
    assert {(r["model"], r["structured"]) for r in results["timing"]} == {
        ("cnn", 0.25), ("cnn", 0.5), ("resnet", 0.25), ("resnet", 0.5)}


def test_value_precision_rows_follow_the_analytic_formula(quick_run):
    _, results, _ = quick_run
    rows = results["precision"]
    precisions = ("float32", "float16", "int8")
    assert {(r["model"], r["precision"]) for r in rows} == {
        (m, p) for m in ("cnn", "lstm", "resnet") for p in precisions}
    for r in rows:
        bits = {"float32": 32, "float16": 16, "int8": 8}[r["precision"]]
        # realised = analytic + one 128-byte header per array, exactly; the limit is b·d bits per prunable weight
        assert r["uplink_bytes"] == r["uplink_analytic"] + r["uplink_headers"], r
        assert r["uplink_limit"] == bits * r["kept_prunable"] / 8
        assert r["downlink_limit"] == (bits * r["kept_prunable"] + r["prunable"]) / 8
        assert r["exact"] and r["ratio_ok"], r
        if r["model"] in ("cnn", "lstm"):
            assert r["uplink_ratio"] <= 1.05 and r["downlink_ratio"] <= 1.05, r
        # decoding error: none at float32, half a float16 ulp, one int8 step up (stochastic), half down
        bound_up, bound_down = {"float32": (0.0, 0.0), "float16": (2.0 ** -11, 2.0 ** -11),
                                "int8": (1 / 127, 0.5 / 127)}[r["precision"]]
        assert r["uplink_max_rel_error"] <= bound_up * 1.001 and r["downlink_max_rel_error"] <= bound_down * 1.001
    by_mask = {}
    for r in rows:
        by_mask.setdefault((r["model"], r["mode"], r["target_density"]), {})[r["precision"]] = r
    for same in by_mask.values():
        up = [same[p]["uplink_bytes"] for p in precisions]
        assert up[0] > up[1] > up[2], up
    assert results["checks"]["precision_exact"] and results["checks"]["precision_within_5pct"]

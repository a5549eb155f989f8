"""1. Bytes per round: realised wire bytes of the sparse codec against analytic bytes and dense FedAvg."""

from __future__ import annotations

import math
from typing import Any

from autoflip_strategy.codec import (ARRAY_HEADER_BYTES, decode_mask, decode_state, encode_mask, encode_state,
    record_nbytes)
from autoflip_strategy.geometry import Layout
from autoflip_strategy.masks import HybridMask, compute_hybrid_mask, dense_mask
from benchmarks.savings.common import (MODEL_LABELS, Settings, Subject, float_state, fmt, fmt_bytes,
    masked_compact_state, md_table, random_scores, states_equal, subject)


def bytes_rows(settings: Settings) -> list[dict[str, Any]]:
    rows = []
    for name in ("cnn", "resnet"):
        sub = subject(name)
        structure = sub.structure
        scores = random_scores(structure)
        dense_layout = Layout.build(structure, dense_mask(structure))
        dense_bytes = record_nbytes(encode_state(float_state(sub.model, structure), dense_layout, "dense"))
        total_prunable = structure.num_prunable
        total_units = sum(g.size for g in structure.groups)
        for mode, structured in (("unstructured", 0.0), ("hybrid", settings.hybrid_structured)):
            for density in settings.densities:
                mask = compute_hybrid_mask(scores, structure, 1.0 - density, structured)
                row: dict[str, Any] = {"model": name, "mode": mode, "structured": structured,
                                       "target_density": density, "density": mask.density()}
                if abs(mask.density() - density) > 1.0 / total_prunable + 1e-12:
                    # the structured part alone removes more than 1 - density: target out of reach
                    row["skipped"] = (f"structured {structured:g} alone leaves density "
                                      f"{mask.density():.3f} < {density:g}")
                    rows.append(row)
                    continue
                rows.append(row | bytes_row(sub, mask, dense_bytes, total_prunable, total_units))
    return rows


def bytes_row(sub: Subject, mask: HybridMask, dense_bytes: int, total_prunable: int,
              total_units: int) -> dict[str, Any]:
    structure = sub.structure
    layout = Layout.build(structure, mask)
    compact = masked_compact_state(sub.model, layout)
    prunable = set(structure.prunable)

    uplink = encode_state(compact, layout, "sparse")
    realised = record_nbytes(uplink)
    analytic = layout.analytic_bytes(False)
    kept = sum(int(m.sum()) for m in layout.compact_masks.values())
    non_prunable = sum(math.prod(s) for n, s in layout.compact_shapes.items() if n not in prunable)
    headers = len(uplink) * ARRAY_HEADER_BYTES
    formula = 4 * kept + 4 * non_prunable + headers  # 32·d bits per prunable weight + dense rest + headers
    uplink_error = abs(realised - formula) / formula

    mask_record = encode_mask(layout, "sparse")
    mask_bytes = record_nbytes(mask_record)
    mask_headers = len(mask_record) * ARRAY_HEADER_BYTES
    bitmap_bound = (total_prunable + total_units + 7) // 8 + len(mask_record)  # 1 bit each, ≤1 pad byte/array
    bitmap_payload = mask_bytes - mask_headers

    lossless = (states_equal(decode_state(uplink, layout, "sparse"), compact)
                and states_equal(decode_state(encode_state(compact, layout, "dense"), layout, "dense"), compact)
                and decode_mask(mask_record, structure, "sparse").equals(mask))
    return {
        "kept_prunable": kept, "prunable": total_prunable, "units": total_units, "non_prunable_values": non_prunable,
        "arrays": len(uplink), "uplink_bytes": realised, "uplink_analytic": analytic,
        "uplink_formula_with_headers": formula, "uplink_formula_error": uplink_error,
        "uplink_ok": uplink_error <= 0.02,
        "dense_fedavg_bytes": dense_bytes,
        "mask_bytes": mask_bytes, "mask_arrays": len(mask_record), "bitmap_payload_bytes": bitmap_payload,
        "bitmap_bits_per_prunable_weight": 8 * bitmap_payload / total_prunable,
        "bitmap_bound_bytes": bitmap_bound, "bitmap_ok": bitmap_payload <= bitmap_bound,
        "downlink_bytes": realised + mask_bytes, "downlink_analytic": layout.analytic_bytes(True),
        "lossless": bool(lossless),
    }


def bytes_markdown(rows: list[dict[str, Any]]) -> str:
    header = ["model", "mask", "density", "uplink realised B", "uplink analytic B", "realised/analytic",
              "dense FedAvg B", "realised/dense", "downlink realised B (model+mask)", "downlink analytic B",
              "realised/analytic", "mask bits/weight", "checks"]
    out = []
    for r in rows:
        label = f"{r['mode']} (structured {r['structured']:g})"
        if "skipped" in r:
            out.append([MODEL_LABELS[r["model"]], label, f"{r['target_density']:g}"] + ["—"] * 9
                       + [f"n/a: {r['skipped']}"])
            continue
        checks = ("ok" if r["uplink_ok"] and r["bitmap_ok"] and r["lossless"] else
                  "FAIL " + ",".join(k for k in ("uplink_ok", "bitmap_ok", "lossless") if not r[k]))
        out.append([
            MODEL_LABELS[r["model"]], label, f"{r['density']:.3f}",
            fmt_bytes(r["uplink_bytes"]), fmt_bytes(r["uplink_analytic"]),
            fmt(r["uplink_bytes"] / r["uplink_analytic"]),
            fmt_bytes(r["dense_fedavg_bytes"]), fmt(r["uplink_bytes"] / r["dense_fedavg_bytes"]),
            fmt_bytes(r["downlink_bytes"]), fmt_bytes(r["downlink_analytic"]),
            fmt(r["downlink_bytes"] / r["downlink_analytic"]),
            fmt(r["bitmap_bits_per_prunable_weight"]), checks,
        ])
    return md_table(header, out)


def resnet_arrays(results: dict[str, Any]) -> int:
    """How many Flower arrays the ResNet's uplink holds (its headers dominate the small model's bytes)."""
    return next((r["arrays"] for r in results["bytes"] if r["model"] == "resnet" and "arrays" in r), 0)


def section(results: dict[str, Any]) -> str:
    """This benchmark's part of savings.md: heading, method, table, checks."""
    checks = results["checks"]
    arrays = resnet_arrays(results)
    parts = [
        "### 1. Bytes per round",
        "",
        "Masks from random scores (seed 0). Uplink: `encode_state(..., 'sparse')`. Downlink: the same "
        "model payload plus `encode_mask(..., 'sparse')`. Dense FedAvg: every float tensor at full size. "
        "Analytic: 32 bits per value sent (+1 bit per prunable weight and unit for the mask), no headers. "
        f"Each Flower array adds a {ARRAY_HEADER_BYTES}-byte np.save header.",
        "",
        bytes_markdown(results["bytes"]),
        "",
        f"Checks on every row: realised uplink within 2 % of 4 B × kept prunable weights + 4 B × compact "
        f"non-prunable values + {ARRAY_HEADER_BYTES} B per array: "
        f"**{'pass' if checks['uplink_within_2pct'] else 'FAIL'}** "
        f"(largest deviation {100 * checks['uplink_max_error']:.3f} %); mask bitmaps ≤ 1 bit per prunable "
        f"weight and unit + 1 padding byte and one header per array: "
        f"**{'pass' if checks['bitmap_bound'] else 'FAIL'}**; decode(encode(x)) == x for the model (sparse and "
        f"dense transport) and the mask: **{'pass' if checks['lossless'] else 'FAIL'}**.",
        "",
        "Reading the table: realised/analytic above 1 is the per-array headers (the ResNet sends "
        f"{arrays} arrays, {arrays * ARRAY_HEADER_BYTES:,} B of headers, "
        "which weighs most at low density); realised/dense above the density is the non-prunable tensors "
        "(biases, BatchNorm) that travel dense. A hybrid downlink comes in under its analytic figure because "
        "the bitmaps cover only the compact tensors (removed units need no bits) while the formula charges "
        "one bit to every prunable weight.",
        "",
    ]
    return "\n".join(parts)

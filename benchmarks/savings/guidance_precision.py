"""4. Exploration uplink precision: masks from float16 guidance against masks from float32 guidance."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from autoflip_strategy.codec import decode_guidance, encode_guidance, record_nbytes
from autoflip_strategy.guidance import local_guidance, normalise, weighted_mean
from autoflip_strategy.masks import compute_hybrid_mask
from autoflip_task.training import train_epochs
from benchmarks.savings.common import (
    LR,
    SEED,
    Settings,
    float_state,
    fmt_bytes,
    md_table,
    subject,
)

MASK_SETTINGS = ((0.5, 0.0), (0.5, 0.2), (0.8, 0.2), (0.9, 0.2))


def digits_28x28() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits, upsampled to the MNIST shape (no download needed)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy((bunch.images / 16.0).astype(np.float32))[:, None]
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    return x, torch.from_numpy(bunch.target.astype(np.int64))


def explored_matrices(settings: Settings) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    sub = subject("cnn")
    x, y = digits_28x28()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SEED))
    theta0 = float_state(sub.model, sub.structure)
    matrices, weights = [], []
    for k in range(settings.explorers):
        idx = order[k * settings.explore_examples:(k + 1) * settings.explore_examples]
        model = copy.deepcopy(sub.model)
        torch.manual_seed(SEED + k)
        train_epochs(model, x[idx], y[idx], settings.explore_epochs, 32, LR)
        matrices.append(local_guidance(theta0, model.state_dict(), sub.structure.prunable))
        weights.append(float(len(idx)))
    return matrices, weights


def noise_matrices() -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """θ₀ + N(0, σ_l²) with σ_l = 10^-(l+1): per-layer scales four orders of magnitude apart."""
    sub = subject("cnn")
    theta0 = float_state(sub.model, sub.structure)
    gen = torch.Generator().manual_seed(SEED + 1)
    trained = dict(theta0)
    for layer, name in enumerate(sub.structure.prunable):
        trained[name] = theta0[name] + 10.0 ** -(layer + 1) * torch.randn(theta0[name].shape, generator=gen)
    return [local_guidance(theta0, trained, sub.structure.prunable)], [1.0]


def guidance_rows(settings: Settings) -> list[dict[str, Any]]:
    structure = subject("cnn").structure
    rows = []
    sources = (
        (f"{settings.explorers} explorers, {settings.explore_epochs} epoch(s) on digits", explored_matrices(settings)),
        ("1 explorer, θ₀ + noise (σ = 1e-1…1e-4 per layer)", noise_matrices()),
    )
    for source, (matrices, weights) in sources:
        sizes, decoded = {}, {}
        for precision in ("float32", "float16"):
            records = [encode_guidance(m, precision) for m in matrices]
            sizes[precision] = record_nbytes(records[0])
            decoded[precision] = [decode_guidance(r, structure, precision) for r in records]
        # precision of the decoded float16 values, relative to each tensor's max (the codec's scale)
        rel_err, flushed, nonzero = 0.0, 0, 0
        for m32, m16 in zip(decoded["float32"], decoded["float16"]):
            for n in structure.prunable:
                scale = float(m32[n].max()) or 1.0
                rel_err = max(rel_err, float((m16[n] - m32[n]).abs().max()) / scale)
                flushed += int(((m32[n] > 0) & (m16[n] == 0)).sum())
                nonzero += int((m32[n] > 0).sum())
        guidance = {p: normalise(weighted_mean(decoded[p], weights)) for p in decoded}
        for sparsity, structured in MASK_SETTINGS:
            m32 = compute_hybrid_mask(guidance["float32"], structure, sparsity, structured)
            m16 = compute_hybrid_mask(guidance["float16"], structure, sparsity, structured)
            differ = sum(int((m32.weights[n] != m16.weights[n]).sum()) for n in structure.prunable)
            # how close to the float32 keep-threshold the disputed weights are (near-ties?)
            g32 = guidance["float32"]
            threshold = float(torch.cat([g32[n][m32.weights[n]] for n in structure.prunable]).min())
            disputed = torch.cat([g32[n][m32.weights[n] != m16.weights[n]] for n in structure.prunable])
            tie_distance = (float((disputed - threshold).abs().max()) / threshold
                            if disputed.numel() and threshold > 0 else 0.0)
            units_differ = sum(int((m32.units[g] != m16.units[g]).sum()) for g in m32.units)
            rows.append({
                "source": source, "sparsity": sparsity, "structured": structured,
                "float32_bytes": sizes["float32"], "float16_bytes": sizes["float16"],
                "bytes_saved": sizes["float32"] - sizes["float16"],
                "max_error_rel_to_tensor_max": rel_err,
                "flushed_to_zero": flushed, "nonzero_entries": nonzero,
                "weight_entries_differ": differ, "prunable": structure.num_prunable,
                "fraction_differ": differ / structure.num_prunable, "unit_decisions_differ": units_differ,
                "disputed_max_distance_to_threshold_rel": tie_distance,
            })
    return rows


def guidance_markdown(rows: list[dict[str, Any]]) -> str:
    header = ["guidance source", "sparsity", "structured", "float32 B/explorer", "float16 B/explorer",
              "saved", "max abs error / tensor max", "flushed to 0", "mask entries differing",
              "fraction differing", "unit decisions differing", "disputed: max abs(G−t)/t"]
    out = [[r["source"], f"{r['sparsity']:g}", f"{r['structured']:g}", fmt_bytes(r["float32_bytes"]),
            fmt_bytes(r["float16_bytes"]), f"{100 * r['bytes_saved'] / r['float32_bytes']:.1f} %",
            f"{r['max_error_rel_to_tensor_max']:.1e}", f"{r['flushed_to_zero']:,} / {r['nonzero_entries']:,}",
            f"{r['weight_entries_differ']:,} / {r['prunable']:,}", f"{r['fraction_differ']:.2e}",
            str(r["unit_decisions_differ"]), f"{r['disputed_max_distance_to_threshold_rel']:.1e}"] for r in rows]
    return md_table(header, out)


def section(results: dict[str, Any]) -> str:
    """This benchmark's part of savings.md: heading, method, table, checks."""
    parts = [
        "### 4. Exploration uplink precision (CNN)",
        "",
        "Guidance D = (θ_k − θ₀)² per prunable weight, sent with `encode_guidance` as float32 or float16 "
        "(float16 scaled by each tensor's max), decoded, averaged, normalised (mean) and turned into "
        "hybrid masks; the two masks are compared entry by entry. Last column: for the weights the two "
        "masks disagree on, the largest distance of their float32 score G from the float32 keep-threshold t "
        "(relative); values near float16's resolution (~1e-3) mean the disputed weights are near-ties.",
        "",
        guidance_markdown(results["guidance"]),
        "",
    ]
    return "\n".join(parts)

"""3. Codec throughput: encode and decode time of the model payload and the mask, both transports."""

from __future__ import annotations

from typing import Any

from autoflip_strategy.codec import (decode_mask, decode_state, encode_mask, encode_state, record_nbytes)
from autoflip_strategy.geometry import Layout
from autoflip_strategy.masks import compute_hybrid_mask
from benchmarks.savings.common import (MODEL_LABELS, Settings, fmt, fmt_bytes, masked_compact_state, md_table,
    median_seconds, random_scores, states_equal, subject)


def codec_rows(settings: Settings) -> list[dict[str, Any]]:
    rows = []
    for name in ("cnn", "lstm"):
        sub = subject(name)
        structure = sub.structure
        mask = compute_hybrid_mask(random_scores(structure), structure, 0.5, settings.hybrid_structured)
        layout = Layout.build(structure, mask)
        compact = masked_compact_state(sub.model, layout)
        for transport in ("sparse", "dense"):
            enc_s, record = median_seconds(lambda: encode_state(compact, layout, transport), settings.codec_reps)
            dec_s, decoded = median_seconds(lambda: decode_state(record, layout, transport), settings.codec_reps)
            menc_s, mrec = median_seconds(lambda: encode_mask(layout, transport), settings.codec_reps)
            mdec_s, mdecoded = median_seconds(lambda: decode_mask(mrec, structure, transport), settings.codec_reps)
            payload, mask_payload = record_nbytes(record), record_nbytes(mrec)
            rows.append({
                "model": name, "transport": transport, "density": mask.density(),
                "payload_bytes": payload, "encode_s": enc_s, "decode_s": dec_s,
                "encode_MBps": payload / enc_s / 1e6, "decode_MBps": payload / dec_s / 1e6,
                "mask_bytes": mask_payload, "mask_encode_s": menc_s, "mask_decode_s": mdec_s,
                "lossless": states_equal(decoded, compact) and mdecoded.equals(mask),
            })
    return rows


def codec_markdown(rows: list[dict[str, Any]]) -> str:
    header = ["model", "transport", "density", "payload B", "encode ms", "encode MB/s", "decode ms",
              "decode MB/s", "mask B", "mask encode ms", "mask decode ms", "round trip"]
    out = [[MODEL_LABELS[r["model"]], r["transport"], f"{r['density']:.3f}", fmt_bytes(r["payload_bytes"]),
            fmt(1e3 * r["encode_s"], 2), f"{r['encode_MBps']:.0f}", fmt(1e3 * r["decode_s"], 2),
            f"{r['decode_MBps']:.0f}", fmt_bytes(r["mask_bytes"]), fmt(1e3 * r["mask_encode_s"], 2),
            fmt(1e3 * r["mask_decode_s"], 2), "lossless" if r["lossless"] else "MISMATCH"] for r in rows]
    return md_table(header, out)


def section(results: dict[str, Any]) -> str:
    """This benchmark's part of savings.md: heading, method, table, checks."""
    s = results["settings"]
    parts = [
        "### 3. Codec throughput",
        "",
        f"Density 0.5 (hybrid, structured {s['hybrid_structured']:g}); medians of {s['codec_reps']} calls; "
        "MB/s = payload bytes / time (1 MB = 10^6 B).",
        "",
        codec_markdown(results["codec"]),
        "",
    ]
    return "\n".join(parts)

"""What AutoFLIP saves, measured: bytes on the wire, local-epoch time, codec speed, uplink and value precision.

Run from the repository root::

    python -m benchmarks.bench_savings            # full run (a few minutes on 2 CPU cores)
    python -m benchmarks.bench_savings --quick    # tiny sizes, for the smoke test (< 60 s)

One run prints five Markdown tables and writes them, with every raw number, to
``benchmarks/results/savings.md`` and ``savings.json`` (``--out`` picks another folder). Each
benchmark is one module of ``benchmarks/savings/``; the settings of both profiles (full and
``--quick``) are data: ``benchmarks/conf/savings.toml``.

1. **Bytes per round** (CNN 1x28x28 and ResNet 3x32x32): masks from random scores
   (fixed seed), because what is measured is the codec, not the choice of weights.
   Realised bytes are the lengths of the Flower ``Array`` buffers
   (:func:`~autoflip_strategy.codec.record_nbytes`); analytic bytes are
   :meth:`~autoflip_strategy.geometry.Layout.analytic_bytes`. Two deterministic
   properties are checked on every row: the sparse uplink is within 2 % of
   ``4 B x kept prunable weights + 4 B x compact non-prunable values + one
   np.save header per array``, and the mask bitmaps cost at most one bit per
   prunable weight and unit (plus one padding byte and one header per array).
   Every row is also decoded again and compared with what was sent (lossless).
2. **Local-epoch time**: one epoch is ``autoflip_task.training.train_epochs`` (Adam,
   shuffled mini-batches, forward, backward, step) over ``--examples`` random
   examples, run inside :func:`~autoflip_strategy.enforce.enforce_mask` exactly as
   the client does. Variants: *dense* (FedAvg, no mask), *dense-masked* (the
   global model with the same hybrid mask enforced, which is what most
   FL-pruning code trains), *compact* (physically narrower model, its compact
   masks enforced; all-True here because unstructured sparsity is 0) and
   *compact, no enforce* (to show what the enforcement hooks cost). All variants
   run in the same process with a fixed thread count, interleaved within each
   repetition (the order rotates every repetition), after warm-up repetitions;
   the table shows medians of wall-clock time, and of process CPU time as a
   cross-check that is less sensitive to other processes on a shared machine.
   Defaults: 600 examples (MNIST's 60 000 over FedAvg's 100 clients), batch 32
   (the app's ``batch-size``), 1 thread (Flower's simulation gives each client one
   CPU). The authors' MNIST setting is ``--examples 3000 --batch 350``.
3. **Codec throughput** (CNN and CharLSTM(vocab 65), sequence length 80) at
   density 0.5 (hybrid, structured 0.2): encode/decode time of the model payload
   for both transports, and of the mask.
4. **Exploration uplink precision**: guidance matrices from explorers that
   really trained the CNN from θ₀ (scikit-learn digits upsampled to 28x28), and
   from θ₀ plus Gaussian noise of very different scale per layer, sent as
   float32 and as float16; masks computed from both after averaging and
   normalisation are compared entry by entry.
5. **Value precision** (``value-precision``, :mod:`autoflip_strategy.quantise`):
   the model payload at float32, float16 and int8 (block-scaled codes) for the
   CNN, the CharLSTM and the ResNet, unstructured and hybrid masks at densities
   0.5 and 0.1. Uplink as a client sends it (int8: seeded stochastic rounding),
   downlink as the server sends it (nearest rounding, plus the mask). Columns:
   realised bytes, analytic bytes (b bits per kept prunable value + 32 per
   64-value block scale + 32 per other value, + 1 bit per prunable weight and unit
   with the mask), the physical limit b·d bits per prunable weight (+1 bit with
   the mask), and the largest decoding error relative to its tensor's largest
   value. Checked on every row: realised = analytic + one 128-byte header per
   array, exactly; realised/analytic ≤ 1.05 on the CNN and CharLSTM rows (not on
   the small ResNet, whose 47 mostly tiny arrays carry 6 KB of headers at every
   precision, 3-17 % over analytic already at float32).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import benchmark_parser, write_report
from benchmarks.savings import (
    bytes_per_round,
    codec_speed,
    epoch_time,
    guidance_precision,
    value_precision,
)
from benchmarks.savings.common import LR, Settings, machine_facts  # noqa: F401 - LR: the benchmark's constants

RESULTS_DIR = Path(__file__).resolve().parent / "results"


SECTIONS = (bytes_per_round, epoch_time, codec_speed, guidance_precision, value_precision)


def build_markdown(results: dict[str, Any]) -> str:
    """savings.md: the machine, then each benchmark's section."""
    m = results["machine"]
    intro = [
        "## AutoFLIP savings benchmark" + (" (quick mode: sizes too small for meaningful timings)"
                                          if results["quick"] else ""),
        "",
        f"Machine: {m['cpu_model']}, {m['usable_cpus']} usable CPU(s), torch {m['torch']} with "
        f"{m['torch_threads']} thread(s), flwr {m['flwr']}, Python {m['python']}; load average "
        f"{m['load_average_start'][0]:.1f} at start, {m['load_average_end'][0]:.1f} at end; "
        f"run took {results['run_seconds']:.0f} s.",
        "",
    ]
    return "\n".join(intro + [section.section(results) for section in SECTIONS])


def run(settings: Settings, quick: bool) -> dict[str, Any]:
    start = time.perf_counter()
    torch.set_num_threads(settings.threads)
    machine = machine_facts(settings.threads)
    byte_rows = bytes_per_round.bytes_rows(settings)
    measured = [r for r in byte_rows if "skipped" not in r]
    checks = {
        "uplink_within_2pct": all(r["uplink_ok"] for r in measured),
        "uplink_max_error": max(r["uplink_formula_error"] for r in measured),
        "bitmap_bound": all(r["bitmap_ok"] for r in measured),
        "lossless": all(r["lossless"] for r in measured),
    }
    times = epoch_time.timing_rows(settings)
    codec = codec_speed.codec_rows(settings)
    checks["codec_lossless"] = all(r["lossless"] for r in codec)
    guidance = guidance_precision.guidance_rows(settings)
    precision = value_precision.precision_rows(settings)
    checked = [r for r in precision if r["ratio_checked"]]
    checks["precision_exact"] = all(r["exact"] for r in precision)
    checks["precision_within_5pct"] = bool(checked) and all(r["ratio_ok"] for r in precision)
    checks["precision_max_ratio"] = max(max(r["uplink_ratio"], r["downlink_ratio"]) for r in checked)
    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results = {
        "quick": quick, "machine": machine, "settings": asdict(settings), "bytes": byte_rows,
        "checks": checks, "timing": times, "acceptance": epoch_time.acceptance(times), "codec": codec,
        "guidance": guidance, "precision": precision, "run_seconds": time.perf_counter() - start,
    }
    results["markdown"] = build_markdown(results)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = benchmark_parser("benchmarks.bench_savings", __doc__, "tiny sizes and one repetition (smoke test)",
                              RESULTS_DIR, "savings")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every measurement")
    parser.add_argument("--examples", type=int, help="examples per local epoch (default 600)")
    parser.add_argument("--batch", type=int, help="batch size of the local epoch (default 32)")
    parser.add_argument("--reps", type=int, help="timed repetitions per variant (default 7)")
    args = parser.parse_args(argv)

    settings = Settings.load("quick" if args.quick else "full", threads=args.threads, examples=args.examples,
                             batch=args.batch, reps=args.reps)
    results = run(settings, args.quick)
    write_report(args.out, "savings", results, default=float)
    return results


if __name__ == "__main__":
    outcome = main()
    checks = outcome["checks"]
    sys.exit(0 if all(checks[k] for k in ("uplink_within_2pct", "bitmap_bound", "lossless", "codec_lossless",
                                          "precision_exact", "precision_within_5pct")) else 1)

"""Benchmarks of the AutoFLIP library; run them as modules (``python -m benchmarks.bench_savings``).

- :mod:`benchmarks.bench_savings`: bytes, local-epoch time, codec speed, uplink and value precision
  (one module each in :mod:`benchmarks.savings`).
- :mod:`benchmarks.bench_scale`: memory and seconds per round from 100 to 100 000 simulated clients
  (process sampling in :mod:`benchmarks.proc_memory`, a private Ray head in :mod:`benchmarks.ray_cluster`,
  the engine's per-pass cost in :mod:`benchmarks.engine_sweep`).
- :mod:`benchmarks.suite`: AutoFLIP against FedAvg and pruning baselines over seeds and settings.
- :mod:`benchmarks.mask_probe`: what a run's final mask does to central training.
- Settings are data (``benchmarks/conf/*.toml``, read by :mod:`benchmarks.settings`); reports are
  written by :mod:`benchmarks.report`.
"""

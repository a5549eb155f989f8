"""The savings benchmarks, one module each; ``python -m benchmarks.bench_savings`` runs them all."""

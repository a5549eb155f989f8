"""Benchmarks of the AutoFLIP library (run them as modules: ``python -m benchmarks.bench_savings``)."""

"""The strategy defaults before the switch to the lean configuration (issue #14).

Tests written against them pin them, so they keep checking exactly what they did: every explorer
reporting, float32 values whose bytes the formulas count exactly, the old densities. The new defaults
have their own tests (tests/test_config.py)."""

FORMER_DEFAULTS = {"sparsity": 0.5, "structured_sparsity": 0.2, "explore_fraction": 1.0,
                   "guidance_precision": "float32", "value_precision": "float32", "min_output_density": 0.0}
"""As :class:`~autoflip_strategy.config.AutoFLIPConfig` keyword arguments."""

FORMER_RUN_CONFIG = {k.replace("_", "-"): v for k, v in FORMER_DEFAULTS.items()}
"""The same as run-config keys."""

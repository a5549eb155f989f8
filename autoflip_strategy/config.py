"""Run-config options: one table that parses, validates and documents them.

Flower hands apps a flat ``{kebab-key: value}`` run config. Every key is
declared once, as a field of :class:`AutoFLIPConfig` (default, type, range or
choices, help); :data:`STRATEGY_OPTIONS` is read off those fields, so a bad value
fails up front with an error that names the key and what it accepts, and
``pyproject.toml`` and the table in docs/configuration.md are checked against the same list
(``tests/test_config.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .scoring import METHODS


class ConfigError(ValueError):
    """A run-config value that is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class Option:
    key: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    high_open: bool = False  # high itself is not allowed

    def parse(self, value: Any) -> Any:
        kind = type(self.default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not kind:
            raise ConfigError(f"{self.key}: expected {kind.__name__}, got {value!r} ({type(value).__name__})")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{self.key}: {value!r} is not one of {list(self.choices)}")
        if self.low is not None and value < self.low:
            raise ConfigError(f"{self.key}: {value!r} is below the minimum {self.low}")
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            bound = f"below {self.high}" if self.high_open else f"at most {self.high}"
            raise ConfigError(f"{self.key}: {value!r} must be {bound}")
        return value


def parse_options(raw: Mapping[str, Any], options: Sequence[Option], strict: bool = True) -> dict[str, Any]:
    """Validated values for ``options`` (defaults filled in); unknown keys fail when ``strict``."""
    known = {o.key: o for o in options}
    if strict:
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(f"unknown run-config keys {unknown}; known keys: {sorted(known)}")
    return {o.key: o.parse(raw[o.key]) if o.key in raw else o.default for o in options}


SAME_AS_SPARSITY = -1.0
"""Declared default of ``sparsity-initial``: Flower merges every declared default into the run config, so
"not set" must be a value that means "no ramp start of its own" (the ramp then starts at ``sparsity``)."""


def resolve_sparsity_initial(sparsity: float, sparsity_initial: float) -> float:
    """The one place that turns the ``sparsity-initial`` sentinel into a sparsity."""
    if sparsity_initial == SAME_AS_SPARSITY:
        return sparsity
    if sparsity_initial < 0:
        raise ConfigError(f"sparsity-initial: {sparsity_initial!r} must be -1 (same as sparsity) or in [0, 1)")
    return sparsity_initial


AUTO = "auto"
"""Declared default of ``value-precision``: each method's own precision (:attr:`.scoring.Method.value_precision`)."""

LEFT_TO_RULE: dict[str, Any] = {"sparsity_initial": SAME_AS_SPARSITY, "value_precision": AUTO}
"""Fields whose declared default means "follow a rule" (the ramp starts at ``sparsity``; the method's own
precision). A config resolves them when built and remembers which were left to the rule, so that
:func:`resolve_config` lets them follow a ``sparsity`` or ``strategy`` changed on top of it."""


def option(default: Any, help: str, *, choices: tuple[Any, ...] | None = None, low: float | None = None,
           high: float | None = None, high_open: bool = False) -> Any:
    """An :class:`AutoFLIPConfig` field declared once: its default and what its run-config key accepts
    (:data:`STRATEGY_OPTIONS` is read off these fields)."""
    spec = {"help": help, "choices": choices, "low": low, "high": high, "high_open": high_open}
    return field(default=default, metadata={"option": spec})


@dataclass(frozen=True)
class AutoFLIPConfig:
    """The strategy's settings, each declared once; field ``x_y`` is run-config key ``x-y``."""

    strategy: str = option("autoflip", "Method: AutoFLIP, plain FedAvg, a random mask fixed once, PruneFL-style "
        "global magnitude pruning, SNIP at initialisation (explorers' |g·θ₀|, fixed) or HideNseek (server-side "
        "SynFlow mask, sign supermask).", choices=tuple(METHODS))
    sparsity: float = option(0.6, "Fraction of all prunable weights removed (units and single weights together); "
        "final density is 1 - sparsity.", low=0.0, high=1.0, high_open=True)
    structured_sparsity: float = option(0.3, "Fraction of units (filters, neurons, LSTM units) removed from every "
        "prunable layer.", low=0.0, high=1.0, high_open=True)
    sparsity_initial: float = option(SAME_AS_SPARSITY, "Sparsity in round 1 when a ramp is configured (structured "
        "sparsity ramps in proportion); -1: same as sparsity.", low=-1.0, high=1.0, high_open=True)
    sparsity_ramp_rounds: int = option(0, "Rounds over which sparsity ramps linearly from sparsity-initial to "
        "sparsity (0: no ramp).", low=0)
    regrowth: bool = option(False, "Allow weights pruned in an earlier round to come back.")
    min_output_density: float = option(0.5, "Share of each fixed output's (classifier row's) remaining fan-in that "
        "the unstructured part always keeps, by guidance (0: pure global ranking, which empties rows on "
        "Shakespeare).", low=0.0, high=1.0)
    layer_budget: str = option("global", "How the unstructured budget is split across tensors: one global ranking, "
        "the same share of every tensor (uniform), or Erdős–Rényi-kernel shares (erk, as RigL), each ranked "
        "within itself.", choices=("global", "uniform", "erk"))
    synflow_iterations: int = option(100, "HideNseek: SynFlow pruning steps at initialisation (density falls "
        "exponentially over them; 1: one-shot).", low=1)
    explore_fraction: float = option(0.1, "Fraction of available clients that explore before round 1 (at "
        "least one).",
        low=0.0, high=1.0)
    explore_epochs: int = option(3, "Maximum local epochs of exploration.", low=1)
    explore_patience: int = option(1, "Stop exploring after this many epochs without a lower epoch-mean loss.", low=1)
    explore_weighting: str = option("examples", "Weight local guidance matrices by example count or uniformly.",
        choices=("examples", "uniform"))
    guidance_precision: str = option("float16", "Precision of exploration uplink (float16 is scaled per tensor).",
        choices=("float32", "float16"))
    value_precision: str = option(AUTO, "Precision of the kept weight values on the wire, both directions: "
        "float16 or int8 codes with one float32 scale per 64 values (int8 uplink: stochastic rounding and error "
        "feedback); the server keeps float32 weights. auto: the method's own (int8 for autoflip, float32 for "
        "the baselines).", choices=(AUTO, "float32", "float16", "int8"))
    guidance_norm: str = option("mean", "Per-tensor normalisation of guidance before the global ranking.",
        choices=("mean", "max", "none"))
    guidance_score: str = option("deviation", "What the mask ranks: the (refreshed) guidance itself, the paper's "
        "deviation, or deviation × |θ| of the current global model, renormalised per tensor.",
        choices=("deviation", "deviation-magnitude"))
    guidance_decay: float = option(0.8, "Weight of the previous guidance when the round's updates refresh it.",
        low=0.0, high=1.0)
    agreement_weight: float = option(0.5, "How much update-sign agreement across clients scales the refresh (0: "
        "ignore).", low=0.0, high=1.0)
    fraction_train: float = option(0.5, "Fraction of available clients sampled each round.", low=0.0, high=1.0)
    min_train_nodes: int = option(2, "Minimum clients sampled per round.", low=1)
    min_train_replies: int = option(1, "Minimum valid replies for a round to update the model (else it keeps the old "
        "one).", low=1)
    fraction_evaluate: float = option(0.0, "Fraction of clients that evaluate the global model on their data each "
        "round (0: central only).", low=0.0, high=1.0)
    min_evaluate_nodes: int = option(2, "Minimum clients sampled for client-side evaluation (when fraction-evaluate > "
        "0).", low=1)
    min_available_nodes: int = option(2, "Wait for this many connected clients before starting.", low=1)
    transport: str = option("sparse", "Wire format: kept values + bitmaps (sparse) or masked dense tensors (dense, "
        "for checks).", choices=("sparse", "dense"))
    max_examples: int = option(10_000_000, "Replies claiming more examples than this are rejected.", low=1)
    max_payload_mb: float = option(512.0, "Replies with an array larger than this are rejected.", low=0.0)
    max_failed_rounds: int = option(3, "Stop the run as failed after this many rounds in a row with no accepted "
        "client reply (the reason names the most common client error).", low=1)
    round_timeout: float = option(3600.0, "Seconds to wait for replies in each stage.", low=0.0)
    handshake_timeout: float = option(60.0, "Seconds to wait for the partition-id handshake (capped by "
        "round-timeout); nodes that do not answer are absent, not sampled until they reply again.", low=0.0)
    handshake_max_nodes: int = option(1000, "Ask every node for its partition id up front while at most this many are "
        "connected (sampling by partition id in every run); above it, only sampled nodes are asked.", low=0)
    seed: int = option(0, "Seed for client sampling, random masks and client training.", low=0)

    def __post_init__(self) -> None:
        values = {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}
        parse_options(values, STRATEGY_OPTIONS)
        # not a field (so out of asdict, equality and checkpoints): which LEFT_TO_RULE fields were left to the rule
        object.__setattr__(self, "_left_to_rule", frozenset(f for f, mark in LEFT_TO_RULE.items()
                                                            if getattr(self, f) == mark))
        object.__setattr__(self, "sparsity_initial", resolve_sparsity_initial(self.sparsity, self.sparsity_initial))
        if self.value_precision == AUTO:
            object.__setattr__(self, "value_precision", METHODS[self.strategy].value_precision)
        if self.sparsity_ramp_rounds > 0 and self.sparsity_initial > self.sparsity:
            raise ConfigError("sparsity-initial: must not exceed sparsity when a ramp is configured")
        if METHODS[self.strategy].signs and self.value_precision != "float32":
            raise ConfigError("value-precision: hidenseek sends sign bits (1 bit per kept weight) and the "
                              "magnitudes once in float32; use value-precision float32")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> AutoFLIPConfig:
        """A named preset (:data:`PRESETS`) with ``overrides`` on top, e.g. ``AutoFLIPConfig.preset("paper")``."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        values = parse_options(PRESETS[name], STRATEGY_OPTIONS)
        return cls(**{**{k.replace("-", "_"): v for k, v in values.items()}, **overrides})

    @classmethod
    def from_run_config(cls, raw: Mapping[str, Any]) -> AutoFLIPConfig:
        """Pick and validate this strategy's keys out of a (larger) run config."""
        values = parse_options({k: v for k, v in raw.items() if k in _KEYS}, STRATEGY_OPTIONS)
        return cls(**{k.replace("-", "_"): v for k, v in values.items()})

    @property
    def prunes(self) -> bool:
        return METHODS[self.strategy].prunes


STRATEGY_OPTIONS: tuple[Option, ...] = tuple(
    Option(f.name.replace("_", "-"), f.default, **f.metadata["option"]) for f in fields(AutoFLIPConfig))
"""Every strategy option (key, default, type, range or choices, help), read off :class:`AutoFLIPConfig`."""

_KEYS = {o.key for o in STRATEGY_OPTIONS}

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's setting (docs/method.md): pruning threshold 0.30, every available client explores, float32
    # both ways, no classifier-row floor; the hybrid part at a tenth of the units.
    "paper": {"strategy": "autoflip", "sparsity": 0.3, "structured-sparsity": 0.1, "explore-fraction": 1.0,
              "guidance-precision": "float32", "value-precision": "float32", "min-output-density": 0.0,
              "sparsity-ramp-rounds": 0},
    # What the savings evidence favours (docs/evidence.md, "Savings"): exploration on a tenth of the clients
    # with float16 guidance, int8 values both ways, sparsity 0.6 with 30 % of the units removed, and the
    # classifier-row floor (the global ranking empties Shakespeare's rows without it).
    "lean": {"strategy": "autoflip", "sparsity": 0.6, "structured-sparsity": 0.3, "explore-fraction": 0.1,
             "guidance-precision": "float16", "value-precision": "int8", "min-output-density": 0.5},
}
"""Named option sets over the defaults (run-config keys). The same sets ship as run-config profiles,
``conf/<name>.toml`` (``flwr run . --run-config conf/paper.toml``), checked equal by the tests."""

FEDAVG_DEFAULTS: dict[str, Any] = {"fraction_train": 1.0, "fraction_evaluate": 1.0, "min_train_nodes": 2,
                                   "min_evaluate_nodes": 2, "min_available_nodes": 2}
"""What ``FedAvg()`` uses: an :class:`~.strategy.AutoFLIP` built without ``config`` samples like FedAvg."""

DEFAULTS_WHEN_ADDED: dict[str, Any] = {"sparsity_initial": SAME_AS_SPARSITY, "min_output_density": 0.0,
                                       "value_precision": "float32"}
"""What a run recorded before an option existed ran under, where that is not today's default (a ramp started at
the target; the lean defaults of issue #14 changed the other two): :func:`recorded_config`."""

RESUME_NEUTRAL = frozenset({"round_timeout", "max_failed_rounds", "handshake_timeout"})
"""Settings a resumed run may change: they decide when to give up, not what the model becomes."""


def recorded_config(saved: Mapping[str, Any]) -> AutoFLIPConfig:
    """The settings a recorded run ran under (``saved``: a checkpoint's ``asdict`` of its config, or the
    same keys with underscores). A key the record lacks did not exist then: that run used
    :data:`DEFAULTS_WHEN_ADDED`, else today's default; rules resolve as for a new config."""
    declared = {o.key.replace("-", "_"): o.default for o in STRATEGY_OPTIONS}
    return AutoFLIPConfig(**{**declared, **DEFAULTS_WHEN_ADDED, **{k: v for k, v in saved.items() if k in declared}})


def resolve_config(base: AutoFLIPConfig | None, run_config: Mapping[str, Any] | None,
                   explicit: Mapping[str, Any]) -> AutoFLIPConfig:
    """The strategy's settings under the one precedence (later wins).

    1. defaults: FedAvg's for FedAvg's arguments (:data:`FEDAVG_DEFAULTS`), AutoFLIPConfig's for the rest;
    2. ``base``: an :class:`AutoFLIPConfig` given as ``config`` (all of its fields);
    3. ``run_config``: the keys of the app's run config that are AutoFLIP options (``fraction-train``, ...);
    4. ``explicit``: keyword arguments (``fraction_train=...``, ``sparsity=...``).
    """
    names = {f.name for f in fields(AutoFLIPConfig)}
    unknown = sorted(set(explicit) - names)
    if unknown:
        raise TypeError(f"AutoFLIP got unknown settings {unknown}; known: {sorted(names)}")
    declared = {o.key.replace("-", "_"): o.default for o in STRATEGY_OPTIONS}  # sentinels unresolved
    values = asdict(base) if base is not None else {**declared, **FEDAVG_DEFAULTS}
    if base is not None:  # what the base left to a rule keeps following it
        values.update({f: LEFT_TO_RULE[f] for f in base._left_to_rule})  # type: ignore[attr-defined]
    picked = parse_options({k: v for k, v in (run_config or {}).items() if k in _KEYS}, STRATEGY_OPTIONS, strict=True)
    given = {k.replace("-", "_"): picked[k] for k in (run_config or {}) if k in _KEYS}
    values.update(given)
    values.update(explicit)
    return AutoFLIPConfig(**values)


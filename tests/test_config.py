import dataclasses
import tomllib
from pathlib import Path

import pytest

from autoflip_strategy.config import STRATEGY_OPTIONS, AutoFLIPConfig, ConfigError
from autoflip_task.config import ALL_OPTIONS, app_config
from former_defaults import FORMER_RUN_CONFIG

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("key,value,words", [
    ("sparsity", 1.5, ["sparsity", "below 1.0"]),
    ("sparsity", -0.1, ["sparsity", "minimum"]),
    ("strategy", "foo", ["strategy", "'autoflip'", "'fedavg'", "'random'", "'magnitude'"]),
    ("dataset", "imagenet", ["dataset", "'digits'", "'mnist'"]),
    ("partitioning", "zipf", ["partitioning", "'dirichlet'"]),
    ("num-server-rounds", 0, ["num-server-rounds"]),
    ("explore-epochs", 2.5, ["explore-epochs", "expected int"]),
    ("regrowth", "yes", ["regrowth", "expected bool"]),
    ("transport", "gzip", ["transport", "'sparse'", "'dense'"]),
    ("learning-rate", "fast", ["learning-rate", "expected float"]),
])
def test_bad_values_name_the_key_and_what_it_accepts(key, value, words):
    with pytest.raises(ConfigError) as err:
        app_config({key: value})
    for word in words:
        assert word in str(err.value)


def test_unknown_keys_are_rejected_with_the_known_keys():
    with pytest.raises(ConfigError, match="spars1ty"):
        app_config({"spars1ty": 0.5})


def test_defaults_and_int_to_float():
    cfg = app_config({"sparsity": 0})  # TOML may hand ints where floats are meant
    assert cfg["sparsity"] == 0.0 and cfg["sparsity-initial"] == 0.0
    assert app_config({})["dataset"] == "digits"


def test_ramp_start_above_target_is_rejected():
    with pytest.raises(ConfigError, match="sparsity-initial"):
        AutoFLIPConfig(sparsity=0.3, sparsity_initial=0.6, sparsity_ramp_rounds=5)


def test_dataclass_defaults_match_the_option_table():
    defaults = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(AutoFLIPConfig)}
    assert defaults == {o.key: o.default for o in STRATEGY_OPTIONS}
    assert AutoFLIPConfig.from_run_config({"sparsity": 0.7, "dataset": "x"}).sparsity_initial == 0.7


def test_sparsity_initial_follows_sparsity_under_flower_merged_defaults():
    """``flwr run`` merges every pyproject default into the run config, so sparsity-initial arrives as its
    declared default; the ramp must still start at the sparsity actually set (config, keyword or run config)."""
    from autoflip_strategy.config import resolve_config

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    merged = {**declared, "sparsity": 0.7}
    assert resolve_config(None, merged, {}).sparsity_initial == 0.7
    assert resolve_config(AutoFLIPConfig(sparsity=0.3), merged, {}).sparsity_initial == 0.7
    assert resolve_config(AutoFLIPConfig(sparsity=0.3), declared, {"sparsity": 0.6}).sparsity_initial == 0.6
    assert resolve_config(None, {**merged, "sparsity-initial": 0.2}, {}).sparsity_initial == 0.2
    assert app_config(merged)["sparsity-initial"] == 0.7


def test_pyproject_declares_every_key_with_the_code_default():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == {o.key: o.default for o in ALL_OPTIONS}


def test_readme_documents_every_key_with_its_default():
    readme = (ROOT / "docs" / "configuration.md").read_text()  # the option table, linked from the README
    for o in ALL_OPTIONS:
        assert f"`{o.key}`" in readme, o.key


def test_resume_compares_every_model_shaping_key_and_nothing_else():
    from autoflip_task.config import NEUTRAL_KEYS, model_settings_changes

    recorded = app_config({**FORMER_RUN_CONFIG, "local-epochs": 3, "seed": 4})
    now = app_config({**FORMER_RUN_CONFIG, "local-epochs": 3, "seed": 4, "data-dir": "/elsewhere", "device": "cpu",
                      "resume": True, "num-server-rounds": 50, "output-dir": "/other", "run-name": "x",
                      "max-eval-examples": 7})
    assert model_settings_changes(recorded, now) == []
    changed = app_config({**FORMER_RUN_CONFIG, "local-epochs": 3, "seed": 5, "model": "resnet", "weight-decay": 0.1})
    assert model_settings_changes(recorded, changed) == ["model: 'auto' -> 'resnet'", "seed: 4 -> 5",
                                                         "weight-decay: 0.0 -> 0.1"]
    # A record from before a key existed counts as that key's default; sparsity-initial as sparsity.
    older = {k: v for k, v in recorded.items() if k not in ("min-output-density", "sparsity-initial")}
    assert model_settings_changes(older, recorded) == []
    assert {"learning-rate", "dataset", "partitioning", "batch-size", "sparsity"}.isdisjoint(NEUTRAL_KEYS)


def test_resume_needs_the_run_name_of_the_run_to_continue():
    with pytest.raises(ConfigError, match="resume: needs run-name"):
        app_config({"resume": True})
    assert app_config({"resume": True, "run-name": "r"})["resume"] is True


SUITE_NAMES = {"lean": "autoflip-lean0.6"}  # the suite's name of a preset, where it is not autoflip-<preset>


def test_presets_ship_as_run_config_profiles_and_suite_methods():
    """PRESETS, conf/<name>.toml and the suite's autoflip-<name> method hold the same option values."""
    import tomllib

    from autoflip_strategy.config import PRESETS, AutoFLIPConfig
    from benchmarks.suite import METHODS

    for name, values in PRESETS.items():
        with (ROOT / "conf" / f"{name}.toml").open("rb") as f:
            assert tomllib.load(f) == values
        assert METHODS[SUITE_NAMES.get(name, f"autoflip-{name}")] == values
        config = AutoFLIPConfig.preset(name, seed=3)
        assert config.seed == 3 and all(getattr(config, k.replace("-", "_")) == v for k, v in values.items())
    with pytest.raises(ValueError, match="unknown preset"):
        AutoFLIPConfig.preset("nope")


def test_the_defaults_are_the_lean_preset_with_each_methods_own_value_precision():
    """Issue #14: the evidence picked lean as the default; value-precision "auto" is int8 for AutoFLIP and
    float32 for the baselines (HideNseek accepts nothing else)."""
    from autoflip_strategy.config import PRESETS

    default = AutoFLIPConfig()
    assert all(getattr(default, k.replace("-", "_")) == v for k, v in PRESETS["lean"].items())
    declared = {o.key: o.default for o in STRATEGY_OPTIONS}
    assert declared["value-precision"] == "auto"
    precision = {m: AutoFLIPConfig(strategy=m).value_precision for m in ("autoflip", "fedavg", "random", "magnitude",
                                                                        "snip", "hidenseek")}
    assert precision == {"autoflip": "int8", "fedavg": "float32", "random": "float32", "magnitude": "float32",
                         "snip": "float32", "hidenseek": "float32"}
    assert AutoFLIPConfig.from_run_config({**declared, "strategy": "magnitude"}).value_precision == "float32"
    assert AutoFLIPConfig(strategy="magnitude", value_precision="int8").value_precision == "int8"
    with pytest.raises(ConfigError, match="hidenseek sends sign bits"):
        AutoFLIPConfig(strategy="hidenseek", value_precision="int8")


def test_a_method_chosen_by_keyword_or_run_config_gets_its_own_value_precision():
    """``AutoFLIP(model, x, strategy="magnitude")`` and a run config naming the method resolve ``auto`` for that
    method, over the defaults or over a config whose precision was its method's own; an explicit one stays."""
    from autoflip_strategy.config import resolve_config

    assert resolve_config(None, None, {"strategy": "magnitude"}).value_precision == "float32"
    assert resolve_config(None, None, {"strategy": "hidenseek"}).value_precision == "float32"  # no error
    assert resolve_config(AutoFLIPConfig(), {"strategy": "fedavg"}, {}).value_precision == "float32"
    assert resolve_config(AutoFLIPConfig(strategy="fedavg"), None, {"strategy": "autoflip"}).value_precision == "int8"
    assert resolve_config(AutoFLIPConfig(value_precision="float16"), {"strategy": "magnitude"},
                          {}).value_precision == "float16"
    assert resolve_config(AutoFLIPConfig(value_precision="int8"), None, {"strategy": "magnitude"}).value_precision \
        == "int8"  # set, not left to the method
    assert resolve_config(AutoFLIPConfig.preset("lean"), None, {"strategy": "magnitude"}).value_precision == "int8"
    assert app_config({"strategy": "snip"})["value-precision"] == "float32"  # recorded resolved in results.json


def test_a_recorded_strategy_config_lacking_later_keys_reads_as_it_ran():
    """A checkpoint from before ``sparsity-initial``, ``min-output-density`` and ``value-precision``: its ramp
    started at its own sparsity (not today's default 0.6), no row floor, float32."""
    from autoflip_strategy.config import recorded_config

    later = ("sparsity_initial", "min_output_density", "value_precision")
    old = {k: v for k, v in dataclasses.asdict(AutoFLIPConfig(sparsity=0.5)).items() if k not in later}
    assert recorded_config({**old, "removed_option": 1}) == AutoFLIPConfig(sparsity=0.5, min_output_density=0.0,
                                                                          value_precision="float32")


def test_resume_check_reads_old_records_under_the_defaults_they_ran_with():
    """A record from before ``min-output-density`` / ``value-precision`` existed ran at 0.0 / float32, and a
    record that says ``auto`` meant its own method's precision."""
    from autoflip_task.config import model_settings_changes

    old = {k: v for k, v in app_config({"strategy": "magnitude"}).items()
           if k not in ("min-output-density", "value-precision")}
    assert model_settings_changes(old, app_config({"strategy": "magnitude", "min-output-density": 0.0})) == []
    assert model_settings_changes(old, app_config({"strategy": "magnitude"})) == ["min-output-density: 0.0 -> 0.5"]
    recorded_auto = {**app_config({}), "value-precision": "auto"}
    assert model_settings_changes(recorded_auto, app_config({})) == []
    assert model_settings_changes(recorded_auto, app_config({"value-precision": "float32"})) == [
        "value-precision: 'int8' -> 'float32'"]


def test_run_config_profile_files_parse_like_flwr_run(tmp_path):
    from runner.runconfig import parse_overrides

    assert parse_overrides(str(ROOT / "conf" / "paper.toml"))["sparsity"] == 0.3
    from runner.runconfig import parse_override_args  # a profile, then pairs that override it
    merged = parse_override_args(None, [str(ROOT / "conf" / "lean.toml"), "sparsity=0.7 num-server-rounds=2"])
    assert (merged["sparsity"], merged["num-server-rounds"], merged["value-precision"]) == (0.7, 2, "int8")
    with pytest.raises(ValueError, match="cannot read run-config file"):
        parse_overrides(str(tmp_path / "missing.toml"))
    (tmp_path / "nested.toml").write_text("sparsity = 0.4\n[extra]\nnote = \"x\"\n")
    assert parse_overrides(str(tmp_path / "nested.toml")) == {"sparsity": 0.4, "extra.note": "x"}  # as Flower flattens
    assert parse_overrides("data-dir='/data/set.toml'") == {"data-dir": "/data/set.toml"}  # a pair, not a file
    (tmp_path / "bad.toml").write_text("sparsity = = 1\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        parse_overrides(str(tmp_path / "bad.toml"))

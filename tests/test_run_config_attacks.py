"""Issue 17: bad run configs, foreign checkpoints and failed runs, tried as attacks on the real app.

Each test does what a careless or hostile user would do and checks the outcome the issue asks for:
``run-name`` cannot write outside ``output-dir``; a resume under other settings, with another
model's tensors or with a broken checkpoint is refused with every difference named (and the run's
files stay as they were); a bad value or a too-small federation fails in seconds, before any process
starts; a run whose clients all fail ends ``failed`` with a reason and makes the launcher fail.

The runs here are real ServerApp/ClientApp runs through ``runner.inprocess`` (digits, two nodes,
one round: a few seconds); the launcher checks never get as far as starting a process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Error, Message, RecordDict

from autoflip_strategy.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from autoflip_strategy.config import ConfigError
from autoflip_task.config import app_config
from autoflip_task.models import build_model
from runner.inprocess import InProcessGrid, InProcessRunError, load_app, run_inprocess
from runner.simulation import SimulationError, resolve_path_keys, run_simulation

ROOT = Path(__file__).resolve().parents[1]
TINY: dict[str, Any] = {"num-server-rounds": 1, "explore-epochs": 1, "local-epochs": 1, "partitioning": "iid",
                        "device": "cpu", "max-eval-examples": 300, "run-name": "r", "seed": 1}
NODES = 2


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _server_app(config: dict[str, Any], output_dir: Path, faults=None) -> None:
    """The reference ServerApp as ``flwr run`` calls it: pyproject defaults under the overrides, no launcher."""
    server, client, defaults = load_app(ROOT)
    run_config = {**defaults, **config, "output-dir": str(output_dir)}
    server(InProcessGrid(client, NODES, run_config, faults=faults), Context(1, 0, {}, RecordDict(), run_config))


# ------------------------------------------------------------------ run-name escapes
ESCAPES = ["../../somewhere", "{abs}", "a/b", "..", "   "]


@pytest.mark.parametrize("name", ESCAPES)
def test_run_name_cannot_write_outside_output_dir(tmp_path: Path, name: str) -> None:
    name = name.replace("{abs}", str(tmp_path / "absolute"))
    out = tmp_path / "x" / "y" / "out"
    with pytest.raises(ConfigError, match="run-name"):
        _server_app({**TINY, "run-name": name}, out)  # under `flwr run`: the ServerApp itself refuses
    with pytest.raises(SimulationError, match="run-name"):
        run_simulation({**TINY, "run-name": name}, NODES, output_dir=out)  # the launcher, before any process
    assert not _files(tmp_path), _files(tmp_path)


def test_a_plain_run_name_is_one_folder_and_output_dir_may_be_anything(tmp_path: Path) -> None:
    assert app_config({"run-name": " my run ", "output-dir": "../../anywhere"})["run-name"] == "my run"


# -------------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One completed tiny run (its folder); tests copy it before they attack it."""
    out = tmp_path_factory.mktemp("finished")
    path = run_inprocess(TINY, NODES, output_dir=out, wire=False)
    assert json.loads(path.read_text())["status"] == "completed"
    return path.parent


@pytest.fixture
def run_copy(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path / "out" / finished.name)
    return tmp_path / "out" / finished.name


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


def test_resume_under_other_app_settings_is_refused_listing_every_difference(run_copy: Path) -> None:
    before = _snapshot(run_copy)
    changed = {"local-epochs": 2, "learning-rate": 0.01, "partitioning": "dirichlet", "batch-size": 16,
               "sparsity": 0.7}
    with pytest.raises(ConfigError) as err:
        run_inprocess({**TINY, **changed, "resume": True}, NODES, output_dir=run_copy.parent, wire=False)
    for key in changed:
        assert key in str(err.value), (key, str(err.value))
    assert _snapshot(run_copy) == before  # the run's record and checkpoint are untouched


def test_resume_under_the_same_settings_extends_the_run(run_copy: Path) -> None:
    """The positive control: the check refuses differences, not resumes (more rounds are allowed)."""
    path = run_inprocess({**TINY, "resume": True, "num-server-rounds": 2, "max-eval-examples": 100}, NODES,
                         output_dir=run_copy.parent, wire=False)
    results = json.loads(path.read_text())
    assert results["status"] == "completed" and [r["round"] for r in results["rounds"]] == [0, 1, 2]


def test_another_models_checkpoint_with_the_same_tensor_names_is_refused_with_the_shapes(run_copy: Path) -> None:
    payload = load_checkpoint(run_copy / "checkpoint.pt")
    other = build_model("cnn", (1, 28, 28), 10).state_dict()  # the MNIST-sized CNN: same names, other shapes
    payload["state"] = {n: other[n].float() for n in payload["state"]}
    save_checkpoint(run_copy / "checkpoint.pt", payload)
    with pytest.raises(CheckpointError) as err:
        _server_app({**TINY, "resume": True, "num-server-rounds": 2}, run_copy.parent)
    assert "shape" in str(err.value) and "fc1.weight" in str(err.value), str(err.value)
    assert json.loads((run_copy / "results.json").read_text())["status"] == "completed"  # record kept


@pytest.mark.parametrize("damage", ["empty", "cut-off"])
def test_a_broken_checkpoint_is_one_line_naming_the_file(run_copy: Path, damage: str) -> None:
    ckpt = run_copy / "checkpoint.pt"
    ckpt.write_bytes(b"" if damage == "empty" else ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as err:
        _server_app({**TINY, "resume": True, "num-server-rounds": 2}, run_copy.parent)
    assert str(ckpt) in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_resume_without_the_runs_record_is_refused(run_copy: Path) -> None:
    (run_copy / "results.json").unlink()
    with pytest.raises(ConfigError, match="results.json"):
        _server_app({**TINY, "resume": True}, run_copy.parent)


# ------------------------------------------------------------- launchers fail fast
@pytest.mark.parametrize("key,value", [("sparsity", 1.5), ("dataset", "nope"), ("num-server-rounds", 0),
                                       ("learning-rate", -1.0), ("sparsity-initial", -0.5)])
def test_bad_values_fail_before_any_process_starts(tmp_path: Path, key: str, value: Any) -> None:
    start = time.monotonic()
    with pytest.raises(SimulationError, match=key):
        run_simulation({key: value}, NODES, output_dir=tmp_path)
    assert time.monotonic() - start < 5


def test_a_federation_smaller_than_min_available_nodes_fails_at_once(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(SimulationError) as err:
        run_simulation({}, 1, output_dir=tmp_path)
    assert "min-available-nodes=2" in str(err.value) and "only 1 node" in str(err.value)
    assert time.monotonic() - start < 5
    with pytest.raises(ValueError, match="min-available-nodes=3"):
        run_inprocess({"min-available-nodes": 3}, 2, output_dir=tmp_path)
    assert not _files(tmp_path)


@pytest.mark.parametrize("module,args", [
    ("runner.simulation", ["--run-config", "sparsity=1.5"]),
    ("runner.simulation", ["--num-supernodes", "1"]),
    ("runner.deployment", ["--run-config", "run-name='../escape'"]),
    ("runner.inprocess", ["--run-config", "dataset='nope'"]),
])
def test_launcher_command_lines_exit_non_zero_in_seconds(tmp_path: Path, module: str, args: list[str]) -> None:
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", module, "--output-dir", str(tmp_path / "out"), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "error:" in res.stderr, (res.returncode, res.stderr[-2000:])
    assert time.monotonic() - start < 20  # an interpreter start with torch, on a loaded 2-core machine
    assert not (tmp_path / "out").exists() or not _files(tmp_path / "out")


def test_a_ramp_to_a_lower_target_is_accepted_with_the_declared_defaults() -> None:
    """Under ``flwr run`` every declared default is in the run config, sparsity-initial included."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    cfg = app_config({**declared, "sparsity": 0.3, "sparsity-ramp-rounds": 5})
    assert cfg["sparsity-initial"] == 0.3
    with pytest.raises(ConfigError, match="sparsity-initial"):
        app_config({**declared, "sparsity": 0.3, "sparsity-initial": 0.6, "sparsity-ramp-rounds": 5})


def test_relative_folders_are_the_callers(tmp_path: Path) -> None:
    resolved = resolve_path_keys({"data-dir": "../shared/data/mnist", "output-dir": "out", "seed": 1}, tmp_path)
    assert resolved == {"data-dir": str((tmp_path / "../shared/data/mnist").resolve()),
                        "output-dir": str(tmp_path / "out"), "seed": 1}
    assert resolve_path_keys({"data-dir": ""}, tmp_path) == {"data-dir": ""}  # empty: the dataset's default


# ------------------------------------------------------------ no silent success
def _every_train_reply_fails(partition: int, msg: Message, reply: Message | None) -> Message | None:
    if msg.metadata.message_type.startswith("train"):
        return Message(Error(code=0, reason="CUDA out of memory (simulated on every client)"), reply_to=msg)
    return reply


def test_a_run_whose_clients_all_fail_ends_failed_with_the_reason(tmp_path: Path) -> None:
    if "max-failed-rounds" not in app_config({}):
        pytest.fail("the strategy has no max-failed-rounds option yet (issue 17: no silent success)")
    config = {**TINY, "num-server-rounds": 6, "max-failed-rounds": 2}
    with pytest.raises(InProcessRunError) as err:  # the launcher fails, with the ServerApp's reason
        run_inprocess(config, NODES, output_dir=tmp_path, faults=_every_train_reply_fails)
    assert "status 'failed'" in str(err.value) and "out of memory" in str(err.value), str(err.value)
    assert "out of memory" in getattr(err.value.__cause__, "reason", "")  # the strategy's RunFailed
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["status"] == "failed" and "out of memory" in results["reason"], results.get("reason")
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]  # what it learned is kept
    assert load_checkpoint(tmp_path / "r" / "checkpoint.pt")["round"] == 2
    assert not (tmp_path / "r" / "final_model.pt").exists()


def test_the_launchers_see_the_final_record_and_its_reason(tmp_path: Path) -> None:
    """What the 30 s grace after the ServerApp's last write and the launchers' error message rest on."""
    from runner.simulation import final_record, find_results, not_completed

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps({"status": "completed"}))
    before = find_results(tmp_path)
    path = tmp_path / "r" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"status": "running"}))
    assert final_record(tmp_path, before, []) is None  # still running: no grace yet
    path.write_text(json.dumps({"status": "failed", "reason": "every sampled client failed: OOM"}))
    assert final_record(tmp_path, before, [f"AutoFLIP run r: writing {path}"]) == path.resolve()
    why = not_completed(path, "running")
    assert why is not None and "'failed'" in why and "every sampled client failed: OOM" in why
    path.write_text(json.dumps({"status": "completed"}))
    assert not_completed(path, None) is None


def test_under_flwr_run_a_relative_data_dir_that_is_not_there_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data-dir: 'no/such/folder' is relative to the ServerApp's working folder"):
        _server_app({**TINY, "dataset": "mnist", "data-dir": "no/such/folder"}, tmp_path)
    assert not _files(tmp_path)

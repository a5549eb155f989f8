"""The reference ServerApp: builds θ₀ and the AutoFLIP strategy, evaluates centrally, writes results.

Each run writes ``<output-dir>/<run-name>/results.json`` before it starts (its
``config`` is then the record of the run's settings) and again, with
``checkpoint.pt``, after every stage (atomically), so a killed run leaves what
it learned and ``resume=true`` continues it. A resume first compares the
settings that shape the trained model with that record and refuses, listing
every difference; the strategy then checks its own settings and the tensors.
A run that stops with an error (e.g. the strategy's ``RunFailed``) ends with
``"status": "failed"`` and a ``"reason"``, keeps its rounds and checkpoint,
and re-raises, so Flower marks it failed and the launchers exit non-zero.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from autoflip_strategy import AutoFLIP, AutoFLIPConfig
from autoflip_strategy.config import ConfigError
from autoflip_task.config import app_config, model_name, model_settings_changes
from autoflip_task.data import load_federated_data
from autoflip_task.models import build_model, example_input
from autoflip_task.training import evaluate, resolve_device

app = ServerApp()


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def progress_line(r: dict[str, Any]) -> str:
    acc = "  -  " if r["accuracy"] is None else f"{r['accuracy']:.3f}"
    flops = "     n/a" if r["train_flops"] is None else f"{r['train_flops'] / 1e9:8.3f}"
    return (f"[{r['phase']:>7} {r['round']:>3}] acc {acc} density {r['density']:.3f} "
            f"down {r['bytes_down'] / 1e6:7.3f} MB up {r['bytes_up'] / 1e6:7.3f} MB "
            f"flops {flops} G replies {len(r['replied'])}/{len(r['sampled'])} "
            f"{r['seconds']:.1f}s")


def check_resumable(out_dir: Path, cfg: dict[str, Any]) -> None:
    """Refuse to resume a run whose recorded settings differ from ``cfg`` in anything that shapes the model.

    Why: the strategy's checkpoint holds only the strategy's settings; a resume with another learning
    rate, local-epochs, partitioning or dataset would otherwise finish "completed" as a run of neither."""
    if not (out_dir / "checkpoint.pt").exists():
        raise FileNotFoundError(f"resume: no checkpoint at {out_dir / 'checkpoint.pt'} "
                                "(set run-name to the run's folder)")
    try:
        stored = json.loads((out_dir / "results.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"resume: {out_dir / 'results.json'} holds no readable record of the run's settings "
                          f"({type(exc).__name__}), so the checkpoint cannot be checked against them") from None
    changes = model_settings_changes(stored, cfg)
    if changes:
        raise ConfigError(f"resume: {out_dir} was run with other settings (recorded -> now): {'; '.join(changes)}. "
                          "Restore them, or start a new run-name")


def check_data_dir(cfg: dict[str, Any]) -> None:
    """A relative ``data-dir`` that does not exist here: say where "here" is.

    Why: under ``flwr run`` the ServerApp runs in a folder of Flower's own, so a path the user
    wrote relative to their shell's folder points nowhere (the launchers resolve it for them)."""
    data_dir = cfg["data-dir"]
    if cfg["dataset"] != "digits" and data_dir and not Path(data_dir).expanduser().is_absolute() \
            and not Path(data_dir).expanduser().exists():
        raise ConfigError(f"data-dir: {data_dir!r} is relative to the ServerApp's working folder {Path.cwd()}, "
                          "where it does not exist; pass an absolute path (runner.* and scripts/run.sh "
                          "resolve relative paths against the folder you launch from)")


def failure_reason(exc: BaseException) -> str:
    """One line for results.json and the launchers: the strategy's own reason, else the error."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason:
        return reason
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class RunRecord:
    """A run's ``results.json``: written atomically, and never left saying "running" after an error.

    A fresh run writes it at once (its ``config`` is the record a later resume is checked
    against); a resume leaves the existing record alone until it has a round of its own."""

    def __init__(self, path: Path, cfg: dict[str, Any], fresh: bool) -> None:
        self.path = path
        self.data: dict[str, Any] = {"status": "running", "config": cfg, "rounds": []}
        self.written = False
        if fresh:
            self.save()

    def save(self) -> None:
        write_json(self.path, self.data)
        self.written = True

    def fail(self, reason: str) -> None:
        """Status ``failed`` with the reason; the rounds recorded so far stay."""
        if self.written:
            self.data.update(status="failed", reason=reason)
            self.save()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = app_config(context.run_config)
    run_name = cfg["run-name"] or (f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg['strategy']}-{cfg['dataset']}"
                                   f"-seed{cfg['seed']}-run{context.run_id}")
    out_dir = Path(cfg["output-dir"]).resolve() / run_name
    check_data_dir(cfg)
    if cfg["resume"]:
        check_resumable(out_dir, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = RunRecord(out_dir / "results.json", cfg, fresh=not cfg["resume"])
    print(f"AutoFLIP run {run_name}: writing {record.path}", flush=True)
    try:
        train(grid, cfg, out_dir, record)
    except Exception as exc:  # RunFailed, or any error: never leave a run that looks as if it still ran
        reason = failure_reason(exc)
        record.fail(reason)
        print(f"AutoFLIP run failed: {reason}", flush=True)
        raise
    print(f"AutoFLIP run finished: {record.path}", flush=True)


def train(grid: Grid, cfg: dict[str, Any], out_dir: Path, record: RunRecord) -> None:
    """Data, θ₀, strategy, the rounds, then the final model and mask; ``record`` follows every round."""
    data = load_federated_data(cfg["dataset"], cfg["data-dir"], cfg["seed"])
    torch.manual_seed(cfg["seed"])
    name = model_name(cfg)
    device = resolve_device(cfg["device"])
    model = build_model(name, data.input_shape, data.num_classes)  # θ₀ (built on the CPU, so a seed gives one θ₀)
    test_x = data.test_x[: cfg["max-eval-examples"]].to(device)
    test_y = data.test_y[: cfg["max-eval-examples"]].to(device)
    results = record.data
    results["model"] = name
    results["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    def on_round(round_record: dict[str, Any]) -> None:
        results["rounds"] = strategy.history
        record.save()
        print(progress_line(round_record), flush=True)

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
        loss, acc = evaluate(model.to(device), test_x, test_y)
        return MetricRecord({"loss": loss, "accuracy": acc})

    strategy = AutoFLIP(
        build_model(name, data.input_shape, data.num_classes),
        example_input(data.input_shape, data.num_classes),
        AutoFLIPConfig.from_run_config(cfg),
        train_config={"local-epochs": cfg["local-epochs"]},
        on_round=on_round,
        checkpoint=out_dir / "checkpoint.pt",
    )
    results["structure"] = {g.name: g.size for g in strategy.structure.groups}
    results["intake"] = strategy.intake.to_json()  # what is pruned how, and what is left whole (and why)
    result = strategy.start(grid, ArrayRecord(model.state_dict()), num_rounds=cfg["num-server-rounds"],
                            evaluate_fn=central_evaluation, resume=cfg["resume"])
    torch.save(result.arrays.to_torch_state_dict(), out_dir / "final_model.pt")
    torch.save(strategy.layout.tensor_masks, out_dir / "final_mask.pt")  # keep-masks, global layout
    results["rounds"] = strategy.history  # also when a resumed run had no round left to train
    results["status"] = "completed"
    record.save()

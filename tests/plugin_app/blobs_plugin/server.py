"""ServerApp: AutoFLIP as a plug-in strategy; writes results.json, the final model and mask."""

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

from .task import NUM_FEATURES, BlobMLP, evaluate, test_data

app = ServerApp()


def _write(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = dict(context.run_config)
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    model = BlobMLP()
    test_x, test_y = test_data(seed)
    out_dir = Path(str(cfg["output-dir"])).resolve() / f"{time.strftime('%Y%m%d-%H%M%S')}-blobs-{os.getpid()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"status": "running", "config": cfg, "rounds": []}

    def on_round(record: dict[str, Any]) -> None:
        results["rounds"].append(record)
        _write(out_dir / "results.json", results)
        acc = "-" if record["accuracy"] is None else f"{record['accuracy']:.3f}"
        print(f"[{record['phase']} {record['round']}] acc {acc} density {record['density']:.3f}", flush=True)

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(model, test_x, test_y)
        return MetricRecord({"loss": loss, "accuracy": acc})

    sparsity = float(cfg["sparsity"])
    strategy = AutoFLIP(
        BlobMLP(),
        torch.zeros(2, NUM_FEATURES),
        AutoFLIPConfig(strategy="autoflip", sparsity=sparsity, sparsity_initial=sparsity,
                       structured_sparsity=float(cfg["structured-sparsity"]),
                       explore_epochs=int(cfg["explore-epochs"]), fraction_train=float(cfg["fraction-train"]),
                       seed=seed),
        train_config={"local-epochs": int(cfg["local-epochs"]), "learning-rate": float(cfg["learning-rate"])},
        on_round=on_round,
    )
    results["structure"] = {g.name: g.size for g in strategy.structure.groups}
    results["prunable"] = list(strategy.structure.prunable)
    result = strategy.start(grid, ArrayRecord(model.state_dict()), num_rounds=int(cfg["num-server-rounds"]),
                            evaluate_fn=central_evaluation)
    torch.save(result.arrays.to_torch_state_dict(), out_dir / "final_model.pt")
    # The final mask: per-unit keep vectors and keep-masks for every tensor it touches (global shapes).
    torch.save({"units": dict(strategy.mask.units), "tensors": strategy.layout.tensor_masks},
               out_dir / "final_mask.pt")
    results["status"] = "completed"
    _write(out_dir / "results.json", results)
    print(f"blobs plug-in run finished: {out_dir / 'results.json'}", flush=True)

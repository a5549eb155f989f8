"""quickstart: A Flower / PyTorch app."""

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from autoflip_strategy import AutoFLIP
from quickstart.task import Net

# Create ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""

    # Read run config
    fraction_train: float = context.run_config["fraction-train"]
    num_rounds: int = context.run_config["num-server-rounds"]
    lr: float = context.run_config["lr"]

    # Load global model
    global_model = Net()
    arrays = ArrayRecord(global_model.state_dict())

    # Initialize FedAvg strategy
    strategy = AutoFLIP(Net(), torch.zeros(1, 3, 32, 32), fraction_train=fraction_train, run_config=context.run_config)

    # Start strategy, run FedAvg for `num_rounds`
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"lr": lr}),
        num_rounds=num_rounds,
    )

    # Save final model and metrics to disk (output-dir/run-<id>/, where our launcher looks for them)
    print("\nSaving final model to disk...")
    out = Path(context.run_config["output-dir"]) / f"run-{context.run_id}"
    out.mkdir(parents=True, exist_ok=True)
    state_dict = result.arrays.to_torch_state_dict()
    torch.save(state_dict, out / "final_model.pt")
    train_metrics = {r: dict(m) for r, m in result.train_metrics_clientapp.items()}
    evaluate_metrics = {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()}
    results = {"status": "completed", "train": train_metrics, "evaluate": evaluate_metrics}
    (out / "results.json").write_text(json.dumps(results))

"""Faulty clients in a real Flower simulation: crashes and malformed replies never reach the model.

The app under test is the reference ServerApp with a ClientApp that wraps the
reference client and misbehaves on two partitions: partition 1 crashes in
every training round, partition 2 answers with NaN weights. The in-process
tests (test_strategy.py) cover every kind of malformed reply one by one; this
one shows the same handling through Flower's simulation engine.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from runner.simulation import run_simulation

ROOT = Path(__file__).resolve().parents[1]

FAULTY_CLIENT = '''
import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict

from autoflip_strategy import protocol as P
from client_app.app import app as honest

app = type(honest)()


@app.query("describe")
def describe(msg, context):
    return honest(msg, context)


@app.query("explore")
def explore(msg, context):
    return honest(msg, context)


@app.train()
def train(msg, context):
    pid = int(context.node_config["partition-id"])
    if pid == 1:
        raise RuntimeError("injected crash")
    reply = honest(msg, context)
    if pid == 2:
        arrays = reply.content[P.ARRAYS]
        bad = {k: Array(np.full_like(arrays[k].numpy(), np.nan)) for k in arrays.keys()}
        reply = Message(RecordDict({P.ARRAYS: ArrayRecord(array_dict=bad), P.METRICS: reply.content[P.METRICS]}),
                        reply_to=msg)
    return reply
'''


@pytest.fixture(scope="module")
def faulty_app(tmp_path_factory) -> Path:
    app = tmp_path_factory.mktemp("faulty_app")
    pyproject = (ROOT / "pyproject.toml").read_text()
    pyproject = re.sub(r'clientapp = "[^"]+"', 'clientapp = "faulty_client:app"', pyproject)
    (app / "pyproject.toml").write_text(pyproject)
    (app / "faulty_client.py").write_text(FAULTY_CLIENT)
    shutil.copy(ROOT / "README.md", app / "README.md")
    return app


def test_crashing_and_nan_clients_are_recorded_and_excluded(faulty_app, tmp_path):
    cfg = {"num-server-rounds": 2, "explore-epochs": 1, "local-epochs": 1, "fraction-train": 1.0,
           "min-train-nodes": 4, "min-available-nodes": 4, "partitioning": "iid", "run-name": "faulty"}
    path = run_simulation(cfg, 4, output_dir=tmp_path, app_dir=faulty_app, client_cpus=2)
    results = json.loads(path.read_text())
    assert results["status"] == "completed"
    for r in results["rounds"][1:]:
        assert sorted(r["replied"]) == [0, 3]
        assert [d["partition"] for d in r["dropped"]] == [1] and "injected crash" in r["dropped"][0]["reason"]
        assert [d["partition"] for d in r["rejected"]] == [2] and "NaN" in r["rejected"][0]["reason"]
    final = torch.load(path.parent / "final_model.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in final.values())
    assert results["rounds"][-1]["accuracy"] > 0.3

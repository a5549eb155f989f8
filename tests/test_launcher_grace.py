"""A ServerApp that wrote its final record but whose process does not end must not hold the launcher.

``flwr-simulation`` can linger after the ServerApp's work is done (Ray shutting down), and Flower
reports the run finished only when it exits. After a final record that says completed the launcher
waits for the stream to go quiet (``DRAIN_SECONDS``; any other ending: up to ``FINAL_GRACE`` seconds),
then stops the run's processes and judges the run by its results file. Here the
reference ServerApp is wrapped so that it sleeps for ten minutes after finishing a 1-round run.
"""

from __future__ import annotations

import shutil
import textwrap
import time
from pathlib import Path

import pytest

from runner.processes import is_alive
from reference_app import copy_reference_app
from runner.simulation import load_results, run_simulation

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"num-server-rounds": 1, "explore-epochs": 1, "local-epochs": 1, "partitioning": "iid",
          "max-eval-examples": 300, "run-name": "r", "device": "cpu"}


@pytest.fixture
def lingering_app(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    app.mkdir()
    (app / "lingering_server.py").write_text(textwrap.dedent('''
        import os
        import time
        from flwr.serverapp import ServerApp
        from server_app.app import main as reference_main

        app = ServerApp()

        @app.main()
        def main(grid, context):
            reference_main(grid, context)
            print(f"lingering pid {os.getpid()}", flush=True)
            time.sleep(600)
    '''))
    copy_reference_app(app, serverapp="lingering_server:app")
    yield app
    shutil.rmtree(app, ignore_errors=True)


@pytest.mark.slow
def test_a_lingering_server_process_is_stopped_after_the_grace(lingering_app: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    start = time.monotonic()
    path = run_simulation(CONFIG, 2, output_dir=tmp_path / "out", app_dir=lingering_app, timeout=600,
                          client_cpus=2, stream_to=lines.append)
    took = time.monotonic() - start
    assert load_results(path)["status"] == "completed"
    (pid,) = [int(line.split("lingering pid ")[1].split()[0]) for line in lines if "lingering pid " in line]
    # the final record says completed: the launcher stops the run once the stream is quiet (DRAIN_SECONDS),
    # at the latest FINAL_GRACE after the record, never the ten minutes the ServerApp would linger
    assert took < 400, took
    assert not is_alive(pid, 0), "the lingering ServerApp process was stopped"

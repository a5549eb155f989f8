"""Run a Flower app as a simulation on a private, throw-away SuperLink.

``flwr run`` on its own starts a detached SuperLink on fixed ports that outlives
the run, and exits 0 even when the run failed. This launcher instead, per call:

1. makes a temporary ``FLWR_HOME`` whose ``config.toml`` holds one connection
   to a SuperLink that this call starts itself (``flower-superlink --insecure
   --simulation``) on a free loopback port, with runtime dependency
   installation disabled (works offline);
2. runs ``flwr run <app_dir> <connection> --stream`` (on a copy of the app that
   holds only its FAB's files: ``runner.common.stage_app``) with the run-config
   overrides (written as a TOML file, so any string value is safe) and the
   federation size, passing every output line to ``stream_to``;
3. waits until Flower reports the run finished, then finds the
   ``results.json`` the ServerApp wrote under ``output_dir`` and checks that
   its ``status`` is ``"completed"`` (and Flower's run status, when known);
4. always stops exactly the processes it started: the SuperLink, the SuperExec
   and ServerApp it spawned, and the simulation's Ray processes (found as
   descendants, or by a unique marker in their environment when they were
   re-parented), then deletes the temporary home.

Two calls can run at the same time on one machine: each has its own home,
database, port and marker. The apps must follow one convention: a run-config
key ``output-dir`` and a ``<output-dir>/<run folder>/results.json`` with a
``status`` field that ends as ``"completed"`` (see ``server_app/app.py``).

Library use::

    from runner.simulation import run_simulation, load_results
    path = run_simulation({"num-server-rounds": 3}, 4, output_dir=Path("outputs"))
    rounds = load_results(path)["rounds"]

Command line (prints the per-round progress lines, then a summary)::

    python -m runner.simulation --num-supernodes 10 --output-dir outputs --run-config "sparsity=0.7"
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.common import (ANSI, LauncherError, LineSink, connection_config, console_script, emit, file_tail,
    launcher_env, progress_printer, run_id_in, run_status_args, run_status_in, stage_app, start_on_free_port, tail,
    wait_finished, wait_healthy)
from runner.processes import stop_all
from runner.results import (  # noqa: F401 - re-exported: the launcher's public names
    FINAL_GRACE, RESULTS_PATTERN, FinalGrace, final_record, find_results, judge_run, load_results, not_completed,
    report, run_candidates, summarise)
from runner.runconfig import (  # noqa: F401 - re-exported: the launcher's public names
    OUTPUT_DIR_KEY, check_run_config, federation_config, parse_override_args, parse_overrides, resolve_path_keys,
    toml_document, toml_value)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "runner"
"""Name of the SuperLink connection in the temporary ``config.toml``."""
MARKER_VAR = "AUTOFLIP_RUNNER_MARKER"
"""Environment variable (with a value unique per call) inherited by every process a call starts."""
SUPERLINK_START_TIMEOUT = 60.0
TAIL_LINES = 60

log = logging.getLogger(__name__)


class SimulationError(RuntimeError):
    """The run did not complete; the message carries the tails of the CLI output and SuperLink log."""


# ------------------------------------------------------------------ processes
@dataclass
class _Session:
    """One temporary FLWR_HOME with its SuperLink and the ``flwr run`` CLI."""

    home: Path
    marker: str
    port: int = 0
    popens: list[subprocess.Popen[Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    """``flwr run --stream`` output lines (ANSI colours removed)."""

    @property
    def env(self) -> dict[str, str]:
        # Ray's session files go away with the home.
        return launcher_env(self.home, MARKER_VAR, self.marker, {"RAY_TMPDIR": str(self.home / "ray")})

    @property
    def log(self) -> Path:
        return self.home / "superlink.log"

    def stop(self, popens: list[subprocess.Popen[Any]] | None = None) -> None:
        """Stop every process this call started and whatever of ours they left behind."""
        killed = stop_all(self.popens if popens is None else popens, MARKER_VAR, self.marker)
        log.debug("processes stopped; %d needed SIGKILL", killed)

    def _superlink(self, port: int) -> subprocess.Popen[bytes]:
        (self.home / "config.toml").write_text(connection_config(CONNECTION, f"127.0.0.1:{port}"))
        cmd = [console_script("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
               "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation",
               "--database", str(self.home / "state.db")]
        with self.log.open("ab") as log_file:
            proc = subprocess.Popen(cmd, env=self.env, cwd=self.home, stdin=subprocess.DEVNULL,
                                    stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        self.popens.append(proc)
        return proc

    def start_superlink(self, deadline: float) -> None:
        until = min(deadline, time.monotonic() + SUPERLINK_START_TIMEOUT)
        port = start_on_free_port(
            self._superlink, lambda proc, port: wait_healthy(proc, self.log, f"http://127.0.0.1:{port}", until),
            lambda proc: self.stop([proc]), until)
        if port is None:
            raise SimulationError(f"the SuperLink did not start:\n{file_tail(self.log, TAIL_LINES)}")
        self.port = port

    def start_run(self, app_dir: Path, overrides: Mapping[str, Any], fed_config: str,
                  stream_to: LineSink | None) -> tuple[subprocess.Popen[str], threading.Thread]:
        """``flwr run --stream``, its output pumped into :attr:`lines` and ``stream_to`` by a thread."""
        (self.home / "overrides.toml").write_text(toml_document(overrides))
        staged = stage_app(app_dir, self.home / "app")
        cmd = [console_script("flwr"), "run", str(staged), CONNECTION, "--stream",
               "--run-config", str(self.home / "overrides.toml"), "--federation-config", fed_config]
        cli = subprocess.Popen(cmd, env=self.env, cwd=self.home, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                               start_new_session=True)
        self.popens.append(cli)

        def pump() -> None:
            assert cli.stdout is not None
            sink = stream_to
            for raw in cli.stdout:
                line = ANSI.sub("", raw.rstrip("\n"))
                self.lines.append(line)
                try:
                    emit(sink, line)
                except Exception:  # a broken sink must not stall the pipe (and so the run)
                    log.exception("stream_to failed; no more lines will be passed to it")
                    sink = None

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        return cli, reader

    def run_status(self, run_id: str) -> dict[str, Any] | None:
        """Flower's record of the run (``status`` e.g. ``finished:completed``), or None if unavailable."""
        try:
            out = subprocess.run([console_script("flwr"), *run_status_args(CONNECTION, run_id)], env=self.env,
                                 cwd=self.home, capture_output=True, text=True, timeout=60,
                                 start_new_session=True).stdout
        except (subprocess.TimeoutExpired, OSError):
            return None
        return run_status_in(out)


def _follow(session: _Session, cli: subprocess.Popen[str], reader: threading.Thread, grace: FinalGrace,
            deadline: float, timeout: float) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """Wait for the run: (run id, Flower's status record, failure or None).

    A final record that says ``completed`` ends the wait once the stream has been quiet for
    :data:`DRAIN_SECONDS` (the ServerApp writes that record last, and its last log lines arrive within a
    second): neither ``flwr run --stream``'s own wind-down (Ray shutting down, Flower's log polling: about
    3 s) nor Flower's run status (a ``flwr list``, about 2 s) is waited for; the session is torn down right
    after, and the results file decides the outcome (:func:`.results.judge_run`). Any other ending waits
    for the stream's end, then for Flower's status, at most :data:`FINAL_GRACE` after the final record."""
    rc, drained = None, False
    seen, quiet_since = 0, time.monotonic()
    while (rc := cli.poll()) is None and time.monotonic() < deadline and not grace():
        time.sleep(0.5)
        if len(session.lines) != seen:
            seen, quiet_since = len(session.lines), time.monotonic()
        elif time.monotonic() - quiet_since >= DRAIN_SECONDS and grace.completed():
            drained = True
            break
    reader.join(timeout=5 if rc is not None else 0.1)
    run_id = run_id_in(session.lines)
    if (rc is not None or drained) and run_id is not None and grace.completed():
        return run_id, None, None
    if rc is None and not grace():
        return run_id, None, f"timed out after {timeout:.0f} s"
    if run_id is None:
        return None, None, f"`flwr run` exited with code {rc} without starting a run"
    info, timed_out = wait_finished(lambda: session.run_status(run_id), grace, deadline)
    if timed_out:
        return run_id, info, f"timed out after {timeout:.0f} s (run status {info and info.get('status')})"
    if not str((info or {}).get("status", "")).startswith("finished"):
        log.warning("run %s: Flower did not report it finished within %.0f s of the ServerApp's final record; "
                    "stopping its processes", run_id, FINAL_GRACE)
    return run_id, info, None


DRAIN_SECONDS = 1.5
"""Quiet stream after a completed final record that ends a simulation run (see :func:`_follow`)."""


# ----------------------------------------------------------------------- run
def run_simulation(
    run_config: Mapping[str, Any],
    num_supernodes: int,
    *,
    output_dir: Path,
    app_dir: Path = REPO_ROOT,
    timeout: float = 900,
    client_cpus: float = 1,
    extra_federation_config: Mapping[str, Any] | None = None,
    stream_to: LineSink | None = None,
    results_pattern: str = RESULTS_PATTERN,
) -> Path:
    """Run ``app_dir`` in simulation with ``num_supernodes`` virtual clients; return its results file.

    ``run_config``: run-config overrides (kebab-case keys of the app's ``[tool.flwr.app.config]``;
    ``output-dir`` is set to ``output_dir``, where the ServerApp writes its run folder).
    ``app_dir``: the Flower app (folder with ``pyproject.toml``); the reference app by default.
    ``timeout``: seconds for everything (SuperLink start, run, wait for its final status).
    ``client_cpus``: CPUs per ClientApp actor (``client-resources-num-cpus``, a whole number in
    Flower 1.41): the number of parallel Ray actors is the machine's cores divided by this.
    ``extra_federation_config``: more ``--federation-config`` keys, e.g. ``{"init-args-num-cpus": 2}``.
    ``stream_to``: receives each line of ``flwr run --stream`` output (ANSI colours removed) as it
    arrives: a callable or a text stream. ``results_pattern``: glob (relative to ``output_dir``) of
    the app's results file.

    Returns the ``results.json`` that this run wrote, with ``status == "completed"``. Raises
    :class:`SimulationError` (a RuntimeError) when the run failed, timed out, or left no completed
    results file; the message includes the tail of the ``flwr run`` output and of the SuperLink log.
    """
    deadline = time.monotonic() + timeout
    app_dir = Path(app_dir).resolve()
    if not (app_dir / "pyproject.toml").is_file():
        raise SimulationError(f"{app_dir} is not a Flower app (no pyproject.toml)")
    output_dir = Path(output_dir).resolve()
    overrides = resolve_path_keys({**run_config, OUTPUT_DIR_KEY: str(output_dir)}, Path.cwd())
    try:
        check_run_config(overrides, app_dir, num_supernodes)
    except TypeError:
        raise
    except ValueError as exc:
        raise SimulationError(f"{exc} (nothing was started)") from None
    fed_config = federation_config(num_supernodes, client_cpus, extra_federation_config)
    output_dir.mkdir(parents=True, exist_ok=True)
    before = find_results(output_dir, results_pattern)

    session = _Session(Path(tempfile.mkdtemp(prefix="flwr-sim-")), uuid.uuid4().hex)
    run_id: str | None = None
    info: dict[str, Any] | None = None
    try:
        session.start_superlink(deadline)
        cli, reader = session.start_run(app_dir, overrides, fed_config, stream_to)
        grace = FinalGrace(output_dir, before, lambda: list(session.lines), results_pattern)
        run_id, info, failure = _follow(session, cli, reader, grace, deadline, timeout)
    except LauncherError as exc:
        failure = str(exc)
    finally:
        session.stop()
        superlink_tail = file_tail(session.log, TAIL_LINES)
        shutil.rmtree(session.home, ignore_errors=True)

    results: Path | None = None
    if failure is None:
        candidates = run_candidates(output_dir, before, session.lines, results_pattern)
        results, failure = judge_run(candidates, run_id, info.get("status") if info else None,
                                     info.get("status-details") if info else None,
                                     f"matching {results_pattern!r} under {output_dir}")
    if failure is not None or results is None:
        raise SimulationError(
            f"Flower run {run_id or '?'} of {app_dir} failed: {failure}\n"
            f"--- flwr run output (last {TAIL_LINES} lines) ---\n{tail(session.lines, TAIL_LINES)}\n"
            f"--- SuperLink log (last {TAIL_LINES} lines) ---\n{superlink_tail}")
    return results


# ----------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runner.simulation",
        description="Run the AutoFLIP Flower app (or another app) in simulation on a private SuperLink.")
    parser.add_argument("--num-supernodes", type=int, default=10, help="simulated clients (default 10)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"), help="where the run folder goes")
    parser.add_argument("--run-config", action="append", default=[], metavar='"k=v ..."',
                        help="run-config overrides in Flower's syntax, e.g. \"sparsity=0.7 strategy='fedavg'\"")
    parser.add_argument("--app-dir", type=Path, default=REPO_ROOT, help="Flower app folder (default: this project)")
    parser.add_argument("--client-cpus", type=int, default=1, help="CPUs per ClientApp actor (default 1)")
    parser.add_argument("--federation-config", default="", metavar='"k=v ..."',
                        help="more federation config, e.g. \"init-args-num-cpus=2\"")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for the whole run (default 3600)")
    parser.add_argument("--verbose", "-v", action="store_true", help="print all of Flower's output")
    args = parser.parse_args(argv)

    overrides = parse_override_args(parser, args.run_config)
    extra = parse_override_args(parser, [args.federation_config]) if args.federation_config else None

    # On SIGTERM unwind like Ctrl-C, so run_simulation still stops what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        path = run_simulation(overrides, args.num_supernodes, output_dir=args.output_dir, app_dir=args.app_dir,
                              timeout=args.timeout, client_cpus=args.client_cpus, extra_federation_config=extra,
                              stream_to=progress_printer(args.verbose))
    except (SimulationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the SuperLink and the simulation were stopped", file=sys.stderr)
        return 130
    print(report(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())

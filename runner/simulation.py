"""Run a Flower app as a simulation on a private, throw-away SuperLink.

``flwr run`` on its own starts a detached SuperLink on fixed ports that outlives
the run, and exits 0 even when the run failed. This launcher instead, per call:

1. makes a temporary ``FLWR_HOME`` whose ``config.toml`` holds one connection
   to a SuperLink that this call starts itself (``flower-superlink --insecure
   --simulation``) on a free loopback port, with runtime dependency
   installation disabled (works offline);
2. runs ``flwr run <app_dir> <connection> --stream`` with the run-config
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
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from runner.processes import stop_all

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATTERN = "*/results.json"
"""Where an app's results file lies, relative to ``output_dir``."""
OUTPUT_DIR_KEY = "output-dir"
CONNECTION = "runner"
"""Name of the SuperLink connection in the temporary ``config.toml``."""
MARKER_VAR = "AUTOFLIP_RUNNER_MARKER"
"""Environment variable (with a value unique per call) inherited by every process a call starts."""
QUIET_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "PYTHONUNBUFFERED": "1",
}
SUPERLINK_START_TIMEOUT = 60.0
STATUS_POLL_INTERVAL = 1.0
FINAL_GRACE = 30.0
"""Seconds the launcher still waits for Flower to report the run finished once the ServerApp wrote
its final record (``status`` completed or failed); then it stops the run's processes anyway
(``flwr-simulation`` can hang in Ray's shutdown after the ServerApp returned)."""
FINAL_STATUSES = ("completed", "failed")
PATH_KEYS = ("data-dir", OUTPUT_DIR_KEY)
"""Run-config keys that name folders: resolved against the caller's working directory, since the
ServerApp runs in a folder of Flower's own."""
MIN_NODES_KEY = "min-available-nodes"
REFERENCE_SERVERAPP = "server_app.app:app"
"""The reference ServerApp: launchers parse its whole run config up front (``autoflip_task.config``)."""
TAIL_LINES = 60

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RUN_ID = re.compile(r"Successfully started run (\d+)")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")

LineSink = Callable[[str], None] | TextIO
log = logging.getLogger(__name__)


class SimulationError(RuntimeError):
    """The run did not complete; the message carries the tails of the CLI output and SuperLink log."""


# ---------------------------------------------------------------- TOML helpers
def toml_value(value: Any) -> str:
    """One value as TOML: strings quoted and escaped, bools lowercase, floats exact (inf/nan allowed)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        # A JSON string (ASCII, \uXXXX escapes) is a valid TOML basic string.
        return json.dumps(os.fspath(value), ensure_ascii=True)
    raise TypeError(f"run-config values must be str, bool, int or float, got {value!r} ({type(value).__name__})")


def toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=True)


def toml_document(values: Mapping[str, Any]) -> str:
    """A flat TOML document ``key = value`` per line (round-trips through ``tomllib``)."""
    return "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in values.items())


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse ``"k=v k2='text' k3=true"`` (Flower's ``--run-config`` syntax) into typed values."""
    pairs = re.findall(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)", text)
    leftover = re.sub(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)", "", text).strip()
    if leftover:
        raise ValueError(f"cannot parse {leftover!r} in {text!r}: expected key=value pairs")
    try:
        return tomllib.loads("\n".join(f"{toml_key(k)} = {v}" for k, v in pairs))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"invalid override {text!r}: values are TOML (strings in quotes): {exc}") from None


def parse_override_args(parser: argparse.ArgumentParser, texts: Iterable[str]) -> dict[str, Any]:
    """The ``--run-config`` arguments of a CLI, merged; a parse error ends the CLI with ``parser.error``."""
    overrides: dict[str, Any] = {}
    try:
        for text in texts:
            overrides.update(parse_overrides(text))
    except ValueError as exc:
        parser.error(str(exc))
    return overrides


def federation_config(num_supernodes: int, client_cpus: float,
                      extra: Mapping[str, Any] | None = None) -> str:
    """The ``--federation-config`` argument (keys as in Flower's ``SimulationConfig``, kebab-case)."""
    if client_cpus != int(client_cpus) or client_cpus < 1:
        # SimulationConfig.client_resources_num_cpus is a uint32 in Flower 1.41.
        raise ValueError(f"client_cpus must be a whole number >= 1 in Flower 1.41, got {client_cpus!r}")
    values: dict[str, Any] = {"num-supernodes": int(num_supernodes), "client-resources-num-cpus": int(client_cpus)}
    values.update(extra or {})
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


# ------------------------------------------------------------- results files
def find_results(output_dir: Path, pattern: str = RESULTS_PATTERN) -> dict[Path, int]:
    """Every results file under ``output_dir`` (resolved path -> modification time in ns)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return {}
    return {p.resolve(): p.stat().st_mtime_ns for p in output_dir.glob(pattern) if p.is_file()}


def app_config_keys(app_dir: Path) -> set[str]:
    """The run-config keys an app declares in ``[tool.flwr.app.config]`` (nested tables flattened with dots)."""
    with (Path(app_dir) / "pyproject.toml").open("rb") as f:
        table = tomllib.load(f).get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})

    def flat(d: Mapping[str, Any], prefix: str = "") -> Iterable[str]:
        for k, v in d.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else [f"{prefix}{k}"]

    return set(flat(table))


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def serverapp_component(app_dir: Path) -> str | None:
    """The app's ``serverapp`` reference (``module:attribute``) from its ``pyproject.toml``."""
    with (Path(app_dir) / "pyproject.toml").open("rb") as f:
        app = tomllib.load(f).get("tool", {}).get("flwr", {}).get("app", {})
    return app.get("components", {}).get("serverapp")


def app_defaults(app_dir: Path) -> dict[str, Any]:
    """The app's declared run config (``[tool.flwr.app.config]``), which Flower merges under the overrides."""
    with (Path(app_dir) / "pyproject.toml").open("rb") as f:
        return dict(tomllib.load(f).get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def resolve_path_keys(overrides: Mapping[str, Any], cwd: Path) -> dict[str, Any]:
    """Relative folder values (``data-dir``, ``output-dir``) made absolute against ``cwd``.

    Why: ``flwr run`` starts the ServerApp and ClientApps in Flower's own folders, where
    ``data-dir='../shared/data/mnist'`` points nowhere; the user meant their working directory."""
    out = dict(overrides)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            out[key] = str((Path(cwd) / value).resolve())
        elif isinstance(value, str) and value.startswith("~"):
            out[key] = str(Path(value).expanduser())
    return out


def check_run_config(overrides: Mapping[str, Any], app_dir: Path, num_nodes: int) -> None:
    """Everything about a run config that can be refused before any process starts (ValueError).

    Names unknown keys (Flower's own error is a bare "Invalid run configuration"); refuses a
    federation smaller than ``min-available-nodes`` (the ServerApp would wait silently until
    its round timeout); for the reference app, parses the whole config as the ServerApp
    will (values, ranges, cross-key rules), so a bad value fails in seconds, not after the
    SuperLink and Ray started."""
    defaults = app_defaults(app_dir)
    unknown = sorted(set(overrides) - set(app_config_keys(app_dir)))
    if unknown:
        raise ValueError(f"unknown run-config key(s) {unknown} for the app in {app_dir}; "
                         f"its keys are {sorted(app_config_keys(app_dir))}")
    for value in overrides.values():
        toml_value(value)  # a TypeError now rather than after the SuperLink started
    merged = {**defaults, **overrides}
    if serverapp_component(app_dir) == REFERENCE_SERVERAPP:  # this project's app, or a copy of it
        from autoflip_task.config import app_config  # imports torch: only for the reference app

        app_config(merged)
    need = merged.get(MIN_NODES_KEY)
    if isinstance(need, int) and not isinstance(need, bool) and need > num_nodes:
        raise ValueError(f"{MIN_NODES_KEY}={need} but the federation has only {num_nodes} node(s): the run would "
                         f"wait for nodes that never come; use at least {need} nodes or set {MIN_NODES_KEY}<={num_nodes}")


def run_outcome(path: Path) -> tuple[str | None, str | None]:
    """(status, reason) of a results file; status ``unreadable (...)`` when it cannot be parsed."""
    try:
        results = load_results(path)
    except (OSError, ValueError) as exc:
        return f"unreadable ({exc})", None
    return results.get("status"), results.get("reason")


def final_record(output_dir: Path, before: Mapping[Path, int], lines: Iterable[str],
                 pattern: str = RESULTS_PATTERN) -> Path | None:
    """This run's results file once its ServerApp wrote a final status (completed or failed), else None."""
    new = [p for p, mtime in find_results(output_dir, pattern).items() if before.get(p) != mtime]
    text = list(lines)
    mentioned = [p for p in new if any(str(p) in line for line in text)]
    candidates = mentioned or new
    if len(candidates) != 1:
        return None
    return candidates[0] if run_outcome(candidates[0])[0] in FINAL_STATUSES else None


def not_completed(path: Path, flower_status: str | None) -> str | None:
    """Why a results file does not show a completed run (its status and reason), or None."""
    status, reason = run_outcome(path)
    if status == "completed":
        return None
    why = f": {reason}" if reason else ""
    flower = f" (Flower run status {flower_status!r})" if flower_status else ""
    return f"{path} has status {status!r}, not 'completed'{why}{flower}"


def summarise(results: Mapping[str, Any]) -> str:
    """A few lines: final accuracy and density, total traffic (exploration included)."""
    rounds = list(results.get("rounds", []))
    if not rounds:
        return f"status {results.get('status')}: no rounds recorded"
    accs = [r["accuracy"] for r in rounds if r.get("accuracy") is not None]
    last = rounds[-1]
    down = sum(r.get("bytes_down", 0) for r in rounds) / 1e6
    up = sum(r.get("bytes_up", 0) for r in rounds) / 1e6
    acc = f"{accs[-1]:.4f}" if accs else "n/a"
    density = last.get("density")
    dens = f"{density:.4f}" if isinstance(density, (int, float)) else "n/a"
    return (f"status {results.get('status')} | rounds {sum(r.get('phase') == 'train' for r in rounds)} | "
            f"final accuracy {acc} | final density {dens} | "
            f"total down {down:.3f} MB, up {up:.3f} MB (exploration included)")


# ------------------------------------------------------------------ processes
def _bin(name: str) -> str:
    """A console script of the running interpreter's environment (falls back to PATH)."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise SimulationError(f"cannot find the `{name}` command (is flwr installed in this environment?)")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(popens: list[subprocess.Popen[Any]], marker: str) -> None:
    """Stop every process this call started and whatever of ours they left behind."""
    killed = stop_all(popens, MARKER_VAR, marker)
    log.debug("processes stopped; %d needed SIGKILL", killed)


def _wait_healthy(proc: subprocess.Popen[Any], log: Path, base_url: str, deadline: float,
                  context: ssl.SSLContext | None = None) -> bool:
    """Wait until the SuperLink ``proc`` serves ``base_url``: its log says Uvicorn runs there (so *our*
    process bound the port) and ``/health`` answers 200. False if it exits or the deadline passes."""
    ready = f"Uvicorn running on {base_url}"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready in _file_text(log):
            try:
                with urllib.request.urlopen(f"{base_url}/health", timeout=2, context=context) as r:
                    if r.status == 200:
                        return True
            except OSError:
                pass
        time.sleep(0.2)
    return False


def _file_text(path: Path) -> str:
    """A log file's text without ANSI colours ("" while it cannot be read)."""
    try:
        return _ANSI.sub("", path.read_text(errors="replace"))
    except OSError:
        return ""


def _tail(lines: Iterable[str], n: int = TAIL_LINES) -> str:
    return "\n".join(deque(lines, maxlen=n))


def _file_tail(path: Path, n: int = TAIL_LINES) -> str:
    try:
        return _tail(_ANSI.sub("", path.read_text(errors="replace")).splitlines(), n)
    except OSError:
        return f"({path} unreadable)"


def _emit(sink: LineSink | None, line: str) -> None:
    if sink is None:
        return
    if hasattr(sink, "write"):
        sink.write(line + "\n")
        sink.flush()
    else:
        sink(line)


@dataclass
class _Session:
    """One temporary FLWR_HOME with its SuperLink."""

    home: Path
    env: dict[str, str]
    marker: str
    port: int = 0
    superlink: subprocess.Popen[bytes] | None = None
    popens: list[subprocess.Popen[Any]] = field(default_factory=list)

    @property
    def log(self) -> Path:
        return self.home / "superlink.log"

    def start_superlink(self, deadline: float) -> None:
        for _ in range(3):  # a port picked as free can be taken before the SuperLink binds it
            self.port = _free_port()
            (self.home / "config.toml").write_text(
                f'[superlink]\ndefault = "{CONNECTION}"\n\n'
                f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')
            cmd = [_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                   "--host", "127.0.0.1", "--port", str(self.port), "--disable-runtime-dependency-installation",
                   "--database", str(self.home / "state.db")]
            with self.log.open("ab") as log_file:
                self.superlink = subprocess.Popen(cmd, env=self.env, cwd=self.home, stdin=subprocess.DEVNULL,
                                                  stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
            self.popens.append(self.superlink)
            if _wait_healthy(self.superlink, self.log, f"http://127.0.0.1:{self.port}",
                             min(deadline, time.monotonic() + SUPERLINK_START_TIMEOUT)):
                return
            _stop([self.superlink], self.marker)
        raise SimulationError(f"the SuperLink did not start:\n{_file_tail(self.log)}")

    def run_status(self, run_id: str) -> dict[str, Any] | None:
        """Flower's record of the run (``status`` e.g. ``finished:completed``), or None if unavailable."""
        try:
            out = subprocess.run([_bin("flwr"), "list", CONNECTION, "--run-id", run_id, "--format", "json"],
                                 env=self.env, cwd=self.home, capture_output=True, text=True, timeout=60,
                                 start_new_session=True).stdout
            payload = json.loads(out[out.index("{"):])
        except (subprocess.TimeoutExpired, ValueError, OSError):
            return None
        runs = payload.get("runs") or []
        return runs[0] if runs else None


def _make_env(home: Path, marker: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(QUIET_ENV)
    env["FLWR_HOME"] = str(home)
    env[MARKER_VAR] = marker
    env["RAY_TMPDIR"] = str(home / "ray")  # Ray's session files go away with the home
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", None)
    return env


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

    Parameters
    ----------
    run_config
        Run-config overrides (kebab-case keys of the app's ``[tool.flwr.app.config]``).
        ``output-dir`` is set to ``output_dir``.
    num_supernodes
        Number of simulated SuperNodes.
    output_dir
        Where the ServerApp writes its run folder (created if missing).
    app_dir
        The Flower app (folder with ``pyproject.toml``); the reference app by default.
    timeout
        Seconds for everything (SuperLink start, run, wait for its final status).
    client_cpus
        CPUs per ClientApp actor (``client-resources-num-cpus``, a whole number in
        Flower 1.41): the number of parallel Ray actors is the machine's cores divided by this.
    extra_federation_config
        More ``--federation-config`` keys, e.g. ``{"init-args-num-cpus": 2}``.
    stream_to
        Receives each line of ``flwr run --stream`` output (ANSI colours removed) as
        it arrives: a callable or a text stream.
    results_pattern
        Glob (relative to ``output_dir``) of the app's results file.

    Returns
    -------
    Path
        The ``results.json`` that this run wrote, with ``status == "completed"``.

    Raises
    ------
    SimulationError (a RuntimeError)
        The run failed, timed out, or left no completed results file; the message
        includes the tail of the ``flwr run`` output and of the SuperLink log.
    """
    start = time.monotonic()
    deadline = start + timeout
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

    marker = uuid.uuid4().hex
    home = Path(tempfile.mkdtemp(prefix="flwr-sim-"))
    session = _Session(home, _make_env(home, marker), marker)
    lines: list[str] = []
    run_id: str | None = None
    info: dict[str, Any] | None = None
    failure: str | None = None
    try:
        (home / "overrides.toml").write_text(toml_document(overrides))
        session.start_superlink(deadline)
        log.debug("%.1fs: SuperLink listening on 127.0.0.1:%d", time.monotonic() - start, session.port)
        cmd = [_bin("flwr"), "run", str(app_dir), CONNECTION, "--stream",
               "--run-config", str(home / "overrides.toml"),
               "--federation-config", fed_config]
        cli = subprocess.Popen(cmd, env=session.env, cwd=home, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                               start_new_session=True)
        session.popens.append(cli)

        def pump() -> None:
            assert cli.stdout is not None
            sink = stream_to
            for raw in cli.stdout:
                line = _ANSI.sub("", raw.rstrip("\n"))
                lines.append(line)
                try:
                    _emit(sink, line)
                except Exception:  # a broken sink must not stall the pipe (and so the run)
                    log.exception("stream_to failed; no more lines will be passed to it")
                    sink = None

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        final_at: float | None = None  # when the ServerApp's final record appeared

        def past_grace() -> bool:
            nonlocal final_at
            if final_at is None and final_record(output_dir, before, list(lines), results_pattern) is not None:
                final_at = time.monotonic()
            return final_at is not None and time.monotonic() - final_at > FINAL_GRACE

        rc = None
        while (rc := cli.poll()) is None and time.monotonic() < deadline and not past_grace():
            time.sleep(STATUS_POLL_INTERVAL)
        reader.join(timeout=5 if rc is not None else 0.1)
        log.debug("%.1fs: `flwr run` exited with %s", time.monotonic() - start, rc)
        run_id = next((m.group(1) for line in list(lines) if (m := _RUN_ID.search(line))), None)
        if rc is None and not past_grace():
            failure = f"timed out after {timeout:.0f} s"
        elif run_id is None:
            failure = f"`flwr run` exited with code {rc} without starting a run"
        else:
            # The log stream can end before the run does: wait for Flower's final status.
            while (info := session.run_status(run_id)) is None or not str(info.get("status", "")).startswith(
                    "finished"):
                if past_grace():
                    log.warning("run %s: Flower did not report it finished within %.0f s of the ServerApp's "
                                "final record; stopping its processes", run_id, FINAL_GRACE)
                    break
                if time.monotonic() > deadline:
                    failure = f"timed out after {timeout:.0f} s (run status {info and info.get('status')})"
                    break
                time.sleep(STATUS_POLL_INTERVAL)
            log.debug("%.1fs: run %s status %s", time.monotonic() - start, run_id, info and info.get("status"))
    finally:
        _stop(session.popens, marker)
        log.debug("%.1fs: processes stopped", time.monotonic() - start)
        superlink_tail = _file_tail(session.log)
        shutil.rmtree(home, ignore_errors=True)

    status = info.get("status") if info else None
    results: Path | None = None
    if failure is None:
        # New files, or files rewritten during the run (a resumed run reuses its folder).
        new = sorted(p for p, mtime in find_results(output_dir, results_pattern).items() if before.get(p) != mtime)
        mentioned = [p for p in new if any(str(p) in line for line in lines)]
        candidates = mentioned or new
        if len(candidates) == 1 and (why := not_completed(candidates[0], status)) is not None \
                and run_outcome(candidates[0])[0] == "failed":
            failure = why  # the ServerApp's own reason comes first
        elif status and str(status).startswith("finished") and status != "finished:completed":
            failure = f"run {run_id} ended with status {status!r} ({info.get('status-details') if info else ''})"
        elif len(candidates) != 1:
            failure = (f"expected one new or updated results file matching {results_pattern!r} under {output_dir}, "
                       f"found {[str(p) for p in candidates]}")
        else:
            results = candidates[0]
            failure = not_completed(results, status)
    if failure is not None or results is None:
        raise SimulationError(
            f"Flower run {run_id or '?'} of {app_dir} failed: {failure}\n"
            f"--- flwr run output (last {TAIL_LINES} lines) ---\n{_tail(lines)}\n"
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

    def show(line: str) -> None:
        if args.verbose or line.startswith("[") or line.startswith("AutoFLIP run"):
            print(line, flush=True)

    # On SIGTERM unwind like Ctrl-C, so run_simulation still stops what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        path = run_simulation(overrides, args.num_supernodes, output_dir=args.output_dir, app_dir=args.app_dir,
                              timeout=args.timeout, client_cpus=args.client_cpus, extra_federation_config=extra,
                              stream_to=show)
    except (SimulationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the SuperLink and the simulation were stopped", file=sys.stderr)
        return 130
    print(f"results: {path}")
    print(summarise(load_results(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What every launcher does the same way around Flower's processes and CLI.

``runner.simulation`` (a throw-away simulation SuperLink) and ``runner.deployment``
(a SuperLink and SuperNodes on loopback) both: build a quiet, tagged environment for
the processes they start; hand ``flwr run`` a staged copy of the app that holds only
the files of its FAB; start a SuperLink on a port picked as free (and retry
when that port was taken before it bound); wait until it serves; ask ``flwr list``
for a run's status; and wait for Flower to report a run finished. One copy here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

from flwr.cli.build import build_fab_from_disk, build_fab_from_files
from flwr.cli.utils import build_pathspec, filter_paths_for_publish, load_gitignore_patterns

QUIET_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "PYTHONUNBUFFERED": "1",
}
SUPERLINK_ATTEMPTS = 3
"""A port picked as free can be taken before the SuperLink binds it: try a fresh one this often."""
STATUS_POLL_INTERVAL = 1.0

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
RUN_ID = re.compile(r"Successfully started run (\d+)")

LineSink = Callable[[str], None] | TextIO


class LauncherError(RuntimeError):
    """A launcher could not find or start a Flower process."""


# ------------------------------------------------------------- environment
def console_script(name: str) -> str:
    """A console script of the running interpreter's environment (falls back to PATH)."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise LauncherError(f"cannot find the `{name}` command (is flwr installed in this environment?)")
    return found


def free_port() -> int:
    """A loopback port that was free a moment ago (callers retry when it was taken meanwhile)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago: all are held open until all are chosen,
    so the system cannot hand the same port out twice (two single ``free_port`` calls can collide)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        return ports


def launcher_env(home: Path, marker_var: str, marker: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment, quiet and offline, with its own ``FLWR_HOME`` and the launcher's marker
    (inherited by every descendant, so re-parented processes are still found and stopped)."""
    env = dict(os.environ)
    env.update(QUIET_ENV)
    env.update(extra or {})
    env["FLWR_HOME"] = str(home)
    env[marker_var] = marker
    # SuperNodes and SuperLinks spawn `flower-superexec` / `flwr-clientapp` by name.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", None)
    return env


def connection_config(name: str, address: str, root_certificates: Path | None = None) -> str:
    """A ``config.toml`` for ``FLWR_HOME`` whose default connection is ``name`` at ``address``."""
    security = (f"root-certificates = {json.dumps(str(root_certificates))}\n" if root_certificates
                else "insecure = true\n")
    return f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}'


# -------------------------------------------------------------------- app
def stage_app(app_dir: Path, into: Path) -> Path:
    """A copy of ``app_dir`` at ``into/<its name>`` that Flower builds into the same FAB, for ``flwr run``.

    ``flwr run <folder>`` walks the whole folder (a ``.venv`` inside a checkout is ~50,000 files, about 6 s
    of CPU per run) before its ``.gitignore`` and ``fab-include`` rules drop nearly all of it. Here the walk
    skips the folders ``.gitignore`` excludes and copies what Flower's own publish rules keep (so
    ``fab-include`` / ``fab-exclude`` patterns resolve against the same files); the copy is used only if
    Flower builds a byte-identical FAB from it. Otherwise (``!`` patterns in ``.gitignore``, an app Flower
    rejects, any difference, or ``into`` inside the app) the original folder is returned and ``flwr run``
    reports on it itself. Flower's messages about the app's configuration then name the copy's path."""
    app_dir = Path(app_dir).resolve()
    staged = Path(into) / app_dir.name
    target = staged.resolve()
    if staged.is_symlink() or target.is_relative_to(app_dir) or app_dir.is_relative_to(target):
        return app_dir  # a copy inside the app (or the app itself) would be packaged or deleted next time
    try:
        files = _unignored_files(app_dir)
        if files is None:
            return app_dir
        fab, _ = build_fab_from_files(files)
        shutil.rmtree(staged, ignore_errors=True)  # a reused work folder must not keep files the app dropped
        for name in filter_paths_for_publish(files):
            (staged / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files[name], staged / name)
        if build_fab_from_disk(staged) != fab:
            return app_dir
    except Exception:  # Flower's own `flwr run` gives the user its message for this app
        return app_dir
    return staged


def _unignored_files(app_dir: Path) -> dict[str, Path] | None:
    """The app's files outside the folders its ``.gitignore`` excludes (relative POSIX path -> path), as
    Flower's ``collect_files`` would list them (no symlinks); None when ``.gitignore`` re-includes paths,
    which skipping a folder could get wrong."""
    gitignore = app_dir / ".gitignore"
    patterns = load_gitignore_patterns(gitignore) if gitignore.is_file() and not gitignore.is_symlink() else []
    if any(p.lstrip().startswith("!") for p in patterns):
        return None
    ignored = build_pathspec(patterns)
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(app_dir, followlinks=False):
        rel = Path(dirpath).relative_to(app_dir)
        dirnames[:] = [d for d in dirnames if not ignored.match_file(f"{(rel / d).as_posix()}/")]
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                files[(rel / name).as_posix()] = path
    return files


# ------------------------------------------------------------------- logs
def file_text(path: Path) -> str:
    """A log file's text without ANSI colours ("" while it cannot be read)."""
    try:
        return ANSI.sub("", path.read_text(errors="replace"))
    except OSError:
        return ""


def tail(lines: Iterable[str], n: int) -> str:
    return "\n".join(deque(lines, maxlen=n))


def file_tail(path: Path, n: int) -> str:
    try:
        return tail(ANSI.sub("", path.read_text(errors="replace")).splitlines(), n)
    except OSError:
        return f"({path} unreadable)"


def emit(sink: LineSink | None, line: str) -> None:
    if sink is None:
        return
    if hasattr(sink, "write"):
        sink.write(line + "\n")
        sink.flush()
    else:
        sink(line)


def progress_printer(verbose: bool) -> Callable[[str], None]:
    """A ``stream_to`` for command lines: the model intake's findings and the per-round progress lines,
    or all of Flower's output."""
    def show(line: str) -> None:
        if verbose or line.startswith("[") or line.startswith("AutoFLIP run") or "Intake: " in line:
            print(line, flush=True)

    return show


def run_id_in(lines: Iterable[str]) -> str | None:
    """The run id ``flwr run`` printed, if it started one."""
    return next((m.group(1) for line in list(lines) if (m := RUN_ID.search(line))), None)


def json_in(text: str) -> dict[str, Any]:
    """The first JSON object in CLI output that starts at the beginning of a line."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"(?m)^\{", text):
        try:
            value, _ = decoder.raw_decode(text[m.start():])
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    raise ValueError(f"no JSON object in {text[-500:]!r}")


# --------------------------------------------------------------- SuperLink
def wait_healthy(proc: subprocess.Popen[Any], log: Path, base_url: str, deadline: float,
                 context: ssl.SSLContext | None = None) -> bool:
    """Wait until the SuperLink ``proc`` serves ``base_url``: its log says Uvicorn runs there (so *our*
    process bound the port) and ``/health`` answers 200. False if it exits or the deadline passes."""
    ready = f"Uvicorn running on {base_url}"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready in file_text(log):
            try:
                with urllib.request.urlopen(f"{base_url}/health", timeout=2, context=context) as r:
                    if r.status == 200:
                        return True
            except OSError:
                pass
        time.sleep(0.2)
    return False


def start_on_free_port(start: Callable[[int], subprocess.Popen[Any]],
                       healthy: Callable[[subprocess.Popen[Any], int], bool],
                       stop: Callable[[subprocess.Popen[Any]], None], deadline: float) -> int | None:
    """Start a server on a free port, retrying with a fresh port when it does not come up; its port, or None."""
    for _ in range(SUPERLINK_ATTEMPTS):
        port = free_port()
        proc = start(port)
        if healthy(proc, port):
            return port
        stop(proc)
        if time.monotonic() > deadline:
            break
    return None


# -------------------------------------------------------------- run status
def run_status_args(connection: str, run_id: str) -> list[str]:
    """``flwr`` arguments that print Flower's record of one run as JSON."""
    return ["list", connection, "--run-id", run_id, "--format", "json"]


def run_status_in(output: str) -> dict[str, Any] | None:
    """Flower's record of the run (``status`` e.g. ``finished:completed``) in ``flwr list`` output, or None."""
    try:
        runs = json_in(output).get("runs") or []
    except ValueError:
        return None
    return runs[0] if runs else None


def wait_finished(run_status: Callable[[], dict[str, Any] | None], past_grace: Callable[[], bool],
                  deadline: float, check: Callable[[], None] = lambda: None
                  ) -> tuple[dict[str, Any] | None, bool]:
    """Poll Flower's run status until it says finished (the log stream can end before the run does).

    Returns (last status record, timed out). Stops early, not timed out, once the ServerApp's
    final record is older than the grace: its results file then decides. ``check`` may raise
    (e.g. a SuperLink that died)."""
    info: dict[str, Any] | None = None
    while True:
        latest = run_status()
        info = latest if latest is not None else info
        if latest is not None and str(latest.get("status", "")).startswith("finished"):
            return info, False
        if past_grace():
            return info, False
        if time.monotonic() > deadline:
            return info, True
        check()
        time.sleep(STATUS_POLL_INTERVAL)

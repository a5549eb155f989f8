"""Run a Flower app on a real federation of processes on the loopback interface.

:class:`LoopbackFederation` starts, as ordinary local processes, what Flower's
Deployment Runtime runs in production (and what ``docker/compose.yml`` runs in
containers):

* one ``flower-superlink`` on a free 127.0.0.1 port, with its own ``FLWR_HOME``
  and runtime dependency installation disabled (works offline); in Flower's
  default ``subprocess`` isolation it spawns the SuperExec that runs each
  ServerApp;
* ``num_supernodes`` ``flower-supernode`` processes, node ``i`` with node config
  ``partition-id=i num-partitions=N``, each with its own ``FLWR_HOME`` and Runtime
  API port; in ``subprocess`` isolation each spawns its own SuperExec that runs
  the ClientApps (no separate ``flower-superexec`` processes to manage);
* optionally TLS (certificates from ``docker/generate_certs.sh``: a CA and a
  SuperLink certificate for 127.0.0.1) and SuperNode authentication
  (``--enable-supernode-auth``; every SuperNode key is registered with
  ``flwr supernode register`` before that node starts).

``run()`` submits an app with ``flwr run`` and waits until Flower reports the run
finished *and* the ServerApp's ``results.json`` says ``"completed"`` (``flwr run``
exits 0 even when a run fails). Leaving the ``with`` block stops exactly the
processes the federation started: each was started in its own session (process
group), every process it spawned inherits a marker variable unique to this
federation, and a process is only signalled when it descends from ours or
carries that marker (and its start time still matches, so a reused PID is never
hit).

Example::

    from runner.deployment import LoopbackFederation
    with LoopbackFederation(3, tls=True, auth=True, workdir=tmp) as fed:
        results = fed.run(REPO_ROOT, {"num-server-rounds": 2, "output-dir": str(tmp / "out")})
        refused = fed.start_unregistered_supernode()   # NodeExit(returncode=1, flower_exit_code=305, ...)
    assert not fed.alive_processes()

Command line (prints the per-round progress lines, then the results path)::

    python -m runner.deployment --num-supernodes 3 --tls --auth --run-config "num-server-rounds=2"
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from runner.common import (ANSI, LauncherError, LineSink, connection_config, console_script, emit, file_text,
    free_port, json_in, launcher_env, progress_printer, run_id_in, run_status_args, run_status_in, stage_app,
    start_on_free_port, tail, wait_finished, wait_healthy)
from runner.processes import cmdline, is_alive, our_processes, stop_all
from runner.results import (  # noqa: F401 - load_results re-exported for callers of this module
    RESULTS_PATTERN, FinalGrace, find_results, judge_run, load_results, report, run_candidates)
from runner.runconfig import (OUTPUT_DIR_KEY, check_run_config, parse_override_args, resolve_path_keys, toml_document,
    toml_pairs)

REPO_ROOT = Path(__file__).resolve().parents[1]
GENERATE_CERTS = REPO_ROOT / "docker" / "generate_certs.sh"
CONNECTION = "loopback"
"""Name of the SuperLink connection in the federation's ``config.toml``."""
MARKER_VAR = "AUTOFLIP_DEPLOYMENT_MARKER"
"""Environment variable, unique per federation, inherited by every process it starts."""
ISOLATION_MODES = ("subprocess", "process")
TAIL_LINES = 40
CLI_TIMEOUT = 120.0

_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
_EXIT_CODE = re.compile(r"Exit Code: (\d+)")


class DeploymentError(RuntimeError):
    """The federation did not start, or a run did not complete; the message carries log tails."""


class _ExitedEarly(Exception):
    """A SuperNode process ended before it logged a node id."""


@dataclass(frozen=True)
class NodeExit:
    """How a SuperNode process ended (see :meth:`LoopbackFederation.start_unregistered_supernode`)."""

    returncode: int | None
    """OS exit status; None when it was still running at the timeout (it was then stopped).
    Flower exits with status 1 for every error and logs its own code (see ``flower_exit_code``)."""
    flower_exit_code: int | None
    """The code in Flower's ``Exit Code: N`` log line (305: could not connect / was refused), if any."""
    node_id: int | None
    """The node id it logged after connecting, or None when it never got one."""
    log: str
    seconds: float


@dataclass
class RunRecord:
    """What :meth:`LoopbackFederation.run` saw of one run."""

    run_id: str | None = None
    cli_returncode: int | None = None
    status: str | None = None
    """Flower's run status, e.g. ``finished:completed``."""
    status_details: str | None = None
    results: Path | None = None
    output: list[str] = field(default_factory=list)
    """``flwr run --stream`` output lines (ANSI colours removed)."""
    seconds: float = 0.0


# ------------------------------------------------------------ federation
class LoopbackFederation:
    """A SuperLink and ``num_supernodes`` SuperNodes as local processes on 127.0.0.1.

    Parameters
    ----------
    num_supernodes
        SuperNodes to start; node ``i`` gets ``partition-id=i num-partitions=N``.
    tls
        Serve the SuperLink over HTTPS with certificates from ``docker/generate_certs.sh``.
    auth
        SuperNode authentication (needs ``tls``): each node's public key is
        registered with ``flwr supernode register`` before the node starts.
    workdir
        Folder for homes, certificates, keys and logs (created; a temporary folder
        that is deleted on exit when None). Logs stay there for debugging.
    node_config
        Extra node-config entries given to every SuperNode.
    env
        Extra environment variables for every process (e.g. ``OMP_NUM_THREADS``).
    isolation
        ``--isolation`` of the SuperLink and SuperNodes. ``subprocess`` (Flower's
        default) makes each of them spawn its own SuperExec; ``process`` is not
        supported here (it needs separately managed ``flower-superexec`` processes).
    startup_timeout
        Seconds for the SuperLink to listen and every SuperNode to get a node id.
    """

    def __init__(
        self,
        num_supernodes: int = 3,
        *,
        tls: bool = False,
        auth: bool = False,
        workdir: Path | None = None,
        node_config: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        isolation: str = "subprocess",
        startup_timeout: float = 90.0,
    ) -> None:
        if num_supernodes < 0:
            raise ValueError(f"num_supernodes must be >= 0, got {num_supernodes}")
        if auth and not tls:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses --enable-supernode-auth "
                             "with --insecure): pass tls=True")
        if isolation != "subprocess":
            raise ValueError(f"isolation {isolation!r} is not supported: only 'subprocess' runs the apps "
                             "without separately managed flower-superexec processes")
        self.num_supernodes = num_supernodes
        self.tls = tls
        self.auth = auth
        self.node_config = dict(node_config or {})
        self.extra_env = dict(env or {})
        self.isolation = isolation
        self.startup_timeout = startup_timeout
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="flwr-deploy-")).resolve()
        self.marker = uuid.uuid4().hex
        self.port = 0
        self.node_ids: dict[int, int] = {}
        """partition id -> SuperNode id of the federation's nodes."""
        self.runs: list[RunRecord] = []
        self._popens: dict[str, subprocess.Popen[Any]] = {}
        self._seen: dict[int, tuple[int, str]] = {}
        """pid -> (start time, command line) of every process observed as ours."""
        self._extra_nodes = 0
        self._started = False

    # ---------------------------------------------------------- paths
    @property
    def home(self) -> Path:
        """FLWR_HOME of the SuperLink and of the ``flwr`` CLI (holds ``config.toml``)."""
        return self.workdir / "home"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    @property
    def certs(self) -> Path:
        return self.workdir / "certs"

    @property
    def keys(self) -> Path:
        return self.workdir / "keys"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def connection(self) -> str:
        """Name of the connection to use with ``flwr`` (``FLWR_HOME`` = :attr:`home`)."""
        return CONNECTION

    def key_path(self, partition_id: int) -> Path:
        return self.keys / f"supernode-{partition_id}"

    # ----------------------------------------------------- environment
    def process_env(self, home: Path | None = None) -> dict[str, str]:
        return launcher_env(home or self.home, MARKER_VAR, self.marker, self.extra_env)

    def _write_config(self) -> None:
        (self.home / "config.toml").write_text(
            connection_config(CONNECTION, self.address, self.certs / "ca.crt" if self.tls else None))

    # ------------------------------------------------------- processes
    def _popen(self, name: str, cmd: list[str], env: Mapping[str, str], cwd: Path) -> subprocess.Popen[bytes]:
        log = self.logs / f"{name}.log"
        with log.open("ab") as fh:
            proc = subprocess.Popen(cmd, env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self._popens[name] = proc
        self.snapshot()
        return proc

    def processes(self) -> dict[int, int]:
        """pid -> start time of every live process that is ours: those started here, their
        descendants, and any process that carries this federation's marker."""
        roots = [p.pid for p in self._popens.values() if p.returncode is None]
        return our_processes(roots, MARKER_VAR, self.marker)

    def snapshot(self) -> dict[int, int]:
        """Scan for our processes and remember them (so :meth:`alive_processes` can check them later)."""
        procs = self.processes()
        for pid, start in procs.items():
            # read every scan: a process caught between fork and exec shows no or its parent's command line
            cmd, (seen_start, seen_cmd) = cmdline(pid), self._seen.get(pid, (None, ""))
            if seen_start != start or cmd:  # a recycled pid never inherits the old process's command line
                self._seen[pid] = (start, cmd or (seen_cmd if seen_start == start else ""))
        return procs

    @property
    def seen_processes(self) -> dict[int, str]:
        """pid -> command line of every process observed as ours so far."""
        return {pid: cmd for pid, (_, cmd) in self._seen.items()}

    def alive_processes(self) -> dict[int, str]:
        """pid -> command line of each process ever seen as ours (or carrying the marker) still alive."""
        alive = {pid: cmd for pid, (start, cmd) in self._seen.items() if is_alive(pid, start)}
        for pid in our_processes([], MARKER_VAR, self.marker):
            alive.setdefault(pid, cmdline(pid))
        return alive

    def _stop_popen(self, proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
        """Stop one process we started and its process group (and reap it)."""
        self.snapshot()
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # start_new_session: pgid == pid
            except OSError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                proc.wait(timeout=5)

    def stop(self) -> None:
        """Stop every process of this federation (SIGTERM to all, SIGKILL to what outlives the grace)."""
        self.snapshot()
        known = {pid: start for pid, (start, _) in self._seen.items()}
        stop_all(list(self._popens.values()), MARKER_VAR, self.marker, known=known, grace=10.0)
        self._started = False

    # ---------------------------------------------------------- start-up
    def __enter__(self) -> LoopbackFederation:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def start(self) -> None:
        """Start the SuperLink, register keys (auth), start the SuperNodes, wait until all have node ids."""
        if self._started:
            raise RuntimeError("this federation is already running")
        self._started = True
        for d in (self.home, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        try:
            deadline = time.monotonic() + self.startup_timeout
            if self.tls:
                self._generate_certs(self.num_supernodes)
            self._start_superlink(deadline)
            if self.auth:
                self.register_keys([self.key_path(i).with_suffix(".pub") for i in range(self.num_supernodes)])
            for i in range(self.num_supernodes):
                self._start_supernode(f"supernode-{i}", i, self.key_path(i) if self.auth else None)
            for i in range(self.num_supernodes):
                for attempt in range(3):
                    try:
                        self.node_ids[i] = self._wait_node_id(f"supernode-{i}", deadline)
                        break
                    except _ExitedEarly:
                        # e.g. its Runtime API port, picked as free, was taken meanwhile: retry once or twice
                        if attempt == 2 or time.monotonic() > deadline:
                            raise DeploymentError(f"supernode-{i} exited before it got a node id:\n"
                                                  f"{self.diagnostics()}") from None
                        self._start_supernode(f"supernode-{i}", i, self.key_path(i) if self.auth else None)
        except BaseException:
            self.stop()
            raise

    def _generate_certs(self, count: int) -> None:
        res = subprocess.run(["bash", str(GENERATE_CERTS), str(self.workdir), str(max(count, 1))],
                             capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise DeploymentError(f"{GENERATE_CERTS} failed ({res.returncode}):\n{res.stdout}{res.stderr}")

    def _superlink_cmd(self) -> list[str]:
        cmd = [console_script("flower-superlink"), "--isolation", self.isolation, "--host", "127.0.0.1",
               "--port", str(self.port), "--disable-runtime-dependency-installation"]
        if self.tls:
            cmd += ["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.pem"),
                    "--ssl-keyfile", str(self.certs / "server.key")]
        else:
            cmd += ["--insecure"]
        if self.auth:
            cmd += ["--enable-supernode-auth"]
        return cmd

    def _start_superlink(self, deadline: float) -> None:
        log = self.logs / "superlink.log"
        url = f"{'https' if self.tls else 'http'}://127.0.0.1"
        context = ssl.create_default_context(cafile=str(self.certs / "ca.crt")) if self.tls else None

        def start(port: int) -> subprocess.Popen[bytes]:
            self.port = port
            self._write_config()
            return self._popen("superlink", self._superlink_cmd(), self.process_env(), self.home)

        port = start_on_free_port(start, lambda proc, port: wait_healthy(proc, log, f"{url}:{port}", deadline, context),
                                  self._stop_popen, deadline)
        if port is None:
            raise DeploymentError(f"the SuperLink did not start:\n{self.diagnostics()}")

    def _supernode_cmd(self, partition_id: int, key: Path | None, num_partitions: int) -> list[str]:
        config = {"partition-id": partition_id, "num-partitions": num_partitions, **self.node_config}
        cmd = [console_script("flower-supernode"), "--superlink", self.address, "--isolation", self.isolation,
               "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", toml_pairs(config)]
        cmd += ["--root-certificates", str(self.certs / "ca.crt")] if self.tls else ["--insecure"]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        return cmd

    def _start_supernode(self, name: str, partition_id: int, key: Path | None,
                         extra_args: Iterable[str] = ()) -> subprocess.Popen[bytes]:
        home = self.workdir / name
        home.mkdir(parents=True, exist_ok=True)
        cmd = self._supernode_cmd(partition_id, key, max(self.num_supernodes, 1)) + list(extra_args)
        return self._popen(name, cmd, self.process_env(home), home)

    def _wait_node_id(self, name: str, deadline: float) -> int:
        proc, log = self._popens[name], self.logs / f"{name}.log"
        while True:
            if (m := _NODE_ID.search(file_text(log))) is not None:
                return int(m.group(1))
            if proc.poll() is not None:
                raise _ExitedEarly(name)
            if time.monotonic() > deadline:
                raise DeploymentError(f"{name} got no node id within {self.startup_timeout:.0f} s:\n"
                                      f"{self.diagnostics()}")
            self.snapshot()
            time.sleep(0.2)

    # ----------------------------------------------------------- the CLI
    def flwr(self, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS`` against this federation (its ``FLWR_HOME``); output is captured."""
        return self._flwr_many([list(args)], timeout)[0]

    def _flwr_many(self, commands: list[list[str]], timeout: float = CLI_TIMEOUT
                   ) -> list[subprocess.CompletedProcess[str]]:
        """Run several ``flwr`` commands at the same time (each CLI start costs seconds of CPU)."""
        procs = []
        for args in commands:
            proc = subprocess.Popen([console_script("flwr"), *args], env=self.process_env(), cwd=self.home,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace", start_new_session=True)
            self._popens[f"flwr-{proc.pid}"] = proc
            procs.append(proc)
        deadline = time.monotonic() + timeout
        results = []
        try:
            for args, proc in zip(commands, procs):
                try:
                    out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    self._stop_popen(proc)
                    out, _ = proc.communicate()
                    raise DeploymentError(f"`flwr {' '.join(args)}` timed out after {timeout:.0f} s:\n{out}") from None
                results.append(subprocess.CompletedProcess(proc.args, proc.returncode, ANSI.sub("", out), ""))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    self._stop_popen(proc)
                self._popens.pop(f"flwr-{proc.pid}", None)
        return results

    def register_keys(self, public_keys: Iterable[Path]) -> None:
        """``flwr supernode register PUBLIC_KEY`` for each key (SuperNode authentication)."""
        keys = list(public_keys)
        results = self._flwr_many([["supernode", "register", str(k), CONNECTION] for k in keys])
        failed = [f"{k}: exit {r.returncode}\n{r.stdout}" for k, r in zip(keys, results) if r.returncode != 0]
        if failed:
            raise DeploymentError("registering SuperNode keys failed:\n" + "\n".join(failed))

    def list_supernodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list --format json``: one dict per SuperNode known to the SuperLink."""
        res = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        try:
            payload = json_in(res.stdout)
        except ValueError:
            raise DeploymentError(f"`flwr supernode list` gave no JSON ({res.returncode}):\n"
                                  f"{res.stdout}{res.stderr}") from None
        nodes = payload.get("nodes")
        return list(nodes) if isinstance(nodes, list) else []

    def run_status(self, run_id: str) -> dict[str, Any] | None:
        """Flower's record of a run (``status`` e.g. ``finished:completed``), or None if unavailable."""
        try:
            return run_status_in(self.flwr(*run_status_args(CONNECTION, run_id), timeout=60).stdout)
        except (DeploymentError, LauncherError, OSError):
            return None

    # ----------------------------------------------------------------- run
    def run(
        self,
        app_dir: Path = REPO_ROOT,
        run_config: Mapping[str, Any] | None = None,
        timeout: float = 600.0,
        *,
        stream_to: LineSink | None = None,
        results_pattern: str = RESULTS_PATTERN,
    ) -> Path:
        """Submit ``app_dir`` with ``flwr run --stream`` and wait for its completed results file.

        ``run_config`` overrides the app's run config (written to a TOML file, so any
        string is safe); it must contain ``output-dir`` (the folder under which the
        ServerApp writes ``<run folder>/results.json``). Returns that results file
        once Flower's run status is ``finished:completed`` and the file's ``status``
        is ``"completed"``; raises :class:`DeploymentError` (with the CLI output and
        every process log) otherwise. Details of the run are in :attr:`runs`.
        """
        if not self._started:
            raise RuntimeError("start the federation first (use it as a context manager)")
        started = time.monotonic()
        app_dir = Path(app_dir).resolve()
        overrides = resolve_path_keys(dict(run_config or {}), Path.cwd())
        if OUTPUT_DIR_KEY not in overrides:
            raise ValueError(f"run_config needs {OUTPUT_DIR_KEY!r} (where the ServerApp writes its results)")
        check_run_config(overrides, app_dir, self.num_supernodes)
        output_dir = Path(overrides[OUTPUT_DIR_KEY]).resolve()
        output_dir.mkdir(parents=True, exist_ok=True)
        overrides[OUTPUT_DIR_KEY] = str(output_dir)
        before = find_results(output_dir, results_pattern)
        record = RunRecord()
        self.runs.append(record)
        grace = FinalGrace(output_dir, before, lambda: record.output, results_pattern)
        failure = self._submit_and_follow(app_dir, overrides, record, grace, started + timeout, timeout, stream_to)
        record.seconds = time.monotonic() - started
        if failure is None:
            candidates = run_candidates(output_dir, before, record.output, results_pattern)
            record.results, failure = judge_run(candidates, record.run_id, record.status, record.status_details,
                                                f"matching {results_pattern!r} under {output_dir}")
        if failure is not None or record.results is None:
            raise DeploymentError(f"Flower run {record.run_id or '?'} of {app_dir} failed: {failure}\n"
                                  f"{self.diagnostics()}")
        return record.results

    def _submit_and_follow(self, app_dir: Path, overrides: Mapping[str, Any], record: RunRecord, grace: FinalGrace,
                           deadline: float, timeout: float, stream_to: LineSink | None) -> str | None:
        """``flwr run --stream`` (output to a log file, pumped into the record), then wait for Flower's
        final status; the failure, or None."""
        index = len(self.runs)
        cfg_file = self.workdir / f"run-{index}-config.toml"
        cfg_file.write_text(toml_document(overrides))
        out_log = self.logs / f"flwr-run-{index}.log"
        staged = stage_app(app_dir, self.workdir / f"run-{index}-app")
        cmd = [console_script("flwr"), "run", str(staged), CONNECTION, "--stream", "--run-config", str(cfg_file)]
        with out_log.open("wb") as fh:
            cli = subprocess.Popen(cmd, env=self.process_env(), cwd=self.home, stdin=subprocess.DEVNULL,
                                   stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        self._popens[f"flwr-run-{index}"] = cli
        seen_lines = 0
        try:
            while cli.poll() is None and time.monotonic() < deadline and not grace():
                seen_lines = self._pump(out_log, record, seen_lines, stream_to)
                self.snapshot()
                self._check_alive()
                time.sleep(0.5)
            record.cli_returncode = cli.poll()
            self._pump(out_log, record, seen_lines, stream_to, final=record.cli_returncode is not None)
            record.run_id = run_id_in(record.output)
            if record.cli_returncode is None and not grace():
                return f"timed out after {timeout:.0f} s"
            if record.run_id is None:
                return f"`flwr run` exited with code {record.cli_returncode} without starting a run"
            info, timed_out = wait_finished(lambda: self.run_status(str(record.run_id)), grace, deadline,
                                            self._check_alive)
            if info is not None:
                record.status = str(info.get("status", ""))
                record.status_details = str(info.get("status-details", "") or "")
            return f"timed out after {timeout:.0f} s (run status {record.status!r})" if timed_out else None
        except DeploymentError as exc:
            return str(exc).splitlines()[0]
        finally:
            if cli.poll() is None:
                self._stop_popen(cli)
            self._popens.pop(f"flwr-run-{index}", None)

    @staticmethod
    def _pump(log: Path, record: RunRecord, seen: int, sink: LineSink | None, final: bool = False) -> int:
        """Pass the new complete lines of ``log`` (all lines when ``final``) to the record and sink."""
        text = file_text(log)
        lines = text.splitlines()
        complete = lines if final or text.endswith("\n") else lines[:-1]
        for line in complete[seen:]:
            record.output.append(line)
            emit(sink, line)
        return max(seen, len(complete))

    def _check_alive(self) -> None:
        """Raise when the SuperLink or a federation SuperNode died."""
        for name, proc in self._popens.items():
            if (name == "superlink" or re.fullmatch(r"supernode-\d+", name)) and proc.poll() is not None:
                raise DeploymentError(f"{name} exited with code {proc.returncode}")

    # ------------------------------------------------------- refused nodes
    def start_unregistered_supernode(self, timeout: float = 60.0, partition_id: int = 0) -> NodeExit:
        """Start one more SuperNode whose (fresh) key was never registered, wait until it exits
        (or ``timeout``), and report how it ended; it is stopped if still running."""
        if not self._started:
            raise RuntimeError("start the federation first")
        if not self.auth:
            raise ValueError("without SuperNode authentication every SuperNode is accepted: use auth=True")
        self._extra_nodes += 1
        name = f"unregistered-{self._extra_nodes}"
        key = self.keys / name
        self.keys.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", name,
                              "-f", str(key)], capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise DeploymentError(f"ssh-keygen failed: {res.stdout}{res.stderr}")
        started = time.monotonic()
        proc = self._start_supernode(name, partition_id, key)
        log = self.logs / f"{name}.log"
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            self.snapshot()
        returncode = proc.poll()
        self._stop_popen(proc)
        text = file_text(log)
        node = _NODE_ID.search(text)
        code = _EXIT_CODE.search(text)
        return NodeExit(returncode, int(code.group(1)) if code else None, int(node.group(1)) if node else None,
                        text, time.monotonic() - started)

    # --------------------------------------------------------- diagnostics
    def diagnostics(self, lines: int = TAIL_LINES) -> str:
        """Tails of every process log (SuperLink, SuperNodes, ``flwr run`` output)."""
        parts = []
        for log in sorted(self.logs.glob("*.log")) if self.logs.is_dir() else []:
            parts.append(f"--- {log.name} (last {lines} lines) ---\n{tail(file_text(log).splitlines(), lines)}")
        return "\n".join(parts)


# ----------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runner.deployment",
        description="Run the AutoFLIP Flower app on a SuperLink and SuperNodes started on 127.0.0.1.")
    parser.add_argument("--num-supernodes", type=int, default=3)
    parser.add_argument("--tls", action="store_true", help="HTTPS with certificates from docker/generate_certs.sh")
    parser.add_argument("--auth", action="store_true", help="SuperNode authentication (implies --tls)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"))
    parser.add_argument("--workdir", type=Path, default=None, help="keep homes, certificates and logs here")
    parser.add_argument("--run-config", action="append", default=[], metavar='"k=v ..."')
    parser.add_argument("--app-dir", type=Path, default=REPO_ROOT)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--verbose", "-v", action="store_true", help="print all of Flower's output")
    args = parser.parse_args(argv)
    overrides = parse_override_args(parser, args.run_config)
    overrides[OUTPUT_DIR_KEY] = str(args.output_dir.resolve())
    try:  # before any process starts: a bad value or too few nodes fails in seconds
        check_run_config(resolve_path_keys(overrides, Path.cwd()), args.app_dir, args.num_supernodes)
    except ValueError as exc:
        print(f"error: {exc} (nothing was started)", file=sys.stderr)
        return 1

    try:
        with LoopbackFederation(args.num_supernodes, tls=args.tls or args.auth, auth=args.auth,
                                workdir=args.workdir) as fed:
            path = fed.run(args.app_dir, overrides, args.timeout, stream_to=progress_printer(args.verbose))
    except DeploymentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())

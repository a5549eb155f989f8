"""Find and stop exactly the processes one launcher started (Linux ``/proc``; roots only elsewhere).

Flower's SuperLink, SuperExec, ServerApp and Ray start processes of their own,
and Ray's daemons are re-parented to init when their parent goes. A launcher
(``runner.simulation``, ``runner.deployment``) therefore tags everything it
starts with a unique value of an environment variable (inherited by every
descendant) and treats a process as its own when it descends from a process it
started or carries that tag. Every signal checks the process's start time
first, so a recycled pid is never hit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
Processes = Mapping[int, int]
"""pid -> start time (clock ticks since boot; 0 where unknown)."""


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[19])


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def has_marker(pid: int, tag: bytes) -> bool:
    """Whether the process's environment holds ``tag`` (``b"VAR=value"``)."""
    try:
        return tag in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def marker_tag(marker_var: str, marker: str) -> bytes:
    return f"{marker_var}={marker}".encode()


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def is_alive(pid: int, start: int) -> bool:
    """The process with this pid and start time (0: any) still runs (zombies count as gone)."""
    st = proc_stat(pid)
    return st is not None and st[0] != "Z" and (not start or st[2] == start)


def process_table() -> dict[int, tuple[str, int, int]]:
    """pid -> (state, ppid, start time) of every process (Linux ``/proc``)."""
    table: dict[int, tuple[str, int, int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (st := proc_stat(int(entry.name))) is not None:
            table[int(entry.name)] = st
    return table


def descendants(table: Mapping[int, tuple[str, int, int]], roots: Iterable[int]) -> set[int]:
    """The ``roots`` found in ``table`` and every process below them."""
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = [p for p in roots if p in table]
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, []))
    return found


def environ_values(pid: int, names: Iterable[str]) -> dict[str, str]:
    """The values of the environment variables ``names`` in a process (those it has)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    prefixes = {name: name.encode() + b"=" for name in names}
    found = {}
    for item in raw.split(b"\0"):
        for name, prefix in prefixes.items():
            if item.startswith(prefix):
                found[name] = item[len(prefix):].decode(errors="replace")
    return found


def cpu_seconds(pid: int) -> tuple[int, float] | None:
    """(start time in ticks, user + system CPU seconds) of a process, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()
    return int(fields[19]), (int(fields[11]) + int(fields[12])) / CLK_TCK


def our_processes(roots: Iterable[int], marker_var: str, marker: str) -> dict[int, int]:
    """Every live process that descends from ``roots`` or carries ``marker_var=marker``."""
    if not Path("/proc").is_dir():  # not Linux: only the roots themselves are known
        return {pid: 0 for pid in roots if pid_exists(pid)}
    table = process_table()
    found = descendants(table, roots)
    tag = marker_tag(marker_var, marker)
    found |= {pid for pid in table if pid not in found and has_marker(pid, tag)}
    found.discard(os.getpid())
    return {pid: table[pid][2] for pid in found if table[pid][0] != "Z"}


def signal_all(procs: Processes, sig: int) -> None:
    for pid, start in procs.items():
        if is_alive(pid, start):
            try:
                os.kill(pid, sig)
            except OSError:
                pass


def wait_gone(procs: Processes, timeout: float) -> dict[int, int]:
    """Wait until every process is gone; return those still alive at the timeout."""
    deadline = time.monotonic() + timeout
    left = dict(procs)
    while left and time.monotonic() < deadline:
        left = {p: s for p, s in left.items() if is_alive(p, s)}
        if left:
            time.sleep(0.1)
    return left


def stop_all(popens: Sequence[subprocess.Popen[Any]], marker_var: str, marker: str,
             known: Processes | None = None, grace: float = 5.0) -> int:
    """Stop what a launcher started and reap it; return how many needed SIGKILL.

    SIGTERM goes at once to each started process's group (each was started with
    ``start_new_session``, so its pgid is its pid) and to every other process of
    ours (descendants, ``known`` from earlier scans, and the marker): a ServerApp
    must not keep training for seconds while its SuperLink shuts down. Whatever
    is alive after ``grace`` seconds (a fresh scan included) gets SIGKILL.
    """
    left = dict(known or {})
    left.update(our_processes([p.pid for p in popens], marker_var, marker))
    for p in popens:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except OSError:
                pass
    signal_all(left, signal.SIGTERM)
    left = wait_gone(left, grace)
    late = {pid: start for pid, start in our_processes([], marker_var, marker).items() if pid not in left}
    signal_all(late, signal.SIGTERM)  # started while we were stopping (e.g. a Ray worker)
    left.update(wait_gone(late, 1.0))
    if left:
        signal_all(left, signal.SIGKILL)
        wait_gone(left, grace)
    for p in popens:
        if p.poll() is None:
            p.kill()
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    return len(left)

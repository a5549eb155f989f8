"""Peak memory and CPU of a simulation's process tree, sampled from Linux ``/proc``.

Why here and not in ``runner.processes``: that module finds and stops a launcher's
processes; this one measures them (RSS, PSS from ``smaps_rollup``, CPU seconds, by kind
of process) for ``benchmarks.bench_scale``, and finds them the same way (descendants plus
the processes that carry a launcher's environment marker).
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from runner.processes import (
    cmdline,
    cpu_seconds,
    descendants,
    environ_values,
    process_table,
)

RUNNER_MARKER_VAR = "AUTOFLIP_RUNNER_MARKER"  # runner.simulation.MARKER_VAR (kept literal: no import cost)
GIB = 2**30
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def memory(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) in bytes; PSS falls back to RSS where smaps_rollup is unreadable."""
    statm = _read(f"/proc/{pid}/statm")
    if statm is None:
        return None
    rss = int(statm.split()[1]) * PAGE
    pss = rss
    rollup = _read(f"/proc/{pid}/smaps_rollup")
    if rollup:
        m = re.search(r"^Pss:\s+(\d+) kB", rollup, re.M)
        if m:
            pss = int(m.group(1)) * 1024
    return rss, pss


SIM_KIND = "simulation (ServerApp + engine)"
ACTOR_KIND = "ray ClientApp actors"


def process_kind(cmdline: list[str]) -> str:
    """Group a simulation process by role (for the per-kind peaks)."""
    text = " ".join(cmdline[:4])
    first = cmdline[0] if cmdline else ""
    if "flower-superlink" in text:
        return "superlink"
    if "flower-superexec" in text:
        return "superexec"
    if "flwr-simulation" in text:
        return SIM_KIND
    if "flwr-serverapp" in text:
        return "serverapp"
    if re.search(r"(^|/)flwr( |$)", text):
        return "flwr CLI"
    if first.startswith("ray::ClientAppActor") or first.startswith("ray::IDLE") or "default_worker.py" in text:
        return ACTOR_KIND
    if first.startswith("ray::") or "/ray/" in text or "ray start" in text or "ray.util.client" in text:
        return "ray system"
    return "other"


@dataclass
class MemoryPeak:
    rss: int = 0
    pss: int = 0
    processes: int = 0
    by_kind_rss: dict[str, int] = field(default_factory=dict)
    by_kind_pss: dict[str, int] = field(default_factory=dict)
    by_kind_count: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    cpu_by_kind: dict[str, float] = field(default_factory=dict)  # CPU seconds used during the run
    # (s, RSS GiB, PSS GiB, processes, CPU s of the simulation process, CPU s of the ClientApp actors) every second
    timeline: list[tuple[float, float, float, int, float, float]] = field(default_factory=list)


class TreeMemorySampler(threading.Thread):
    """Peak RSS/PSS of this process's descendants plus the processes carrying given environment markers.

    Markers: the runner's ``AUTOFLIP_RUNNER_MARKER`` value is learnt from any
    descendant (the SuperLink is a child of this process), so re-parented Ray
    daemons and actors are found too; ``extra_markers`` adds e.g. a Ray head's.
    """

    def __init__(self, interval: float = 0.25, extra_markers: Mapping[str, str] | None = None) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.extra = dict(extra_markers or {})
        self.peak = MemoryPeak()
        self._stop_event = threading.Event()
        self._t0 = time.monotonic()
        self._last_timeline = -1.0
        self._cpu: dict[tuple[int, int], tuple[str, float, float]] = {}  # (pid, start) -> (kind, first, last)
        self.markers_seen: set[str] = set()

    def stop(self) -> MemoryPeak:
        self._stop_event.set()
        self.join(timeout=10)
        return self.peak

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.sample()
            except Exception as exc:  # never let the sampler kill the benchmark
                print(f"memory sampler: {exc!r}", file=sys.stderr)
            self._stop_event.wait(self.interval)

    def _members(self) -> set[int]:
        me = os.getpid()
        table = process_table()
        found = descendants(table, [me]) - {me}
        for pid in found:
            value = environ_values(pid, (RUNNER_MARKER_VAR,)).get(RUNNER_MARKER_VAR)
            if value:
                self.markers_seen.add(value)
        wanted = {(RUNNER_MARKER_VAR, v) for v in self.markers_seen} | set(self.extra.items())
        names = tuple({n for n, _ in wanted})
        if names:
            for pid in table.keys() - found - {me}:
                env = environ_values(pid, names)
                if any((n, v) in wanted for n, v in env.items()):
                    found.add(pid)
        return {p for p in found if table[p][0] != "Z"}

    def sample(self) -> None:
        pids = self._members()
        rss_total = pss_total = 0
        kinds_rss: dict[str, int] = {}
        kinds_pss: dict[str, int] = {}
        kinds_count: dict[str, int] = {}
        for pid in pids:
            mem = memory(pid)
            if mem is None:
                continue
            kind = process_kind(cmdline(pid).split())
            if (cpu := cpu_seconds(pid)) is not None:
                key = (pid, cpu[0])
                if key in self._cpu:
                    old_kind, first, _ = self._cpu[key]
                    kind = old_kind if kind == "other" else kind  # an exiting process loses its cmdline
                else:  # count from the first sample for processes older than the run
                    first = cpu[1] if self.peak.samples == 0 else 0.0
                self._cpu[key] = (kind, first, cpu[1])
            rss_total += mem[0]
            pss_total += mem[1]
            kinds_rss[kind] = kinds_rss.get(kind, 0) + mem[0]
            kinds_pss[kind] = kinds_pss.get(kind, 0) + mem[1]
            kinds_count[kind] = kinds_count.get(kind, 0) + 1
        p = self.peak
        p.samples += 1
        if rss_total > p.rss:
            p.rss, p.processes = rss_total, len(pids)
        p.pss = max(p.pss, pss_total)
        for k, v in kinds_rss.items():
            p.by_kind_rss[k] = max(p.by_kind_rss.get(k, 0), v)
        for k, v in kinds_pss.items():
            p.by_kind_pss[k] = max(p.by_kind_pss.get(k, 0), v)
        for k, v in kinds_count.items():
            p.by_kind_count[k] = max(p.by_kind_count.get(k, 0), v)
        cpu_by_kind: dict[str, float] = {}
        for kind, first, last in self._cpu.values():
            cpu_by_kind[kind] = cpu_by_kind.get(kind, 0.0) + last - first
        p.cpu_by_kind = cpu_by_kind
        now = time.monotonic() - self._t0
        if now - self._last_timeline >= 1.0:
            self._last_timeline = now
            p.timeline.append((round(now, 1), round(rss_total / GIB, 3), round(pss_total / GIB, 3), len(pids),
                               round(cpu_by_kind.get(SIM_KIND, 0.0), 2), round(cpu_by_kind.get(ACTOR_KIND, 0.0), 2)))

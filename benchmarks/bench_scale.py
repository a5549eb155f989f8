"""How AutoFLIP simulations scale with the number of clients: peak memory and seconds per round.

Run from the repository root::

    python -m benchmarks.bench_scale                    # 100, 500 and 1000 clients (a few minutes on 2 cores)
    python -m benchmarks.bench_scale --quick            # 20 clients, 1 round (the smoke test)
    python -m benchmarks.bench_scale --ray-head         # the same, on a private `ray start --head` cluster
    python -m benchmarks.bench_scale --ray-address 127.0.0.1:6379   # on a Ray cluster you started

The settings of both profiles (full and ``--quick``) are data: ``benchmarks/conf/scale.toml``.

Every run is a real Flower simulation through :func:`runner.simulation.run_simulation`
(its own SuperLink, ``flwr-simulation`` with the ServerApp, Ray with the ClientApp
actors). All client counts use the same *number* of clients per stage (10 explorers,
10 trainers per round), so the fraction sampled falls as clients are added: any
growth of memory or time is then the cost of clients that are *not* sampled.

What is measured
----------------
* **Memory**: a sampler thread in this process reads ``/proc`` every 0.25 s and
  sums the resident set size (RSS) and the proportional set size (PSS, from
  ``smaps_rollup``: shared pages divided among the processes sharing them) of
  every process of the simulation: descendants of this process plus every
  process carrying the runner's ``AUTOFLIP_RUNNER_MARKER`` in its environment
  (Ray re-parents its daemons), plus the processes of a Ray head started with
  ``--ray-head``. The table shows the peak of the sum over the run and the
  peak of each kind of process (these peaks need not coincide).
* **Seconds**: the ``seconds`` of each stage in ``results.json`` (server wall
  time of the stage, central evaluation on ``max-eval-examples`` included).
  Exploration (stage 0) is the *start-up*: it also holds the ``query.describe``
  partition handshake and the one-time start of the ClientApp actor. While at
  most ``handshake-max-nodes`` (default 1000) nodes are connected, the strategy
  asks every node in one exchange bounded by ``handshake-timeout``; above it,
  only the nodes a stage samples (``autoflip_strategy/nodes.py`` says why: the
  simulation engine's cost grows with nodes x messages in flight). With the same
  number of explorers at every client count, the growth of the exploration stage
  per added node is the cost of nodes that are *not* sampled.
* **What stops a count**: a run that fails or times out (``--timeout`` per run)
  is recorded with the error and the last lines of its output, and larger counts
  are skipped; the table says so instead of a row of numbers.

Runs at 10 000 and 100 000 clients::

    python -m benchmarks.bench_scale --clients 1000 10000 100000 --rounds 3 --timeout 3600

Ray clusters
------------
Flower 1.41 has no federation-config key for a Ray address: its Ray backend calls
``ray.init(**init_args)`` with ``init_args`` limited to ``num_cpus``,
``num_gpus``, ``logging_level`` and ``log_to_driver``. ``ray.init()`` without an
address honours the ``RAY_ADDRESS`` environment variable, and the simulation
process inherits the SuperLink's environment, so a simulation attaches to an
existing cluster when ``RAY_ADDRESS`` is set where the SuperLink is started
(``runner.simulation`` copies this process's environment into it). When attached,
``init-args-num-cpus`` must stay unset (Ray refuses ``num_cpus`` for an existing
cluster); the cluster's CPUs divided by ``client-resources-num-cpus`` gives the
number of ClientApp actors. :class:`RayHead` starts a private single-node cluster
(own temp dir and ports, so it neither collides with nor is found by other Ray
instances on the machine) and stops exactly its own processes; ``ray stop`` is
never used because it kills every Ray process of the machine.
:func:`cluster_evidence` proves a run used the cluster: the cluster's job
table (GCS) holds a job whose driver was ``flwr-simulation``, and the head's
worker logs of that job name the ``ClientAppActor`` actors.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.engine_sweep import engine_sweep_costs
from benchmarks.proc_memory import (  # noqa: F401 - RUNNER_MARKER_VAR, MemoryPeak: this benchmark's names
    ACTOR_KIND, GIB, RUNNER_MARKER_VAR, SIM_KIND, MemoryPeak, TreeMemorySampler, process_kind)
from benchmarks.ray_cluster import (  # noqa: F401 - cluster_jobs: this benchmark's names
    HEAD_MARKER_VAR, RayHead, cluster_evidence, cluster_jobs, ray_address_env, resolve_ray_address)
from benchmarks.report import benchmark_parser, write_report
from benchmarks.settings import CONF, load_profile

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
SETTINGS_FILE = CONF / "scale.toml"


def shared_data() -> Path:
    """The shared data folder beside the checkout (as in ``benchmarks.suite``; override with AUTOFLIP_SHARED_DATA)."""
    return Path(os.environ.get("AUTOFLIP_SHARED_DATA", ROOT.parent / "shared" / "data"))


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Settings:
    """One benchmark run's settings; the values live in ``benchmarks/conf/scale.toml``."""

    client_counts: tuple[int, ...]
    per_round: int  # clients trained per round, the same at every client count
    explorers: int  # clients exploring in stage 0, the same at every client count
    rounds: int
    dataset: str
    client_cpus: int  # client-resources-num-cpus
    local_epochs: int
    explore_epochs: int
    batch_size: int
    max_eval_examples: int
    sample_interval: float
    timeout: float
    handshake_max_nodes: int  # the strategy's handshake-max-nodes

    @classmethod
    def load(cls, profile: str, path: Path = SETTINGS_FILE, **overrides: Any) -> Settings:
        """A profile (``full`` or ``quick``) of the settings file, with ``overrides`` on top."""
        return load_profile(cls, path, profile, **overrides)

    @classmethod
    def quick(cls) -> Settings:
        return cls.load("quick")


def resolve_data(dataset: str) -> tuple[str, str, list[str]]:
    """(dataset, data-dir, notes): MNIST from the shared folder, else digits with a note."""
    notes: list[str] = []
    if dataset == "digits":
        return "digits", "", notes
    folder = shared_data() / "mnist" if dataset == "mnist" else Path("/usr/share/datasets/fashion-mnist")
    if folder.is_dir() and any(folder.glob("*idx3-ubyte*")):
        return dataset, str(folder), notes
    notes.append(f"{dataset} not found at {folder}: fell back to scikit-learn digits (1437 training examples), "
                 "so 1000 iid clients hold about 1 example each; memory and timing still show the scaling, "
                 "but the per-client work is smaller than with MNIST")
    return "digits", "", notes


TRAIN_EXAMPLES = {"digits": 1437, "mnist": 10_000, "fashion-mnist": 60_000}


HANDSHAKE_LINES = ("Partition handshake:", "No node has answered yet")  # the strategy's log lines (nodes.py)


def handshake_seconds(lines: Iterator[str]) -> float:
    """Seconds the strategy spent in partition handshakes, from its log lines ("... answered in 1.2 s").

    The first one also holds the wait for the simulation engine to serve at all
    (it builds every node's context first), logged as "No node has answered yet".
    """
    total = 0.0
    for line in lines:
        if m := re.search(r"Partition handshake: \d+ of \d+ nodes answered in ([0-9.]+) s", line):
            total += float(m.group(1))
    return total


# ------------------------------------------------------------------ runs
def base_config(s: Settings, dataset: str, data_dir: str, n: int, strategy: str = "autoflip") -> dict[str, Any]:
    return {"strategy": strategy, "dataset": dataset, "data-dir": data_dir, "partitioning": "iid",
            "num-server-rounds": s.rounds, "local-epochs": s.local_epochs, "explore-epochs": s.explore_epochs,
            "batch-size": s.batch_size, "max-eval-examples": s.max_eval_examples,
            "fraction-train": s.per_round / n, "min-train-nodes": s.per_round,
            "explore-fraction": s.explorers / n, "min-available-nodes": n, "seed": 0, "run-name": "run",
            "handshake-max-nodes": s.handshake_max_nodes,
            # the strategy settings of the recorded tables (docs/operations.md), made before the lean defaults
            "sparsity": 0.5, "structured-sparsity": 0.2, "guidance-precision": "float32",
            "value-precision": "float32", "min-output-density": 0.0}


def measure_run(s: Settings, cfg: dict[str, Any], n: int, out: Path, head: RayHead | None,
                ray_address: str | None) -> dict[str, Any]:
    """One simulation with the memory sampler running; its results.json condensed."""
    from runner.simulation import load_results, run_simulation

    extra = {HEAD_MARKER_VAR: head.marker} if head else None
    sampler = TreeMemorySampler(s.sample_interval, extra)
    progress: list[tuple[float, str]] = []
    started_ms = int(time.time() * 1000)
    t0 = time.monotonic()
    load0 = os.getloadavg()
    sampler.start()
    tail: list[str] = []  # the last lines of the run's output, for a run that fails

    def sink(line: str) -> None:
        tail[:] = (tail + [line])[-30:]
        if line.startswith("[") or line.startswith("AutoFLIP run") or any(k in line for k in HANDSHAKE_LINES):
            progress.append((round(time.monotonic() - t0, 2), line))

    try:
        with ray_address_env(ray_address):
            path = run_simulation(cfg, n, output_dir=out, timeout=s.timeout, client_cpus=s.client_cpus,
                                  stream_to=sink)
    except Exception as exc:  # what stops this client count: recorded, not raised
        peak = sampler.stop()
        return {"strategy": cfg["strategy"], "num_clients": n, "failed": f"{type(exc).__name__}: {exc}"[-3000:],
                "wall_seconds": time.monotonic() - t0, "peak_rss_gib": peak.rss / GIB, "peak_pss_gib": peak.pss / GIB,
                "timeline": peak.timeline, "progress_lines": progress, "output_tail": tail,
                "loadavg_before": load0, "loadavg_after": os.getloadavg()}
    peak = sampler.stop()
    wall = time.monotonic() - t0
    rounds = load_results(path)["rounds"]
    stage0 = rounds[0]
    train = [r for r in rounds if r["phase"] == "train"]
    row = {
        "strategy": cfg["strategy"], "num_clients": n, "dataset": cfg["dataset"],
        "examples_per_client": TRAIN_EXAMPLES.get(cfg["dataset"], 0) / n,
        "fraction_train": cfg["fraction-train"], "explore_fraction": cfg["explore-fraction"],
        "explorers": len(stage0["sampled"]) if stage0["phase"] == "explore" else 0,
        "sampled_per_round": [len(r["sampled"]) for r in train],
        "replied_per_round": [len(r["replied"]) for r in train],
        "stage0_phase": stage0["phase"], "stage0_seconds": stage0["seconds"],
        "handshake": "every node" if n <= cfg["handshake-max-nodes"] else "sampled nodes only",
        "handshake_seconds": handshake_seconds(line for _, line in progress),
        "absent_nodes": len(rounds[-1].get("absent", [])),
        "partition_refused": sum(len(r.get("partition_refused", [])) for r in rounds),
        "train_seconds": [r["seconds"] for r in train],
        "train_seconds_mean": statistics.fmean(r["seconds"] for r in train) if train else float("nan"),
        "client_train_seconds": [r["client_train_seconds"] for r in rounds],
        "accuracy": [r["accuracy"] for r in rounds],
        "wall_seconds": wall,
        "peak_rss_gib": peak.rss / GIB, "peak_pss_gib": peak.pss / GIB, "processes_at_peak": peak.processes,
        "peak_rss_gib_by_kind": {k: v / GIB for k, v in sorted(peak.by_kind_rss.items())},
        "peak_pss_gib_by_kind": {k: v / GIB for k, v in sorted(peak.by_kind_pss.items())},
        "max_processes_by_kind": dict(sorted(peak.by_kind_count.items())),
        "cpu_seconds_by_kind": {k: round(v, 2) for k, v in sorted(peak.cpu_by_kind.items())},
        "memory_samples": peak.samples, "timeline": peak.timeline, "progress_lines": progress,
        "loadavg_before": load0, "loadavg_after": os.getloadavg(),
    }
    if ray_address:
        row["ray_cluster"] = cluster_evidence(ray_address, started_ms, head.session_logs() if head else None)
    return row


def _seconds_note(r: dict[str, Any]) -> str:
    """" (12.3)": the run's handshake seconds, where it recorded them."""
    return f" ({r['handshake_seconds']:.1f})" if "handshake_seconds" in r else ""


def _gib(x: float) -> str:
    return f"{x:.2f}"


def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    failed = [r for r in res["runs"] if "failed" in r]
    runs = [r for r in res["runs"] if r["strategy"] == "autoflip" and "failed" not in r]
    actors = max(res["machine"]["cpus"] // s["client_cpus"], 1)
    counts = [str(r["num_clients"]) for r in res["runs"]] + [str(n) for n in res.get("skipped", [])]
    lines = [
        f"### Scale: AutoFLIP simulations with {', '.join(counts)} clients",
        "",
        f"{s['dataset']} iid, CNN, {s['explorers']} explorers and {s['per_round']} trainers per round at every "
        f"client count, {s['rounds']} round(s), local-epochs {s['local_epochs']}, explore-epochs "
        f"{s['explore_epochs']}, client-resources-num-cpus {s['client_cpus']} ({res['machine']['cpus']} cores: "
        f"{actors} ClientApp actor{'s' if actors > 1 else ''}), central evaluation on {s['max_eval_examples']} "
        f"test examples.",
        "",
        "| clients | examples / client | explorers (fraction) | trained / round (fraction) | peak RSS GiB "
        "| peak PSS GiB | simulation proc RSS GiB | Ray actors RSS GiB | Ray system RSS GiB "
        "| partition handshake (s) | exploration (start-up) s | train s / round | run wall s "
        "| CPU s simulation proc / actors | load avg |",
        "|" + "---|" * 15,
    ]
    for r in runs:
        by, cpu = r["peak_rss_gib_by_kind"], r["cpu_seconds_by_kind"]
        train = ", ".join(f"{x:.1f}" for x in r["train_seconds"])
        load = (r["loadavg_before"][0] + r["loadavg_after"][0]) / 2
        lines.append(
            f"| {r['num_clients']} | {r['examples_per_client']:.1f} | {r['explorers']} ({r['explore_fraction']:.1%}) "
            f"| {max(r['sampled_per_round'], default=0)} ({r['fraction_train']:.1%}) | {_gib(r['peak_rss_gib'])} "
            f"| {_gib(r['peak_pss_gib'])} | {_gib(by.get(SIM_KIND, 0))} | {_gib(by.get(ACTOR_KIND, 0))} "
            f"| {_gib(by.get('ray system', 0))} | {r.get('handshake', 'every node')}"
            f"{_seconds_note(r)} "
            f"| {r['stage0_seconds']:.1f} | {r['train_seconds_mean']:.2f} ({train}) "
            f"| {r['wall_seconds']:.0f} | {cpu.get(SIM_KIND, 0):.0f} / {cpu.get(ACTOR_KIND, 0):.0f} | {load:.1f} |")
    if len(runs) >= 2:
        lo, hi = runs[0], runs[-1]
        lines += ["", f"Peak PSS with {hi['num_clients']} vs {lo['num_clients']} clients (same number sampled): "
                      f"{hi['peak_pss_gib']:.2f} vs {lo['peak_pss_gib']:.2f} GiB "
                      f"({(hi['peak_pss_gib'] / lo['peak_pss_gib'] - 1):+.1%}); peak RSS "
                      f"{hi['peak_rss_gib']:.2f} vs {lo['peak_rss_gib']:.2f} GiB "
                      f"({(hi['peak_rss_gib'] / lo['peak_rss_gib'] - 1):+.1%})."]
    for r in failed:
        lines += ["", f"**{r['num_clients']} clients: stopped** after {r['wall_seconds']:.0f} s (peak PSS "
                      f"{r['peak_pss_gib']:.2f} GiB): {r['failed']}"]
        if r.get("output_tail"):
            lines += ["", "Its last output lines:", "", "```", *r["output_tail"][-12:], "```"]
    if res.get("skipped"):
        lines += ["", f"Not run after that: {', '.join(map(str, res['skipped']))} clients."]
    est = res.get("describe_estimate")
    if est:
        lines += ["", f"Start-up per added node: exploration (which holds the `query.describe` partition handshake: "
                      f"with every node up to handshake-max-nodes={s.get('handshake_max_nodes', 1000)}, with the "
                      f"sampled nodes only above it) grows by {1000 * est['seconds_per_node']:.2f} ms per added node "
                      f"from {est['from_clients']} to {est['to_clients']} clients (same explorers). Exploration also "
                      f"holds the one-time start of the ClientApp actor (imports, data loading), the same at every "
                      f"count."]
    sweeps = res.get("engine_sweeps") or []
    if sweeps:
        lines += ["", "Flower 1.41's simulation engine polls every node for messages every 0.1 s, and each poll "
                      "scans every message in flight, so one pass costs O(nodes x messages in flight) "
                      "(CPU seconds of one pass, measured on Flower's own classes):", "",
                  "| nodes | messages in flight | CPU s per pass |", "|---|---|---|"]
        lines += [f"| {w['nodes']} | {w['in_flight']} | {w['later_pass_cpu_s']:.3f} |" for w in sweeps]
    for r in res["runs"]:
        ev = r.get("ray_cluster")
        if ev:
            jobs = ", ".join(f"{j['job_id']} (driver pid {j['driver_pid']})" for j in ev["flwr_jobs"]) or "none"
            lines += ["", f"Ray cluster {ev['address']} ({r['num_clients']} clients): flwr-simulation jobs in its "
                          f"job table: {jobs}; ClientAppActor worker logs on the head: {len(ev['actor_workers'])}; "
                          f"used the cluster: {'yes' if ev['used_cluster'] else 'NO'}."]
    lines += ["", "RSS sums count shared pages (torch libraries) once per process; PSS divides them among the "
                  "processes sharing them and is the better total. Per-kind columns are each kind's own peak. "
                  "Seconds are server wall time per stage from results.json (central evaluation included); "
                  "exploration includes the partition handshake. The machine has "
                  f"{res['machine']['cpus']} cores shared with other work (load average column: mean of the "
                  "1-minute load before and after the run), so wall times are noisy; CPU seconds are less so."]
    for note in res["notes"]:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def machine_info() -> dict[str, Any]:
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "n/a"

    mem = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    m = re.search(r"MemTotal:\s+(\d+) kB", mem)
    return {"cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "mem_gib": int(m.group(1)) / 2**20 if m else None, "python": platform.python_version(),
            "flwr": version("flwr"), "ray": version("ray"), "torch": version("torch"),
            "loadavg_start": os.getloadavg()}


def run(s: Settings, out: Path, ray_address: str | None = None, ray_head: bool = False,
        command: str = "") -> dict[str, Any]:
    dataset, data_dir, notes = resolve_data(s.dataset)
    res: dict[str, Any] = {"command": command, "settings": {**asdict(s), "dataset": dataset, "data_dir": data_dir},
                           "machine": machine_info(), "runs": [], "notes": notes}
    if s.client_cpus == 2:
        notes.append("client-resources-num-cpus=2 gives one ClientApp actor on this 2-core machine: two actors (=1) "
                     "were found no faster on 2 cores (shared/docs/flower-notes.md) and each costs about 0.8 GB "
                     "more; the 'Ray actors' column also holds the idle Ray workers Ray keeps ready")
    runs_dir = Path(tempfile.mkdtemp(prefix="autoflip-scale-"))  # results.json files, condensed into scale.json
    head = RayHead(num_cpus=res["machine"]["cpus"]) if ray_head else None
    try:
        if head is not None:
            ray_address = head.start()
            print(f"private Ray head at {ray_address} (temp dir {head.temp_dir})", flush=True)
        res["ray_address"] = ray_address
        for i, n in enumerate(s.client_counts):
            print(f"[scale] {n} clients ...", flush=True)
            row = measure_run(s, base_config(s, dataset, data_dir, n), n, runs_dir / f"autoflip-{n}", head,
                              ray_address)
            res["runs"].append(row)
            if "failed" in row:
                print(f"[scale] {n} clients FAILED after {row['wall_seconds']:.0f} s: {row['failed']}", flush=True)
                res["skipped"] = list(s.client_counts[i + 1:])
                break
            print(f"[scale] {n} clients: peak RSS {row['peak_rss_gib']:.2f} GiB, PSS {row['peak_pss_gib']:.2f} GiB, "
                  f"exploration {row['stage0_seconds']:.1f} s, train {row['train_seconds_mean']:.2f} s/round, "
                  f"wall {row['wall_seconds']:.0f} s", flush=True)
        autoflip = [r for r in res["runs"] if r["strategy"] == "autoflip" and "failed" not in r]
        if len(autoflip) >= 2:
            lo, hi = autoflip[0], autoflip[-1]
            per_node = (hi["stage0_seconds"] - lo["stage0_seconds"]) / (hi["num_clients"] - lo["num_clients"])
            res["describe_estimate"] = {"from_clients": lo["num_clients"], "to_clients": hi["num_clients"],
                                        "seconds_per_node": per_node,
                                        "seconds_at_max": per_node * hi["num_clients"]}
        # (nodes, messages in flight): a stage's sample, and a full handshake where the strategy sends one
        # (a pass at 10 000 nodes x 10 000 messages would take minutes of CPU)
        pairs = tuple(p for n in s.client_counts
                      for p in ((n, s.per_round),) + (((n, n),) if n <= s.handshake_max_nodes else ()))
        res["engine_sweeps"] = engine_sweep_costs(pairs)
    finally:
        if head is not None:
            head.stop()
        shutil.rmtree(runs_dir, ignore_errors=True)
    res["markdown"] = markdown(res)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = benchmark_parser("benchmarks.bench_scale", __doc__, "20 clients (digits), 1 round (smoke test)",
                              RESULTS_DIR, "scale")
    parser.add_argument("--clients", type=int, nargs="+", help="client counts (default 100 500 1000)")
    parser.add_argument("--rounds", type=int, help="training rounds after exploration (default 3)")
    parser.add_argument("--dataset", choices=("mnist", "fashion-mnist", "digits"), help="default mnist")
    parser.add_argument("--client-cpus", type=int, help="client-resources-num-cpus (default 2: one actor)")
    parser.add_argument("--timeout", type=float, help="seconds per run before it counts as stopped (default 1800)")
    parser.add_argument("--handshake-max-nodes", type=int,
                        help="the strategy's handshake-max-nodes (default 1000; e.g. 100000 to time a full handshake)")
    ray = parser.add_mutually_exclusive_group()
    ray.add_argument("--ray-address", metavar="auto|HOST:PORT",
                     help="run on an existing Ray cluster (sets RAY_ADDRESS for the simulation); "
                          "auto = the cluster last started with `ray start` on this machine")
    ray.add_argument("--ray-head", action="store_true",
                     help="start a private `ray start --head` cluster on loopback, run on it, stop it")
    args = parser.parse_args(argv)

    s = Settings.load("quick" if args.quick else "full", client_counts=tuple(args.clients) if args.clients else None,
                      rounds=args.rounds, dataset=args.dataset, client_cpus=args.client_cpus, timeout=args.timeout,
                      handshake_max_nodes=args.handshake_max_nodes)
    address = resolve_ray_address(args.ray_address) if args.ray_address else None
    command = "python -m benchmarks.bench_scale " + " ".join(argv if argv is not None else sys.argv[1:])
    res = run(s, args.out, address, args.ray_head, command.strip())
    write_report(args.out, "scale", res)
    return res


if __name__ == "__main__":
    outcome = main()
    failed = [r for r in outcome["runs"] if r.get("ray_cluster") and not r["ray_cluster"]["used_cluster"]]
    sys.exit(1 if failed else 0)

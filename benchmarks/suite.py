"""AutoFLIP against FedAvg and pruning baselines: one command per named suite.

    python -m benchmarks.suite --suite mnist            # real Flower simulations, 3 seeds
    python -m benchmarks.suite --suite smoke --seeds 0  # the tiny configuration the tests run
    python -m benchmarks.suite --suite cifar10 --engine inprocess --jobs 5   # e.g. on a GPU machine

Every (setting, method, seed) is a real Flower simulation through
``runner.simulation`` with the same θ₀, data split and sampled clients
(all derive from the seed). ``--engine inprocess`` runs the same ServerApp and
ClientApp through ``runner.inprocess`` instead (no Ray: for machines where Ray
cannot be installed; same seed, same run), each run in its own process, and
``--jobs`` runs that many at once. A run that was cut off resumes from its
checkpoint. Each run's ``results.json`` lands under
``benchmarks/results/<suite>/runs/``; the suite then writes ``summary.csv``,
``summary.md`` (the summary table, then the cost breakdown of ``costs_table``) and
two PNG plots per setting (accuracy vs round, accuracy vs cumulative MB). Datasets
without an offline source here are reported as not run, never substituted.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import costs_table as C

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def shared_data() -> Path:
    """The shared data folder beside the checkout (override with AUTOFLIP_SHARED_DATA)."""
    return Path(os.environ.get("AUTOFLIP_SHARED_DATA", ROOT.parent / "shared" / "data"))


@dataclass(frozen=True)
class Setting:
    """One dataset/model/split configuration, run for every method and seed."""

    name: str
    dataset: str
    num_clients: int
    per_round: int
    rounds: int
    run_config: dict[str, Any] = field(default_factory=dict)
    data: str = ""  # "" (embedded), "shared:<folder>" or "system:<absolute folder>" (benchmarks/conf/suite.toml)
    extra_methods: tuple[str, ...] = ()  # run besides CORE_METHODS

    @property
    def methods(self) -> list[str]:
        return [*CORE_METHODS, *self.extra_methods]

    def data_dir(self) -> tuple[str, str | None]:
        """(data-dir, reason it is unavailable or None). Reading settings installs nothing: a dataset
        that must come from the system (``apt-get install dataset-fashion-mnist``) is reported missing."""
        if not self.data:
            return "", None
        if self.data.startswith("system:"):
            folder = Path(self.data.removeprefix("system:"))
            hint = f" (install it, e.g. `apt-get install dataset-{folder.name}`)"
        else:
            folder = shared_data() / self.data.removeprefix("shared:")
            hint = ""
        return str(folder), None if folder.exists() else f"{folder} is missing{hint}"


def load_settings(path: Path) -> dict[str, list[Setting]]:
    """The named suites of a settings file (``benchmarks/conf/suite.toml``): data, not code."""
    with path.open("rb") as f:
        conf = tomllib.load(f)
    bases = conf.pop("bases", {})
    composite = conf.pop("paper", [])
    conf.pop("methods", None)
    suites = {name: [Setting(e["name"], e["dataset"], e["num-clients"], e["per-round"], e["rounds"],
                             {**bases.get(e.get("base", ""), {}), **e.get("run-config", {})}, e.get("data", ""),
                             tuple(e.get("extra-methods", ()))) for e in entries]
              for name, entries in conf.items()}
    suites["paper"] = [s for k in composite for s in suites[k]]
    return suites


def load_methods(path: Path) -> dict[str, dict[str, Any]]:
    """The methods of a settings file (its ``[methods]`` table): run-config overrides per method name."""
    with path.open("rb") as f:
        return dict(tomllib.load(f)["methods"])


METHODS: dict[str, dict[str, Any]] = load_methods(ROOT / "benchmarks" / "conf" / "suite.toml")
CORE_METHODS = ("fedavg", "random", "magnitude", "autoflip-unstructured", "autoflip")

SETTINGS: dict[str, list[Setting]] = load_settings(ROOT / "benchmarks" / "conf" / "suite.toml")
NOT_RUN = {
    "femnist": "no offline source of FEMNIST on this machine",
    "cifar100": "no offline source of CIFAR-100 on this machine",
}


def planned_config(setting: Setting, method: str, seed: int, data_dir: str = "") -> dict[str, Any]:
    """The run config the suite gives one run of (setting, method, seed)."""
    return {**setting.run_config, **METHODS[method], "dataset": setting.dataset, "seed": seed,
            "num-server-rounds": setting.rounds, "fraction-train": setting.per_round / setting.num_clients,
            "min-train-nodes": setting.per_round, "min-available-nodes": setting.num_clients,
            "data-dir": data_dir, "run-name": "run"}


# Where a run was made, not what it computed: may differ between a stored run and the suite's plan.
PLACE_KEYS = frozenset({"data-dir", "output-dir", "run-name", "resume", "device"})


def check_run_matches(results: dict[str, Any], setting: Setting, method: str, seed: int, path: Path) -> None:
    """Refuse a stored run made under other settings than the suite's current ones.

    Without this, editing a setting (more rounds, another learning rate) would silently keep reporting
    the old runs, or resume a cut-off one under the new values. Keys the stored run lacks (written by
    an older version) are not compared."""
    stored = results.get("config", {})
    drift = {k: (stored[k], v) for k, v in planned_config(setting, method, seed).items()
             if k not in PLACE_KEYS and k in stored and stored[k] != v}
    if drift:
        changes = ", ".join(f"{k}: ran {was!r}, now {now!r}" for k, (was, now) in sorted(drift.items()))
        raise ValueError(f"{path} was made under other settings ({changes}); move that run away to re-run it, "
                         f"or restore the setting")


def completed_run(setting: Setting, method: str, seed: int, out: Path) -> Path | None:
    """The results.json of a completed earlier run of (setting, method, seed), or None.

    Raises ValueError when that run does not match the suite's current settings."""
    from runner.results import find_results, load_results

    run_dir = out / "runs" / setting.name / f"{method}-seed{seed}"
    done = sorted(p for p in find_results(run_dir) if load_results(p).get("status") == "completed")
    if not done:
        return None
    check_run_matches(load_results(done[-1]), setting, method, seed, done[-1])
    return done[-1]


def cut_off_note(setting: Setting, cut_off: list[dict[str, Any]], out: Path) -> str | None:
    """For a method none of whose runs completed: how far its ``cut_off`` runs got, beside FedAvg then."""
    seen = [(r["config"]["seed"], r["rounds"][-1]["round"], r["rounds"][-1]["accuracy"]) for r in cut_off]
    if not seen:
        return None
    at = min(r for _, r, _ in seen)
    fedavg = [json.loads(completed_run(setting, "fedavg", seed, out).read_text())["rounds"][at]["accuracy"]
              for seed in completed_seeds(setting, "fedavg", out)]
    runs = ", ".join(f"seed {seed}: round {r}/{setting.rounds}, acc {acc:.3f}" for seed, r, acc in seen)
    versus = f"; FedAvg at round {at}: {np.mean(fedavg):.3f}" if fedavg else ""
    return f"cut off ({runs}{versus})"


def cut_off_runs(setting: Setting, method: str, out: Path) -> list[dict[str, Any]]:
    """The results of (setting, method) runs that did not complete (with at least one round)."""
    from runner.results import find_results, load_results

    found = [load_results(p) for folder in sorted((out / "runs" / setting.name).glob(f"{method}-seed*"))
             for p in find_results(folder)]
    return [r for r in found if r.get("status") != "completed" and r.get("rounds")]


def completed_seeds(setting: Setting, method: str, out: Path) -> list[int]:
    """Seeds of (setting, method) with a completed run under ``out``."""
    folders = (out / "runs" / setting.name).glob(f"{method}-seed*")
    seeds = sorted(int(f.name.rsplit("-seed", 1)[1]) for f in folders if f.name.rsplit("-seed", 1)[1].isdigit())
    return [seed for seed in seeds if completed_run(setting, method, seed, out) is not None]


ENGINES = ("simulation", "inprocess")


def run_one(setting: Setting, method: str, seed: int, out: Path, data_dir: str, engine: str = "simulation",
            threads: int | None = None) -> Path:
    """One run; returns its results.json (reused when already complete, resumed when cut off)."""
    from runner.runconfig import toml_pairs
    from runner.simulation import run_simulation

    if (done := completed_run(setting, method, seed, out)) is not None:
        return done
    run_dir = out / "runs" / setting.name / f"{method}-seed{seed}"
    checkpoint = run_dir / "run" / "checkpoint.pt"
    if checkpoint.exists() and (results := run_dir / "run" / "results.json").exists():
        check_run_matches(json.loads(results.read_text()), setting, method, seed, results)
    cfg = {**planned_config(setting, method, seed, data_dir), "resume": checkpoint.exists()}
    if engine == "simulation":
        return run_simulation(cfg, setting.num_clients, output_dir=run_dir, timeout=4 * 3600, client_cpus=2)
    # In its own process: its own CUDA context, torch threads and dataset cache; the log beside the run.
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = toml_pairs(cfg)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with open(run_dir / "log.txt", "a") as log:
        code = subprocess.run([sys.executable, "-m", "runner.inprocess", "--num-nodes", str(setting.num_clients),
                               "--output-dir", str(run_dir), "--run-config", overrides],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0 or (done := completed_run(setting, method, seed, out)) is None:
        raise RuntimeError(f"{setting.name} {method} seed {seed}: exit code {code}; see {run_dir / 'log.txt'}")
    return done


def _curve(rounds: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([r[key] if r[key] is not None else np.nan for r in rounds], dtype=float)


# Rounds averaged for "last-5 acc": on the pathological splits single-round accuracy swings by 0.1 or more.
LAST_ROUNDS = 5


def last_rounds_accuracy(rounds: list[dict[str, Any]], n: int = LAST_ROUNDS) -> float:
    """Mean central accuracy over the last ``n`` training rounds (all of them when fewer)."""
    return float(np.nanmean(_curve([r for r in rounds if r["phase"] == "train"][-n:], "accuracy")))


def summarise(setting: Setting, runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One summary row per method (mean ± std over seeds), relative to FedAvg where asked."""
    base = runs.get("fedavg", [])
    target = float(np.mean([r["rounds"][-1]["accuracy"] for r in base])) if base else float("nan")
    ref = {k: float(np.mean([r["rounds"][-1][f"cum_{k}"] for r in base])) if base else float("nan")
           for k in ("bytes_down", "bytes_up", "train_flops", "client_train_seconds")}
    base_per_round = float(np.mean([C.per_round_mb(r["rounds"]) for r in base])) if base else float("nan")
    rows = []
    for method, results in runs.items():
        finals = [r["rounds"][-1]["accuracy"] for r in results]
        best = [np.nanmax(_curve(r["rounds"], "accuracy")) for r in results]
        tail = [last_rounds_accuracy(r["rounds"]) for r in results]
        last = [r["rounds"][-1] for r in results]
        reach = []
        for r in results:
            hit = [x for x in r["rounds"] if x["accuracy"] is not None and x["accuracy"] >= target]
            reach.append((hit[0]["cum_bytes_down"] + hit[0]["cum_bytes_up"]) / 1e6 if hit else float("nan"))
        mean = lambda key: float(np.mean([x[f"cum_{key}"] for x in last]))  # noqa: E731
        rows.append({
            "setting": setting.name, "method": method, "seeds": len(results),
            "final_acc": float(np.mean(finals)), "final_acc_std": float(np.std(finals)),
            "last5_acc": float(np.mean(tail)), "last5_acc_std": float(np.std(tail)),
            "best_acc": float(np.mean(best)), "density": float(np.mean([x["density"] for x in last])),
            "mb_down": mean("bytes_down") / 1e6, "mb_up": mean("bytes_up") / 1e6,
            "mb_to_fedavg_acc": float(np.nanmean(reach)) if not np.all(np.isnan(reach)) else float("nan"),
            "reached_fedavg_acc": f"{sum(not np.isnan(x) for x in reach)}/{len(reach)}",
            "comm_vs_fedavg": (mean("bytes_down") + mean("bytes_up")) / (ref["bytes_down"] + ref["bytes_up"]),
            "flops_vs_fedavg": mean("train_flops") / ref["train_flops"],
            "client_seconds_vs_fedavg": mean("client_train_seconds") / ref["client_train_seconds"],
            **cost_breakdown(results, runs, base_per_round),
        })
    return rows


def cost_breakdown(results: list[dict[str, Any]], runs: dict[str, list[dict[str, Any]]],
                   base_per_round: float) -> dict[str, Any]:
    """The one-off and per-round traffic of one method's runs (mean over seeds), when its cumulative traffic
    breaks even with FedAvg's and magnitude's (benchmarks/costs_table.py), and its mean mask churn."""
    rounds = [r["rounds"] for r in results]
    per_round = float(np.mean([C.per_round_mb(r) for r in rounds]))
    reference = {m: [r["rounds"] for r in runs[m]] if m in runs else None for m in ("fedavg", "magnitude")}
    return {
        "one_off_mb": float(np.mean([C.one_off_mb(r) for r in rounds])), "per_round_mb": per_round,
        "per_round_vs_fedavg": per_round / base_per_round,
        "break_even_vs_fedavg": C.break_even_cell(rounds, reference["fedavg"]),
        "break_even_vs_magnitude": C.break_even_cell(rounds, reference["magnitude"]),
        "mask_churn": C.mean_churn_over_seeds(rounds),
    }


def markdown(rows: list[dict[str, Any]], notes: dict[tuple[str, str], str]) -> str:
    """The summary table; ``notes`` adds a row per (setting, method) that has no result (why)."""
    head = (f"| setting | method | seeds | final acc | last-{LAST_ROUNDS} acc | best acc | density | MB down | MB up "
            "| MB to FedAvg acc | comm vs FedAvg | train FLOPs vs FedAvg | client s vs FedAvg |\n|" + "---|" * 13)
    lines = [head]
    for r in rows:
        reach = ("never" if np.isnan(r["mb_to_fedavg_acc"])
                 else f"{r['mb_to_fedavg_acc']:.1f} ({r['reached_fedavg_acc']})")
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['seeds']} | {r['final_acc']:.3f} ± {r['final_acc_std']:.3f} "
            f"| {r['last5_acc']:.3f} ± {r['last5_acc_std']:.3f} | {r['best_acc']:.3f} "
            f"| {r['density']:.2f} | {r['mb_down']:.1f} | {r['mb_up']:.1f} | {reach} | {r['comm_vs_fedavg']:.2f} "
            f"| {r['flops_vs_fedavg']:.2f} | {r['client_seconds_vs_fedavg']:.2f} |")
    for (setting, method), why in notes.items():
        lines.append(f"| {setting} | {method} | {why} |" + " |" * 10)
    if rows:
        lines += ["", costs_markdown(rows)]
    return "\n".join(lines) + "\n"


def costs_markdown(rows: list[dict[str, Any]]) -> str:
    """The cost breakdown beside the summary table (docs/evidence.md explains the columns)."""
    lines = [f"| setting | method | last-{LAST_ROUNDS} acc | one-off MB | per-round MB | per-round vs FedAvg "
             "| break-even vs FedAvg | break-even vs magnitude | mask churn r2+ |\n|" + "---|" * 9]
    for r in rows:
        versus = [r[f"break_even_vs_{m}"] if r[f"break_even_vs_{m}"] != "" else "–" for m in ("fedavg", "magnitude")]
        lines.append(f"| {r['setting']} | {r['method']} | {r['last5_acc']:.3f} | {r['one_off_mb']:.1f} "
                     f"| {r['per_round_mb']:.2f} | {r['per_round_vs_fedavg']:.2f} | {versus[0]} | {versus[1]} "
                     f"| {C.churn_text(r['mask_churn'])} |")
    return "\n".join(lines)


def plot(setting: Setting, runs: dict[str, list[dict[str, Any]]], out: Path,
         partial: dict[str, list[dict[str, Any]]] | None = None) -> list[Path]:
    """Accuracy vs round and vs cumulative MB, mean over seeds; ``partial`` (cut-off runs) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    curves = [(m, r, "-", m) for m, r in runs.items()]
    curves += [(m, r, "--", f"{m} (cut off)") for m, r in (partial or {}).items() if r]
    for kind in ("round", "mb"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for _method, results, style, label in curves:
            length = min(len(r["rounds"]) for r in results)
            acc = np.nanmean([_curve(r["rounds"][:length], "accuracy") for r in results], axis=0)
            if kind == "round":
                x = np.arange(len(acc))
            else:
                x = np.mean([(_curve(r["rounds"][:length], "cum_bytes_down")
                              + _curve(r["rounds"][:length], "cum_bytes_up")) / 1e6 for r in results], axis=0)
            ax.plot(x, acc, style, marker=".", label=label)
        ax.set_xlabel("round (0 = exploration / initial model)" if kind == "round" else "cumulative MB (down + up)")
        ax.set_ylabel("test accuracy")
        ax.set_title(setting.name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = out / f"{setting.name}-accuracy-vs-{kind}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def run_suite(suite: str, seeds: list[int], methods: list[str] | None = None, out: Path | None = None,
              only: list[str] | None = None, summary_only: bool = False, engine: str = "simulation",
              jobs: int = 1) -> Path:
    """Run (or reuse) every run of the suite and write its summary; returns summary.md.

    Settings left out by ``only`` (or all, with ``summary_only``) are not run; their completed runs
    on disk, whatever their seeds, still make their rows and plots."""
    out = out or RESULTS / suite
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    notes = {(name, "(not run)"): why for name, why in NOT_RUN.items()} if suite == "paper" else {}
    started = time.time()
    for setting in SETTINGS[suite]:
        if summary_only or (only and setting.name not in only):
            # Not run now: summarise the completed runs on disk (every seed found) when each method has one.
            found = {m: completed_seeds(setting, m, out) for m in methods or setting.methods}
            partial = {m: cut_off_runs(setting, m, out) for m, seeds_of in found.items() if not seeds_of}
            for m, cut_off in partial.items():
                notes[setting.name, m] = cut_off_note(setting, cut_off, out) or "(no run yet)"
            found = {m: seeds_of for m, seeds_of in found.items() if seeds_of}
            if "fedavg" in found:
                runs = {m: [json.loads(completed_run(setting, m, seed, out).read_text()) for seed in seeds_of]
                        for m, seeds_of in found.items()}
                rows += summarise(setting, runs)
                plot(setting, runs, out, partial)
            continue
        data_dir, missing = setting.data_dir()
        if missing:
            print(f"[{setting.name}] not run: {missing}", flush=True)
            notes[setting.name, "(not run)"] = missing
            continue
        runs: dict[str, list[dict[str, Any]]] = {}
        todo = [(method, seed) for method in methods or setting.methods for seed in seeds]
        threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None

        def one(method: str, seed: int) -> dict[str, Any]:
            t = time.time()
            result = json.loads(run_one(setting, method, seed, out, data_dir, engine, threads).read_text())
            last = result["rounds"][-1]
            print(f"[{setting.name}] {method:>22} seed {seed}: acc {last['accuracy']:.3f} "
                  f"density {last['density']:.2f} MB {(last['cum_bytes_down'] + last['cum_bytes_up']) / 1e6:.1f} "
                  f"({time.time() - t:.0f}s)", flush=True)
            return result

        with ThreadPoolExecutor(jobs) as pool:
            for (method, _), result in zip(todo, list(pool.map(lambda job: one(*job), todo))):
                runs.setdefault(method, []).append(result)
        rows += summarise(setting, runs)
        plot(setting, runs, out)
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["setting"])
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.md").write_text(markdown(rows, notes))
    print(f"\n{markdown(rows, notes)}\nsuite {suite}: {time.time() - started:.0f}s; results in {out}", flush=True)
    return out / "summary.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=sorted(SETTINGS), default="smoke")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=None,
                        help="default: the five core methods plus the setting's extra ones")
    parser.add_argument("--settings", nargs="+", default=None, help="run only these settings of the suite")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--summary-only", action="store_true",
                        help="run nothing: rebuild the tables and plots from the completed runs on disk")
    parser.add_argument("--engine", choices=ENGINES, default="simulation",
                        help="simulation: Flower's Ray simulation engine (default); inprocess: runner.inprocess")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    run_suite(args.suite, args.seeds, args.methods, args.out, args.settings, args.summary_only, args.engine,
              args.jobs)


if __name__ == "__main__":
    sys.exit(main())

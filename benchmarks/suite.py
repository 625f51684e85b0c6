"""The benchmark suite: every strategy on federations that differ the way real ones do.

Four tasks (benchmarks/suite_tasks.py, and digits-straggler as benchmarks/digits_straggler.py
runs it), each site its own worker process with its own connection to a local broker:

  homogeneous       8 equally fast sites, a causal transformer trained with AdamW on Python's help
                    texts; target: next-character accuracy 0.50
  churn             10 digits sites with lognormal delays (0.06 to 2.94 s), four of which go offline
                    and come back on a schedule; target 0.95
  many-sites        24 digits sites, labels split by Dirichlet(0.1); target 0.90
  digits-straggler  10 sites, delays 0.1 to 3 s; target 0.95

Each task runs synchronous FedAvg (every site each round), FedAsync, FedBuff (K=3) and the
coordinator's defaults (FedBuff whose buffer is a quarter of the active sites, at least three, with
stand-ins for sites that lost their connection), one after the other in a fresh vhost each,
``--repeats`` times; a run stops at its target or after ``--max-seconds``.

    python benchmarks/suite.py [--tasks homogeneous,churn] [--modes fedavg,default] [--repeats 3]

Writes benchmarks/results/suite.json, a table (suite.md: median time to target, its ratio to
FedAvg's, updates applied and bytes moved) and one accuracy-against-time plot per task
(suite.TASK.png), and prints the table. With other tasks or modes than the default, the file
names say which: suite.homogeneous-fedavg-fedbuff.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the suite's tasks live beside this file
RESULTS = Path(__file__).parent / "results"

from benchmarks.digits_straggler import median_or_none  # noqa: E402 - found through ROOT, set just above


@dataclass(frozen=True)
class SuiteTask:
    task: str
    sites: int
    target: float
    #: Offline spans (from, to), in seconds of the run's clock, per site.
    offline: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


TASKS = {
    "homogeneous": SuiteTask("benchmarks.suite_tasks:CharTransformer", 8, 0.50),
    # Fast and slow sites alike go away for 15-25 s, one at a time and sometimes two.
    "churn": SuiteTask("benchmarks.suite_tasks:LognormalDigits", 10, 0.95, offline={
        "site-5": [(3.0, 23.0)], "site-1": [(8.0, 28.0), (45.0, 60.0)], "site-7": [(20.0, 40.0)],
        "site-0": [(30.0, 55.0)],
    }),
    "many-sites": SuiteTask("benchmarks.suite_tasks:ManyDigits", 24, 0.90),
    "digits-straggler": SuiteTask("shared.digits_task:DigitsStraggler", 10, 0.95),
}
ASYNC_STALENESS = {"staleness": "polynomial", "staleness_a": 0.5}
MODES = {
    "fedavg": lambda task: {"strategy": "fedavg", "sites": task.sites},
    "fedasync": lambda task: {"strategy": "fedasync", "alpha": 0.6, **ASYNC_STALENESS},
    "fedbuff": lambda task: {"strategy": "fedbuff", "buffer_size": 3, **ASYNC_STALENESS},
    "default": lambda task: {},
    # A candidate for the defaults that lost, run when named in --modes: FedBuff whose server step is
    # scaled so that a round's worth of buffers (one update per site) moves the model as far as one
    # FedAvg round does. (The default's buffer follows the active sites: see FedBuff.size.)
    "fedbuff-scaled": lambda task: {"strategy": "fedbuff", "buffer_size": 3, "server_lr": 3 / task.sites,
                                    **ASYNC_STALENESS},
}
DEFAULT_MODES = "fedavg,fedasync,fedbuff,default"


def run_once(broker, name: str, mode: str, repeat: int, max_seconds: float, work_dir: Path) -> dict:
    from coordinator.runlog import time_to_accuracy
    from fedq.federation import run_federation, site_names

    task = TASKS[name]
    vhost = f"suite-{name}-{mode}-{repeat}-{int(time.time())}"
    url = broker.create_vhost(vhost)
    try:
        summary = run_federation(
            url, work_dir / f"{name}-{mode}-{repeat}", site_names(task.sites),
            coordinator={"task": task.task, **MODES[mode](task), "stop_at_accuracy": task.target,
                         "max_seconds": max_seconds, "max_staleness": 100_000},
            worker={"task": task.task}, offline=task.offline, fresh=True,
        )
    finally:
        broker.delete_vhost(vhost)
    return {
        "time_to_target": time_to_accuracy(summary["curve"], task.target),
        "best_accuracy": summary["best_accuracy"],
        "updates_applied": summary["updates_applied"],
        "bytes_moved": sum(summary["bytes_in_per_site"].values()) + summary["bytes_out"],
        "elapsed": summary["elapsed"],
        "curve": [(point[0], point[2]) for point in summary["curve"]],
    }


def table(results: dict[str, dict[str, list[dict]]], repeats: int) -> str:
    lines = [f"| task (target) | mode | time to target, median of {repeats} (runs) | vs FedAvg | updates applied | "
             "MB moved |", "| --- | --- | --- | --- | --- | --- |"]
    for name, modes in results.items():
        fedavg = [run["time_to_target"] for run in modes.get("fedavg", [])]
        for mode, runs in modes.items():
            times = [run["time_to_target"] for run in runs]
            median = median_or_none(times)
            # Ratios within each repeat: the same hour, the same machine load.
            ratios = [t / f for t, f in zip(times, fedavg) if t is not None and f is not None]
            shown = ", ".join("-" if t is None else f"{t:.1f}" for t in times)
            lines.append(
                f"| {name} ({TASKS[name].target:.2f}) | {mode} | {'not reached' if median is None else f'{median:.1f} s'} "
                f"({shown}) | {f'{statistics.median(ratios):.2f}' if len(ratios) == len(runs) and ratios else '-'} | "
                f"{statistics.median(run['updates_applied'] for run in runs):.0f} | "
                f"{statistics.median(run['bytes_moved'] for run in runs) / 1e6:.1f} |")
    return "\n".join(lines)


def plot(name: str, modes: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for m, (mode, runs) in enumerate(modes.items()):
        for i, run in enumerate(runs):
            ax.plot([t for t, _ in run["curve"]], [a for _, a in run["curve"]], color=f"C{m}",
                    label=mode if i == 0 else None, alpha=1.0 if i == 0 else 0.4, drawstyle="steps-post")
    ax.axhline(TASKS[name].target, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("seconds since the first snapshot")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{name}: {TASKS[name].sites} sites, target {TASKS[name].target:.2f}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated, of: " + ", ".join(TASKS))
    parser.add_argument("--modes", default=DEFAULT_MODES, help="comma-separated, of: " + ", ".join(MODES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=240.0, help="a run that has not reached its target stops")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    names, modes = args.tasks.split(","), args.modes.split(",")
    for given, known, what in ((names, TASKS, "task"), (modes, MODES, "mode")):
        unknown = [g for g in given if g not in known]
        if unknown:
            parser.error(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

    from fedq.local_broker import find_broker

    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, list[dict]]] = {name: {mode: [] for mode in modes} for name in names}
    broker = find_broker()
    try:
        for repeat in range(args.repeats):
            for name in names:
                for mode in modes:
                    started = time.monotonic()
                    run = run_once(broker, name, mode, repeat, args.max_seconds, args.out / "runs" / "suite")
                    results[name][mode].append(run)
                    reached = "not reached" if run["time_to_target"] is None else f"{run['time_to_target']:.1f} s"
                    print(f"[{repeat + 1}/{args.repeats}] {name} {mode}: target {TASKS[name].target:.2f} {reached}, "
                          f"best {run['best_accuracy']:.3f}, {run['updates_applied']} updates "
                          f"({time.monotonic() - started:.0f} s with start-up)", flush=True)
    finally:
        broker.close()
    text = table(results, args.repeats)
    suffix = "" if (names, modes) == (list(TASKS), DEFAULT_MODES.split(",")) else "." + "-".join(names + modes)
    (args.out / f"suite{suffix}.json").write_text(json.dumps(
        {"repeats": args.repeats, "max_seconds": args.max_seconds,
         "tasks": {name: {"task": TASKS[name].task, "sites": TASKS[name].sites, "target": TASKS[name].target,
                          "offline": TASKS[name].offline, "modes": results[name]} for name in names}}, indent=1))
    (args.out / f"suite{suffix}.md").write_text(text + "\n")
    for name in names:
        plot(name, results[name], args.out / f"suite{suffix}.{name}.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

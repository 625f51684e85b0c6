"""soak: 20 real workers against a three-node cluster for 30 minutes, killed and cut on a random schedule.

A local three-node RabbitMQ cluster from broker_config/ (fedq.local_broker.start_local_cluster), a
coordinator process connected to all three nodes (FedAsync on digits split 20 ways, a version per
update: the most snapshots per minute), and 20 worker processes that reach each node through a chaos proxy of
its own (tests/chaos_proxy.py). On a schedule drawn from a fixed seed, about every 15 s (exponential
gaps), one of:

    a worker SIGKILLed, and started again on its state 1-10 s later     (60%)
    every link through one node's proxy cut; the workers reconnect       (40%)

Every 10 s: the coordinator's resident memory and each broker node's (their processes' VmRSS).
At the end the workers are stopped, the coordinator drains their queues and stops, and the run is
checked: every update a worker logged as confirmed by the broker is in the ledger once, no update
is applied twice, and every site had an update applied in the last two minutes before the stop (no
site stuck). Memory trend: the least-squares slope of each series after the first 5 minutes, in MB
per 10 minutes.

    python benchmarks/soak.py                  # 30 minutes, 20 workers
    python benchmarks/soak.py --minutes 3      # a quick check of the script

Writes benchmarks/results/soak.json and soak.png (memory against time), and prints the counts.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the chaos proxy lives with the tests

from coordinator.checkpoint import read_checkpoint  # noqa: E402
from coordinator.runlog import read_events  # noqa: E402
from fedq.federation import site_names, start_coordinator, start_worker  # noqa: E402
from fedq.local_broker import start_local_cluster  # noqa: E402
from tests.chaos_proxy import ChaosProxy  # noqa: E402
from tests.federation_helpers import confirmed_updates  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TASK = "benchmarks.suite_tasks:SoakDigits"  # digits split 20 ways
SAMPLE_SECONDS = 10.0
WARM_UP_SECONDS = 300.0  # left out of the trend: queues, caches and the stream's first segments fill


def resident_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(found.group(1)) * 1024 if found else None


def slope_mb_per_10_min(samples: list[tuple[float, int]]) -> float | None:
    """Least-squares slope of (seconds, bytes) samples, in MB per 10 minutes."""
    if len(samples) < 3:
        return None
    xs, ys = [t for t, _ in samples], [b / 1e6 for _, b in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / spread * 600 if spread else None


def soak(run_dir: Path, minutes: float, workers: int, seed: int, log) -> dict:
    rng = random.Random(seed)
    broker = start_local_cluster(log=log)
    nodes = broker.cluster.nodes
    proxies = [ChaosProxy(node.amqp_port) for node in nodes]
    direct = broker.url().split(",")
    worker_url = ",".join(proxy.url(url) for proxy, url in zip(proxies, direct))
    sites = site_names(workers)
    duration = minutes * 60
    worker_settings = {"task": TASK}
    coordinator_settings = {"task": TASK, "strategy": "fedasync", "max_staleness": 100_000, "wait_for_sites": workers,
                            "max_seconds": duration + 600, "max_versions": 10**9, "metrics_port": ""}
    coordinator = start_coordinator(broker.url(), run_dir, **coordinator_settings)
    processes = {site: start_worker(worker_url, site, run_dir / "sites" / f"{site}.log", **worker_settings) for site in sites}
    restarts: dict[str, float] = {}  # site -> when its killed worker starts again
    faults: list[tuple[float, str]] = []
    memory: list[dict] = []
    try:
        while not any(e["event"] == "start" for e in read_events(run_dir)):
            if coordinator.poll() is not None:
                raise RuntimeError(f"the coordinator exited with {coordinator.returncode}; see {run_dir / 'coordinator.log'}")
            time.sleep(0.2)
        clock = time.monotonic()
        log(f"soak: {workers} workers on the three-node cluster, {minutes:g} minutes from now")
        next_fault = rng.expovariate(1 / 15)
        next_sample = 0.0
        while (now := time.monotonic() - clock) < duration:
            if coordinator.poll() is not None:
                raise RuntimeError(f"the coordinator exited with {coordinator.returncode} at {now:.0f} s")
            for site, when in list(restarts.items()):
                if now >= when:
                    processes[site] = start_worker(worker_url, site, run_dir / "sites" / f"{site}.log", **worker_settings)
                    del restarts[site]
            if now >= next_fault:
                if rng.random() < 0.6:
                    site = rng.choice([s for s in sites if s not in restarts])
                    processes[site].send_signal(signal.SIGKILL)
                    processes[site].wait()
                    restarts[site] = now + rng.uniform(1, 10)
                    faults.append((round(now, 1), f"{site} killed"))
                else:
                    which = rng.randrange(len(proxies))
                    cut = proxies[which].cut()
                    faults.append((round(now, 1), f"{cut} links through node {which + 1}'s proxy cut"))
                next_fault = now + rng.expovariate(1 / 15)
            if now >= next_sample:
                sample = {"t": round(now, 1), "coordinator": resident_bytes(coordinator.pid)}
                for index, node in enumerate(nodes, 1):
                    sample[f"node {index}"] = resident_bytes(node.beam_pid())
                memory.append(sample)
                if len(memory) % 30 == 1:
                    versions = max((e["version"] for e in read_events(run_dir) if e["event"] == "snapshot"), default=0)
                    log(f"  {now / 60:5.1f} min: version {versions}, {len(faults)} faults, coordinator "
                        f"{(sample['coordinator'] or 0) / 1e6:.0f} MB, nodes "
                        + ", ".join(f"{(sample[f'node {i}'] or 0) / 1e6:.0f}" for i in range(1, len(nodes) + 1)) + " MB")
                next_sample += SAMPLE_SECONDS
            time.sleep(0.2)
        stopped_at = time.monotonic() - clock
        for site, when in restarts.items():  # a site down at the end comes back to send what it holds
            processes[site] = start_worker(worker_url, site, run_dir / "sites" / f"{site}.log", **worker_settings)
        time.sleep(15)
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        for process in processes.values():
            process.wait(60)
        # Drained once every update a worker saw confirmed has reached the run log.
        confirmed = set(confirmed_updates(run_dir / "sites"))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not confirmed <= {e["update_id"] for e in read_events(run_dir)
                                                                 if e["event"] == "update"}:
            time.sleep(1)
        coordinator.send_signal(signal.SIGTERM)
        coordinator.wait(120)
    finally:
        for process in [coordinator, *processes.values()]:
            if process.poll() is None:
                process.kill()
                process.wait()
        for proxy in proxies:
            proxy.close()
        broker.close()
    events = read_events(run_dir)
    applied = [row[0] for row in read_checkpoint(run_dir / "checkpoint.fedq").ledger_rows if row[3] is not None]
    last_update = {site: max((e["t"] for e in events if e["event"] == "update" and e["site"] == site), default=None)
                   for site in sites}
    stuck = [site for site, t in last_update.items() if t is None or t < stopped_at - 120]
    trend = {series: slope_mb_per_10_min([(m["t"], m[series]) for m in memory
                                          if m["t"] >= min(WARM_UP_SECONDS, duration / 3) and m[series] is not None])
             for series in memory[0] if series != "t"}
    return {
        "minutes": minutes, "workers": workers, "seed": seed, "faults": faults,
        "updates_confirmed": len(confirmed), "updates_applied": len(applied),
        "applied_twice": len(applied) - len(set(applied)),
        "confirmed_not_applied": len(confirmed - set(applied)),
        "versions": max((e["version"] for e in events if e["event"] == "snapshot"), default=0),
        "sites_stuck": stuck, "memory": memory, "trend_mb_per_10_min": trend,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4.5))
    for series in result["memory"][0]:
        if series == "t":
            continue
        points = [(m["t"] / 60, m[series] / 1e6) for m in result["memory"] if m[series] is not None]
        axes.plot(*zip(*points), label=f"{series} ({result['trend_mb_per_10_min'][series]:+.1f} MB / 10 min)")
    for t, _ in result["faults"]:
        axes.axvline(t / 60, color="grey", alpha=0.08)
    axes.set_xlabel("minutes")
    axes.set_ylabel("resident memory (MB)")
    axes.set_title(f"fedq soak: {result['workers']} workers, three-node cluster, {len(result['faults'])} faults "
                   "(grey lines)")
    axes.legend(loc="upper left", fontsize=8)
    axes.set_ylim(bottom=0)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not 1 <= args.workers <= 20:
        parser.error(f"--workers must be 1 to 20, the sites of {TASK}; not {args.workers}")
    args.out.mkdir(parents=True, exist_ok=True)
    run_dir = args.out / "runs" / f"soak-{int(time.time())}"
    result = soak(run_dir, args.minutes, args.workers, args.seed, lambda line: print(line, flush=True))
    name = "soak" if args.minutes == 30 and args.workers == 20 else f"soak-{args.minutes:g}min-{args.workers}"
    (args.out / f"{name}.json").write_text(json.dumps({"benchmark": "soak", "run_dir": str(run_dir), **result}, indent=1))
    plot(result, args.out / f"{name}.png")
    ok = not result["applied_twice"] and not result["confirmed_not_applied"] and not result["sites_stuck"]
    print(f"soak: {result['minutes']:g} min, {result['workers']} workers, {len(result['faults'])} faults, "
          f"{result['versions']} versions; updates confirmed {result['updates_confirmed']}, applied "
          f"{result['updates_applied']}, applied twice {result['applied_twice']}, confirmed but not applied "
          f"{result['confirmed_not_applied']}; sites stuck: {result['sites_stuck'] or 'none'}")
    print("  memory trend after warm-up (MB per 10 min): "
          + ", ".join(f"{k} {v:+.1f}" for k, v in result["trend_mb_per_10_min"].items() if v is not None))
    print(f"  plot: {args.out / f'{name}.png'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

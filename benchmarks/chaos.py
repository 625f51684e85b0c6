"""chaos: digits-straggler with faults on a schedule, against the same run without them.

Both runs use a RabbitMQ node of their own, a coordinator process and ten worker processes that
reach the broker through a proxy. The faulty run, on the run's clock (seconds since version 0):

    1 s  every site's link is cut          4 s  site-3's worker is SIGKILLed and restarted
    2 s  the coordinator is SIGKILLed      5 s  every site's link is cut again
         and restarted from its checkpoint 7 s  the broker node is restarted

Reports time to 0.90 and 0.95 for both and the ledger check (no update counted twice).

    python benchmarks/chaos.py [--repeats 3]

Writes benchmarks/results/chaos.json and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the chaos proxy lives with the tests

from coordinator.checkpoint import read_checkpoint  # noqa: E402
from coordinator.runlog import read_events, time_to_accuracy  # noqa: E402
from fedq.local_broker import LocalNode  # noqa: E402
from fedq.federation import site_names, start_coordinator, start_worker  # noqa: E402
from tests.chaos_proxy import ChaosProxy  # noqa: E402

RESULTS = Path(__file__).parent / "results"
COORDINATOR = {"strategy": "fedbuff", "buffer_size": 3, "stop_at_accuracy": 0.95, "max_seconds": 300,
               "max_staleness": 100_000, "wait_for_sites": 10}


def run(run_dir: Path, faults: bool, log) -> dict:
    node = LocalNode(ROOT / "broker_config")
    node.start()
    url = f"amqp://fedq:fedq@127.0.0.1:{node.amqp_port}/fedq"
    proxy = ChaosProxy(node.amqp_port)
    worker_url = proxy.url(url)
    sites = site_names(10)
    processes = {"coordinator": start_coordinator(url, run_dir, **COORDINATOR)}
    processes.update({s: start_worker(worker_url, s, run_dir / "sites" / f"{s}.log") for s in sites})
    done: list[str] = []
    try:
        while not any(e["event"] == "start" for e in read_events(run_dir)):
            time.sleep(0.05)
        clock = time.monotonic()

        def at(seconds: float, what: str, action) -> None:
            time.sleep(max(0.0, clock + seconds - time.monotonic()))
            action()
            done.append(f"{time.monotonic() - clock:.1f} s: {what}")
            log(f"  {done[-1]}")

        def kill_coordinator():
            processes["coordinator"].send_signal(signal.SIGKILL)
            processes["coordinator"].wait()
            processes["coordinator"] = start_coordinator(url, run_dir, **COORDINATOR)

        def kill_site_3():
            processes["site-3"].send_signal(signal.SIGKILL)
            processes["site-3"].wait()
            processes["site-3"] = start_worker(worker_url, "site-3", run_dir / "sites" / "site-3.log")

        if faults:
            schedule = [(1, "links cut", proxy.cut), (2, "coordinator killed and restarted", kill_coordinator),
                        (4, "site-3 killed and restarted", kill_site_3), (5, "links cut", proxy.cut),
                        (7, "broker restarted", node.restart)]
            for seconds, what, action in schedule:
                if any(e["event"] == "evaluation" and e.get("accuracy", 0) >= 0.95 for e in read_events(run_dir)):
                    break
                at(seconds, what, action)
        deadline = time.monotonic() + 330
        while time.monotonic() < deadline:
            if processes["coordinator"].poll() is not None and any(e["event"] == "start" for e in read_events(run_dir)):
                break
            time.sleep(0.2)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        proxy.close()
        node.close()
    events = read_events(run_dir)
    curve = [(e["t"], e["version"], e["accuracy"], e.get("loss")) for e in events if e["event"] == "evaluation"]
    updates = [e["update_id"] for e in events if e["event"] == "update"]
    ledger = [row[0] for row in read_checkpoint(run_dir / "checkpoint.fedq").ledger_rows if row[3] is not None]
    return {
        "faults": done,
        "time_to_0.90": time_to_accuracy(curve, 0.90),
        "time_to_0.95": time_to_accuracy(curve, 0.95),
        "final_accuracy": curve[-1][2] if curve else None,
        "updates_in_ledger": len(ledger),
        "ledger_has_no_duplicates": len(ledger) == len(set(ledger)),
        "update_events": len(updates),
        "resumes": sum(e["event"] == "resume" for e in events),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level="WARNING")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {"fault_free": [], "chaos": []}
    for repeat in range(args.repeats):
        for name, faults in (("fault_free", False), ("chaos", True)):
            run_dir = args.out / "runs" / f"chaos-{name}-{repeat}-{int(time.time())}"
            print(f"[{repeat + 1}/{args.repeats}] {name}", flush=True)
            result = run(run_dir, faults, lambda line: print(line, flush=True))
            results[name].append(result)
            print(f"  0.90 at {result['time_to_0.90']} s, 0.95 at {result['time_to_0.95']} s, "
                  f"{result['updates_in_ledger']} updates in the ledger, duplicates: {not result['ledger_has_no_duplicates']}",
                  flush=True)

    def median(name: str, key: str):
        values = [r[key] for r in results[name]]
        return statistics.median(values) if all(v is not None for v in values) else None

    report = {"benchmark": "chaos", "coordinator": COORDINATOR, "runs": results,
              "median_time_to_0.95": {name: median(name, "time_to_0.95") for name in results}}
    (args.out / "chaos.json").write_text(json.dumps(report, indent=1))
    clean, chaos = report["median_time_to_0.95"]["fault_free"], report["median_time_to_0.95"]["chaos"]
    duplicates = not all(r["ledger_has_no_duplicates"] for rs in results.values() for r in rs)
    print(f"chaos: median time to 0.95 {chaos} s with faults against {clean} s without; "
          f"duplicates in any ledger: {duplicates}")
    return 0 if chaos is not None and not duplicates else 1


if __name__ == "__main__":
    sys.exit(main())

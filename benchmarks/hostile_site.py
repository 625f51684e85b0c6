"""hostile site: digits-straggler where site-0 (the fastest) sends its updates scaled 100x.

Runs FedBuff (K = 5) with the plain mean (no defence), the trimmed mean and the median, in one run;
reports time to 0.90, best and final accuracy for each.

    python benchmarks/hostile_site.py

Writes benchmarks/results/hostile_site.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the hostile task lives with the tests

RESULTS = Path(__file__).parent / "results"
DEFENCES = {
    "none (mean)": {"aggregation": "mean"},
    "trimmed mean 20%": {"aggregation": "trimmed-mean", "trim_fraction": 0.2},
    "median": {"aggregation": "median"},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-seconds", type=float, default=90.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level="ERROR")
    from fedq.local_broker import find_broker
    from fedq.federation import run_federation, site_names

    broker = find_broker()
    rows = []
    try:
        for label, defence in DEFENCES.items():
            vhost = f"hostile-{defence['aggregation']}-{int(time.time())}"
            url = broker.create_vhost(vhost)
            try:
                summary = run_federation(
                    url, args.out / "runs" / f"hostile-{defence['aggregation']}", site_names(10),
                    coordinator={"strategy": "fedbuff", "buffer_size": 5, "stop_at_accuracy": 0.90,
                                 "max_seconds": args.max_seconds, "max_staleness": 10_000, **defence},
                    site_settings={"site-0": {"task": "tests.hostile_task:ScaledDigits"}},
                    fresh=True,
                )
            finally:
                broker.delete_vhost(vhost)
            rows.append({"defence": label, "settings": defence, "time_to_0.90": summary["time_to_accuracy"]["0.90"],
                         "best_accuracy": summary["best_accuracy"], "final_accuracy": summary["final_accuracy"],
                         "updates_applied": summary["updates_applied"], "updates_dropped": summary["updates_dropped"]})
            print(f"{label:18s} 0.90 at {rows[-1]['time_to_0.90']} s, best {rows[-1]['best_accuracy']:.4f}, "
                  f"final {rows[-1]['final_accuracy']:.4f}", flush=True)
    finally:
        broker.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hostile_site.json").write_text(json.dumps({"benchmark": "hostile site", "scale": 100, "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

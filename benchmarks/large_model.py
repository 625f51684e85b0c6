"""large model: 500M parameters (2 GB in fp32) out to a site and a compressed update back.

The model is the shape large models take in federated recommendation and language work: a hashed
embedding table of 500M parameters (scikit-learn's digits as hashed pixel and pixel-pair features,
trained for real with sparse gradients) and a small dense head. The coordinator publishes version 0,
one site fetches and verifies it, trains, and returns a top-k + int8 update, which the coordinator
applies with a plain server step (FedAsync: no optimizer moments, no error-feedback residual).

Legs come from the two processes' own logs and run log; peak resident memory from each process's
``ru_maxrss``, reported against the target of 2x the model's size plus 512 MB. After each run, on
the same broker, pika alone publishes the snapshot's bytes to a fresh stream while a reader reads
them (``bare_stream``): the snapshot's legs are reported as a share of that bare throughput, against
a target of 80%.

    python benchmarks/large_model.py                          # 500M parameters, 3 runs
    python benchmarks/large_model.py --parameters 1000000000  # 1B parameters (4 GB)
    python benchmarks/large_model.py --parameters 20000000 --repeats 1  # a quick check

Writes benchmarks/results/large_model.json (large_model_N.json for N parameters) and prints the
legs' medians, bare's, and the memory.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import statistics
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pika
import torch
from torch import nn

from coordinator.runlog import read_events
from fedq.federation import start_coordinator, start_worker
from fedq.local_broker import DEFAULT_CONFIG_DIR, find_broker, vhost_definitions
from shared import transport
from shared.chunking import chunk_count
from shared.protocol import MAX_CHUNK_BYTES
from shared.task import SiteContext, Task, TrainResult

RESULTS = Path(__file__).parent / "results"
DIM = 64
PARAMETERS_VARIABLE = "FEDQ_BENCH_PARAMETERS"  # both processes build the same model from it
EPOCHS, BATCH_SIZE, LR = 3, 32, 0.2
PUBLISH = "coordinator publishes the snapshot"  # encoding, digest and announcement included
FETCH = "site fetches, verifies and decodes it"  # from the announcement, while the chunks are written


@lru_cache(maxsize=1)
def hashed_digits(rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Token ids (train, test) and labels (train, test): each digit as its 64 (pixel, value)
    features and 112 (pixel pair, values) crosses, hashed into ``rows`` embedding rows."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    values = data.data.astype(np.int64)  # 0..16
    grid = values.reshape(-1, 8, 8)
    features = [np.arange(64) * 17 + values]
    right = grid[:, :, :-1] * 17 + grid[:, :, 1:]
    down = grid[:, :-1, :] * 17 + grid[:, 1:, :]
    features.append(1088 + np.arange(56) * 289 + right.reshape(len(values), -1))
    features.append(1088 + 56 * 289 + np.arange(56) * 289 + down.reshape(len(values), -1))
    tokens = (np.concatenate(features, axis=1) * 2654435761 + 12345) % rows
    x_train, x_test, y_train, y_test = train_test_split(tokens, data.target, test_size=0.2, stratify=data.target,
                                                        random_state=0)
    return x_train, x_test, y_train, y_test


class HashedEmbeddingModel(nn.Module):
    """Summed embeddings of a digit's hashed features, then a linear head."""

    def __init__(self, rows: int):
        super().__init__()
        self.embedding = nn.EmbeddingBag(rows, DIM, mode="sum", sparse=True)
        self.head = nn.Linear(DIM, 10)
        with torch.no_grad():
            self.embedding.weight.normal_(0.0, 0.01)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(tokens))


class HashedDigits(Task):
    """digits through a hashed embedding table of (about) ``FEDQ_BENCH_PARAMETERS`` parameters."""

    def __init__(self):
        parameters = int(os.environ.get(PARAMETERS_VARIABLE, 500_000_000))
        self.rows = max(1, (parameters - (DIM * 10 + 10)) // DIM)

    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        return HashedEmbeddingModel(self.rows)

    def train(self, model: nn.Module, site: SiteContext) -> TrainResult:
        x_train, _, y_train, _ = hashed_digits(self.rows)
        tokens, labels = torch.from_numpy(x_train), torch.from_numpy(y_train)
        # Sparse gradients and plain SGD: training touches only the rows the data uses, with no
        # dense gradient or optimizer state the size of the table.
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        generator = torch.Generator().manual_seed(site.version)
        steps = EPOCHS * -(-len(labels) // BATCH_SIZE)
        for step in range(steps):
            batch = torch.randint(len(labels), (BATCH_SIZE,), generator=generator)
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(tokens[batch]), labels[batch]).backward()
            optimizer.step()
            site.progress((step + 1) / steps)
        return TrainResult(num_samples=len(labels))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        _, x_test, _, y_test = hashed_digits(self.rows)
        logits = model(torch.from_numpy(x_test))
        labels = torch.from_numpy(y_test)
        return {"accuracy": float((logits.argmax(1) == labels).float().mean()),
                "loss": float(nn.functional.cross_entropy(logits, labels))}


def _found(pattern: str, text: str, what: str) -> re.Match:
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"the run did not log {what}; see the logs printed above")
    return match


def _bare_read(url: str, chunks: int, attached, done) -> None:
    """The bare reader, in a process of its own as a site is: every chunk from the stream's start."""
    link = transport.connect(url, 60, "bare-reader")
    got: list[int] = []

    def on_message(ch, method, properties, chunk):
        got.append(len(chunk))
        ch.basic_ack(method.delivery_tag)

    reader = link.channel()
    reader.basic_qos(prefetch_count=min(16, chunks))
    reader.basic_consume("bare", on_message, arguments={"x-stream-offset": "first"})
    attached.set()
    link.serve_until(lambda: len(got) >= chunks, timeout=600)
    done.put((time.time(), sum(got)))
    link.close()


def bare_stream(broker, size: int) -> dict[str, float]:
    """pika alone on the same broker, as the twin of the snapshot's legs: ``size`` bytes in chunks of
    fedq's size, published persistent with a confirm each (pika's BlockingChannel in confirm mode) to
    a fresh stream declared as fedq.snapshots is, while a reader process with a site's prefetch takes
    them from the stream's start and only acknowledges them. Like a site, which is told of a snapshot
    before its chunks go out, the reader reads while they are written: "read" is the time from the
    first publish to the last chunk read. No encoding, digest or decoding."""
    body = os.urandom(MAX_CHUNK_BYTES)
    chunks = chunk_count(size, MAX_CHUNK_BYTES)
    last = size - (chunks - 1) * MAX_CHUNK_BYTES
    arguments = next(q["arguments"] for q in vhost_definitions(DEFAULT_CONFIG_DIR)["queues"]
                     if q["name"] == transport.SNAPSHOTS)
    context = multiprocessing.get_context("spawn")
    with broker.temporary_vhost(f"bare-{os.getpid()}-{time.monotonic_ns()}") as url:
        publisher = transport.connect(url, 60, "bare-publisher")
        channel = publisher.channel()
        channel.queue_declare("bare", durable=True, arguments=arguments)
        attached, done = context.Event(), context.Queue()
        reader = context.Process(target=_bare_read, args=(url, chunks, attached, done), daemon=True)
        reader.start()
        if not attached.wait(60):
            raise RuntimeError("the bare reader did not attach to the stream within 60 s")
        channel.confirm_delivery()
        properties = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
        began, began_wall = time.monotonic(), time.time()
        for index in range(chunks):
            channel.basic_publish("", "bare", body if index < chunks - 1 else body[:last], properties)
        published = time.monotonic() - began
        publisher.close()
        read_at, got = done.get(timeout=600)
        reader.join(30)
    if got != size:
        raise RuntimeError(f"the bare reader got {got} of {size} bytes")
    return {"publish": round(published, 4), "read": round(read_at - began_wall, 4)}


def run(parameters: int, codec: str, fraction: float, timeout: float) -> dict:
    task = "benchmarks.large_model:HashedDigits"
    os.environ[PARAMETERS_VARIABLE] = str(parameters)
    model_bytes = (HashedDigits().rows * DIM + DIM * 10 + 10) * 4
    broker = find_broker()
    try:
        with tempfile.TemporaryDirectory(prefix="fedq-large-") as folder:
            run_dir = Path(folder) / "run"
            site_log = run_dir / "sites" / "site-0.log"
            started = time.monotonic()
            coordinator = start_coordinator(broker.url(), run_dir, task=task, strategy="fedasync", max_versions=1,
                                            wait_for_sites=1, metrics_port="")
            worker = start_worker(broker.url(), "site-0", site_log, task=task, codec=codec, topk_fraction=fraction,
                                  error_feedback=False, max_tasks=1, torch_threads=2)
            try:
                for process, who in ((worker, "worker"), (coordinator, "coordinator")):
                    remaining = timeout - (time.monotonic() - started)
                    if process.wait(timeout=max(1.0, remaining)) != 0:
                        raise RuntimeError(f"the {who} exited with {process.returncode}")
            finally:
                for process in (coordinator, worker):
                    if process.poll() is None:
                        process.kill()
                coordinator_log = (run_dir / "coordinator.log").read_text()
                worker_log = site_log.read_text() if site_log.exists() else ""
                if coordinator.returncode or worker.returncode:
                    print(coordinator_log[-3000:], worker_log[-3000:], sep="\n", file=sys.stderr)
            summary = json.loads((run_dir / "summary.json").read_text())
            run_events = read_events(run_dir)
        snapshot = next(e for e in run_events if e["event"] == "snapshot" and e["version"] == 0)
        bare = bare_stream(broker, snapshot["bytes"])
    finally:
        broker.close()
    update = next(e for e in run_events if e["event"] == "update")
    fetched = _found(r"snapshot version 0 \((\d+) bytes\) in ([\d.]+) s", worker_log, "the snapshot fetch")
    trained = _found(r"trained on version 0 \(\d+ samples\) in ([\d.]+) s; update \w+: (\d+) bytes .*"
                     r"encoded and stored in ([\d.]+) s", worker_log, "the training")
    uploaded = _found(r"confirmed by the broker \([\d.]+ MB in ([\d.]+) s\)", worker_log, "the upload")
    worker_peak = float(_found(r"peak resident memory ([\d.]+) GB", worker_log, "its peak memory").group(1)) * 1e9
    budget = 2 * model_bytes + 512 * 2**20
    return {
        "parameters": model_bytes // 4, "model_bytes": model_bytes, "codec": codec, "topk_fraction": fraction,
        "snapshot_bytes": snapshot["bytes"], "update_bytes": int(trained.group(2)),
        "legs_seconds": {
            PUBLISH: snapshot["seconds"],
            FETCH: float(fetched.group(2)),
            "site trains": float(trained.group(1)),
            "site encodes the update and stores it in its outbox": float(trained.group(3)),
            "site uploads the update (confirmed)": float(uploaded.group(1)),
            "coordinator receives, decodes, validates and applies it": update["ingest_seconds"],
        },
        "bare_seconds": bare,
        "final_accuracy": summary["final_accuracy"],
        "peak_resident_bytes": {"coordinator": summary["peak_resident_bytes"], "worker": int(worker_peak)},
        "budget_bytes": budget,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parameters", type=int, default=500_000_000)
    parser.add_argument("--codec", default="topk-int8")
    parser.add_argument("--topk-fraction", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=3, help="runs, each with its bare twin (medians are reported)")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    runs = []
    for repeat in range(1, args.repeats + 1):
        runs.append(run(args.parameters, args.codec, args.topk_fraction, args.timeout))
        fedq, bare = runs[-1]["legs_seconds"], runs[-1]["bare_seconds"]
        print(f"run {repeat} of {args.repeats}: publish {fedq[PUBLISH]:.2f} s (bare {bare['publish']:.2f} s), "
              f"fetch {fedq[FETCH]:.2f} s (bare read {bare['read']:.2f} s)", flush=True)
    result = {key: value for key, value in runs[0].items() if key not in ("legs_seconds", "bare_seconds")}
    result["legs_seconds"] = {leg: statistics.median([r["legs_seconds"][leg] for r in runs]) for leg in runs[0]["legs_seconds"]}
    result["bare_seconds"] = {leg: statistics.median([r["bare_seconds"][leg] for r in runs]) for leg in runs[0]["bare_seconds"]}
    # Throughput against bare's, run by run (each fedq run and its twin shared the broker's state).
    result["of_bare"] = {
        "publish": statistics.median([r["bare_seconds"]["publish"] / r["legs_seconds"][PUBLISH] for r in runs]),
        "fetch": statistics.median([r["bare_seconds"]["read"] / r["legs_seconds"][FETCH] for r in runs]),
    }
    result["peak_resident_bytes"] = {who: max(r["peak_resident_bytes"][who] for r in runs)
                                     for who in runs[0]["peak_resident_bytes"]}
    result["runs"] = runs
    args.out.mkdir(parents=True, exist_ok=True)
    name = "large_model.json" if args.parameters == 500_000_000 else f"large_model_{args.parameters}.json"
    (args.out / name).write_text(json.dumps({"benchmark": "large model", **result}, indent=1))
    model_gb = result["model_bytes"] / 1e9
    print(f"large model: {result['parameters']:,} parameters ({model_gb:.2f} GB fp32), snapshot "
          f"{result['snapshot_bytes'] / 1e9:.2f} GB, update {result['update_bytes'] / 1e6:.1f} MB ({args.codec}); "
          f"medians of {len(runs)}")
    twins = {PUBLISH: ("publish", "bare pika publish, a confirm per chunk"),
             FETCH: ("read", "bare pika read of the stream, as it is written")}
    for leg, seconds in result["legs_seconds"].items():
        print(f"  {leg:58s} {seconds:7.2f} s")
        if leg in twins:
            key, what = twins[leg]
            share = result["of_bare"]["publish" if key == "publish" else "fetch"]
            print(f"    {what:56s} {result['bare_seconds'][key]:7.2f} s: fedq at {share:.0%} of bare's throughput "
                  f"(target 80%)")
    within = True
    for process, peak in result["peak_resident_bytes"].items():
        ok = peak < result["budget_bytes"]
        within &= ok
        print(f"  peak resident memory, {process:11s} {peak / 1e9:5.2f} GB = {peak / result['model_bytes']:.2f}x the model "
              f"(budget 2x + 512 MB = {result['budget_bytes'] / 1e9:.2f} GB: {'within' if ok else 'OVER'})")
    print(f"  accuracy after the one update: {result['final_accuracy']:.4f}")
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())

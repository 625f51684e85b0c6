"""broker throughput: fedq's update ingest and snapshot fan-out against a bare pika loop, same broker, same run.

Every fedq measurement has a bare twin that moves the same messages (the same payload bytes, cut into
chunks of the same sizes and count) through the same kind of queue on the same broker, with a pika
publish -> consume loop that does nothing else. Bare and fedq runs alternate, each in a fresh vhost.
Throughput is payload bytes per second (MB = 10^6 bytes); the table shows medians and the ratio
fedq / bare, against a target of 0.70.

(a) Update ingest, for models of 1M and 25M float32 parameters, dense (fp32) and compressed
    (topk-int8, 1%). A publisher process publishes M updates exactly as a worker does: UpdateHeader
    payloads, chunked by shared.transport.publish_payload on a confirming channel, as the broker's user.
    Each update is its own random delta, encoded before the clock starts (sites send different
    updates; the same one M times would find its positions of the sum still in cache). M is 100
    updates of 1M parameters or 5 of 25M (400 and 500 MB dense). The compressed cases send 1000 and
    100 updates (about 22 and 55 MB), so that the interval is long enough to time and one-off costs
    do not dominate (with 50 of 25M, 0.15 s, medians of 5 ranged from 0.69 to 0.86 of bare for the
    same code).
    fedq: the coordinator runs on a thread of this process with its default settings (FedBuff with
    a buffer larger than M, so no version is published and the interval is ingest only: receive,
    reassemble, verify, decode, validate, decompress, accumulate, with the checkpoints fedq takes
    before it acknowledges). It checkpoints when 112 deliveries wait for their acknowledgement:
    twice in the 120 chunks of the dense 25M case, 8 times in the 1M top-k case, never in the 100
    one-chunk updates of the 25M top-k case (a checkpoint there writes the 100 MB running sum).
    The publisher starts once the coordinator's start-up snapshot (version 0) is all in the
    stream, so the interval holds no snapshot traffic.
    Clock: the publisher's first publish to the moment the coordinator has applied all M and all
    of them are in FedBuff's running sum (sparse deltas may be added on a thread of their own;
    once all M are applied, this thread reads the sum, which waits for any still queued).
    bare: the same publisher process and payloads into a fresh quorum queue declared like
    fedq.updates; a pika consumer here (the coordinator's default prefetch, 128) acks each message.
    Clock: the first publish to the last message consumed.

(b) Snapshot fan-out of a 25M-parameter (100 MB) model to 8 sites.
    fedq: 8 reader processes, each a worker.site.SiteWorker on the same model, declare their
    announcement queues and wait; then the coordinator starts and publishes version 0 (fp32) to the
    fedq.snapshots stream and announces it. Each reader takes the announcement with the worker's own
    handler and reads the snapshot with the worker's own SiteWorker.fetch_snapshot (attach at the
    announced time, reassemble, verify the digest, decode against the layout, check names and shapes).
    Clock: the start of the coordinator's snapshot publish to the last reader holding decoded tensors.
    bare: the same chunks (bytes and headers) published from here with confirms to a fresh stream
    declared like fedq.snapshots, while 8 reader processes consume it from "first" with prefetch 16
    (the worker's) and ack each message. Clock: the first publish to the last reader's last message.
    Both sides read while the publisher writes: the coordinator announces a version before it writes
    its chunks. The fedq interval also holds the coordinator's encoding and digest of the model
    (publish and slowest read are both in the JSON).
    Bytes: 8 x the snapshot payload on both sides.

Just before each clock starts, on both sides, this process writes and frees 2 GiB, so that what the
interval allocates comes from memory the kernel has just freed (see recycle_free_memory: on a
virtual machine that hands idle memory back to its host, first writes to such memory otherwise
cost whichever side meets them about ten times as much).

    python benchmarks/broker_throughput.py [--repeats 3]
    python benchmarks/broker_throughput.py --quick     # 1M ingest cases and a 20 MB fan-out, once
    python benchmarks/broker_throughput.py --case "ingest 25M topk-int8" --repeats 5   # one case

Starts a throwaway broker with fedq.local_broker.find_broker(). Writes
benchmarks/results/broker_throughput.json (every run and the medians; --quick writes
broker_throughput.quick.json instead, --case broker_throughput.case.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import queue
import secrets
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import pika
import torch
from torch import nn

from coordinator.server import Coordinator
from shared import transport
from shared.chunking import SITE_HEADER, chunk_count, iter_chunks
from shared.codecs import encode_tensors, get_codec
from shared.protocol import (
    MAX_CHUNK_BYTES,
    PROTOCOL_VERSION,
    SnapshotHeader,
    UpdateHeader,
    encode_payload,
    new_id,
    now,
    payload_size,
)
from coordinator.settings import CoordinatorSettings
from shared.settings import load_settings
from worker.settings import WorkerSettings
from shared.task import Task
from shared.model_state import trained_state
from shared.transport.stream import PREFETCH as STREAM_PREFETCH
from worker.site import SiteWorker

RESULTS = Path(__file__).parent / "results"
TARGET_RATIO = 0.70
TOPK_FRACTION = 0.01
LAYER_WIDTH = 1000
SITE = "bench-site"
# The bare ingest consumer takes as many messages at once as the coordinator does by default.
INGEST_PREFETCH = CoordinatorSettings.model_fields["prefetch"].default
BARE_UPDATES = "bench.bare.updates"  # exchange and quorum queue of the bare ingest loop
BARE_SNAPSHOTS = "bench.bare.snapshots"  # exchange and stream of the bare fan-out loop
MEASUREMENT_TIMEOUT = 600.0
# How often this thread checks on the coordinator and the helpers while it waits: coarse enough not
# to take the GIL from the coordinator's thread. The ingest clock stops on an event, not on a look.
POLL_SECONDS = 0.01
# More than any measured interval allocates: 8 sites' 100 MB buffers and decoded tensors, the
# broker's 500 MB of log for the 25M fp32 ingest (see recycle_free_memory).
RECYCLE_BYTES = 2 << 30
SPAWN = multiprocessing.get_context("spawn")


class LinearStack(Task):
    """A stack of bias-free linear layers, 1000 wide, with exactly ``parameters`` float32 values."""

    def __init__(self, parameters: int):
        if parameters <= 0 or parameters % LAYER_WIDTH:
            raise ValueError(f"parameters must be a positive multiple of {LAYER_WIDTH}, got {parameters}")
        self.parameters = parameters

    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        rows = self.parameters // LAYER_WIDTH
        layers = [nn.Linear(LAYER_WIDTH, LAYER_WIDTH, bias=False) for _ in range(rows // LAYER_WIDTH)]
        if rows % LAYER_WIDTH:
            layers.append(nn.Linear(LAYER_WIDTH, rows % LAYER_WIDTH, bias=False))
        return nn.Sequential(*layers)

    def train(self, model, site):
        raise NotImplementedError("the broker throughput benchmark never trains")

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        # Runs once per version on the coordinator's thread, so it must cost next to nothing.
        return {"accuracy": 0.0, "loss": float(model[0].weight.detach().norm())}


@dataclass(frozen=True)
class IngestCase:
    label: str
    parameters: int
    codec: str
    updates: int


@dataclass(frozen=True)
class FanoutCase:
    label: str
    parameters: int
    sites: int


INGEST_CASES = [
    IngestCase("ingest 1M fp32", 1_000_000, "fp32", 100),
    IngestCase("ingest 1M topk-int8", 1_000_000, "topk-int8", 1000),
    IngestCase("ingest 25M fp32", 25_000_000, "fp32", 5),
    IngestCase("ingest 25M topk-int8", 25_000_000, "topk-int8", 100),
]
FANOUT_CASE = FanoutCase("fan-out 100 MB to 8 sites", 25_000_000, 8)
QUICK_FANOUT_CASE = FanoutCase("fan-out 20 MB to 8 sites", 5_000_000, 8)


# -- helper processes ------------------------------------------------------------------------------


class Helpers:
    """The processes one measurement starts, the queue they report on, and the signal that starts them.

    A helper reports tuples: ("ready", ...) once set up, ("done", ...) with its times, or
    ("error", traceback) before it exits with the exception. A helper that is done stays idle until
    the measurement is over: a Python process with PyTorch and a model takes a few hundred
    milliseconds of CPU to exit, which would be taken from whatever is still being measured.
    """

    def __init__(self):
        self.reports = SPAWN.Queue()
        self.go = SPAWN.Event()
        self.over = SPAWN.Event()
        self.processes: list[multiprocessing.process.BaseProcess] = []

    def start(self, target: Callable[..., None], *args: Any) -> None:
        """Start ``target(*args, reports)`` in a fresh interpreter."""
        process = SPAWN.Process(target=_run_helper, args=(target, args, self.reports, self.over), daemon=True)
        process.start()
        self.processes.append(process)

    def collect(self, kind: str, count: int, deadline: float) -> list[tuple]:
        """Wait for ``count`` reports of ``kind`` and return their fields."""
        found = []
        while len(found) < count:
            try:
                report = self.reports.get(timeout=0.5)
            except queue.Empty:
                self.check(deadline)
                continue
            if report[0] == "error":
                raise RuntimeError(f"a helper process failed:\n{report[1]}")
            if report[0] != kind:
                raise RuntimeError(f"expected a {kind!r} report from a helper, got {report!r}")
            found.append(report[1:])
        return found

    def check(self, deadline: float) -> None:
        """Raise if a helper died or the measurement ran out of time."""
        for process in self.processes:
            if process.exitcode not in (None, 0):
                raise RuntimeError(f"helper process {process.pid} exited with code {process.exitcode} "
                                   "(its traceback is printed above)")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the measurement did not finish within {MEASUREMENT_TIMEOUT:.0f} s")

    def __enter__(self) -> "Helpers":
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        self.over.set()
        # After a failure nobody waits for the helpers' reports: stop them soon.
        for process in self.processes:
            process.join(timeout=5 if exc_type else 30)
            if process.is_alive():
                process.terminate()
                process.join()
        self.reports.close()


def _run_helper(target: Callable[..., None], args: tuple, reports, over) -> None:
    """A helper process's entry point: run ``target``, then wait for the measurement to be over; on
    failure, report the traceback and exit with the error."""
    try:
        target(*args, reports)
    except BaseException:
        reports.put(("error", traceback.format_exc()))
        raise
    over.wait(MEASUREMENT_TIMEOUT)


def _update_payloads(parameters: int, codec: str, count: int, run_id: str, base_version: int) -> list[tuple[str, list[memoryview]]]:
    """``count`` updates (id, payload buffers), each of its own random delta, as ``count`` sites
    would send: identical deltas would let a coordinator's sum find the same positions in cache."""
    tensors = trained_state(LinearStack(parameters).build_model())
    generator = torch.Generator().manual_seed(1)
    encoder = get_codec(codec, TOPK_FRACTION)
    payloads = []
    for _ in range(count):
        delta = {name: torch.randn(t.shape, generator=generator) * 0.01 for name, t in tensors.items()}
        specs, parts = encode_tensors(delta, encoder)
        header = UpdateHeader(protocol=PROTOCOL_VERSION, update_id=new_id(), run_id=run_id, site=SITE,
                              base_version=base_version, num_samples=10, train_seconds=0.0, tensors=specs)
        payloads.append((header.update_id, encode_payload(header, parts)))
    return payloads


def publish_updates(url: str, exchange: str, routing_key: str, parameters: int, codec: str, count: int,
                    run_id: str, base_version: int, go, reports) -> None:
    """Helper process: publish M updates as a worker does, from the first publish after ``go``.
    Reports ("ready", payload bytes, chunks), then ("done", first publish, last confirm)."""
    payloads = _update_payloads(parameters, codec, count, run_id, base_version)
    sizes = [payload_size(buffers) for _, buffers in payloads]
    connection = transport.connect(url, 30, "bench-publisher")
    channel = transport.confirmed_channel(connection)
    user = transport.broker_user(url)
    reports.put(("ready", sum(sizes), sum(chunk_count(size, MAX_CHUNK_BYTES) for size in sizes)))
    go.wait()
    started = time.time()
    for update_id, buffers in payloads:
        transport.publish_payload(channel, exchange, routing_key, buffers, update_id, user_id=user,
                                  headers={SITE_HEADER: SITE})
    reports.put(("done", started, time.time()))
    connection.close()


def read_snapshot_as_worker(url: str, site: str, parameters: int, state_dir: Path, reports) -> None:
    """Helper process: a site worker that reads the first announced snapshot with the worker's own
    code. Reports ("ready",) once its queue is declared, then ("done", announcement heard, tensors
    decoded, payload bytes)."""
    # Eight readers share two cores here; one thread each, as fedq.federation runs workers.
    torch.set_num_threads(1)
    settings = load_settings(WorkerSettings, broker_url=url, site=site, state_dir=state_dir)
    worker = SiteWorker(settings, LinearStack(parameters))
    connection = transport.connect(url, settings.heartbeat, f"bench-reader-{site}")
    transport.bind_site_queue(connection.channel(), site)  # a worker's hello would have the coordinator do it
    transport.Announcements(connection, site, worker.on_announcement)
    reports.put(("ready",))
    deadline = time.monotonic() + MEASUREMENT_TIMEOUT
    while worker.announcement is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"site {site} heard no announcement within {MEASUREMENT_TIMEOUT:.0f} s")
        connection.serve(0.5)
    announcement = worker.announcement
    announced = time.time()
    if not worker.fetch_snapshot(connection, announcement):
        raise RuntimeError(f"site {site} could not use snapshot version {announcement.version} (its log line says why)")
    done = time.time()
    if worker.base is None or worker.base_version != announcement.version:
        raise RuntimeError(f"site {site} holds version {worker.base_version}, not the announced {announcement.version}")
    reports.put(("done", announced, done, announcement.size))
    connection.close()


def consume_counting(channel, queue: str, prefetch: int, arguments: dict | None = None) -> tuple[str, dict[str, int]]:
    """A bare consumer: it acks each message and counts messages and bytes, nothing else.
    Returns the consumer tag and the live counts."""
    channel.basic_qos(prefetch_count=prefetch)
    counts = {"messages": 0, "bytes": 0}

    def on_message(ch, method, properties, body):
        ch.basic_ack(method.delivery_tag)
        counts["messages"] += 1
        counts["bytes"] += len(body)

    return channel.basic_consume(queue, on_message, arguments=arguments), counts


def consume_stream_bare(url: str, stream: str, chunks: int, reports) -> None:
    """Helper process: consume a whole stream from its first message, acking each and nothing else.
    Reports ("ready",) once attached, then ("done", last message consumed, bytes)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    tag, received = consume_counting(channel, stream, STREAM_PREFETCH, {"x-stream-offset": "first"})
    reports.put(("ready",))
    deadline = time.monotonic() + MEASUREMENT_TIMEOUT
    while received["messages"] < chunks:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{received['messages']} of {chunks} messages arrived within {MEASUREMENT_TIMEOUT:.0f} s")
        connection.process_data_events(time_limit=0.5)
    reports.put(("done", time.time(), received["bytes"]))
    transport.cancel_stream_consumer(channel, tag)
    connection.close()


# -- the coordinator on a thread ---------------------------------------------------------------------


class CoordinatorThread:
    """A coordinator serving on a thread of this process (as tests/federation_helpers runs it) until the block ends."""

    def __init__(self, coordinator: Coordinator):
        self.coordinator = coordinator
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, name="coordinator", daemon=True)

    def _serve(self) -> None:
        try:
            self.coordinator.run()
        except BaseException as exc:
            self.error = exc

    def check(self) -> None:
        if not self.thread.is_alive():
            raise RuntimeError("the coordinator stopped during the measurement") from self.error

    def __enter__(self) -> "CoordinatorThread":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.coordinator.stop("benchmark measurement finished")
        self.thread.join(120)
        if self.error is not None and exc_info[0] is None:
            raise RuntimeError("the coordinator failed") from self.error


def make_coordinator(url: str, run_dir: Path, parameters: int, **settings: Any) -> Coordinator:
    config = load_settings(
        CoordinatorSettings, broker_url=url, run_dir=run_dir, task="benchmarks/broker_throughput.py:LinearStack",
        # torch_threads is left to PyTorch (one per core), as a deployed coordinator runs.
        strategy="fedbuff", metrics_port="",  # "" turns the endpoint off; None would mean "the default port"
        **settings,
    )
    return Coordinator(config, LinearStack(parameters))


def wait_until(predicate: Callable[[], bool], deadline: float, *checks: Callable[[], None]) -> None:
    while not predicate():
        for check in checks:
            check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the measurement did not finish within {MEASUREMENT_TIMEOUT:.0f} s")
        time.sleep(POLL_SECONDS)


def fresh_vhost(broker):
    """A new vhost with broker_config's definitions loaded, for one measurement; its AMQP URL."""
    return broker.temporary_vhost(f"throughput-{secrets.token_hex(4)}")


def declare_bare_twin(channel, name: str, like: str, routing_key: str) -> None:
    """An exchange and queue called ``name``, the queue declared with fedq's arguments for ``like``."""
    channel.exchange_declare(name, "direct", durable=True)
    channel.queue_declare(name, durable=True, arguments=transport.QUEUES[like])
    channel.queue_bind(name, name, routing_key=routing_key)


def recycle_free_memory() -> None:
    """Touch and free RECYCLE_BYTES of memory, so that what the measured interval allocates (the
    broker's page cache, the processes' buffers) comes from pages the kernel has just freed.

    A virtual machine may hand memory the guest has kept free for a while back to its host; the
    guest's first write to such a page costs a trip to the host. On the machine these figures
    come from, dd wrote 500 MB into the page cache in 0.70 s on such pages and 0.075 s on pages
    freed a moment before. Which side of a comparison met them depended on what the previous
    measurement had freed: in fedq runs the broker spent 4 times the CPU on its quorum-queue log
    writes (copy_folio_from_iter_atomic, by perf), in bare runs it did not. Every measurement of
    both sides starts from here.
    """
    torch.ones(RECYCLE_BYTES, dtype=torch.uint8)


def _result(side: str, started: float, ended: float, size: int, **details: Any) -> dict[str, Any]:
    seconds = ended - started
    return {"side": side, "seconds": round(seconds, 4), "bytes": size, "mb_per_s": size / seconds / 1e6,
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in details.items()}}


# -- (a) update ingest ------------------------------------------------------------------------------------


def ingest_bare(broker, case: IngestCase) -> dict[str, Any]:
    with fresh_vhost(broker) as url, Helpers() as helpers:
        deadline = time.monotonic() + MEASUREMENT_TIMEOUT
        connection = pika.BlockingConnection(pika.URLParameters(url))
        try:
            channel = connection.channel()
            declare_bare_twin(channel, BARE_UPDATES, transport.UPDATES, transport.LOBBY_KEY)
            _, consumed = consume_counting(channel, BARE_UPDATES, INGEST_PREFETCH)
            helpers.start(publish_updates, url, BARE_UPDATES, transport.LOBBY_KEY, case.parameters, case.codec,
                          case.updates, new_id(), 0, helpers.go)
            [(size, chunks)] = helpers.collect("ready", 1, deadline)
            recycle_free_memory()
            helpers.go.set()
            while consumed["messages"] < chunks:
                helpers.check(deadline)
                connection.process_data_events(time_limit=0.5)
            ended = time.time()
        finally:
            connection.close()
        [(started, confirmed)] = helpers.collect("done", 1, deadline)
    if consumed["bytes"] != size:
        raise RuntimeError(f"the bare consumer got {consumed['bytes']} bytes, the publisher sent {size}")
    return _result("bare", started, ended, size, messages=chunks, publish_seconds=confirmed - started)


def ingest_fedq(broker, case: IngestCase) -> dict[str, Any]:
    with fresh_vhost(broker) as url, tempfile.TemporaryDirectory() as run_dir, Helpers() as helpers:
        deadline = time.monotonic() + MEASUREMENT_TIMEOUT
        # A buffer one larger than M: every update is accumulated and none makes a new version.
        coordinator = make_coordinator(url, Path(run_dir), case.parameters, buffer_size=case.updates + 1)
        with CoordinatorThread(coordinator) as serving:
            # Version 0 is announced before its chunks are written: the clock starts once they are all
            # in the stream, or it would time the tail of the start-up snapshot as ingest.
            wait_until(lambda: coordinator.runlog.bytes_out > 0, deadline, serving.check)
            # The clock stops the moment the M-th update is counted, not at this thread's next poll:
            # wrapping the run log's counter on this instance signals it without touching fedq's code.
            all_applied = threading.Event()
            count_applied = coordinator.runlog.applied_update

            def applied_update(*args: Any) -> None:
                count_applied(*args)
                if coordinator.runlog.applied >= case.updates:
                    all_applied.set()

            coordinator.runlog.applied_update = applied_update
            helpers.start(publish_updates, url, transport.UPDATE_EXCHANGE, transport.LOBBY_KEY, case.parameters, case.codec,
                          case.updates, coordinator.run_id, coordinator.version, helpers.go)
            [(size, chunks)] = helpers.collect("ready", 1, deadline)
            recycle_free_memory()
            helpers.go.set()

            while not all_applied.wait(POLL_SECONDS):
                serving.check()
                helpers.check(deadline)
                if coordinator.runlog.rejected or coordinator.runlog.dropped:
                    raise RuntimeError("the coordinator refused or dropped an update (its warning above says why)")
            # FedBuff may still hold sparse deltas queued for its sum; reading the sum folds them in,
            # as the buffer's next version or the next checkpoint would.
            coordinator.strategy.sum
            ended = time.time()
            [(started, confirmed)] = helpers.collect("done", 1, deadline)
            received = sum(coordinator.runlog.bytes_in.values())
            buffered = len(coordinator.strategy.sites)
    if received != size or buffered != case.updates:
        raise RuntimeError(f"the coordinator took {received} of {size} bytes and buffers {buffered} of {case.updates} updates")
    return _result("fedq", started, ended, size, messages=chunks, publish_seconds=confirmed - started)


# -- (b) snapshot fan-out --------------------------------------------------------------------------------


def snapshot_chunks(parameters: int) -> list[tuple[pika.BasicProperties, bytes]]:
    """A real snapshot of the model, cut and labelled as shared.transport.publish_payload does, for the bare loop."""
    tensors = trained_state(LinearStack(parameters).build_model())
    specs, parts = encode_tensors(tensors, get_codec("fp32"))
    header = SnapshotHeader(protocol=PROTOCOL_VERSION, run_id=new_id(), version=0, created_at=now(), tensors=specs)
    payload_id = new_id()
    return [
        (pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent, headers=info.to_headers(),
                              message_id=f"{payload_id}:{info.index}", content_type="application/x-fedq"), body)
        for info, body in iter_chunks(encode_payload(header, parts), payload_id)
    ]


def fanout_bare(broker, case: FanoutCase, chunks: list[tuple[pika.BasicProperties, bytes]]) -> dict[str, Any]:
    with fresh_vhost(broker) as url, Helpers() as helpers:
        deadline = time.monotonic() + MEASUREMENT_TIMEOUT
        connection = pika.BlockingConnection(pika.URLParameters(url))
        try:
            channel = connection.channel()
            declare_bare_twin(channel, BARE_SNAPSHOTS, transport.SNAPSHOTS, transport.SNAPSHOT_KEY)
            channel.confirm_delivery()
            for _ in range(case.sites):
                helpers.start(consume_stream_bare, url, BARE_SNAPSHOTS, len(chunks))
            helpers.collect("ready", case.sites, deadline)
            recycle_free_memory()
            started = time.time()
            for properties, body in chunks:
                channel.basic_publish(BARE_SNAPSHOTS, transport.SNAPSHOT_KEY, body, properties, mandatory=True)
            published = time.time()
        finally:
            connection.close()
        done = helpers.collect("done", case.sites, deadline)
    size = sum(len(body) for _, body in chunks)
    if any(received != size for _, received in done):
        raise RuntimeError(f"a bare reader got {[r for _, r in done]} bytes, not {size} each")
    return _result("bare", started, max(t for t, _ in done), case.sites * size, payload_bytes=size,
                   messages=len(chunks), publish_seconds=published - started)


def fanout_fedq(broker, case: FanoutCase) -> dict[str, Any]:
    with fresh_vhost(broker) as url, tempfile.TemporaryDirectory() as scratch, Helpers() as helpers:
        deadline = time.monotonic() + MEASUREMENT_TIMEOUT
        scratch = Path(scratch)
        # Readers first: their queues must exist before the coordinator announces version 0.
        for i in range(case.sites):
            helpers.start(read_snapshot_as_worker, url, f"site-{i}", case.parameters, scratch / "sites")
        helpers.collect("ready", case.sites, deadline)
        coordinator = make_coordinator(url, scratch / "run", case.parameters)
        # The coordinator's own first publish is the one timed; wrapping it on this instance records
        # when it starts and ends without touching the coordinator's code.
        publish_times: list[tuple[float, float]] = []
        publish_snapshot = coordinator._publish_snapshot

        def timed_publish_snapshot() -> None:
            started = time.time()
            publish_snapshot()
            publish_times.append((started, time.time()))

        coordinator._publish_snapshot = timed_publish_snapshot
        recycle_free_memory()
        with CoordinatorThread(coordinator) as serving:
            done = helpers.collect("done", case.sites, deadline)
            serving.check()
    [(started, published), *_] = publish_times
    ended = max(d for _, d, _ in done)
    size = done[0][2]
    return _result("fedq", started, ended, case.sites * size, payload_bytes=size,
                   publish_seconds=published - started, last_announcement_heard=max(a for a, _, _ in done) - started,
                   slowest_read_seconds=max(d - a for a, d, _ in done))


# -- the run ------------------------------------------------------------------------------------------------


def summarize(case: IngestCase | FanoutCase, runs: list[dict[str, Any]]) -> dict[str, Any]:
    bare = statistics.median(r["mb_per_s"] for r in runs if r["side"] == "bare")
    fedq = statistics.median(r["mb_per_s"] for r in runs if r["side"] == "fedq")
    return {**asdict(case), "runs": runs, "median_bare_mb_per_s": bare,
            "median_fedq_mb_per_s": fedq, "ratio": fedq / bare}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side of each case (medians are reported)")
    parser.add_argument("--quick", action="store_true", help="the 1M ingest cases and a 20 MB fan-out, once, to check the script")
    parser.add_argument("--case", action="append", choices=[c.label for c in [*INGEST_CASES, FANOUT_CASE]],
                        help="measure only this case (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(asctime)s %(name)s %(message)s")
    from fedq.local_broker import find_broker

    repeats = 1 if args.quick else args.repeats
    ingest_cases = [c for c in INGEST_CASES if c.parameters == 1_000_000] if args.quick else INGEST_CASES
    fanout_case = QUICK_FANOUT_CASE if args.quick else FANOUT_CASE
    if args.case:
        ingest_cases = [c for c in ingest_cases if c.label in args.case]
        fanout_case = fanout_case if fanout_case.label in args.case else None
    kind = "quick" if args.quick else "case" if args.case else None
    out_file = args.out / (f"broker_throughput.{kind}.json" if kind else "broker_throughput.json")
    args.out.mkdir(parents=True, exist_ok=True)
    # Other work on the machine moves these numbers (everything shares its cores): record how busy it was.
    report: dict[str, Any] = {"benchmark": "broker throughput", "target_ratio": TARGET_RATIO, "repeats": repeats,
                              "quick": args.quick, "mb": 1_000_000, "cpus": os.cpu_count(),
                              "load_average_at_start": os.getloadavg(), "cases": []}

    def measure_case(case, sides: list[tuple[str, Callable[[], dict[str, Any]]]]) -> None:
        runs: list[dict[str, Any]] = []
        for repeat in range(repeats):
            for side, measure in sides:  # bare, fedq, bare, fedq ...: drift touches both alike
                result = measure()
                runs.append(result)
                print(f"{case.label:28s} run {repeat + 1}/{repeats} {side:4s}: {result['bytes'] / 1e6:7.1f} MB in "
                      f"{result['seconds']:6.2f} s = {result['mb_per_s']:7.1f} MB/s", flush=True)
        report["cases"].append(summarize(case, runs))
        report["load_average_at_end"] = os.getloadavg()
        out_file.write_text(json.dumps(report, indent=1))

    broker = find_broker()
    try:
        for case in ingest_cases:
            measure_case(case, [("bare", partial(ingest_bare, broker, case)), ("fedq", partial(ingest_fedq, broker, case))])
        if fanout_case is not None:
            chunks = snapshot_chunks(fanout_case.parameters)
            measure_case(fanout_case, [("bare", partial(fanout_bare, broker, fanout_case, chunks)),
                                       ("fedq", partial(fanout_fedq, broker, fanout_case))])
    finally:
        broker.close()

    print(f"\n{'case':28s} {'bare MB/s':>10s} {'fedq MB/s':>10s} {'ratio':>6s}")
    for row in report["cases"]:
        print(f"{row['label']:28s} {row['median_bare_mb_per_s']:10.1f} {row['median_fedq_mb_per_s']:10.1f} {row['ratio']:6.2f}")
    worst = min(report["cases"], key=lambda row: row["ratio"])
    print(f"broker throughput (medians of {repeats}): lowest ratio {worst['ratio']:.2f} in {worst['label']} "
          f"(target {TARGET_RATIO:.2f}); results in {out_file}")
    return 0 if worst["ratio"] >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())

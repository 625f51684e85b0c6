"""stream fan-out: what the broker alone costs to deliver one snapshot to N readers at once.

The reference for benchmarks/load_sites.py: N readers, each its own connection, attach to a
stream at its end; once all have attached, one message of ``--megabytes`` (a 1M-parameter
fp32 snapshot is 4 MB) is published with a confirm, and each reader takes it and leaves. Measured per N: time from the publish to each reader holding the bytes
(p50, p99, last), the broker's CPU seconds and peak memory over the fan-out, and MB delivered per
CPU second of the broker.

Three ways, on the same throwaway node (``rabbitmq_stream`` enabled beside
broker_config/'s plugins):

- ``amqp``: AMQP 0-9-1 with pika, as fedq's sites read (basic.consume with ``x-stream-offset``);
- ``fedq``: fedq's own ends over the same protocol: the coordinator's ``Publisher`` writes the
  snapshot to the fedq.snapshots stream at the offset it announces, and each reader is a worker's
  ``SnapshotReader`` (attach there, reassemble, check the digest), each on its own connection;
- ``stream``: RabbitMQ's own stream protocol with the ``rstream`` client, when it is installed
  (``pip install rstream``; fedq does not depend on it): the broker sends stored chunks without
  turning them into AMQP frames.

    python benchmarks/stream_fanout.py --readers 100 300 1000
    python benchmarks/stream_fanout.py --readers 50 --ways amqp        # a quick check

Writes benchmarks/results/stream_fanout.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pika

from benchmarks.load_sites import cpu_seconds, percentile, resident_bytes
from fedq.local_broker import (
    DEFAULT_CONFIG_DIR,
    DEV_PASSWORD,
    DEV_USER,
    DEV_VHOST,
    LocalNode,
    _free_port,
)
from shared import transport
from shared.chunking import chunk_count, payload_digest
from shared.protocol import MAX_CHUNK_BYTES, PROTOCOL_VERSION, Announcement, new_id

RESULTS = Path(__file__).parent / "results"


def stream_node(folder: Path) -> tuple[LocalNode, int]:
    """A throwaway node on broker_config/ with the stream protocol's listener too; and that port."""
    config = folder / "broker_config"
    shutil.copytree(DEFAULT_CONFIG_DIR, config)
    plugins = (config / "enabled_plugins").read_text().strip().rstrip("].")
    (config / "enabled_plugins").write_text(f"{plugins},rabbitmq_stream].\n")
    port = _free_port()
    with open(config / "rabbitmq.conf", "a") as conf:
        conf.write(f"\nstream.listeners.tcp.default = 127.0.0.1:{port}\n")
    node = LocalNode(config)
    node.start()
    return node, port


class Fanout:
    """One fan-out: readers attached, then the publish; ``took`` holds each reader's seconds."""

    def __init__(self, node: LocalNode, readers: int, body: bytes):
        self.url = f"amqp://{DEV_USER}:{DEV_PASSWORD}@127.0.0.1:{node.amqp_port}/{DEV_VHOST}"
        self.params = pika.URLParameters(self.url)
        self.node, self.readers, self.body = node, readers, body
        self.stream = self.declare_stream()
        self.attached = threading.Semaphore(0)
        self.published_at = 0.0
        self.took: list[float] = []
        self.attachments = 0  # fedq's readers: how many times they attached to the stream, all told

    def declare_stream(self) -> str:
        """A fresh stream for this fan-out; its name."""
        stream = f"fanout-{self.readers}-{time.time_ns()}"
        connection = pika.BlockingConnection(self.params)
        connection.channel().queue_declare(stream, durable=True, arguments={"x-queue-type": "stream"})
        connection.close()
        return stream

    def publish_when_attached(self) -> None:
        for _ in range(self.readers):
            self.attached.acquire()
        connection = pika.BlockingConnection(self.params)
        channel = connection.channel()
        channel.confirm_delivery()
        self.published_at = time.monotonic()
        channel.basic_publish("", self.stream, self.body)
        connection.close()

    def measure(self, read) -> dict:
        beam = self.node.beam_pid()
        cpu_before, memory = cpu_seconds(beam), []
        publisher = threading.Thread(target=self.publish_when_attached)
        publisher.start()
        sampling = True

        def sample():
            while sampling:
                memory.append(resident_bytes(beam))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        read(self)
        sampling = False
        publisher.join()
        cpu = cpu_seconds(beam) - cpu_before
        delivered = len(self.body) * len(self.took)
        return {"readers": self.readers, "received": len(self.took), "attachments": self.attachments or None,
                "p50": percentile(self.took, 0.5), "p99": percentile(self.took, 0.99), "last": max(self.took),
                "broker_cpu_seconds": round(cpu, 2), "broker_rss_peak": max(filter(None, memory), default=None),
                "mb_per_broker_cpu_second": round(delivered / 1e6 / cpu, 1) if cpu > 0 else None}


def each_on_a_thread(readers: int, reader) -> None:
    """Run ``reader(number)`` for each of ``readers`` on a thread of its own; wait for all."""
    threads = [threading.Thread(target=reader, args=(number,)) for number in range(readers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def read_amqp(fanout: Fanout) -> None:
    """Each reader a thread with its own pika connection, as a site has."""
    lock = threading.Lock()

    def reader(number: int):
        connection = pika.BlockingConnection(fanout.params)
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1)
        took: list[float] = []

        def on_message(channel, method, properties, body):
            took.append(time.monotonic() - fanout.published_at)
            channel.basic_ack(method.delivery_tag)

        # Returns once the broker confirmed the consumer, so the publish cannot come before it.
        channel.basic_consume(fanout.stream, on_message, arguments={"x-stream-offset": "next"})
        fanout.attached.release()
        while not took:
            connection.process_data_events(time_limit=1.0)
        with lock:
            fanout.took.extend(took)
        connection.close()

    each_on_a_thread(fanout.readers, reader)


class FedqFanout(Fanout):
    """The same fan-out through fedq's own ends: the coordinator's ``Publisher`` writes the snapshot
    to the fedq.snapshots stream at an offset it announces, and each reader is a worker's
    ``SnapshotReader`` (attach at the announced offset, reassemble, check the digest)."""

    def __init__(self, node: LocalNode, readers: int, body: bytes):
        super().__init__(node, readers, body)
        self.buffers = [memoryview(body)]
        self.link = transport.connect(self.url, 60, "fanout-coordinator")
        self.publisher = transport.Publisher(self.link)
        self.announcement = Announcement(
            protocol=PROTOCOL_VERSION, run_id=new_id(), version=1, payload_id=new_id(),
            chunks=chunk_count(len(body), MAX_CHUNK_BYTES), size=len(body), digest=payload_digest(self.buffers),
            published_at=time.time(), stream_offset=self.publisher.find_stream_end())

    def declare_stream(self) -> str:
        return transport.SNAPSHOTS  # broker_config's, in the vhost the node loads it into

    def publish_when_attached(self) -> None:
        for _ in range(self.readers):
            self.attached.acquire()
        self.published_at = time.monotonic()
        self.publisher.snapshot(self.buffers, self.announcement.payload_id, self.announcement.digest)
        time.sleep(transport.WAKE_AFTER_SECONDS)  # then, as the coordinator's loop would:
        self.publisher.wake_readers()
        self.publisher.confirmed.settle()
        self.link.close()


def read_fedq(fanout: FedqFanout) -> None:
    """Each reader a thread with its own connection, as a site has, reading as a worker does."""
    lock = threading.Lock()
    log = logging.getLogger("fedq.fanout")

    def reader(number: int):
        link = transport.connect(fanout.url, 60, f"fanout-site-{number}")
        fanout.attached.release()  # connected; the read attaches at once, as a site does on an announcement
        announcement = fanout.announcement
        read = transport.SnapshotReader(link, announcement, memoryview(bytearray(announcement.size)),
                                        newest=lambda: announcement, log=log, who=f"site-{number}")
        payload = read.read()
        took = time.monotonic() - fanout.published_at
        with lock:
            fanout.attachments += read.attachments
            if payload is not None:
                fanout.took.append(took)
        link.close()

    each_on_a_thread(fanout.readers, reader)


def read_stream(fanout: Fanout, port: int) -> None:
    """Each reader an rstream consumer with its own connection, on one event loop."""
    from rstream import Consumer, ConsumerOffsetSpecification, OffsetType, amqp_decoder

    async def reader():
        consumer = Consumer("127.0.0.1", port, username=DEV_USER, password=DEV_PASSWORD, vhost=DEV_VHOST)
        await consumer.start()
        got = asyncio.get_running_loop().create_future()

        async def on_message(message, context):
            if not got.done():
                got.set_result(time.monotonic() - fanout.published_at)

        await consumer.subscribe(fanout.stream, on_message, decoder=amqp_decoder,
                                 offset_specification=ConsumerOffsetSpecification(OffsetType.NEXT, None))
        running = asyncio.create_task(consumer.run())
        fanout.attached.release()
        fanout.took.append(await got)
        await consumer.close()
        running.cancel()

    async def all_readers():
        await asyncio.gather(*(reader() for _ in range(fanout.readers)))

    asyncio.run(all_readers())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readers", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--megabytes", type=float, default=4.0, help="the snapshot's size")
    parser.add_argument("--ways", default="amqp,fedq,stream", help="comma-separated, of: amqp, fedq, stream")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    ways = args.ways.split(",")
    if "stream" in ways:
        try:
            import rstream  # noqa: F401
        except ImportError:
            print("stream: skipped, rstream is not installed (pip install rstream)", flush=True)
            ways.remove("stream")
    body = os.urandom(int(args.megabytes * 1e6))
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedq-fanout-") as folder:
        node, port = stream_node(Path(folder))
        try:
            for readers in args.readers:
                for way in ways:
                    fanout = (FedqFanout if way == "fedq" else Fanout)(node, readers, body)
                    read = {"amqp": read_amqp, "fedq": read_fedq, "stream": lambda f: read_stream(f, port)}[way]
                    row = fanout.measure(read)
                    rows.append({"way": way, "megabytes": args.megabytes, **row})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            node.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stream_fanout.json").write_text(json.dumps(rows, indent=1))
    print("| readers | way | p50 / p99 / last | broker CPU | MB per broker CPU second | broker peak | attachments |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['readers']} | {r['way']} | {r['p50']:.2f} / {r['p99']:.2f} / {r['last']:.2f} s | "
              f"{r['broker_cpu_seconds']} s | {r['mb_per_broker_cpu_second']} | {(r['broker_rss_peak'] or 0) / 1e6:.0f} MB | "
              f"{r['attachments'] or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

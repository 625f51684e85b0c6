"""The worker process of one site: newest snapshot in, local training, update out. Outbound only.

The connection lives on the main thread and is serviced the whole time (pika answers heartbeats
only while its connection is driven); training runs on a second thread, so an hour of training
costs nothing on the wire. Announcements arrive on the site's latest-only queue; the snapshot they
name is read from the stream, verified, and trained on; the difference waits in the outbox until
the broker has confirmed it. Lost connections are re-made with backoff; no finished work is lost.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import numpy as np
import pika
import torch

from shared import amqp
from shared.chunking import ChunkInfo, Reassembly, read_single
from shared.codecs import Layout, decode_tensors, encode_tensors, get_codec
from shared.protocol import (
    PROTOCOL_VERSION,
    Announcement,
    Hello,
    ProtocolError,
    SnapshotHeader,
    UpdateHeader,
    decode_header,
    decode_payload,
    encode_payload,
    new_id,
    now,
    payload_size,
)
from shared.memory import peak_resident_bytes
from shared.settings import WorkerSettings
from shared.task import SiteContext, Task, TrainResult
from shared.validation import check_matches_model, float_state
from worker.error_feedback import ErrorFeedback
from worker.outbox import Outbox

log = logging.getLogger("fedq.worker")

SNAPSHOT_TIMEOUT = 300.0
# A snapshot read that hears nothing from the stream for this long, not a frame, attaches again.
# RabbitMQ 3.10's streams (osiris 1.3) can miss telling a reader of a chunk committed just as it
# attached: the reader would sit until the next write, which in synchronous rounds never comes
# (seen here: 4 of 600 reads in a loop that announced, then wrote; a FedAvg round stalled for
# good). Frames count, not whole messages: over a slow link one 4 MiB chunk takes many seconds.
STREAM_STALL_SECONDS = 1.0
SNAPSHOT_HEADER_ROOM = 1 << 20  # a snapshot's header and alignment, beyond its fp32 tensor bytes
HELLO_WAIT = 5.0
PROGRESS_EVERY = 5.0
_STREAM_PREFETCH = 16


class _Throttle:
    """Due at most once every PROGRESS_EVERY seconds: long work reports progress, short work stays quiet."""

    def __init__(self):
        self.last = time.monotonic()

    def due(self) -> bool:
        if time.monotonic() - self.last < PROGRESS_EVERY:
            return False
        self.last = time.monotonic()
        return True


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _warm_up_torch() -> None:
    """Pay PyTorch's one-off start-up cost (about a second of CPU for autograd and the optimizers)
    before joining, not inside the first round where every site would pay it at once."""
    scratch = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([scratch], lr=0.1)
    (scratch * 2).sum().backward()
    optimizer.step()


class SiteWorker:
    def __init__(self, settings: WorkerSettings, task: Task):
        self.settings = settings
        self.task = task
        self.model = task.build_model()
        self.params = float_state(self.model)
        self.layout = Layout.of(self.params)
        self.user = amqp.broker_user(settings.broker_url)
        self.announcement: Announcement | None = None
        self.base: dict[str, torch.Tensor] | None = None
        self.base_version: int | None = None
        self.base_run: str | None = None
        self.started_at = now()
        self.last_trained: tuple[str | None, int] | None = None
        self.codec = get_codec(settings.codec, settings.topk_fraction)
        self.feedback = (
            ErrorFeedback(settings.state_dir / f"{settings.site}.residual", self.layout)
            if self.codec.lossy and settings.error_feedback else None
        )
        self.outbox = Outbox(settings.state_dir / f"{settings.site}.outbox")
        self.heard = False
        self.sent = 0
        self.snapshots_fetched: list[int] = []
        #: How many times the last snapshot read attached to the stream (more than once after a stall).
        self.stream_attachments = 0
        # Snapshots are reassembled into this one buffer, touched once at start-up: fresh memory
        # costs a page fault per page, and for a large model that is most of a fetch's time.
        # It holds the base between fetches, so it is the worker's second copy of the model.
        self.snapshot_buffer = memoryview(np.ones(self.layout.total * 4 + SNAPSHOT_HEADER_ROOM, dtype=np.uint8)).cast("B")

    def run(self) -> int:
        """Train and send updates until the coordinator announces the end (or ``max_tasks``), through
        broker outages; returns the updates the broker confirmed."""
        s = self.settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        self.task.prepare_site(s.site)
        _warm_up_torch()
        amqp.serve_with_reconnect(self._session, f"site {s.site}", lambda: False)
        log.info("site %s: done; %d updates sent; peak resident memory %.2f GB", s.site, self.sent,
                 peak_resident_bytes() / 1e9)
        return self.sent

    def _session(self, backoff: amqp.Backoff) -> bool:
        """One connection's worth of work; returns True when the worker is done."""
        s = self.settings
        connection = amqp.connect(s.broker_url, s.heartbeat, f"fedq-worker-{s.site}", **s.tls_files())
        try:
            backoff.reset()
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_consume(amqp.declare_site_queue(channel, s.site), self._on_announcement)
            self._flush_outbox(channel)
            self.heard = False
            self._publish(channel, encode_payload(Hello(protocol=PROTOCOL_VERSION, site=s.site), []), new_id())
            log.info("site %s connected; waiting for a snapshot", s.site)
            # Whatever was announced while this site was away is waiting in its queue, and the hello
            # makes the coordinator say it again: hear it before training on older news.
            self._wait(connection, lambda: self.heard, timeout=HELLO_WAIT)
            while s.max_tasks is None or self.sent < s.max_tasks:
                announcement = self._wait(connection, self._has_work)
                assert announcement is not None  # _has_work is only true with one
                if announcement.final:
                    log.info("site %s: the coordinator ended the run at version %d", s.site, announcement.version)
                    break
                stale_base = (self.base_run, self.base_version) != (announcement.run_id, announcement.version)
                if stale_base and not self._fetch_snapshot(connection, announcement):
                    continue
                self._train(connection)
                self._flush_outbox(channel)
            return True
        finally:
            if connection.is_open:
                connection.close()

    def _has_work(self) -> bool:
        a = self.announcement
        return a is not None and (a.final or a.retrain or (a.run_id, a.version) != self.last_trained)

    def _wait(
        self, connection: pika.BlockingConnection, ready: Callable[[], bool], timeout: float | None = None
    ) -> Announcement | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready() and (deadline is None or time.monotonic() < deadline):
            connection.process_data_events(time_limit=1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic())))
        return self.announcement

    def _on_announcement(self, channel, method, properties, body) -> None:
        channel.basic_ack(method.delivery_tag)
        try:
            header, _ = decode_header(read_single(properties.headers, body))
        except ProtocolError as exc:
            log.warning("ignored a malformed announcement: %s", exc)
            return
        if not isinstance(header, Announcement):
            log.warning("ignored a %s payload on the announcement queue", header.kind)
        elif header.final and header.published_at < self.started_at:
            # The end of a run that finished before this worker started; wait for the current one.
            log.info("site %s: ignoring the end of an earlier run (version %d)", self.settings.site, header.version)
        else:
            # The queue keeps only the newest announcement and one publisher orders them, so the
            # latest delivered is the one to follow, even when a new run restarted the versions.
            self.announcement = header
            self.heard = True

    # -- snapshot ------------------------------------------------------------------------------

    def _fetch_snapshot(self, connection: pika.BlockingConnection, announcement: Announcement) -> bool:
        """Read the announced snapshot from the stream, verify it, and make it the base to train from.

        Returns False if it did not arrive in time (the stream's retention may have dropped it); the
        worker then waits for the next announcement.
        """
        started = time.monotonic()
        # The old base is of no more use once a newer version is announced; letting it go first
        # keeps a large model's worker at two copies (model and base), never three.
        self.base = self.base_version = self.base_run = None
        channel = connection.channel()
        frames = amqp.deliver_fragments(channel)  # copied into snapshot_buffer without pika's join first
        channel.basic_qos(prefetch_count=_STREAM_PREFETCH)
        state: dict = {"reassembly": None, "payload": None, "error": None, "next": None,
                       "attached_at": time.monotonic(), "attached": 0}
        throttle, stalls = _Throttle(), _Throttle()

        def on_chunk(ch, method, properties, body):
            ch.basic_ack(method.delivery_tag)
            headers = properties.headers or {}
            if isinstance(headers.get("x-stream-offset"), int):
                state["next"] = headers["x-stream-offset"] + 1
            if state["payload"] is not None or headers.get("fedq-payload") != announcement.payload_id:
                return  # another snapshot stored near this one in the stream
            try:
                info = ChunkInfo.from_headers(properties.headers, announcement.size)
                if state["reassembly"] is None:
                    state["reassembly"] = Reassembly(info, self.snapshot_buffer)
                if state["reassembly"].add(info, body):
                    state["payload"] = state["reassembly"].payload()
                elif throttle.due():
                    received = state["reassembly"].received
                    log.info("site %s: receiving snapshot version %d: %d of %d chunks (%s of %s)", self.settings.site,
                             announcement.version, received, info.count,
                             _megabytes(min(received * info.chunk_bytes, info.size)), _megabytes(info.size))
            except ProtocolError as exc:
                state["error"] = exc

        def attach() -> str:
            # First at the announcement's time; again after a stall, just past the last message heard.
            offset = state["next"] if state["next"] is not None else amqp.stream_offset_at(announcement.published_at)
            state["attached_at"] = time.monotonic()
            state["attached"] += 1
            return channel.basic_consume(amqp.SNAPSHOTS, on_chunk, arguments={"x-stream-offset": offset})

        def chunks_in() -> int:
            return state["reassembly"].received if state["reassembly"] is not None else 0

        tag = attach()
        # A newer announcement (the coordinator moved on, or republished after losing the broker
        # mid-write) ends the wait: that snapshot is the one to read.
        while (state["payload"] is None and state["error"] is None and not self._superseded(announcement)
               and time.monotonic() - started < SNAPSHOT_TIMEOUT):
            connection.process_data_events(time_limit=min(1.0, STREAM_STALL_SECONDS / 2))
            if state["payload"] is None and time.monotonic() - max(state["attached_at"], frames.last_frame) > STREAM_STALL_SECONDS:
                amqp.cancel_stream_consumer(channel, tag)
                tag = attach()
                # Rare on a healthy broker: said at the first time and then every few seconds, so a
                # read that stays stuck shows in the log how it tried.
                if state["attached"] == 2 or stalls.due():
                    log.info("site %s: nothing from the stream for %.1f s while reading version %d (%d of %d chunks); "
                             "attached again at offset %s (%d attachments)", self.settings.site, STREAM_STALL_SECONDS,
                             announcement.version, chunks_in(), announcement.chunks, state["next"], state["attached"])
        amqp.cancel_stream_consumer(channel, tag)
        self.stream_attachments = state["attached"]
        channel.close()
        if state["payload"] is None and state["error"] is None and self._superseded(announcement):
            log.info("site %s: version %d was superseded before it arrived; reading the newer announcement",
                     self.settings.site, announcement.version)
            return False
        try:
            if state["error"] is not None:
                raise state["error"]
            if state["payload"] is None:
                raise TimeoutError(
                    f"it did not arrive from stream {amqp.SNAPSHOTS} within {SNAPSHOT_TIMEOUT:.0f} s: {chunks_in()} of "
                    f"{announcement.chunks} chunks came, the reader attached "
                    f"{state['attached']} times, last at offset {state['next']}; if this repeats, check that the "
                    "stream's retention keeps at least one whole snapshot"
                )
            header, parts = decode_payload(state["payload"])
            if not isinstance(header, SnapshotHeader):
                raise ProtocolError(f"the stream holds a {header.kind} payload under its id")
            tensors = decode_tensors(header.tensors, parts, self.layout)
            # Not checked for NaN here: the coordinator checks each version once before publishing
            # it, and the digest proves these are the bytes it published.
            check_matches_model(self.params, tensors, finite=False)
        except (ProtocolError, TimeoutError) as exc:
            log.error("site %s: cannot use snapshot version %d (%s); waiting for the next version",
                      self.settings.site, announcement.version, exc)
            if self.announcement is announcement:
                self.announcement = None
            return False
        self.base, self.base_version, self.base_run = tensors, header.version, header.run_id
        self.snapshots_fetched.append(header.version)
        log.info("site %s: snapshot version %d (%d bytes) in %.2f s",
                 self.settings.site, header.version, len(state["payload"]), time.monotonic() - started)
        return True

    def _superseded(self, announcement: Announcement) -> bool:
        """A newer snapshot was announced (the same one announced again, for a hello, is not newer)."""
        return self.announcement is not None and self.announcement.payload_id != announcement.payload_id

    # -- training and the update -----------------------------------------------------------------

    def _train(self, connection: pika.BlockingConnection) -> None:
        """Train on the base snapshot and put the update in the outbox.

        If the broker is lost during training, training still finishes and its update waits in the
        outbox; only then does the connection failure propagate to the reconnect loop.
        """
        assert self.base is not None and self.base_version is not None
        site, version = self.settings.site, self.base_version
        for name, tensor in self.params.items():
            tensor.copy_(self.base[name])
        started = time.monotonic()
        context = SiteContext(site=site, version=version, progress=self._progress_reporter(version, started))
        result, lost = self._train_in_background(connection, context)
        train_seconds = time.monotonic() - started
        self.last_trained = (self.base_run, version)
        encoding = time.monotonic()
        # The difference is taken in place: the model's tensors are reset from the base before the
        # next training anyway, and a copy would be a third model's worth of memory.
        delta = {name: tensor.sub_(self.base[name]) for name, tensor in self.params.items()}
        dense = sum(t.numel() * 4 for t in delta.values())
        if self.feedback is not None:
            specs, parts = self.feedback.encode(delta, self.codec)
        else:
            specs, parts = encode_tensors(delta, self.codec)
        header = UpdateHeader(
            protocol=PROTOCOL_VERSION, update_id=new_id(), run_id=self.base_run, site=site, base_version=version,
            num_samples=result.num_samples, train_seconds=train_seconds, metrics=result.metrics, tensors=specs,
        )
        buffers = encode_payload(header, parts)
        self.outbox.put(header.update_id, buffers)
        # The residual moves on only once the update it belongs with is safe on disk.
        if self.feedback is not None:
            self.feedback.commit()
        log.info("site %s: trained on version %d (%d samples) in %.2f s; update %s: %d bytes (%s; dense fp32 %d), "
                 "encoded and stored in %.2f s", site, version, result.num_samples, train_seconds, header.update_id,
                 payload_size(buffers), self.codec.name, dense, time.monotonic() - encoding)
        if lost is not None:
            raise lost

    def _progress_reporter(self, version: int, started: float) -> Callable[[float], None]:
        """A progress callback for the task that logs long training every few seconds, not short tasks."""
        throttle = _Throttle()

        def report(fraction: float) -> None:
            if throttle.due():
                log.info("site %s: training on version %d, %.0f%% done after %.0f s",
                         self.settings.site, version, 100 * fraction, time.monotonic() - started)

        return report

    def _flush_outbox(self, channel) -> None:
        """Publish every waiting update, oldest first; each leaves the outbox once confirmed."""
        for path in self.outbox.pending():
            entry = self.outbox.read(path)
            if entry is None:
                continue
            update_id, payload = entry
            started = time.monotonic()
            self._publish(channel, [payload], update_id)
            self.outbox.remove(path)
            self.sent += 1
            log.info("site %s: update %s confirmed by the broker (%.1f MB in %.2f s)", self.settings.site, update_id,
                     len(payload) / 1e6, time.monotonic() - started)

    def _train_in_background(
        self, connection: pika.BlockingConnection, context: SiteContext
    ) -> tuple[TrainResult, BaseException | None]:
        """Run the task's training on a thread while this thread keeps the connection alive.

        Returns the result and the connection failure met meanwhile, if any.
        """
        outcome: dict = {}

        def work():
            try:
                outcome["result"] = self.task.train(self.model, context)
            except BaseException as exc:  # re-raised on the main thread below
                outcome["error"] = exc
            finally:
                try:
                    connection.add_callback_threadsafe(lambda: None)  # wake the loop now, not at its timeout
                except Exception:
                    pass  # the connection is gone; the main thread notices on its own

        thread = threading.Thread(target=work, name=f"train-{context.site}", daemon=True)
        thread.start()
        lost = None
        while thread.is_alive() and lost is None:
            try:
                connection.process_data_events(time_limit=1.0)
            except amqp.RECOVERABLE as exc:
                log.warning("site %s: lost the broker during training (%s); training goes on", context.site, exc)
                lost = exc
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        result = outcome["result"]
        if not isinstance(result, TrainResult) or result.num_samples <= 0:
            raise ValueError(f"task {self.settings.task} train() must return a TrainResult with num_samples > 0, got {result!r}")
        return result, lost

    def _publish(self, channel, buffers, payload_id: str) -> ChunkInfo:
        throttle = _Throttle()

        def progress(info: ChunkInfo) -> None:
            if throttle.due():
                log.info("site %s: uploading %s: %d of %d chunks confirmed (%s of %s)", self.settings.site, payload_id,
                         info.index + 1, info.count, _megabytes(info.offset + info.length),
                         _megabytes(info.size))

        return amqp.publish_payload(channel, amqp.UPDATES, amqp.UPDATE_KEY, buffers, payload_id, user_id=self.user,
                                    progress=progress)

"""The coordinator process: owns the global model, takes updates as they come, publishes versions.

One thread, one connection, two channels: updates are consumed on one, snapshots and
announcements published with confirms on the other. Every update is either applied, dropped with
a logged reason (too stale, already counted), or refused and dead-lettered with its reason; bad
input never stops the coordinator.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pika
import torch

from coordinator.checkpoint import Checkpoint, CheckpointFiles
from coordinator.ledger import Entry, Ledger
from coordinator.metrics import serve_metrics
from coordinator.privacy import GaussianPrivacy
from coordinator.robust import clip_to_norm, update_norm
from coordinator.runlog import RunLog
from coordinator.server_optimizers import make_server_optimizer
from coordinator.staleness import staleness_weight
from coordinator.status import INGEST_BOUNDS, Observations, build_status, progress_line
from coordinator.strategies import FedAsync, FedAvgSync, FedBuff, Strategy, Update
from coordinator.upload_spool import UploadSpool
from shared import amqp
from shared.chunking import BufferPool, ChunkInfo, Reassembly, chunk_count, payload_digest
from shared.codecs import Layout, decode_tensors, encode_tensors, get_codec
from shared.protocol import (
    MAX_CHUNK_BYTES,
    Announcement,
    Hello,
    ProtocolError,
    SnapshotHeader,
    Status,
    UpdateHeader,
    decode_payload,
    encode_payload,
    new_id,
    now,
    payload_size,
    PROTOCOL_VERSION,
)
from shared.memory import keep_freed_memory, peak_resident_bytes
from shared.settings import CoordinatorSettings, SettingsError
from shared.validation import check_matches_model, float_state, non_finite_tensor
from shared.task import Task

log = logging.getLogger("fedq.coordinator")


def make_strategy(settings: CoordinatorSettings) -> Strategy:
    """The aggregation strategy the settings ask for."""
    optimizer = make_server_optimizer(
        settings.server_optimizer,
        settings.server_lr,
        settings.server_momentum,
        settings.server_beta1,
        settings.server_beta2,
        settings.server_tau,
    )
    privacy = (
        GaussianPrivacy(settings.dp_clip_norm, settings.dp_noise_multiplier, settings.dp_delta)
        if settings.dp_noise_multiplier else None
    )
    if settings.strategy == "fedavg":
        return FedAvgSync(settings.sites, optimizer, privacy=privacy)
    weight = staleness_weight(settings.staleness, settings.staleness_a, settings.staleness_b)
    if settings.strategy == "fedasync":
        return FedAsync(settings.alpha, staleness_weight=weight, max_staleness=settings.max_staleness, privacy=privacy)
    return FedBuff(settings.buffer_size, optimizer, settings.aggregation, settings.trim_fraction,
                   staleness_weight=weight, max_staleness=settings.max_staleness, privacy=privacy)


class ModelDiverged(RuntimeError):
    """The merged model holds NaN or infinity; the run stops without making it durable."""


@dataclass
class _Upload:
    """An update still arriving chunk by chunk, and the deliveries to settle once it is handled."""

    reassembly: Reassembly
    tags: list[int] = field(default_factory=list)
    user_id: str | None = None
    first_chunk: float = field(default_factory=time.monotonic)
    last_chunk: float = field(default_factory=time.monotonic)
    #: Whether its chunks so far are in the upload spool (and acknowledged).
    spooled: bool = False


class Coordinator:
    def __init__(self, settings: CoordinatorSettings, task: Task):
        self.settings = settings
        self.task = task
        self.model = task.build_model()
        # These tensors share storage with the model, so updating them updates the model.
        self.params = float_state(self.model)
        self.layout = Layout.of(self.params)
        self.run_id = new_id()
        self.version = 0
        try:
            self.strategy = make_strategy(settings)
        except ValueError as exc:
            raise SettingsError(f"fedq cannot start: {exc}. Fix FEDQ_STRATEGY and its settings, then start again.") from None
        self.strategy.prepare(self.params)
        self.ledger = Ledger()
        self.runlog = RunLog(settings.run_dir)
        self.checkpoints = CheckpointFiles(settings.run_dir)
        self.uploads: dict[str, _Upload] = {}
        self.spool = UploadSpool(settings.run_dir / "uploads")
        # Spooled uploads handled since the last checkpoint: their files go once it is written.
        self._spool_done: list[str] = []
        # Keeps the buffer of one dense update (model plus header room) for the next upload.
        self.buffers = BufferPool(self.layout.total * 4 + MAX_CHUNK_BYTES)
        self.announcement: Announcement | None = None
        self.last_metrics: dict[str, float] = {}
        self._scored_version: int | None = None  # the version last_metrics are of
        self._checked_version: int | None = None  # the last version found finite
        self.stop_reason: str | None = None
        self.sites_seen: set[str] = set()
        self.pending_acks: list[int] = []
        # Deliveries pika has handed over, handled one at a time by _serve.
        self._inbox: deque[tuple[Any, pika.BasicProperties, list[bytes]]] = deque()
        # When the oldest delivery in pending_acks was taken: none waits longer than checkpoint_seconds.
        self._pending_since = 0.0
        self.ingest = Observations(INGEST_BOUNDS)
        # Replaced whole on every tick, so readers on other threads (metrics) never see it half-built.
        self.status: Status | None = None
        self._last_status = 0.0
        self.metrics_url: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Serve until a stop condition or SIGTERM/SIGINT, through broker outages; returns the run summary."""
        s = self.settings
        # Signals reach only the main thread; a coordinator embedded elsewhere is stopped with stop().
        on_main = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)} if on_main else {}
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        keep_freed_memory()
        metrics = self._serve_metrics()
        resumed = s.resume and self._resume()
        if resumed:
            self._take_spooled_uploads()
        else:
            self.spool.clear()
        log.info("coordinator %s: strategy %s, task %s, %d tensors, %d parameters",
                 "resumed" if resumed else "up", s.strategy, s.task, len(self.params), self.layout.total)
        dense_chunks = -(-self.layout.total * 4 // MAX_CHUNK_BYTES)
        if dense_chunks > self._window:
            log.warning("a dense fp32 update of this model is %d chunks, more than the window of %d that prefetch %d "
                        "allows: such updates will be refused. Have sites compress (FEDQ_CODEC=fp16 halves it, "
                        "topk-int8 cuts it ~100x) or raise FEDQ_PREFETCH above %d (memory: up to 4 MiB per chunk)",
                        dense_chunks, self._window, s.prefetch, dense_chunks + dense_chunks // 7 + 1)
        try:
            amqp.serve_with_reconnect(self._session, "coordinator", lambda: self.stop_reason is not None)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if metrics is not None:
                metrics.shutdown()
                metrics.server_close()
        privacy = self.strategy.privacy
        log.info("coordinator done; peak resident memory %.2f GB", peak_resident_bytes() / 1e9)
        summary = self.runlog.summary(
            strategy=s.strategy, stop_reason=self.stop_reason, final_version=self.version, protocol=PROTOCOL_VERSION,
            peak_resident_bytes=peak_resident_bytes(),
            privacy={"epsilon": privacy.epsilon(), "delta": privacy.delta, "releases": privacy.releases} if privacy else None,
        )
        self.runlog.close()
        return summary

    def _session(self, backoff: amqp.Backoff) -> bool:
        """One connection's worth of serving; returns True when the run is over."""
        s = self.settings
        connection = amqp.connect(s.broker_url, s.heartbeat, "fedq-coordinator", **s.tls_files())
        try:
            backoff.reset()
            # Deliveries of the last connection come again; what they carried is either in the
            # checkpoint (and the ledger skips it), in the upload spool, or redelivered in full.
            self.uploads = {pid: _Upload(u.reassembly, user_id=u.user_id, spooled=True)
                            for pid, u in self.uploads.items() if u.spooled}
            self.pending_acks.clear()
            self._inbox.clear()
            self._publisher = connection.channel()
            amqp.declare_shared_topology(self._publisher)
            self._publisher.confirm_delivery()
            self._consumer = connection.channel()
            amqp.deliver_fragments(self._consumer)  # copied into the upload's buffer without pika's join first
            self._consumer.basic_qos(prefetch_count=s.prefetch)
            self._consumer.basic_consume(amqp.UPDATES, self._receive)
            if self.announcement is None:
                self._start(connection)
            else:
                self._release()  # the newest version again, in case the outage lost it
            while self.stop_reason is None:
                self._serve(connection)
                self._check_limits()
                self._expire_uploads()
                self._settle()
                self._tick()
            log.info("stopping: %s", self.stop_reason)
            if self._unreleased:
                self._release()
            else:
                self._settle(force=True)
            self._announce(final=True)
            self._tick(force=True)
            return True
        finally:
            if connection.is_open:
                connection.close()

    def _start(self, connection: pika.BlockingConnection) -> None:
        """The first version of a new run, or the first publication after a resume."""
        self._wait_for_sites(connection)
        if self.stop_reason is not None:  # stopped before its sites came: the run never started
            return
        if not self.runlog.curve:
            # Scored before the clock starts: loading the evaluation data is not the federation's time.
            self._score()
            self.runlog.start_clock()
            self.runlog.event("start", run_id=self.run_id, strategy=self.settings.strategy,
                              settings=self.settings.model_dump(mode="json"))
            self.runlog.evaluation(self.version, self.last_metrics)
        self._release()

    def _wait_for_sites(self, connection: pika.BlockingConnection) -> None:
        """Hold the first version until enough sites said hello, so a run's clock starts with its sites."""
        if self.settings.wait_for_sites and self.version == 0:
            log.info("waiting for %d sites to say hello", self.settings.wait_for_sites)
            while len(self.sites_seen) < self.settings.wait_for_sites and self.stop_reason is None:
                self._serve(connection)
                self._tick()  # fedq status and the log show who came while nobody sends anything

    @property
    def _window(self) -> int:
        """Deliveries the coordinator may hold unacknowledged before it must settle them."""
        return self.settings.prefetch - max(1, self.settings.prefetch // 8)

    def _serve_metrics(self):
        s = self.settings
        if s.metrics_port is None:
            return None
        try:
            server = serve_metrics(lambda: self.status, s.metrics_host, s.metrics_port)
        except OSError as exc:
            raise SettingsError(
                f"fedq cannot start: the metrics endpoint cannot listen on {s.metrics_host}:{s.metrics_port} ({exc.strerror}); "
                "set FEDQ_METRICS_PORT (--metrics-port) to a free port, 0 for any free port, or empty to turn it off"
            ) from None
        self.metrics_url = f"http://{s.metrics_host}:{server.server_port}/metrics"
        return server

    def _tick(self, force: bool = False) -> None:
        """Every ``status_seconds``: publish the status for fedq status and metrics, and log progress."""
        if not force and time.monotonic() - self._last_status < self.settings.status_seconds:
            return
        self._last_status = time.monotonic()
        s = self.settings
        self.status = build_status(
            self.runlog, run_id=self.run_id, strategy=s.strategy, version=self.version, metrics=self.last_metrics,
            queue_depths=amqp.queue_depths(self._publisher), ingest=self.ingest, every=s.status_seconds,
            site_of_user=lambda user: s.site_users.get(user, user),
        )
        amqp.publish_status(self._publisher, self.status)
        if self.runlog.curve:
            log.info("%s", progress_line(self.status))
        else:  # the run's clock starts with its first version: until then there is no progress to show
            log.info("waiting for sites: %d of %d said hello", len(self.sites_seen), s.wait_for_sites)

    def stop(self, reason: str) -> None:
        """Ask the run to end (safe from any thread); it finishes within half a second."""
        self.stop_reason = reason

    def _on_signal(self, signum, frame) -> None:
        self.stop(f"received {signal.Signals(signum).name}")

    # -- durability ------------------------------------------------------------------------------

    def _settle(self, force: bool = False) -> None:
        """Checkpoint, then acknowledge every delivery taken since the last one.

        Nothing is acknowledged before its effect is on disk: a crash before the checkpoint leaves
        those deliveries unacknowledged, so the broker hands them over again and they are counted
        once, against the checkpoint's ledger. Unfinished uploads that fill the window by
        themselves are spooled to disk instead.
        """
        due = bool(self.pending_acks) and time.monotonic() - self._pending_since >= self.settings.checkpoint_seconds
        # The broker sends nothing more once the prefetch window is full of unacknowledged
        # deliveries, so a nearly full window is settled at once, whatever the clock says.
        unfinished = sum(len(upload.tags) for upload in self.uploads.values())
        if force or due or (self.pending_acks and len(self.pending_acks) + unfinished >= self._window):
            self._checkpoint()
            for payload_id in self._spool_done:
                self.spool.remove(payload_id)
            self._spool_done.clear()
            for tag in self.pending_acks:
                self._consumer.basic_ack(tag)
            self.pending_acks.clear()
        if unfinished >= self._window:
            self._spool(unfinished)

    def _spool(self, chunks: int) -> None:
        """The window is full of unfinished uploads, so nothing more would arrive to finish any:
        write them to the spool and acknowledge their ``chunks``, so the rest of them can come."""
        partial = [upload for upload in self.uploads.values() if upload.tags]
        log.info("%d uploads arriving at once fill the window of %d chunks; keeping their %d chunks on disk",
                 len(partial), self._window, chunks)
        for upload in partial:
            self.spool.write(upload.reassembly, upload.user_id)
            upload.spooled = True
        for upload in partial:
            for tag in upload.tags:
                self._consumer.basic_ack(tag)
            upload.tags.clear()

    def _take_spooled_uploads(self) -> None:
        for reassembly, user_id in self.spool.read_all():
            self.uploads[reassembly.payload_id] = _Upload(reassembly, user_id=user_id, spooled=True)
        if self.uploads:
            log.info("resumed %d unfinished uploads from %s", len(self.uploads), self.spool.folder)

    def _forget_upload(self, payload_id: str) -> _Upload:
        """Take an upload out of the ones arriving; its spool file goes with the next checkpoint."""
        upload = self.uploads.pop(payload_id)
        if upload.spooled:
            self._spool_done.append(payload_id)
        return upload

    def _hold(self, tags: list[int]) -> None:
        """Keep these deliveries unacknowledged until the next checkpoint holds their effect."""
        if not self.pending_acks:
            self._pending_since = time.monotonic()
        self.pending_acks.extend(tags)

    def _checkpoint(self) -> None:
        self._check_finite()
        if self.strategy.max_staleness is not None:
            self.ledger.forget_before(self.version - self.strategy.max_staleness)
        tensors, values = self.strategy.state()
        self.checkpoints.write(Checkpoint(
            run_id=self.run_id, version=self.version, params=self.params, strategy_tensors=tensors,
            strategy_values=values, ledger_rows=self.ledger.to_rows(),
            run={"sites_seen": sorted(self.sites_seen), "started_at": self.runlog.started_at,
                   "counters": self.runlog.counters(),
                   "dp_releases": self.strategy.privacy.releases if self.strategy.privacy else 0},
        ))

    def _resume(self) -> bool:
        if not self.checkpoints.exists():
            return False
        checkpoint = self.checkpoints.read()
        check_matches_model(self.params, checkpoint.params)
        for name, tensor in checkpoint.params.items():
            self.params[name].copy_(tensor)
        self.run_id, self.version = checkpoint.run_id, checkpoint.version
        self.strategy.restore(checkpoint.strategy_tensors, checkpoint.strategy_values)
        self.ledger = Ledger.from_rows(checkpoint.ledger_rows)
        self.sites_seen = set(checkpoint.run["sites_seen"])
        self.runlog.resume_clock(checkpoint.run["started_at"])
        self.runlog.restore_counters(checkpoint.run["counters"])
        if self.strategy.privacy is not None:
            self.strategy.privacy.releases = checkpoint.run["dp_releases"]
        self.runlog.event("resume", run_id=self.run_id, version=self.version, ledger=len(self.ledger.entries))
        self._evaluate()
        log.info("resumed run %s at version %d from %s (%d updates in the ledger)",
                 self.run_id, self.version, self.checkpoints.path, len(self.ledger.entries))
        return True

    def _expire_uploads(self) -> None:
        now_ = time.monotonic()
        for payload_id, upload in list(self.uploads.items()):
            if now_ - upload.last_chunk > self.settings.upload_timeout:
                self._forget_upload(payload_id)
                log.warning("discarded update upload %s from %s: %d of %d chunks, idle for %.0f s",
                            payload_id, upload.user_id or "unknown user", upload.reassembly.received,
                            upload.reassembly.count, now_ - upload.last_chunk)
                self.runlog.event("upload_expired", payload_id=payload_id, user=upload.user_id,
                                  received=upload.reassembly.received, chunks=upload.reassembly.count)
                self._hold(upload.tags)

    def _check_limits(self) -> None:
        s = self.settings
        accuracy = self.last_metrics.get("accuracy")
        if s.stop_at_accuracy is not None and accuracy is not None and accuracy >= s.stop_at_accuracy:
            self.stop_reason = f"accuracy {accuracy:.4f} reached the target {s.stop_at_accuracy}"
        elif s.max_versions is not None and self.version >= s.max_versions:
            self.stop_reason = f"reached version {self.version}"
        elif s.max_seconds is not None and self.runlog.elapsed >= s.max_seconds:
            self.stop_reason = f"ran for {s.max_seconds:g} s"

    # -- incoming messages -----------------------------------------------------------------------

    def _receive(self, channel, method, properties: pika.BasicProperties, body: list[bytes]) -> None:
        """pika's consumer callback only queues the delivery for ``_serve``.

        pika calls it until no delivery is pending, and every snapshot publish and acknowledgement
        lets more arrive: updates handled in here kept a busy coordinator inside pika for good,
        past its stop conditions and status ticks.
        """
        self._inbox.append((method, properties, body))

    def _serve(self, connection: pika.BlockingConnection) -> None:
        """Wait up to half a second for deliveries, handle them one at a time, checking the stop
        conditions and the status tick between them, then release the newest version.

        Updates that arrived together all go into the model before one snapshot goes out: sites
        want only the newest version, and a snapshot per update would let a backlog grow whenever
        updates come faster than versions can be checkpointed and published.
        """
        connection.process_data_events(time_limit=0.5)
        while self._inbox and self.stop_reason is None:
            self._on_message(*self._inbox.popleft())
            self._check_limits()
            self._tick()
        if self.stop_reason is None and self._unreleased:
            self._release()

    def _on_message(self, method, properties: pika.BasicProperties, body: list[bytes]) -> None:
        try:
            info = ChunkInfo.from_headers(properties.headers, self.settings.max_update_bytes)
        except ProtocolError as exc:
            self._refuse([method.delivery_tag], properties.headers, body, str(exc), properties.user_id)
            return
        upload = self.uploads.get(info.payload_id)
        if upload is None:
            if info.count > self._window:
                # Its chunks could never all be held unacknowledged at once: refused, not left to stall.
                self._refuse([method.delivery_tag], properties.headers, body, (
                    f"payload of {info.count} chunks ({info.size} bytes) exceeds the coordinator's window of "
                    f"{self._window} chunks; raise FEDQ_PREFETCH on the coordinator or compress updates"
                ), properties.user_id)
                return
            reassembly = Reassembly(info, self.buffers.take(info.size))
            upload = self.uploads[info.payload_id] = _Upload(reassembly, user_id=properties.user_id)
        upload.tags.append(method.delivery_tag)
        upload.last_chunk = time.monotonic()
        try:
            complete = upload.reassembly.add(info, body)
        except ProtocolError as exc:
            self._forget_upload(info.payload_id)
            self._refuse(upload.tags, properties.headers, body, str(exc), properties.user_id)
            return
        if complete:
            self._forget_upload(info.payload_id)
            self._handle(upload, properties.headers)

    def _handle(self, upload: _Upload, headers: dict | None) -> None:
        try:
            payload = upload.reassembly.payload()
            header, parts = decode_payload(payload)
            if isinstance(header, (Hello, UpdateHeader)):
                self._check_sender(header.site, upload.user_id)
            if isinstance(header, Hello):
                log.info("site %s said hello", header.site)
                self.sites_seen.add(header.site)
                self.runlog.seen(header.site)
                self._announce()
            elif isinstance(header, UpdateHeader):
                self._take_update(header, parts, len(payload), upload.first_chunk)
            else:
                raise ProtocolError(f"a {header.kind} payload does not belong on the updates queue")
        except ProtocolError as exc:
            self._refuse(upload.tags, headers, upload.reassembly.prefix(MAX_CHUNK_BYTES), str(exc), upload.user_id)
            return
        finally:
            self.ingest.observe(time.monotonic() - upload.first_chunk)
            # Nothing refers to the payload any more: strategies copy what they keep.
            self.buffers.give(upload.reassembly.storage)
        self._hold(upload.tags)
        self._settle()

    def _take_update(self, header: UpdateHeader, parts, size: int, first_chunk: float) -> None:
        """Apply or drop a decoded update; a new version it makes is released by ``_serve``."""
        self.sites_seen.add(header.site)
        self.runlog.received_update(header.site, size)
        if header.run_id != self.run_id:
            self._drop(header, f"trained in run {header.run_id}, not the current run {self.run_id}", staleness=None)
            return
        if header.update_id in self.ledger:
            raise ProtocolError(f"update {header.update_id} was already counted (redelivered or replayed)")
        staleness = self.version - header.base_version
        if staleness < 0:
            raise ProtocolError(f"base version {header.base_version} is newer than the current version {self.version}")
        delta = decode_tensors(header.tensors, parts, self.layout, sparse=True)
        check_matches_model(self.params, delta)
        self._bound_norm(delta)
        if self.strategy.privacy is not None:
            self.strategy.privacy.clip(delta)
        update = Update(header.update_id, header.site, header.base_version, header.num_samples, delta, header.metrics)
        reason = self.strategy.admit(update, staleness)
        if reason is not None:
            self._drop(header, reason, staleness)
            return
        outcome = self.strategy.submit(self.params, update, staleness)
        self.ledger.record(header.update_id, Entry(header.site, header.base_version, self.version))
        self.runlog.applied_update(header.site, header.base_version, staleness)
        self.runlog.event(
            "update", site=header.site, update_id=header.update_id, base_version=header.base_version,
            staleness=staleness, weight=round(outcome.weight, 6), num_samples=header.num_samples, bytes=size,
            train_seconds=header.train_seconds, metrics=header.metrics,
            ingest_seconds=round(time.monotonic() - first_chunk, 4),
        )
        if outcome.new_version:
            self.version += 1

    def _check_sender(self, site: str, user: str | None) -> None:
        """The broker vouches for ``user_id``; the claimed site must be that user's."""
        s = self.settings
        if not user:
            raise ProtocolError("the message carries no user_id, so its sender cannot be verified")
        if user not in s.any_site_users and s.site_users.get(user, user) != site:
            raise ProtocolError(f"user {user!r} may not send for site {site!r}")

    def _bound_norm(self, delta) -> None:
        bound = self.settings.update_norm_bound
        if bound is None:
            return
        if self.settings.update_norm_action == "refuse":
            norm = update_norm(delta)
            if norm > bound:
                raise ProtocolError(f"update norm {norm:.4g} exceeds the bound {bound:g}")
        else:
            clip_to_norm(delta, bound)

    def _drop(self, header: UpdateHeader, reason: str, staleness: int | None) -> None:
        log.warning("dropped update %s from %s (base version %d): %s", header.update_id, header.site, header.base_version, reason)
        if header.update_id not in self.ledger:
            self.ledger.record(header.update_id, Entry(header.site, header.base_version, None, reason))
        self.runlog.dropped += 1
        self.runlog.dropped_per_site[header.site] += 1
        self.runlog.event("dropped", site=header.site, update_id=header.update_id, staleness=staleness, reason=reason)

    def _refuse(self, tags: list[int], headers: dict | None, body: bytes | list[bytes], reason: str,
                user_id: str | None) -> None:
        """Dead-letter a message (whole or as its fragments) that cannot be used, with the reason,
        and settle its deliveries."""
        log.warning("refused a message from %s: %s", user_id or "unknown user", reason)
        self.runlog.refused(user_id)
        self.runlog.event("rejected", user=user_id, reason=reason)
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            headers={**(headers or {}), "fedq-reason": reason, "fedq-user": user_id or ""},
        )
        self._publisher.basic_publish(amqp.REJECTED, "", b"".join(body) if isinstance(body, list) else body, properties)
        self._hold(tags)

    # -- outgoing versions -----------------------------------------------------------------------

    def _check_finite(self) -> None:
        """Stop before a model holding NaN or infinity is checkpointed or published.

        Every update was finite, but their sum can overflow or a server optimizer diverge. Sites do
        not check snapshots again (the digest proves they are these bytes), so this is where one
        check per version stands in for one per site; and a loud stop beats sites that each refuse
        the version and wait for one that never comes.
        """
        if self.version == self._checked_version:
            return
        bad = non_finite_tensor(self.params)
        if bad is not None:
            self.runlog.event("diverged", version=self.version, tensor=bad)
            raise ModelDiverged(
                f"version {self.version} of the model holds NaN or infinite values (tensor {bad!r}) after merging "
                f"updates; it was neither checkpointed nor published, and the updates merged since the last checkpoint "
                f"stay on the queue. Bound update norms (FEDQ_UPDATE_NORM_BOUND) or lower the server step "
                f"(FEDQ_SERVER_LR for FedBuff, FEDQ_ALPHA for FedAsync), then start the coordinator again: "
                f"it resumes from the last checkpoint"
            )
        self._checked_version = self.version

    def _evaluate(self) -> None:
        self._score()
        self.runlog.evaluation(self.version, self.last_metrics)

    def _score(self) -> None:
        metrics = self.task.evaluate(self.model)
        if self.strategy.privacy is not None:
            metrics["epsilon"] = self.strategy.privacy.epsilon()
        self.last_metrics = metrics  # whole, for readers on other threads (status, tests)
        self._scored_version = self.version

    @property
    def _unreleased(self) -> bool:
        """Whether the model has moved on from the version last announced."""
        return self.announcement is not None and self.announcement.version != self.version

    def _release(self) -> None:
        """Make the newest version durable, publish it, and evaluate it if ``eval_every`` says so.

        Durable before it is published: a restarted coordinator never hands out a version number
        twice for two different models. Evaluated after, so sites do not wait for the evaluation.
        """
        self._settle(force=True)
        self._publish_snapshot()
        if self._scored_version is None or self.version - self._scored_version >= self.settings.eval_every:
            self._evaluate()


    def _publish_snapshot(self) -> None:
        """Announce the current version, then write its chunks to the stream.

        The announcement goes first, with the size and digest computed up front, so that sites read
        the stream while it is being written instead of after: fan-out takes the longer of writing
        and reading, not their sum. A site that is told of a newer version gives up the older one.
        """
        started = time.monotonic()
        specs, parts = encode_tensors(self.params, get_codec(self.settings.snapshot_codec))
        header = SnapshotHeader(protocol=PROTOCOL_VERSION, run_id=self.run_id, version=self.version, created_at=now(), tensors=specs)
        buffers = encode_payload(header, parts)
        size, digest = payload_size(buffers), payload_digest(buffers)
        self.announcement = Announcement(
            protocol=PROTOCOL_VERSION, run_id=self.run_id, version=self.version, payload_id=new_id(),
            chunks=chunk_count(size, MAX_CHUNK_BYTES), size=size, digest=digest, published_at=now(),
            retrain=self.strategy.retrain,
        )
        self._announce()
        amqp.publish_payload(self._publisher, amqp.SNAPSHOTS, amqp.SNAPSHOT_KEY, buffers, self.announcement.payload_id,
                             digest=digest)
        self.runlog.bytes_out += size
        seconds = time.monotonic() - started
        self.runlog.event("snapshot", version=self.version, bytes=size, chunks=self.announcement.chunks,
                          seconds=round(seconds, 4))
        if seconds >= 1.0:
            log.info("published version %d: %.1f MB in %.1f s", self.version, size / 1e6, seconds)

    def _announce(self, final: bool = False) -> None:
        if self.announcement is None:
            return
        announcement = self.announcement.model_copy(update={"final": final})
        # Not mandatory: before any site has declared its queue, nobody needs to hear it.
        amqp.publish_payload(self._publisher, amqp.ANNOUNCEMENTS, "", encode_payload(announcement, []), new_id(), mandatory=False)


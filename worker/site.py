"""The worker process of one site: newest snapshot in, local training, update out. Outbound only.

The connection lives on the main thread and is serviced the whole time (pika answers heartbeats
only while its connection is driven); training runs on a second thread, so an hour of training
costs nothing on the wire. Announcements arrive on the site's latest-only queue; the snapshot they
name is read from the stream, verified, and trained on; the difference waits in the outbox until
the broker has confirmed it. Lost connections are re-made with backoff; no finished work is lost.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np
import torch
from pydantic import ValidationError

from shared import transport
from shared.chunking import ChunkInfo, read_single
from shared.codecs import Layout, decode_tensors, encode_tensors, get_codec
from shared.memory import peak_resident_bytes
from shared.progress import Throttle, megabytes
from shared.settings import writable_folder
from shared.protocol import (
    PROTOCOL_VERSION,
    MAX_METRICS,
    MAX_SCORE,
    Announcement,
    EvalReport,
    HeaderLimits,
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
from worker.settings import WorkerSettings
from shared.model_state import checked_names, frozen_digest, load_values, trained_delta, trained_state
from shared.task import EvalResult, SiteContext, Task, TaskMismatch, TrainResult
from shared.validation import check_matches_model
from worker.error_feedback import ErrorFeedback
from worker.outbox import Outbox

log = logging.getLogger("fedq.worker")

SNAPSHOT_HEADER_ROOM = 1 << 20  # a snapshot's header and alignment, beyond its fp32 tensor bytes
HELLO_WAIT = 5.0


def _warm_up_torch() -> None:
    """Pay PyTorch's one-off start-up cost (about a second of CPU for autograd and the optimizers)
    before joining, not inside the first round where every site would pay it at once."""
    scratch = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([scratch], lr=0.1)
    (scratch * 2).sum().backward()
    optimizer.step()


class SiteWorker:
    def __init__(self, settings: WorkerSettings, task: Task, started_at: float | None = None):
        """``started_at`` (by the wall clock, now if not given) dates the worker's start: the end of
        a run announced before it is an earlier run's, to be ignored (``on_announcement``)."""
        self.settings = settings
        self.task = task
        self.model = task.build_model()
        #: The tensors that travel; the rest is frozen, and must be the coordinator's (self.frozen).
        self.names = checked_names(self.model, task.trained_tensors(self.model), settings.task)
        self.frozen = frozen_digest(self.model, self.names)
        self.layout = Layout.of(trained_state(self.model, self.names))
        self.device = settings.torch_device
        self.user = transport.broker_user(settings.broker_url)
        self.announcement: Announcement | None = None
        self.base: dict[str, torch.Tensor] | None = None
        self.base_version: int | None = None
        self.base_run: str | None = None
        #: The run configuration announced with the base snapshot, for the task (SiteContext.config).
        self.base_config: dict = {}
        self.started_at = now() if started_at is None else started_at
        self.last_trained: tuple[str | None, int] | None = None
        #: The run and round of site evaluation this site last answered.
        self.evaluated: tuple[str | None, int] | None = None
        self.codec = get_codec(settings.codec, settings.topk_fraction)
        writable_folder(settings.state_dir, "FEDQ_STATE_DIR")
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
        transport.serve_with_reconnect(self._session, f"site {s.site}", lambda: False)
        log.info("site %s: done; %d updates sent; peak resident memory %.2f GB", s.site, self.sent,
                 peak_resident_bytes() / 1e9)
        return self.sent

    def _session(self, backoff: transport.Backoff) -> bool:
        """One connection's worth of work; returns True when the worker is done."""
        s = self.settings
        link = transport.connect(s.broker_url, s.heartbeat, f"fedq-worker-{s.site}", **s.tls_files())
        try:
            backoff.reset()
            publisher = transport.Publisher(link)
            transport.Announcements(link, s.site, self.on_announcement)
            self._flush_outbox(publisher)
            self.heard = False
            self._say_hello(publisher)
            log.info("site %s connected; waiting for a snapshot", s.site)
            # Whatever was announced while this site was away is waiting in its queue, and the hello
            # makes the coordinator say it again: hear it before training on older news.
            link.serve_until(lambda: self.heard, timeout=HELLO_WAIT)
            greeted = self.announcement.run_id if self.announcement else None
            while s.max_tasks is None or self.sent < s.max_tasks:
                link.serve_until(self._has_work)
                announcement = self.announcement
                assert announcement is not None  # _has_work is only true with one
                if announcement.final:
                    log.info("site %s: the coordinator ended the run at version %d", s.site, announcement.version)
                    break
                if greeted not in (None, announcement.run_id):
                    # A coordinator that started a new run takes updates only from the queues of sites
                    # that said hello to it.
                    log.info("site %s: a new run %s began; saying hello to it", s.site, announcement.run_id)
                    self._say_hello(publisher)
                greeted = announcement.run_id
                self._check_frozen(announcement)
                stale_base = (self.base_run, self.base_version) != (announcement.run_id, announcement.version)
                if stale_base and not self.fetch_snapshot(link, announcement):
                    continue
                # A site that lost the broker still trains: its update and score wait in the outbox.
                offline = self._score_base(link, publisher)
                self._train(link)
                if offline is not None:
                    raise offline
                self._flush_outbox(publisher)
            return True
        finally:
            link.close()

    def _check_frozen(self, announcement: Announcement) -> None:
        """Refuse to train when this site's frozen weights are not the coordinator's: they never
        travel, so an update trained on others would be merged into a model it was not made for."""
        if announcement.frozen is not None and announcement.frozen != self.frozen:
            frozen = len(self.model.state_dict()) - len(self.names)
            raise TaskMismatch(
                f"site {self.settings.site} cannot train: the frozen part of its model ({frozen} tensors that do not "
                f"train, digest {self.frozen[:12]}) differs from the coordinator's (digest {announcement.frozen[:12]}). "
                f"Frozen weights are never sent: every process builds them in build_model(). Run the same task "
                f"({self.settings.task}) with the same pretrained weights, seeds and package versions as the "
                f"coordinator, then start this site again")

    def _has_work(self) -> bool:
        a = self.announcement
        return a is not None and (a.final or a.retrain or (a.run_id, a.version) != self.last_trained)

    def on_announcement(self, headers: dict | None, body: bytes) -> None:
        """Take an announcement from the site's queue: the newest one is the one to follow."""
        try:
            header, _ = decode_header(read_single(headers, body))
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

    def fetch_snapshot(self, link: transport.Link, announcement: Announcement) -> bool:
        """Read the announced snapshot from the stream, verify it, and make it the base to train from.

        Returns False if it did not arrive in time (the stream's retention may have dropped it) or
        gave way to a newer announcement (``transport.SnapshotReader`` says when); the worker then
        follows the newest announcement.
        """
        started = time.monotonic()
        site = self.settings.site
        # The old base is of no more use once a newer version is announced; letting it go first
        # keeps a large model's worker at two copies (model and base), never three.
        self.base = self.base_version = self.base_run = None
        reader = transport.SnapshotReader(link, announcement, self.snapshot_buffer, log=log, who=f"site {site}",
                                          newest=lambda: self.announcement)
        try:
            payload = reader.read()
            if payload is None:
                log.info("site %s: version %d gave way to the announcement of version %d before it arrived",
                         site, announcement.version, self.announcement.version)
                return False
            header, parts = decode_payload(payload, HeaderLimits.for_model(len(self.layout.shapes)))
            if not isinstance(header, SnapshotHeader):
                raise ProtocolError(f"the stream holds a {header.kind} payload under its id")
            tensors = decode_tensors(header.tensors, parts, self.layout)
            # Not checked for NaN here: the coordinator checks each version once before publishing
            # it, and the digest proves these are the bytes it published.
            check_matches_model(trained_state(self.model, self.names), tensors, finite=False)
        except (ProtocolError, transport.SnapshotUnavailable) as exc:
            log.error("site %s: cannot use snapshot version %d (%s); waiting for the next version",
                      site, announcement.version, exc)
            if self.announcement is announcement:
                self.announcement = None
            return False
        finally:
            self.stream_attachments = reader.attachments
        self.base, self.base_version, self.base_run = tensors, header.version, header.run_id
        self.base_config = dict(announcement.config)
        self.snapshots_fetched.append(header.version)
        log.info("site %s: snapshot version %d (%d bytes) in %.2f s", site, header.version, len(payload),
                 time.monotonic() - started)
        return True

    # -- evaluation ------------------------------------------------------------------------------

    def _score_base(self, link: transport.Link, publisher: transport.Publisher) -> BaseException | None:
        """Score the base snapshot on the site's own held-out data, if the coordinator's open round
        of evaluation asks for it and this site has not answered it, and send the score now, not
        after training. Returns the connection failure met meanwhile, for the caller to raise once
        training is done."""
        asked = self.announcement.evaluate if self.announcement is not None else None
        if (not self.task.evaluates_at_sites or asked is None or self.base_version < asked
                or self.evaluated == (self.base_run, asked)):
            return None
        self.evaluated = (self.base_run, asked)
        site, version = self.settings.site, self.base_version
        self.model.to(self.device)
        load_values(self.model, self.base)
        context = SiteContext(site=site, version=version, device=self.device, config=dict(self.base_config))
        started = time.monotonic()
        result, lost = link.run_while_serving(
            lambda: self.task.evaluate_site(self.model, context), f"evaluate-{site}",
            on_lost=lambda exc: log.warning("site %s: lost the broker during evaluation (%s); it goes on", site, exc),
        )
        report = self._report(result, asked, version)
        if report is not None:
            self.outbox.put(report.report_id, encode_payload(report, []), kind="evaluation")
            log.info("site %s: scored version %d for round %d on %d held-out samples in %.2f s: %s", site, version,
                     asked, report.num_samples, time.monotonic() - started,
                     ", ".join(f"{name} {value:.4f}" for name, value in report.metrics.items()))
        if report is not None and lost is None:
            try:
                self._flush_outbox(publisher)
            except transport.RECOVERABLE as exc:
                lost = exc
        return lost

    def _report(self, result, asked: int, version: int) -> EvalReport | None:
        """The report of an evaluate_site result (None: nothing to report, said why)."""
        site = self.settings.site
        if result is None:
            log.info("site %s: the task scored nothing for round %d (evaluate_site returned None)", site, asked)
            return None
        if not isinstance(result, EvalResult) or result.num_samples <= 0:
            raise ValueError(f"task {self.settings.task} evaluate_site() must return an EvalResult with "
                             f"num_samples > 0, or None, got {result!r}")
        try:
            return EvalReport(protocol=PROTOCOL_VERSION, report_id=new_id(), run_id=self.base_run, site=site,
                              round=asked, version=version, num_samples=result.num_samples, metrics=result.metrics)
        except ValidationError as exc:
            log.error("site %s: evaluate_site's metrics for version %d cannot be sent (%s); they need finite numbers "
                      "of magnitude at most %g under at most %d names of 64 characters", site, version,
                      "; ".join(e["msg"] for e in exc.errors()[:3]), MAX_SCORE, MAX_METRICS)
            return None

    # -- training and the update -----------------------------------------------------------------

    def _train(self, link: transport.Link) -> None:
        """Train on the base snapshot and put the update in the outbox.

        If the broker is lost during training, training still finishes and its update waits in the
        outbox; only then does the connection failure propagate to the reconnect loop.
        """
        assert self.base is not None and self.base_version is not None
        site, version = self.settings.site, self.base_version
        self.model.to(self.device)
        load_values(self.model, self.base)
        started = time.monotonic()
        context = SiteContext(site=site, version=version, device=self.device, config=dict(self.base_config),
                              progress=self._progress_reporter(version, started))
        result, lost = self._train_in_background(link, context)
        train_seconds = time.monotonic() - started
        self.last_trained = (self.base_run, version)
        encoding = time.monotonic()
        # By name, as the model holds them now: training may have moved or replaced its tensors.
        delta = trained_delta(trained_state(self.model, self.names), self.base)
        if all(torch.count_nonzero(tensor) == 0 for tensor in delta.values()):
            log.error("site %s: training on version %d changed nothing: the update is exactly zero. A task whose "
                      "train() builds a new model or optimizes tensors other than the model's own learns nothing "
                      "fedq can see; it is sent all the same, and the coordinator counts it", site, version)
        dense = sum(t.numel() * 4 for t in delta.values())
        if self.feedback is not None:
            specs, parts = self.feedback.encode(delta, self.codec, self.base_run)
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
        throttle = Throttle()

        def report(fraction: float) -> None:
            if throttle.due():
                log.info("site %s: training on version %d, %.0f%% done after %.0f s",
                         self.settings.site, version, 100 * fraction, time.monotonic() - started)

        return report

    def _flush_outbox(self, publisher: transport.Publisher) -> None:
        """Publish every waiting update, oldest first; each leaves the outbox once confirmed."""
        for path in self.outbox.pending():
            entry = self.outbox.read(path)
            if entry is None:
                continue
            kind, payload_id, payload = entry
            started = time.monotonic()
            self._publish(publisher, [payload], payload_id)
            self.outbox.remove(path)
            if kind == "update":
                self.sent += 1
            log.info("site %s: %s %s confirmed by the broker (%.1f MB in %.2f s)", self.settings.site, kind,
                     payload_id, len(payload) / 1e6, time.monotonic() - started)

    def _train_in_background(
        self, link: transport.Link, context: SiteContext
    ) -> tuple[TrainResult, BaseException | None]:
        """Run the task's training on a thread while this thread keeps the connection alive.

        Returns the result and the connection failure met meanwhile, if any.
        """
        result, lost = link.run_while_serving(
            lambda: self.task.train(self.model, context), f"train-{context.site}",
            on_lost=lambda exc: log.warning("site %s: lost the broker during training (%s); training goes on",
                                            context.site, exc),
        )
        if not isinstance(result, TrainResult) or result.num_samples <= 0:
            raise ValueError(f"task {self.settings.task} train() must return a TrainResult with num_samples > 0, got {result!r}")
        return result, lost

    def _say_hello(self, publisher: transport.Publisher) -> None:
        hello = Hello(protocol=PROTOCOL_VERSION, site=self.settings.site, frozen=self.frozen)
        self._publish(publisher, encode_payload(hello, []), new_id(), hello=True)

    def _publish(self, publisher: transport.Publisher, buffers, payload_id: str, hello: bool = False) -> ChunkInfo:
        throttle = Throttle()

        def progress(info: ChunkInfo) -> None:
            if throttle.due():
                log.info("site %s: uploading %s: %d of %d chunks sent (%s of %s)", self.settings.site, payload_id,
                         info.index + 1, info.count, megabytes(info.offset + info.length),
                         megabytes(info.size))

        return publisher.update(buffers, payload_id, self.user, self.settings.site, progress, hello=hello)

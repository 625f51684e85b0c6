"""The coordinator process: owns the global model, takes updates as they come, publishes versions.

One thread, one connection, two channels: updates are consumed on one (``transport.UpdateInbox``),
snapshots, announcements, refusals and the status published with confirms on the other
(``transport.Publisher``). What a payload does to the federation is decided without the broker,
in ``coordinator.ingest``; this module keeps the process: the connection, acknowledgements,
checkpoints, releases of new versions, evaluation, status and signals.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from typing import Any

import torch

from coordinator import export
from coordinator.checkpoint import Checkpoint, CheckpointFiles
from coordinator.ingest import GREETED, REFUSED, Ingest, NormBound, Verdict, report_gap
from coordinator.ledger import Ledger
from coordinator.memory import keep_freed_memory
from coordinator.metrics import serve_metrics
from coordinator.runlog import RunLog
from coordinator.senders import Senders
from coordinator.site_scores import SiteScores
from coordinator.settings import CoordinatorSettings
from coordinator.state import FederationState
from coordinator.status import INGEST_BOUNDS, Observations, build_status, progress_line
from coordinator.strategies import STRATEGIES, Strategy
from coordinator.suspects import Suspects, deliveries
from coordinator.upload_spool import UploadSpool
from coordinator.uploads import Budget, Refusal, Upload, Uploads
from shared import transport
from shared.chunking import BufferPool, chunk_count, payload_digest
from shared.codecs import Layout, encode_tensors, get_codec
from shared.memory import peak_resident_bytes
from shared.protocol import (
    MAX_CHUNK_BYTES,
    PROTOCOL_VERSION,
    Announcement,
    ProtocolError,
    SnapshotHeader,
    Status,
    encode_payload,
    new_id,
    now,
    payload_size,
)
from shared.settings import SettingsError, writable_folder
from shared.task import Task
from shared.model_state import checked_names, frozen_digest, load_values, master_state, trained_state
from shared.validation import check_matches_model, non_finite_tensor

log = logging.getLogger("fedq.coordinator")
# How often the broker is asked whether quiet sites still have a connection (stand-ins): a site
# that left is noticed within about this long, at one passive queue.declare per quiet site.
ABSENCE_CHECK_SECONDS = 1.0


def make_strategy(settings: CoordinatorSettings) -> Strategy:
    """The aggregation strategy the settings ask for."""
    return STRATEGIES[settings.strategy].from_settings(settings)


class ModelDiverged(RuntimeError):
    """The merged model holds NaN or infinity; the run stops without making it durable."""


class Coordinator:
    def __init__(self, settings: CoordinatorSettings, task: Task):
        self.settings = settings
        self.task = task
        self.model = task.build_model()
        # Only the tensors that train travel and are merged; the frozen rest stays as build_model
        # made it, here and at every site (the announcements carry its digest).
        names = checked_names(self.model, task.trained_tensors(self.model), settings.task)
        # Updates merge into a float32 CPU master; where the model is float32 on the CPU, it is the
        # model itself. The model is loaded from it by name before each evaluation (load_values).
        params = master_state(trained_state(self.model, names))
        self.state = FederationState(run_id=new_id(), params=params, layout=Layout.of(params),
                                     frozen=frozen_digest(self.model, names))
        self.model.to(settings.torch_device)
        try:
            self.strategy = make_strategy(settings)
        except ValueError as exc:
            raise SettingsError(f"fedq cannot start: {exc}. Fix FEDQ_STRATEGY and its settings, then start again.") from None
        self.strategy.prepare(params)
        if self.strategy.privacy is not None:
            self._cover_trainable()
        if not (task.evaluates_centrally or task.evaluates_at_sites) and settings.stop_at_accuracy is not None:
            raise SettingsError(f"fedq cannot start: FEDQ_STOP_AT_ACCURACY needs an accuracy, and task {settings.task} "
                                "scores nothing (it has neither evaluate nor evaluate_site). Give the task one of them, "
                                "or stop the run by FEDQ_MAX_SECONDS or FEDQ_MAX_VERSIONS")
        # Federated evaluation, for tasks that score at the sites; its rounds' scores stand for the
        # federation's when the coordinator has no data of its own.
        self.scores = SiteScores(settings.site_eval_every, settings.site_eval_wait) if task.evaluates_at_sites else None
        #: The values of the version the open round of site evaluation scores, for model-best: the
        #: model has moved on by the time the sites' answers are in.
        self._round_values: dict[str, torch.Tensor] | None = None
        self.runlog = RunLog(writable_folder(settings.run_dir, "FEDQ_RUN_DIR"))
        self.senders = Senders(frozenset(settings.any_site_users), settings.site_users)
        self.ingest = Ingest(
            self.state, self.strategy, self.runlog, senders=self.senders,
            norm_bound=None if settings.update_norm_bound is None else NormBound(settings.update_norm_bound,
                                                                                   settings.update_norm_action),
            max_num_samples=settings.max_num_samples, max_update_value=settings.max_update_value, scores=self.scores,
        )
        self.checkpoints = CheckpointFiles(settings.run_dir)
        self.suspects = Suspects(settings.run_dir / "suspect.fedq")
        # The accuracy of model-best.safetensors (a resumed run takes it from the file).
        self._best_accuracy = -math.inf
        # Keeps the buffer of one dense update (model plus header room) for the next upload.
        self.buffers = BufferPool(self.state.layout.total * 4 + MAX_CHUNK_BYTES)
        self.uploads = Uploads(
            UploadSpool(settings.run_dir / "uploads"), self.buffers, self.senders, max_bytes=settings.max_update_bytes,
            window=self._window,
            budget=Budget(settings.sender_uploads, settings.sender_upload_bytes or settings.max_update_bytes),
            spool_period=settings.upload_timeout,
        )
        self.announcement: Announcement | None = None
        self.last_metrics: dict[str, float] = {}
        self._scored_version: int | None = None  # the version last_metrics are of
        self._checked_version: int | None = None  # the last version found finite
        self.stop_reason: str | None = None
        #: The signal (SIGTERM, SIGINT) that stopped the run, if one did.
        self.stopped_by: signal.Signals | None = None
        self.pending_acks: list[int] = []
        # When the oldest delivery in pending_acks was taken: none waits longer than checkpoint_seconds.
        self._pending_since = 0.0
        self.ingest_times = Observations(INGEST_BOUNDS)
        # Replaced whole on every tick, so readers on other threads (metrics) never see it half-built.
        self.status: Status | None = None
        self._last_status = 0.0
        self._asked_at = 0.0  # time.monotonic() when the broker was last asked which sites are absent
        self.metrics_url: str | None = None
        self._link: transport.Link | None = None
        #: The broker defects already logged: each once, not at every reconnection.
        self._defects_told: set[str] = set()

    def _cover_trainable(self) -> None:
        trainable = {name for name, parameter in self.model.named_parameters() if parameter.requires_grad}
        kept = self.strategy.privacy.cover(self.state.layout, trainable)
        if kept:
            log.warning("differential privacy covers the model's trainable parameters only: %d other tensors (%s) keep "
                        "the values the task's model starts with, for updates to them would leak site data outside the "
                        "guarantee. A model that needs them learned (BatchNorm statistics) should use GroupNorm or "
                        "LayerNorm under privacy", len(kept), ", ".join(kept[:5]) + (", ..." if len(kept) > 5 else ""))

    # The federation's state, as tests and embedding code read it.

    @property
    def run_id(self) -> str:
        return self.state.run_id

    @property
    def version(self) -> int:
        return self.state.version

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self.state.params

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
            self.uploads.take_spooled()
        else:
            self.uploads.spool.clear()
        log.info("coordinator %s: strategy %s, task %s, %d tensors, %d parameters",
                 "resumed" if resumed else "up", s.strategy, s.task, len(self.params), self.state.layout.total)
        dense_chunks = -(-self.state.layout.total * 4 // MAX_CHUNK_BYTES)
        if dense_chunks > self._window:
            log.warning("a dense fp32 update of this model is %d chunks, more than the window of %d that prefetch %d "
                        "allows: such updates will be refused. Have sites compress (FEDQ_CODEC=fp16 halves it, "
                        "topk-int8 cuts it ~100x) or raise FEDQ_PREFETCH above %d (memory: up to 4 MiB per chunk)",
                        dense_chunks, self._window, s.prefetch, dense_chunks + dense_chunks // 7 + 1)
        try:
            transport.serve_with_reconnect(self._session, "coordinator", lambda: self.stop_reason is not None)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if metrics is not None:
                metrics.shutdown()
                metrics.server_close()
        if self.announcement is not None:  # the run started: its final version is the model to take away
            final = s.run_dir / export.FINAL_FILE
            export.export_model(self.model, self.params, final, run_id=self.run_id, version=self.version,
                                accuracy=self.last_metrics.get("accuracy") if self._scored_version == self.version else None)
            log.info("the final model, version %d, is in %s (the best scored, in %s)", self.version, final,
                     export.BEST_FILE)
        privacy = self.strategy.privacy
        log.info("coordinator done; peak resident memory %.2f GB", peak_resident_bytes() / 1e9)
        summary = self.runlog.summary(
            strategy=s.strategy, stop_reason=self.stop_reason, final_version=self.version, protocol=PROTOCOL_VERSION,
            peak_resident_bytes=peak_resident_bytes(),
            privacy={"epsilon": privacy.epsilon(), "delta": privacy.delta, "releases": privacy.releases} if privacy else None,
        )
        self.runlog.close()
        return summary

    def _session(self, backoff: transport.Backoff) -> bool:
        """One connection's worth of serving; returns True when the run is over."""
        s = self.settings
        self._link = transport.connect(s.broker_url, s.heartbeat, "fedq-coordinator", **s.tls_files())
        try:
            backoff.reset()
            for defect in transport.broker_defects(self._link.broker_version):
                if defect not in self._defects_told:
                    self._defects_told.add(defect)
                    log.warning("%s", defect)
            self.uploads.reconnected()
            self.pending_acks.clear()
            self._publisher = transport.Publisher(self._link, declare_topology=True,
                                                 confirm_timeout=transport.SNAPSHOT_CONFIRM_TIMEOUT)
            if self._publisher.find_stream_end() is None:
                log.warning("could not read back a marker written to stream %s within %g s: sites will look for "
                            "snapshots by time, which needs the coordinator's clock to agree with the broker's "
                            "to within a second", transport.SNAPSHOTS, transport.MARKER_TIMEOUT)
            self._inbox = transport.UpdateInbox(self._link, s.prefetch)
            for site in sorted(self.state.sites_seen):  # a resumed run's sites may have updates queued
                self._listen(site)
            if self.announcement is None:
                self._start()
            else:
                self._release()  # the newest version again, in case the outage lost it
            while self.stop_reason is None:
                self._serve()
                self._flush_if_due()
                self._close_site_round()
                self._check_limits()
                self._expire_uploads()
                self._find_absent_sites()
                self._settle()
                self._tick()
                self._publisher.wake_readers()
            log.info("stopping: %s", self.stop_reason)
            if self._unreleased:
                self._release()
            else:
                self._settle(force=True)
            self._announce(final=True)
            self._tick(force=True)
            return True
        finally:
            self._link.close()

    def _start(self) -> None:
        """The first version of a new run, or the first publication after a resume."""
        self._wait_for_sites()
        if self.stop_reason is not None:  # stopped before its sites came: the run never started
            return
        if not self.runlog.clock_started:
            # Scored before the clock starts: loading the evaluation data is not the federation's time.
            lost = self._score() if self.task.evaluates_centrally else None
            self.runlog.start_clock()
            self.runlog.event("start", run_id=self.run_id, strategy=self.settings.strategy,
                              settings=self.settings.public())
            if self.task.evaluates_centrally:
                self.runlog.evaluation(self.version, self.last_metrics)
            if lost is not None:
                raise lost
        self._release()

    def _wait_for_sites(self) -> None:
        """Hold the first version until enough sites said hello, so a run's clock starts with its sites."""
        if self.settings.wait_for_sites and self.version == 0:
            log.info("waiting for %d sites to say hello", self.settings.wait_for_sites)
            while len(self.state.sites_seen) < self.settings.wait_for_sites and self.stop_reason is None:
                self._serve()
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
            queue_depths=self._publisher.queue_depths(self._inbox.backed_up if self._inbox.site_queues else None),
            ingest=self.ingest_times, every=s.status_seconds,
            site_of_user=self.senders.site_of_user,
            absent=self.strategy.stand_ins.away if self.strategy.stand_ins is not None else (),
        )
        self._publisher.status(self.status)
        if self.runlog.clock_started:
            log.info("%s", progress_line(self.status))
        else:  # the run's clock starts with its first version: until then there is no progress to show
            log.info("waiting for sites: %d of %d said hello", len(self.state.sites_seen), s.wait_for_sites)

    def stop(self, reason: str) -> None:
        """Ask the run to end (safe from any thread); it finishes within half a second."""
        self.stop_reason = reason

    def _on_signal(self, signum, frame) -> None:
        self.stopped_by = signal.Signals(signum)
        self.stop(f"received {self.stopped_by.name}")

    def _flush_if_due(self) -> None:
        """Close a buffer or round that has waited past its deadline with the updates it holds; the
        version it makes is released by the next ``_serve``."""
        outcome = self.ingest.flush(time.monotonic())
        if outcome is not None:
            log.info("closed a buffer of %d updates at its deadline of %g s: version %d", outcome.flushed,
                     self.settings.buffer_deadline, self.version)

    def _check_limits(self) -> None:
        s = self.settings
        accuracy = self.last_metrics.get("accuracy")
        if s.stop_at_accuracy is not None and accuracy is not None and accuracy >= s.stop_at_accuracy:
            self.stop_reason = f"accuracy {accuracy:.4f} reached the target {s.stop_at_accuracy}"
        elif s.max_versions is not None and self.version >= s.max_versions:
            self.stop_reason = f"reached version {self.version}"
        elif s.max_seconds is not None and self.runlog.elapsed >= s.max_seconds:
            self.stop_reason = f"ran for {s.max_seconds:g} s"

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
        if force or due or (self.pending_acks and self._inbox.fullest >= self._window):
            self._checkpoint()
            self.uploads.checkpointed()
            self._inbox.ack(self.pending_acks)
            self.pending_acks.clear()
        if self._inbox.fullest >= self._window:  # full of unfinished uploads alone
            acks, refusals = self.uploads.spool_unfinished()
            self._inbox.ack(acks)
            for refusal in refusals:
                self._refuse(refusal)

    def _hold(self, tags: list[int]) -> None:
        """Keep these deliveries unacknowledged until the next checkpoint holds their effect."""
        if not self.pending_acks:
            self._pending_since = time.monotonic()
        self.pending_acks.extend(tags)

    def _checkpoint(self) -> None:
        self._check_finite()
        if self.strategy.max_staleness is not None:
            self.state.ledger.forget_before(self.version - self.strategy.max_staleness)
        tensors, values = self.strategy.state()
        self.checkpoints.write(Checkpoint(
            run_id=self.run_id, version=self.version, params=self.params, strategy_tensors=tensors,
            strategy_values=values, ledger_rows=self.state.ledger.to_rows(),
            run={"sites_seen": sorted(self.state.sites_seen), "started_at": self.runlog.started_at,
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
        self.state.run_id, self.state.version = checkpoint.run_id, checkpoint.version
        self.strategy.restore(checkpoint.strategy_tensors, checkpoint.strategy_values)
        self.state.ledger = Ledger.from_rows(checkpoint.ledger_rows)
        self.state.sites_seen = set(checkpoint.run["sites_seen"])
        self.runlog.resume_clock(checkpoint.run["started_at"])
        self.runlog.restore_counters(checkpoint.run["counters"])
        if self.strategy.privacy is not None:
            self.strategy.privacy.releases = checkpoint.run["dp_releases"]
        self.runlog.event("resume", run_id=self.run_id, version=self.version, ledger=len(self.state.ledger.entries))
        best = export.exported_metadata(self.settings.run_dir / export.BEST_FILE)
        if best.get("fedq_run_id") == self.run_id and "fedq_accuracy" in best:
            self._best_accuracy = float(best["fedq_accuracy"])
        if self.task.evaluates_centrally:
            self._evaluate()
        log.info("resumed run %s at version %d from %s (%d updates in the ledger)",
                 self.run_id, self.version, self.checkpoints.path, len(self.state.ledger.entries))
        return True

    # -- incoming messages -----------------------------------------------------------------------

    def _serve(self) -> None:
        """Wait up to half a second for deliveries, handle them one at a time, checking the stop
        conditions and the status tick between them, then release the newest version.

        Updates that arrived together all go into the model before one snapshot goes out: sites
        want only the newest version, and a snapshot per update would let a backlog grow whenever
        updates come faster than versions can be checkpointed and published. Only those in hand when
        the round began: publishing the status drives the connection, which hands over more, and a
        steady flood would otherwise hold the next snapshot back for as long as it lasts.
        """
        # Deliveries handed over during the last round wait in the inbox: take them without waiting.
        self._link.serve(0 if self._inbox else 0.5)
        for _ in range(len(self._inbox)):
            if self.stop_reason is not None or not self._inbox:
                break
            delivery = self._inbox.pop()
            self._on_delivery(delivery)
            self._close_site_round()
            self._check_limits()
            self._tick()
        if self.stop_reason is None and self._unreleased:
            self._release()

    def _on_delivery(self, delivery: transport.Delivery) -> None:
        try:
            placed = self.uploads.add(delivery.tag, delivery.headers, delivery.user_id, delivery.body)
        except Exception as exc:  # noqa: BLE001 - as in the ingest stages: this delivery's end, not the process's
            placed = Refusal([delivery.tag], report_gap(self.runlog, "uploads", exc, delivery.user_id), delivery.body,
                             delivery.headers, delivery.user_id)
        if isinstance(placed, Refusal):
            self._refuse(placed)
        elif isinstance(placed, Upload):
            self._handle(placed, delivery.headers)

    def _handle(self, upload: Upload, headers: dict | None) -> None:
        """Take a whole upload through the ingest stages and act on the verdict."""
        payload_id, handed_over = upload.reassembly.payload_id, deliveries(headers)
        try:
            stopped_us = self.suspects.refusal(payload_id, handed_over)
            if stopped_us is not None:
                verdict = Verdict(REFUSED, stopped_us)
            else:
                guarded = self.suspects.taking(payload_id, handed_over)
                try:
                    verdict = self.ingest.take(upload.reassembly.payload(), upload.user_id, upload.first_chunk)
                except ProtocolError as exc:  # the digest does not match: the bytes are not what was sent
                    verdict = Verdict(REFUSED, str(exc))
                if guarded:
                    self.suspects.taken()
            if verdict.outcome == REFUSED:
                evidence = upload.reassembly.prefix(MAX_CHUNK_BYTES)
                self._refuse(Refusal(upload.tags, verdict.reason, evidence, headers, upload.user_id))
                return
        finally:
            self.ingest_times.observe(time.monotonic() - upload.first_chunk)
            # Nothing refers to the payload any more: strategies copy what they keep.
            self.buffers.give(upload.reassembly.storage)
        if verdict.outcome == GREETED:
            self._listen(verdict.site)
            refused = self._publisher.welcome(verdict.site)  # its queue hears every version from now on
            if refused is not None:
                log.warning("site %s said hello, but its announcement queue cannot be bound (%s); it will hear no "
                            "version until it declares %s as fedq's worker does", verdict.site, refused,
                            transport.site_queue(verdict.site))
                self.runlog.event("unwelcome", site=verdict.site, reason=refused)
            self._announce()
        self._hold(upload.tags)
        self._settle()

    def _listen(self, site: str) -> None:
        """Take the site's updates from a queue of its own, with a window of its own."""
        refused = self._publisher.open_updates(site)
        if refused is None:
            self._inbox.listen(site)
        else:  # its updates go on arriving through the lobby, in the window all sites share
            log.warning("the queue of site %s's updates cannot be declared (%s): an older fedq made %s with other "
                        "arguments; its updates come through the lobby %s until it is deleted", site, refused,
                        transport.site_update_queue(site), transport.UPDATES)
            self.runlog.event("no_update_queue", site=site, reason=refused)

    def _expire_uploads(self) -> None:
        for upload in self.uploads.expire(self.settings.upload_timeout):
            log.warning("discarded update upload %s from %s: %d of %d chunks, idle for %.0f s",
                        upload.reassembly.payload_id, upload.user_id or "unknown user", upload.reassembly.received,
                        upload.reassembly.count, time.monotonic() - upload.last_chunk)
            self.runlog.event("upload_expired", payload_id=upload.reassembly.payload_id, user=upload.user_id,
                              received=upload.reassembly.received, chunks=upload.reassembly.count)
            self._hold(upload.tags)

    def _find_absent_sites(self) -> None:
        """Once a second, ask the broker whether the quiet sites the strategy keeps a stand-in for
        still have a connection; those that have none are absent, and their stand-ins step in."""
        stand_ins, now = self.strategy.stand_ins, time.monotonic()
        if stand_ins is None or now - self._asked_at < ABSENCE_CHECK_SECONDS:
            return
        self._asked_at = now
        for site in stand_ins.expire(now):
            log.info("site %s has sent nothing for %g s: its latest update stands in for it no more", site,
                     stand_ins.lifetime)
            self.runlog.event("site_gone", site=site)
        for site in stand_ins.to_ask(now):
            if self._publisher.connected(site) is False:
                stand_ins.left(site)
                log.info("site %s has no connection: its latest update stands in for it until it sends again",
                         site)
                self.runlog.event("site_absent", site=site, stand_in_staleness=stand_ins.kept[site].staleness)

    def _refuse(self, refusal: Refusal) -> None:
        """Dead-letter a message that cannot be used, with the reason, and settle its deliveries."""
        log.warning("refused a message from %s: %s", refusal.user_id or "unknown user", refusal.reason)
        self.runlog.refused(refusal.user_id)
        self.runlog.event("rejected", user=refusal.user_id, reason=refusal.reason)
        self._publisher.refusal(refusal.body, refusal.headers, refusal.reason, refusal.user_id)
        self._hold(refusal.tags)

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
        lost = self._score()
        self.runlog.evaluation(self.version, self.last_metrics)
        if lost is not None:
            raise lost

    def _score(self) -> BaseException | None:
        """Evaluate the model, on a thread of its own while this one keeps the connection alive: an
        evaluation longer than two heartbeats once cost the connection after every version, and the
        unacknowledged deliveries crept towards the queue's delivery limit. Deliveries that arrive
        meanwhile wait in the inbox; nothing changes the model until the evaluation is done. Returns
        the connection failure met meanwhile, for the caller to raise once the result is recorded."""
        load_values(self.model, self.params)
        evaluate = lambda: self.task.evaluate(self.model)  # noqa: E731
        lost = None
        if self._link is not None and self._link.is_open:
            metrics, lost = self._link.run_while_serving(evaluate, "fedq-evaluate")
        else:  # resuming, before the first connection
            metrics = evaluate()
        if not isinstance(metrics, dict):
            raise TypeError(f"task {self.settings.task} evaluate() must return a dict of metrics, got {metrics!r}")
        self._scored(self.version, metrics, self.params)
        return lost

    def _scored(self, version: int, metrics: dict[str, float], values: dict[str, torch.Tensor]) -> None:
        """Make ``metrics`` the federation's score of ``version`` (of the model with ``values``), and
        export that version if it is the best so far."""
        if self.strategy.privacy is not None:
            metrics = {**metrics, "epsilon": self.strategy.privacy.epsilon()}
        self.last_metrics = metrics  # whole, for readers on other threads (status, tests)
        self._scored_version = version
        accuracy = metrics.get("accuracy")
        if accuracy is None or not math.isfinite(accuracy) or accuracy <= self._best_accuracy:
            return
        self._best_accuracy = accuracy
        export.export_model(self.model, values, self.settings.run_dir / export.BEST_FILE, run_id=self.run_id,
                            version=version, accuracy=accuracy)

    def _close_site_round(self) -> None:
        """Record the round of site evaluation if it is done: every site seen answered, or its wait is over."""
        pooled = self.scores.close_if_done(self.state.sites_seen, time.monotonic()) if self.scores else None
        if pooled is None:
            return
        values, self._round_values = self._round_values, None
        self.runlog.event("federated_evaluation", version=pooled.version, newest_version=pooled.newest,
                          sites=pooled.sites, samples=pooled.samples, representative=pooled.representative,
                          **pooled.metrics)
        log.info("sites scored version %d%s: %s (%d sites, %d samples%s)", pooled.version,
                 f" (some of them up to version {pooled.newest})" if pooled.newest != pooled.version else "",
                 ", ".join(f"{name} {value:.4f}" for name, value in pooled.metrics.items()), pooled.sites,
                 pooled.samples, "" if pooled.representative else "; fewer than half the sites: not taken as the "
                 "federation's score")
        if pooled.representative and not self.task.evaluates_centrally:
            self.runlog.evaluation(pooled.version, pooled.metrics)
            self._scored(pooled.version, pooled.metrics, values if values is not None else self.params)

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
        if self.scores is not None and self.scores.open_if_due(self.version, time.monotonic()):
            if not self.task.evaluates_centrally:
                self._round_values = {name: tensor.clone() for name, tensor in self.params.items()}
        self._publish_snapshot()
        if self.task.evaluates_centrally and (
                self._scored_version is None or self.version - self._scored_version >= self.settings.eval_every):
            self._evaluate()

    def _publish_snapshot(self) -> None:
        """Announce the current version, then write its chunks to the stream.

        The announcement goes first, with the size and digest computed up front, so that sites read
        the stream while it is being written instead of after: fan-out takes the longer of writing
        and reading, not their sum. A site's read that is moving finishes even when a newer version
        is announced meanwhile (shared/transport/stream.py says why).
        """
        started = time.monotonic()
        specs, parts = encode_tensors(self.params, get_codec(self.settings.snapshot_codec))
        header = SnapshotHeader(protocol=PROTOCOL_VERSION, run_id=self.run_id, version=self.version, created_at=now(), tensors=specs)
        buffers = encode_payload(header, parts)
        size, digest = payload_size(buffers), payload_digest(buffers)
        self.announcement = Announcement(
            protocol=PROTOCOL_VERSION, run_id=self.run_id, version=self.version, payload_id=new_id(),
            chunks=chunk_count(size, MAX_CHUNK_BYTES), size=size, digest=digest, published_at=now(),
            stream_offset=self._publisher.stream_end, retrain=self.strategy.retrain, config=self.settings.run_config,
            frozen=self.state.frozen, evaluate=self.scores.asking if self.scores else None,
        )
        self._announce()
        self._publisher.snapshot(buffers, self.announcement.payload_id, digest)
        self.runlog.bytes_out += size
        seconds = time.monotonic() - started
        self.runlog.event("snapshot", version=self.version, bytes=size, chunks=self.announcement.chunks,
                          seconds=round(seconds, 4))
        if seconds >= 1.0:
            log.info("published version %d: %.1f MB in %.1f s", self.version, size / 1e6, seconds)

    def _announce(self, final: bool = False) -> None:
        if self.announcement is not None:
            self._publisher.announcement(self.announcement.model_copy(update={"final": final}))

"""The way of one payload through the coordinator, without a broker: small stages, one verdict.

A payload arrives reassembled and digest-checked, with the user the broker verified as its sender.
It goes through these stages in order; each either lets it go on or gives the verdict:

1. ``decode``: the header and its tensor parts; only hellos, updates and site evaluations belong here;
2. ``identify``: the broker-verified user may speak for the site the payload names;
3. ``greet``: a hello ends here: the site is up;
4. ``score``: a site's evaluation ends here, taken into its round (``coordinator.site_scores``);
5. ``replay``: an update the ledger counted already is a duplicate (a redelivery, or a replay), set aside;
6. ``receive``: the update's bytes count against its site;
7. ``current_run``: an update trained in another run is dropped;
8. ``staleness``: how many versions old its base is (a base from the future is refused);
9. ``validate``: its claimed sample count, and its tensors against the model: names, shapes, finite
   values of bounded magnitude;
10. ``bound``: the update norm bound (clip, or refuse);
11. ``privacy``: clipped to the privacy norm, under differential privacy;
12. ``admit``: the strategy's say (too stale, a site already in the buffer);
13. ``submit``: folded into the model or the buffer; a new version if the strategy made one;
14. ``record``: the ledger and the run log.

Between payloads, ``flush`` lets the strategy close a buffer or round that waited past its deadline.

A ProtocolError's message is the refusal's reason. Any other exception in a stage is a gap in
fedq's own checks: it is logged with its trace and counted (the run log's ``stage_failed``), and
the payload is refused with a reason naming the stage and the error. No payload stops the
coordinator.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from coordinator.ledger import Entry
from coordinator.robust import clip_to_norm, update_norm
from coordinator.runlog import RunLog
from coordinator.senders import Senders
from coordinator.site_scores import SiteScores
from coordinator.state import FederationState
from coordinator.strategies import Outcome, Strategy, Update
from shared.codecs import decode_tensors
from shared.deltas import Delta, update_magnitude
from shared.protocol import EvalReport, HeaderLimits, Hello, ProtocolError, UpdateHeader, decode_payload
from shared.validation import check_matches_model

log = logging.getLogger("fedq.coordinator")

APPLIED, DROPPED, REFUSED, GREETED, DUPLICATE, SCORED = (
    "applied", "dropped", "refused", "greeted", "duplicate", "scored")


@dataclass(frozen=True)
class Verdict:
    """What became of a payload: ``applied`` (``new_version`` if the model moved on), ``dropped``
    (counted, without effect: stale, or from another run), ``refused`` (to be dead-lettered with
    ``reason``), ``greeted`` (a site's hello), ``duplicate`` (counted already: acknowledged and
    set aside, for at-least-once delivery brings honest sites' updates twice) or ``scored`` (a
    site's evaluation, taken into its round unless ``reason`` says why not)."""

    outcome: str
    reason: str | None = None
    site: str | None = None
    update_id: str | None = None
    new_version: bool = False


@dataclass
class Arrival:
    """One payload on its way through the stages, and what each stage learned of it."""

    payload: memoryview
    user: str | None
    #: When its first chunk came (time.monotonic()), for its ingest latency.
    first_chunk: float
    header: Any = None
    #: Whether its sender may speak for the site it names.
    identified: bool = False
    parts: list = field(default_factory=list)
    staleness: int = 0
    delta: Delta | None = None
    outcome: Outcome | None = None
    #: The version current when it was folded in.
    applied_at: int = 0


@dataclass(frozen=True)
class NormBound:
    """The largest L2 norm an update may have, and what happens to one over it: ``clip`` or ``refuse``."""

    bound: float
    action: str = "clip"

    def apply(self, delta: Delta) -> None:
        if self.action == "refuse":
            norm = update_norm(delta)
            if norm > self.bound:
                raise ProtocolError(f"update norm {norm:.4g} exceeds the bound {self.bound:g}")
        else:
            clip_to_norm(delta, self.bound)


Stage = Callable[[Arrival], "Verdict | None"]


def report_gap(runlog: RunLog, stage: str, error: Exception, user: str | None) -> str:
    """An error no check foresaw, in ``stage`` on a payload from ``user``: a check fedq lacks, or a
    bug. Logged loudly with its trace and counted; returns the refusal's reason, for it is still
    only that payload's end."""
    log.error("ingest stage %s raised %s on a payload from %s; the payload is refused and the coordinator goes on. "
              "This is a gap in fedq's checks: please report it with this trace", stage, type(error).__name__,
              user or "unknown user", exc_info=error)
    runlog.stage_failed(stage, error)
    return f"{stage} failed: {type(error).__name__}: {error}"


class Ingest:
    """Takes payloads into ``state`` through ``strategy``, recording them in ``runlog``."""

    def __init__(self, state: FederationState, strategy: Strategy, runlog: RunLog, *,
                 senders: Senders = Senders(), norm_bound: NormBound | None = None, max_num_samples: int = 100_000_000,
                 max_update_value: float = 1e12, scores: SiteScores | None = None):
        self.state, self.strategy, self.runlog = state, strategy, runlog
        self.scores = scores
        self.senders, self.norm_bound, self.max_num_samples = senders, norm_bound, max_num_samples
        self.max_update_value = max_update_value
        self.limits = HeaderLimits.for_model(len(state.layout.shapes))
        self.stages: tuple[Stage, ...] = (
            self.decode, self.identify, self.greet, self.score, self.replay, self.receive, self.current_run,
            self.staleness,
            self.validate, self.bound, self.privacy, self.admit, self.submit, self.record,
        )

    def flush(self, now: float) -> Outcome | None:
        """Have the strategy close a buffer or round that waited past its deadline (``now`` is
        time.monotonic()); the outcome if it did, the model then at its new version."""
        outcome = self.strategy.flush(self.state.params, now)
        if outcome is not None:
            if outcome.new_version:
                self.state.version += 1
            self.runlog.event("flushed", updates=outcome.flushed, version=self.state.version)
        return outcome

    def take(self, payload: memoryview, user: str | None, first_chunk: float | None = None) -> Verdict:
        """The verdict on one payload from ``user``, every stage it passed having had its effect."""
        arrival = Arrival(payload, user, time.monotonic() if first_chunk is None else first_chunk)
        for stage in self.stages:
            try:
                verdict = stage(arrival)
            except ProtocolError as exc:
                return self._refused(arrival, str(exc))
            except Exception as exc:  # noqa: BLE001 - a stage's failure is the payload's refusal, never a crash
                return self._refused(arrival, report_gap(self.runlog, stage.__name__, exc, user))
            if verdict is not None:
                return verdict
        raise AssertionError("the record stage gives every payload that reaches it its verdict")

    # -- the stages, in order ------------------------------------------------------------------

    def decode(self, arrival: Arrival) -> None:
        arrival.header, arrival.parts = decode_payload(arrival.payload, self.limits)
        if not isinstance(arrival.header, (Hello, UpdateHeader, EvalReport)):
            raise ProtocolError(f"a {arrival.header.kind} payload does not belong on the updates queue")

    def identify(self, arrival: Arrival) -> None:
        self.senders.check(arrival.header.site, arrival.user)
        arrival.identified = True

    def greet(self, arrival: Arrival) -> Verdict | None:
        if not isinstance(arrival.header, Hello):
            return None
        site, frozen = arrival.header.site, arrival.header.frozen
        log.info("site %s said hello", site)
        if frozen is not None and self.state.frozen is not None and frozen != self.state.frozen:
            log.error("site %s's frozen weights (digest %s) are not this model's (%s): it will refuse to train until it "
                      "builds the same task with the same pretrained weights", site, frozen[:12], self.state.frozen[:12])
            self.runlog.event("frozen_mismatch", site=site, digest=frozen)
        self.state.sites_seen.add(site)
        self.runlog.seen(site)
        return Verdict(GREETED, site=site)

    def score(self, arrival: Arrival) -> Verdict | None:
        report = arrival.header
        if not isinstance(report, EvalReport):
            return None
        if report.num_samples > self.max_num_samples:
            raise ProtocolError(f"the evaluation claims {report.num_samples} samples, more than the "
                                f"{self.max_num_samples} a message may claim (FEDQ_MAX_NUM_SAMPLES)")
        if report.tensors:
            raise ProtocolError("an evaluation carries scores, not tensors")
        if self.scores is None:
            raise ProtocolError("this coordinator asks no site to evaluate (its task has no evaluate_site)")
        self.state.sites_seen.add(report.site)
        self.runlog.seen(report.site)
        # Set aside, as an update from another run is dropped: an honest site's outbox can hold one
        # from before the coordinator started a new run.
        set_aside = (f"the evaluation is of run {report.run_id}, not the current run {self.state.run_id}"
                     if report.run_id != self.state.run_id else self.scores.add(report, self.state.version))
        self.runlog.event("site_evaluation", site=report.site, round=report.round, version=report.version,
                          num_samples=report.num_samples, metrics=report.metrics, set_aside=set_aside)
        return Verdict(SCORED, set_aside, site=report.site)

    def replay(self, arrival: Arrival) -> Verdict | None:
        header = arrival.header
        if header.update_id not in self.state.ledger:
            return None
        log.info("update %s from %s was counted already (redelivered or replayed): set aside", header.update_id,
                 header.site)
        self.runlog.duplicate(header.site, header.update_id)
        return Verdict(DUPLICATE, f"update {header.update_id} was counted already", site=header.site,
                       update_id=header.update_id)

    def receive(self, arrival: Arrival) -> None:
        self.state.sites_seen.add(arrival.header.site)
        self.runlog.received_update(arrival.header.site, len(arrival.payload))

    def current_run(self, arrival: Arrival) -> Verdict | None:
        run_id = arrival.header.run_id
        if run_id != self.state.run_id:
            return self._dropped(arrival, f"trained in run {run_id}, not the current run {self.state.run_id}", None)
        return None

    def staleness(self, arrival: Arrival) -> None:
        arrival.staleness = self.state.version - arrival.header.base_version
        if arrival.staleness < 0:
            raise ProtocolError(f"base version {arrival.header.base_version} is newer than the current version "
                                f"{self.state.version}")

    def validate(self, arrival: Arrival) -> None:
        if arrival.header.num_samples > self.max_num_samples:
            raise ProtocolError(f"the update claims {arrival.header.num_samples} samples, more than the "
                                f"{self.max_num_samples} an update may claim (FEDQ_MAX_NUM_SAMPLES)")
        arrival.delta = decode_tensors(arrival.header.tensors, arrival.parts, self.state.layout, sparse=True)
        check_matches_model(self.state.params, arrival.delta)
        # Finite is not enough: one update of 1e38s, merged, made the model infinite, which stops the
        # coordinator before it checkpoints, and the update, left on the queue, stopped it again.
        largest = update_magnitude(arrival.delta)
        if largest > self.max_update_value:
            raise ProtocolError(f"the update holds a value of magnitude {largest:.3g}, more than the "
                                f"{self.max_update_value:g} an update's values may reach (FEDQ_MAX_UPDATE_VALUE)")
        if largest == 0:
            # Taken (it moves nothing), but said loudly: a site that learned nothing is a bug or an attack.
            log.warning("update %s from %s is exactly zero: its site's training changed nothing fedq can see",
                        arrival.header.update_id, arrival.header.site)
            self.runlog.event("zero_update", site=arrival.header.site, update_id=arrival.header.update_id)

    def bound(self, arrival: Arrival) -> None:
        if self.norm_bound is not None:
            self.norm_bound.apply(arrival.delta)

    def privacy(self, arrival: Arrival) -> None:
        if self.strategy.privacy is not None:
            self.strategy.privacy.clip(arrival.delta)

    def admit(self, arrival: Arrival) -> Verdict | None:
        reason = self.strategy.admit(self._update(arrival), arrival.staleness)
        return None if reason is None else self._dropped(arrival, reason, arrival.staleness)

    def submit(self, arrival: Arrival) -> None:
        arrival.applied_at = self.state.version
        arrival.outcome = self.strategy.submit(self.state.params, self._update(arrival), arrival.staleness)
        if arrival.outcome.new_version:
            self.state.version += 1

    def record(self, arrival: Arrival) -> Verdict:
        header = arrival.header
        self.state.ledger.record(header.update_id, Entry(header.site, header.base_version, arrival.applied_at))
        self.runlog.applied_update(header.site, header.base_version, arrival.staleness)
        self.runlog.event(
            "update", site=header.site, update_id=header.update_id, base_version=header.base_version,
            staleness=arrival.staleness, weight=round(arrival.outcome.weight, 6), num_samples=header.num_samples,
            bytes=len(arrival.payload), train_seconds=header.train_seconds, metrics=header.metrics,
            ingest_seconds=round(time.monotonic() - arrival.first_chunk, 4),
        )
        return Verdict(APPLIED, site=header.site, update_id=header.update_id, new_version=arrival.outcome.new_version)

    # -- verdicts --------------------------------------------------------------------------------

    @staticmethod
    def _update(arrival: Arrival) -> Update:
        h = arrival.header
        return Update(h.update_id, h.site, h.base_version, h.num_samples, arrival.delta, h.metrics)

    def _dropped(self, arrival: Arrival, reason: str, staleness: int | None) -> Verdict:
        """Counted (so a redelivery is not taken again), without effect on the model."""
        header = arrival.header
        log.warning("dropped update %s from %s (base version %d): %s", header.update_id, header.site,
                    header.base_version, reason)
        if header.update_id not in self.state.ledger:
            self.state.ledger.record(header.update_id, Entry(header.site, header.base_version, None, reason))
        self.runlog.dropped += 1
        self.runlog.dropped_per_site[header.site] += 1
        self.runlog.event("dropped", site=header.site, update_id=header.update_id, staleness=staleness, reason=reason)
        return Verdict(DROPPED, reason, site=header.site, update_id=header.update_id)

    def _refused(self, arrival: Arrival, reason: str) -> Verdict:
        """To be dead-lettered; a strategy waiting for this site's answer is told it was refused."""
        header = arrival.header
        new_version = False
        if arrival.identified and isinstance(header, UpdateHeader):
            try:
                outcome = self.strategy.excuse(self.state.params, header.site, self.state.version - header.base_version)
            except Exception as exc:  # noqa: BLE001 - as in the stages: the refusal stands, the coordinator goes on
                report_gap(self.runlog, "excuse", exc, arrival.user)
                outcome = None
            if outcome is not None and outcome.new_version:
                self.state.version += 1
                new_version = True
                self.runlog.event("excused", site=header.site, updates=outcome.flushed, version=self.state.version)
        return Verdict(REFUSED, reason, site=getattr(header, "site", None), update_id=getattr(header, "update_id", None),
                       new_version=new_version)

"""Aggregation strategies: one class per algorithm, each turning site updates into new versions.

Lifecycle, as the coordinator drives it for every update that passed validation:

0. ``prepare(params)`` once, before the first update: allocate what ``submit`` will need, so the
   first update does not pay for fresh memory;
1. ``admit(update, staleness)`` returns a reason to drop the update, or None to take it;
2. ``submit(params, update, staleness)`` folds it in and says whether the global model changed,
   in which case the coordinator bumps the version, evaluates and publishes a snapshot;
3. between updates, ``flush(params, now)``: a strategy that holds updates back (a buffer, a round)
   closes it with what it has once it has waited past its deadline, so that sites that stopped
   answering, or whose updates are refused, never stall the run.

A strategy with ``stand_ins`` (``coordinator.stand_ins``) keeps sites' latest updates; the
coordinator asks the broker about the sites it names (``stand_ins.to_ask``) and tells it which have
no connection (``stand_ins.left``).

``staleness`` is the current version minus the version the site trained from. Updates are
differences to their base snapshot, so mixing one in never needs the old snapshot itself.

Each strategy registers itself in ``STRATEGIES`` under the name FEDQ_STRATEGY takes, and builds
itself from the coordinator's settings (``from_settings``): a new strategy is one class here.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from coordinator.aggregators import AGGREGATORS
from coordinator.privacy import GaussianPrivacy
from coordinator.running_sum import FlatTensors
from coordinator.server_optimizers import SERVER_OPTIMIZERS, ServerOptimizer, ServerSGD
from coordinator.staleness import StalenessWeight, constant, staleness_weight
from coordinator.stand_ins import StandIns
from shared.deltas import Delta, add_scaled, dense_copy
from shared.registry import Registry

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Update:
    """A decoded, validated site update."""

    update_id: str
    site: str
    base_version: int
    num_samples: int
    delta: Delta
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """What ``submit`` or ``flush`` did: whether a new version exists, the weight the update got,
    and, for a flush, how many updates the closed buffer held."""

    new_version: bool
    weight: float
    flushed: int = 0


class Strategy(ABC):
    """Decides how updates move the global model."""

    #: Whether a site that already trained on the newest version should train on it again.
    retrain = True
    #: Whether the server optimizer (FEDQ_SERVER_OPTIMIZER) moves the model for this strategy.
    uses_server_optimizer = False
    #: The latest updates that stand in for absent sites, for a strategy that uses them.
    stand_ins: StandIns | None = None

    def __init__(self, staleness_weight: StalenessWeight = constant, max_staleness: int | None = None,
                 privacy: GaussianPrivacy | None = None):
        self.staleness_weight = staleness_weight
        self.max_staleness = max_staleness
        #: With central differential privacy, every release of a new model gets calibrated noise.
        self.privacy = privacy

    @classmethod
    @abstractmethod
    def from_settings(cls, settings) -> "Strategy":
        """The strategy as the coordinator's settings configure it; ValueError for a combination
        that cannot work, saying which settings to change."""

    def prepare(self, params: Tensors) -> None:
        """Allocate the buffers ``submit`` needs for a model of these tensors."""

    def admit(self, update: Update, staleness: int) -> str | None:
        """A reason to drop this update, or None to take it."""
        if self.max_staleness is not None and staleness > self.max_staleness:
            return f"staleness {staleness} exceeds the maximum of {self.max_staleness}"
        return None

    @abstractmethod
    def submit(self, params: Tensors, update: Update, staleness: int) -> Outcome:
        """Fold an admitted update into ``params`` (in place, or into a buffer).

        ``update.delta`` may be a view of the received payload, whose memory receives the next
        payload once this returns: copy what must outlive the call.
        """

    def excuse(self, params: Tensors, site: str, staleness: int) -> Outcome | None:
        """``site``'s update, trained ``staleness`` versions ago, was refused: a strategy that waits
        for that site's answer stops waiting (the outcome, if that closed what it held back)."""
        return None

    def flush(self, params: Tensors, now: float) -> Outcome | None:
        """Close what is held back if its deadline has passed (``now`` is time.monotonic()); the
        outcome if it did. A strategy that holds nothing back never flushes."""
        return None

    def state(self) -> tuple[dict[str, Tensors], dict]:
        """What a checkpoint must keep besides the model: named tensor groups and plain values."""
        return {}, {}

    def restore(self, tensors: dict[str, Tensors], values: dict) -> None:
        """Take back what ``state`` returned."""


STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def privacy_from(settings) -> GaussianPrivacy | None:
    """Central differential privacy as the settings ask for it, or None when it is off."""
    if not settings.dp_noise_multiplier:
        return None
    return GaussianPrivacy(settings.dp_clip_norm, settings.dp_noise_multiplier, settings.dp_delta,
                           neighbours=settings.dp_neighbours, secure=settings.dp_secure_noise)


def staleness_from(settings) -> StalenessWeight:
    return staleness_weight(settings.staleness, settings.staleness_a, settings.staleness_b)


@STRATEGIES.register("fedasync")
class FedAsync(Strategy):
    """Mix every update in at once: x <- x + alpha * s(staleness) * delta.

    At zero staleness this is exactly FedAsync's (1 - a) x + a x_site with x_site = x + delta. For a
    stale update it moves the current model by the site's own progress instead of pulling it back
    towards the older base, and needs no copies of old versions.
    """

    def __init__(self, alpha: float = 0.6, **kwargs):
        super().__init__(**kwargs)
        self.alpha = alpha

    @classmethod
    def from_settings(cls, settings):
        return cls(settings.alpha, staleness_weight=staleness_from(settings), max_staleness=settings.max_staleness,
                   privacy=privacy_from(settings))

    def submit(self, params, update, staleness):
        weight = self.alpha * self.staleness_weight(staleness)
        delta = update.delta
        if self.privacy is not None:
            delta = dense_copy(delta)  # noise goes on every coordinate
            self.privacy.release(delta, sensitivity=1.0)
        add_scaled(params, delta, weight)
        return Outcome(True, weight)


# The default buffer (FedBuff.size): a quarter of the active sites, and at least three.
SMALLEST_BUFFER = 3
ACTIVE_SITES_PER_PLACE = 4


@STRATEGIES.register("fedbuff")
class FedBuff(Strategy):
    """Buffer K updates, then step the server optimizer along their aggregate (Nguyen et al., 2022).

    The aggregate is the buffer aggregator's (``coordinator.aggregators``): by default the sample-
    and staleness-weighted mean, with which K = number of sites, zero staleness and SGD at lr 1
    are FedAvg; trimmed mean and median resist hostile sites. A buffer that has held updates for
    ``deadline`` seconds steps with the ones it has (with privacy, the noise is calibrated to
    their number): where each site may hold one place, fewer than K live sites would otherwise
    never fill it. With the mean and without privacy, the latest updates of sites that have no
    connection join every step (``stand_ins``).
    """

    uses_server_optimizer = True

    def __init__(self, buffer_size: int | None = None, optimizer: ServerOptimizer | None = None,
                 aggregation: str = "mean", trim_fraction: float = 0.2,
                 deadline: float | None = None, active_seconds: float = 60.0, stand_in_mb: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if buffer_size is None and (aggregation != "mean" or self.privacy is not None):
            raise ValueError(f"{aggregation if aggregation != 'mean' else 'differential privacy'} needs a fixed buffer_size")
        self.aggregator = AGGREGATORS[aggregation](buffer_size, trim_fraction)
        if self.privacy is not None and not self.aggregator.supports_privacy:
            raise ValueError(f"differential privacy is calibrated for the mean, not the {self.aggregator.name}")
        #: K, or None for a quarter of the active sites (``size``).
        self.buffer_size = buffer_size
        self.active_seconds = active_seconds
        self._heard: dict[str, float] = {}  # site -> time.monotonic() of its last update
        self.optimizer = optimizer or ServerSGD(1.0)
        self.deadline = deadline
        self.samples = 0
        self.sites: list[str] = []
        self._opened = 0.0  # time.monotonic() of the buffer's first update
        self.steps = 0
        # Robust rules and privacy count real updates only.
        if stand_in_mb > 0 and aggregation == "mean" and self.privacy is None:
            self.stand_ins = StandIns(self.staleness_weight, int(stand_in_mb * 1e6), active_seconds)

    @classmethod
    def from_settings(cls, settings):
        return cls(settings.buffer_size, SERVER_OPTIMIZERS[settings.server_optimizer].from_settings(settings),
                   settings.aggregation, settings.trim_fraction, settings.buffer_deadline, settings.active_seconds,
                   settings.stand_in_memory_mb, staleness_weight=staleness_from(settings),
                   max_staleness=settings.max_staleness, privacy=privacy_from(settings))

    def size(self, now: float) -> int:
        """Updates this buffer takes: K, or by default a quarter of the sites whose last update came
        in the last ``active_seconds``, rounded up, and at least three (all of them, when fewer are
        active). Small buffers make versions often, so sites train on fresh models: with ten sites,
        K=3 reached digits-straggler's target sooner than half the sites did. A buffer must also
        span enough sites for their labels to average out: with 24 non-IID sites a fixed K=3 was
        slower than synchronous FedAvg, and once diverged, where a quarter (6) was quicker than
        FedAvg in every run. docs/strategies.md has the runs."""
        if self.buffer_size is not None:
            return self.buffer_size
        active = sum(1 for heard in self._heard.values() if now - heard <= self.active_seconds)
        return max(1, min(SMALLEST_BUFFER, active), math.ceil(active / ACTIVE_SITES_PER_PLACE))

    @property
    def sum(self) -> FlatTensors:
        """The running sum of the buffer's weighted deltas, complete (the mean's, after ``prepare``)."""
        return self.aggregator.sum

    def prepare(self, params):
        self.aggregator.prepare(params)

    def admit(self, update, staleness):
        if (self.aggregator.one_per_site or self.privacy is not None) and update.site in self.sites:
            why = "differential privacy" if self.privacy is not None else self.aggregator.name
            return f"site {update.site} already has an update in this buffer ({why} takes one per site)"
        return super().admit(update, staleness)

    def submit(self, params, update, staleness):
        weight = self.staleness_weight(staleness)
        # Under differential privacy every update counts the same: a sample count would let one
        # site's share, and so the noise it needs, grow without bound.
        share = 1 if self.privacy is not None else update.num_samples
        self.aggregator.prepare(params)
        self.aggregator.add(update.delta, weight, share)
        now = time.monotonic()
        if self.stand_ins is not None:
            self.stand_ins.keep(update.site, update.delta, share, staleness, self.steps, now)
        if not self.sites:
            self._opened = now
        self._heard[update.site] = now
        self.samples += share
        self.sites.append(update.site)
        if len(self.sites) < self.size(now):
            return Outcome(False, weight)
        self._step(params)
        return Outcome(True, weight)

    def flush(self, params, now):
        if not self.sites or self.deadline is None or now - self._opened < self.deadline:
            return None
        held = len(self.sites)
        self._step(params)
        return Outcome(True, 0.0, flushed=held)

    def _step(self, params: Tensors) -> None:
        """Step the server optimizer along the buffer's aggregate, with the absent sites' stand-ins,
        and empty the buffer."""
        if self.stand_ins is not None:
            self.samples += self.stand_ins.fold(self.aggregator.add, self.steps)
        self.steps += 1
        aggregate = self.aggregator.aggregate(self.samples)
        if self.privacy is not None:
            # One update changes a uniform mean of n by at most C / n: n is the number taken, K or fewer.
            self.privacy.release(aggregate, sensitivity=1.0 / len(self.sites))
        self.optimizer.step(params, aggregate)
        self.aggregator.reset()
        self.samples, self.sites = 0, []

    def state(self):
        buffers = self.aggregator.state(len(self.sites))
        return {**buffers, **self.optimizer.state_dict()}, {"samples": self.samples, "sites": list(self.sites)}

    def restore(self, tensors, values):
        self.samples, self.sites = int(values["samples"]), list(values["sites"])
        self._opened = time.monotonic()  # a resumed buffer's deadline counts from the resume
        self.aggregator.restore(tensors, len(self.sites))
        self.optimizer.load_state_dict(tensors)  # it takes its own groups and leaves the buffer's


@STRATEGIES.register("fedavg")
class FedAvgSync(FedBuff):
    """Synchronous FedAvg rounds, the baseline: every site trains on the same version once.

    The round closes when ``quorum`` of the ``sites`` have answered (all, by default), or once it
    has waited ``deadline`` seconds since its first update, with those that answered; sites wait for
    the next version instead of retraining, and an update that comes after its round closed is
    dropped with the reason."""

    retrain = False

    def __init__(self, sites: int, optimizer: ServerOptimizer | None = None, privacy: GaussianPrivacy | None = None,
                 quorum: float = 1.0, deadline: float | None = None):
        super().__init__(buffer_size=max(1, math.ceil(quorum * sites)), optimizer=optimizer, deadline=deadline,
                         staleness_weight=constant, max_staleness=0, privacy=privacy)
        #: Sites whose answer to this round was refused: they count towards closing it, but add nothing.
        self.excused: set[str] = set()

    @classmethod
    def from_settings(cls, settings):
        return cls(settings.sites, SERVER_OPTIMIZERS[settings.server_optimizer].from_settings(settings),
                   privacy=privacy_from(settings), quorum=settings.round_quorum, deadline=settings.buffer_deadline)

    def admit(self, update, staleness):
        if staleness > 0:
            return f"round {update.base_version} is closed (the model is {staleness} versions newer)"
        if update.site in self.sites:
            return f"site {update.site} already answered this round"
        if update.site in self.excused:
            return f"site {update.site}'s answer to this round was refused already"
        return None

    def submit(self, params, update, staleness):
        return self._close_if_answered(params, super().submit(params, update, staleness))

    def excuse(self, params, site, staleness):
        """A site whose update was refused does not train this version again (rounds do not
        retrain), so the round would wait for it until its deadline: it counts as answered."""
        if staleness != 0 or site in self.sites or site in self.excused:
            return None
        self.excused.add(site)
        return self._close_if_answered(params, None)

    def _close_if_answered(self, params, outcome: Outcome | None) -> Outcome | None:
        if outcome is not None and outcome.new_version:
            self.excused.clear()
            return outcome
        if len(self.sites) + len(self.excused) >= self.buffer_size:
            held = len(self.sites)
            if held:
                self._step(params)
            # Every answer refused: the same model again as a new version, so that sites train a new round.
            self.excused.clear()
            return Outcome(True, 0.0 if outcome is None else outcome.weight, flushed=held)
        return outcome

    def flush(self, params, now):
        outcome = super().flush(params, now)
        if outcome is not None:
            self.excused.clear()
        return outcome

    def state(self):
        tensors, values = super().state()
        return tensors, {**values, "excused": sorted(self.excused)}

    def restore(self, tensors, values):
        super().restore(tensors, values)
        self.excused = set(values.get("excused", ()))  # absent from older checkpoints

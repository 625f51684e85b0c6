"""Aggregation strategies: one class per algorithm, each turning site updates into new versions.

Lifecycle, as the coordinator drives it for every update that passed validation:

0. ``prepare(params)`` once, before the first update: allocate what ``submit`` will need, so the
   first update does not pay for fresh memory;
1. ``admit(update, staleness)`` returns a reason to drop the update, or None to take it;
2. ``submit(params, update, staleness)`` folds it in and says whether the global model changed,
   in which case the coordinator bumps the version, evaluates and publishes a snapshot.

``staleness`` is the current version minus the version the site trained from. Updates are
differences to their base snapshot, so mixing one in never needs the old snapshot itself.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from coordinator.privacy import GaussianPrivacy
from coordinator.robust import coordinate_median, trimmed_mean
from coordinator.server_optimizers import ServerOptimizer, ServerSGD
from coordinator.staleness import StalenessWeight, constant
from shared.deltas import Delta, FlatTensors, RunningSum, add_scaled, dense_copy

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
    """What ``submit`` did: whether a new version exists, and the weight the update got."""

    new_version: bool
    weight: float


class Strategy(ABC):
    """Decides how updates move the global model."""

    #: Whether a site that already trained on the newest version should train on it again.
    retrain = True

    def __init__(self, staleness_weight: StalenessWeight = constant, max_staleness: int | None = None,
                 privacy: GaussianPrivacy | None = None):
        self.staleness_weight = staleness_weight
        self.max_staleness = max_staleness
        #: With central differential privacy, every release of a new model gets calibrated noise.
        self.privacy = privacy

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

    def state(self) -> tuple[dict[str, Tensors], dict]:
        """What a checkpoint must keep besides the model: named tensor groups and plain values."""
        return {}, {}

    def restore(self, tensors: dict[str, Tensors], values: dict) -> None:
        """Take back what ``state`` returned."""


class FedAsync(Strategy):
    """Mix every update in at once: x <- x + alpha * s(staleness) * delta.

    At zero staleness this is exactly FedAsync's (1 - a) x + a x_site with x_site = x + delta. For a
    stale update it moves the current model by the site's own progress instead of pulling it back
    towards the older base, and needs no copies of old versions.
    """

    def __init__(self, alpha: float = 0.6, **kwargs):
        super().__init__(**kwargs)
        self.alpha = alpha

    def submit(self, params, update, staleness):
        weight = self.alpha * self.staleness_weight(staleness)
        delta = update.delta
        if self.privacy is not None:
            delta = dense_copy(delta)  # noise goes on every coordinate
            self.privacy.release(delta, sensitivity=1.0)
        add_scaled(params, delta, weight)
        return Outcome(True, weight)


AGGREGATIONS = ("mean", "trimmed-mean", "median")


class FedBuff(Strategy):
    """Buffer K updates, then step the server optimizer along their aggregate (Nguyen et al., 2022).

    ``mean``: sum(n_i * s(tau_i) * delta_i) / sum(n_i). Sample counts weight the sites as FedAvg
    does, and staleness shrinks an old update's share without inflating the fresh ones. With
    K = number of sites, zero staleness and SGD at lr 1 this is FedAvg. It keeps one running sum,
    allocated once and zeroed after every version: a freshly allocated 2 GB sum would page-fault on
    the buffer's first update. Large sparse updates are queued and folded into the sum several at a
    time, mostly on a thread of their own while the coordinator receives the next ones
    (``shared.deltas.RunningSum``).

    ``trimmed-mean`` and ``median``: coordinate-wise over s(tau_i) * delta_i, ignoring sample counts
    (which a hostile site could inflate), so one bad site among K cannot pull the model away. A
    buffer takes one update per site: in asynchronous training a hostile site may also be the
    fastest, and could otherwise hold more places than the trim removes. They hold all K updates
    until the buffer is full: K copies of the model.
    """

    def __init__(self, buffer_size: int = 3, optimizer: ServerOptimizer | None = None, aggregation: str = "mean",
                 trim_fraction: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
        if aggregation != "mean" and self.privacy is not None:
            raise ValueError(f"differential privacy is calibrated for the mean, not the {aggregation}")
        self.buffer_size = buffer_size
        self.optimizer = optimizer or ServerSGD(1.0)
        self.aggregation = aggregation
        self.trim = math.floor(trim_fraction * buffer_size)
        if aggregation == "trimmed-mean" and not 1 <= self.trim < buffer_size / 2:
            raise ValueError(
                f"trimmed-mean over {buffer_size} updates with trim_fraction {trim_fraction} trims {self.trim} from each "
                f"side; choose trim_fraction and buffer_size so that 1 <= floor(trim_fraction * buffer_size) < buffer_size / 2"
            )
        self.running: RunningSum | None = None
        self.reset_buffer()

    @property
    def sum(self) -> FlatTensors:
        """The running sum of the buffer's weighted deltas, complete (``mean`` only, after ``prepare``)."""
        return self.running.tensors

    def prepare(self, params):
        if self.aggregation == "mean" and self.running is None:
            self.running = RunningSum(params)

    def admit(self, update, staleness):
        if (self.aggregation != "mean" or self.privacy is not None) and update.site in self.sites:
            why = "differential privacy" if self.privacy is not None else self.aggregation
            return f"site {update.site} already has an update in this buffer ({why} takes one per site)"
        return super().admit(update, staleness)

    def reset_buffer(self) -> None:
        if self.running is not None:
            self.sum.flat.zero_()
        self.held: list[Tensors] = []
        self.samples = 0
        self.sites: list[str] = []

    def submit(self, params, update, staleness):
        weight = self.staleness_weight(staleness)
        # Under differential privacy every update counts the same: a sample count would let one
        # site's share, and so the noise it needs, grow without bound.
        share = 1 if self.privacy is not None else update.num_samples
        if self.aggregation == "mean":
            self.prepare(params)
            self.running.add(update.delta, share * weight)
        else:
            self.held.append(dense_copy(update.delta, weight))
        self.samples += share
        self.sites.append(update.site)
        if len(self.sites) < self.buffer_size:
            return Outcome(False, weight)
        aggregate = self._aggregate()
        if self.privacy is not None:
            self.privacy.release(aggregate, sensitivity=1.0 / self.buffer_size)
        self.optimizer.step(params, aggregate)
        self.reset_buffer()
        return Outcome(True, weight)

    def _aggregate(self) -> Tensors:
        if self.aggregation == "mean":
            return {name: acc.div_(self.samples) for name, acc in self.sum.items()}
        statistic = (lambda s: trimmed_mean(s, self.trim)) if self.aggregation == "trimmed-mean" else coordinate_median
        return {name: statistic(torch.stack([h[name] for h in self.held])) for name in self.held[0]}

    def state(self):
        if self.aggregation == "mean":
            buffers = {"buffer": self.sum} if self.sites else {}  # an empty buffer is all zeros: not worth writing
        else:
            buffers = {f"held{i}": h for i, h in enumerate(self.held)}
        return {**buffers, **self.optimizer.state_dict()}, {"samples": self.samples, "sites": list(self.sites)}

    def restore(self, tensors, values):
        self.samples, self.sites = int(values["samples"]), list(values["sites"])
        for name, tensor in tensors.get("buffer", {}).items():  # without one, the sum is still all zeros
            self.sum[name].copy_(tensor)
        self.held = [dict(tensors[f"held{i}"]) for i in range(len(self.sites))] if self.aggregation != "mean" else []
        self.optimizer.load_state_dict({k: v for k, v in tensors.items() if k != "buffer" and not k.startswith("held")})


class FedAvgSync(FedBuff):
    """Synchronous FedAvg, the baseline: every site trains on the same version, the round closes
    when all of them have answered, and sites wait for the next version instead of retraining."""

    retrain = False

    def __init__(self, sites: int, optimizer: ServerOptimizer | None = None, privacy: GaussianPrivacy | None = None):
        super().__init__(buffer_size=sites, optimizer=optimizer, staleness_weight=constant, max_staleness=0,
                         privacy=privacy)

    def admit(self, update, staleness):
        if staleness > 0:
            return f"round {update.base_version} is closed (the model is {staleness} versions newer)"
        if update.site in self.sites:
            return f"site {update.site} already answered this round"
        return None

"""Buffer aggregators: how FedBuff combines the updates of one buffer into the step its server
optimizer takes. One class per rule, registered in ``AGGREGATORS`` (the choices of FEDQ_AGGREGATION).

Every aggregator takes each update with its staleness weight and its share (the sample count, or 1
where sample counts must not weigh), and hands back one aggregate when the buffer is full.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from coordinator.robust import coordinate_median, trimmed_mean
from coordinator.running_sum import FlatTensors, RunningSum
from shared.deltas import Delta, dense_copy
from shared.registry import Registry

Tensors = dict[str, torch.Tensor]

AGGREGATORS: Registry[type["BufferAggregator"]] = Registry("buffer aggregation")


class BufferAggregator(ABC):
    """Combines the updates of a buffer of ``buffer_size``."""

    #: Whether a buffer takes at most one update per site.
    one_per_site = False
    #: Whether central differential privacy's noise is calibrated for this aggregate.
    supports_privacy = False

    def __init__(self, buffer_size: int, trim_fraction: float):
        """For a buffer of ``buffer_size`` updates; ``trim_fraction`` is the trimmed mean's."""

    def prepare(self, params: Tensors) -> None:
        """Allocate what ``add`` needs for a model of these tensors."""

    @abstractmethod
    def add(self, delta: Delta, weight: float, share: float) -> None:
        """Take one update: its delta, its staleness weight, its share of the buffer."""

    @abstractmethod
    def aggregate(self, shares: float) -> Tensors:
        """The buffer's aggregate, given the sum of the shares it took; valid until ``reset``."""

    @abstractmethod
    def reset(self) -> None:
        """Empty the buffer."""

    @abstractmethod
    def state(self, held: int) -> dict[str, Tensors]:
        """What a checkpoint keeps of a buffer holding ``held`` updates, as named tensor groups."""

    @abstractmethod
    def restore(self, tensors: dict[str, Tensors], held: int) -> None:
        """Take back what ``state`` returned."""


@AGGREGATORS.register("mean")
class Mean(BufferAggregator):
    """sum(n_i * s(tau_i) * delta_i) / sum(n_i): sample counts weight the sites as FedAvg does.

    Staleness shrinks an old update's share without inflating the fresh ones. It keeps one running
    sum, allocated once and zeroed after every version: a freshly allocated 2 GB sum would
    page-fault on the buffer's first update. Large sparse updates are queued and folded into the
    sum several at a time, mostly on a thread of their own while the coordinator receives the next
    ones (``coordinator.running_sum``).
    """

    supports_privacy = True

    def __init__(self, buffer_size: int, trim_fraction: float):
        super().__init__(buffer_size, trim_fraction)
        self.running: RunningSum | None = None

    @property
    def sum(self) -> FlatTensors:
        """The running sum of the buffer's weighted deltas, complete (after ``prepare``)."""
        return self.running.tensors

    def prepare(self, params):
        if self.running is None:
            self.running = RunningSum(params)

    def add(self, delta, weight, share):
        self.running.add(delta, share * weight)

    def aggregate(self, shares):
        return {name: acc.div_(shares) for name, acc in self.sum.items()}

    def reset(self):
        if self.running is not None:
            self.sum.flat.zero_()

    def state(self, held):
        return {"buffer": self.sum} if held else {}  # an empty buffer is all zeros: not worth writing

    def restore(self, tensors, held):
        for name, tensor in tensors.get("buffer", {}).items():  # without one, the sum is still all zeros
            self.sum[name].copy_(tensor)


class _CoordinateWise(BufferAggregator):
    """A statistic over the buffer's s(tau_i) * delta_i at every coordinate, ignoring sample counts
    (which a hostile site could inflate), so that one bad site among K cannot pull the model away.

    A buffer takes one update per site: in asynchronous training a hostile site may also be the
    fastest, and could otherwise hold more places than the statistic ignores. It holds all K
    updates until the buffer is full: K copies of the model.
    """

    one_per_site = True

    def __init__(self, buffer_size: int, trim_fraction: float):
        super().__init__(buffer_size, trim_fraction)
        self.held: list[Tensors] = []

    @abstractmethod
    def statistic(self, stacked: torch.Tensor) -> torch.Tensor:
        """The statistic over dimension 0 of the stacked updates."""

    def add(self, delta, weight, share):
        self.held.append(dense_copy(delta, weight))

    def aggregate(self, shares):
        return {name: self.statistic(torch.stack([h[name] for h in self.held])) for name in self.held[0]}

    def reset(self):
        self.held = []

    def state(self, held):
        return {f"held{i}": h for i, h in enumerate(self.held)}

    def restore(self, tensors, held):
        self.held = [dict(tensors[f"held{i}"]) for i in range(held)]


@AGGREGATORS.register("trimmed-mean")
class TrimmedMean(_CoordinateWise):
    """Coordinate-wise mean without the trim_fraction largest and smallest values; resists hostile sites.

    A buffer closed at its deadline with fewer updates still trims at least one from each side
    while that leaves one in the middle, and takes the median where it would not."""

    def __init__(self, buffer_size: int, trim_fraction: float):
        super().__init__(buffer_size, trim_fraction)
        self.trim_fraction = trim_fraction
        self.trim = math.floor(trim_fraction * buffer_size)
        if not 1 <= self.trim < buffer_size / 2:
            raise ValueError(
                f"trimmed-mean over {buffer_size} updates with trim_fraction {trim_fraction} trims {self.trim} from each "
                f"side; choose trim_fraction and buffer_size so that 1 <= floor(trim_fraction * buffer_size) < buffer_size / 2"
            )

    def statistic(self, stacked):
        held = stacked.shape[0]
        trim = min(max(1, math.floor(self.trim_fraction * held)), (held - 1) // 2)
        return trimmed_mean(stacked, trim) if trim >= 1 else coordinate_median(stacked)


@AGGREGATORS.register("median")
class Median(_CoordinateWise):
    """Coordinate-wise median; resists hostile sites."""

    def statistic(self, stacked):
        return coordinate_median(stacked)

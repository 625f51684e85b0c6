"""Stand-ins for absent sites: while a site has no connection to the broker, its latest update takes
the site's share of every FedBuff step, weighted by its age in versions.

A site that leaves takes its data with it: the model drifts towards the sites that remain and must
win back what it forgot when the site returns. MIFA (Gu et al., NeurIPS 2021) keeps every site's
latest update and uses it while the site is unavailable. Here a site counts as absent only when
its worker has no connection (no consumer on its announcement queue: the coordinator asks the
broker), never because it is slow or quiet: cached updates standing in for sites that were merely
quiet kept 24 non-IID sites below 0.40 accuracy for 120 s and made 8 equally fast AdamW sites 2.6
times slower, on cores shared with other work (docs/strategies.md). A site with no connection
sends nothing until it is back.

A stand-in is weighted by the staleness weight of its age, the versions made since its site
trained it, so that a long absence fades: at full weight, stale stand-ins took the churn task 46 s
to its target, against 23 s weighted (one run each). It is dropped when its site sends again, and ``lifetime`` seconds after its site's
last update (the time a site counts as active), so a site that is gone for good stops counting.

Memory: one dense copy of the trained tensors per site kept, within ``budget`` bytes; a site that
would exceed it gets no stand-in. Stand-ins are not checkpointed: after a restart they are kept
again as updates arrive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from coordinator.staleness import StalenessWeight
from shared.deltas import Delta, copy_into, dense_bytes, dense_copy

Tensors = dict[str, torch.Tensor]

#: A site quiet for less than this is not asked about (nor for less than twice its usual interval):
#: each question is a round trip to the broker.
QUIET_SECONDS = 1.0
#: At most this many sites asked about at a time, the longest overdue first.
ASKS = 32


@dataclass
class StandIn:
    delta: Tensors
    share: float
    #: The update's staleness when it came, and the steps its keeper had made by then.
    staleness: int
    step: int
    heard: float  # time.monotonic() of the site's last update
    interval: float  # seconds between the site's updates, smoothed; 0 until it has sent two
    nbytes: int


class StandIns:
    """The sites' latest updates, and which sites are away."""

    def __init__(self, weight: StalenessWeight, budget: int, lifetime: float):
        self.weight = weight
        self.budget = budget
        self.lifetime = lifetime
        self.kept: dict[str, StandIn] = {}
        self.away: set[str] = set()
        self.nbytes = 0

    def keep(self, site: str, delta: Delta, share: float, staleness: int, step: int, now: float) -> None:
        """``site`` sent this update (its staleness, at its keeper's ``step``): it is present, and
        this is what stands in for it if it leaves."""
        self.away.discard(site)
        previous = self.kept.get(site)
        nbytes = dense_bytes(delta)
        if previous is None and self.nbytes + nbytes > self.budget:
            return
        interval = 0.0 if previous is None else \
            (now - previous.heard if not previous.interval else 0.5 * (previous.interval + now - previous.heard))
        if previous is None:
            self.nbytes += nbytes
            copy = dense_copy(delta)
        else:  # a fresh copy per update left the freed ones in the heap: 1.6 times the budget
            copy = previous.delta
            copy_into(copy, delta)
        self.kept[site] = StandIn(copy, share, staleness, step, now, interval, nbytes)

    def to_ask(self, now: float) -> list[str]:
        """Sites to ask the broker about: kept, not known to be away, and quiet for longer than
        twice their usual interval (and ``QUIET_SECONDS``); the most overdue first, at most ``ASKS``."""
        def overdue(site: str) -> float:
            kept = self.kept[site]
            return (now - kept.heard) / max(QUIET_SECONDS, 2 * kept.interval)

        quiet = [site for site in self.kept if site not in self.away and overdue(site) > 1.0]
        return sorted(quiet, key=overdue, reverse=True)[:ASKS]

    def left(self, site: str) -> None:
        """The broker says ``site`` has no connection: its stand-in takes its place from now on."""
        if site in self.kept:
            self.away.add(site)

    def expire(self, now: float) -> list[str]:
        """Drop the stand-ins of sites silent for ``lifetime`` seconds; returns the absent ones among
        them, whose stand-ins stop standing in."""
        gone = [site for site, kept in self.kept.items() if now - kept.heard > self.lifetime]
        ended = [site for site in gone if site in self.away]
        for site in gone:
            self.nbytes -= self.kept.pop(site).nbytes
            self.away.discard(site)
        return ended

    def fold(self, add: Callable[[Tensors, float, float], None], step: int) -> float:
        """Add every away site's stand-in to a buffer about to make the step after ``step``: ``add``
        takes (delta, staleness weight, share), as a buffer aggregator does. Returns the shares added."""
        shares = 0.0
        for site in sorted(self.away):
            kept = self.kept[site]
            add(kept.delta, self.weight(kept.staleness + step - kept.step), kept.share)
            shares += kept.share
        return shares

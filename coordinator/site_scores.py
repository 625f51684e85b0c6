"""Federated evaluation: the sites score versions on their own held-out data, the coordinator pools.

A coordinator needs no data of its own. Every ``every`` versions it opens a round of evaluation at
the version it is releasing; announcements carry the round, and each site scores the first version
at or after it that it fetches (``Task.evaluate_site``) and sends an ``EvalReport``. Sites read only
the newest version, so a round's reports may score a few versions from its first on: the pooled
score is of the model as it stood over those versions, which is what a federation with no central
data can know.

A round closes when every site seen has answered, or ``wait`` seconds after it opened (a site that
is gone must not stop evaluation). Its pooled metrics are each reported metric weighted by the
sites' sample counts. A round closed by the wait with answers from fewer than half of the sites
seen is logged, but does not stand for the federation (the stopping rule does not read it): a few
sites' held-out data can score far from all sites'.

Pure: no broker, no clock of its own (``now`` is passed in), no model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.protocol import EvalReport, ProtocolError


@dataclass
class Round:
    """One round of site evaluation, opened at ``version``."""

    version: int
    opened: float
    reports: dict[str, EvalReport] = field(default_factory=dict)


@dataclass(frozen=True)
class Pooled:
    """A closed round: its version, the sample-weighted metrics, who answered, whether they are
    enough (at least half of the sites seen) to stand for the federation, and the newest version a
    report scored (the metrics are of the model from ``version`` to ``newest``)."""

    version: int
    metrics: dict[str, float]
    sites: int
    samples: int
    representative: bool
    newest: int


class SiteScores:
    def __init__(self, every: int, wait: float):
        self.every, self.wait = every, wait
        self.current: Round | None = None
        #: The version of the last round opened, closed or not.
        self.last_opened: int | None = None

    def open_if_due(self, version: int, now: float) -> bool:
        """Open a round at ``version`` if none is open and ``every`` versions have passed since the last."""
        if self.current is not None or (self.last_opened is not None and version - self.last_opened < self.every):
            return False
        self.current, self.last_opened = Round(version, now), version
        return True

    @property
    def asking(self) -> int | None:
        """The version of the open round, for announcements (None: sites score nothing now)."""
        return None if self.current is None else self.current.version

    def add(self, report: EvalReport, version_now: int) -> str | None:
        """Take a site's report; returns why it was set aside (another round, a second answer), or
        None when it counts. ProtocolError for a report that cannot be true."""
        if report.version > version_now:
            raise ProtocolError(f"the report scores version {report.version}, newer than the current {version_now}")
        if report.version < report.round:
            raise ProtocolError(f"the report scores version {report.version}, older than its round {report.round}")
        if self.current is None or report.round != self.current.version:
            return f"round {report.round} is not open"
        if report.site in self.current.reports:
            return f"site {report.site} answered round {report.round} already"
        self.current.reports[report.site] = report
        return None

    def close_if_done(self, sites_seen: set[str], now: float) -> Pooled | None:
        """Close the open round if every site seen answered, or its wait is over with any answer."""
        current = self.current
        if current is None:
            return None
        answered = set(current.reports)
        if not answered or not (sites_seen <= answered or now - current.opened >= self.wait):
            return None
        self.current = None
        return Pooled(current.version, pool(current.reports.values()), len(answered),
                      sum(r.num_samples for r in current.reports.values()),
                      representative=2 * len(answered) >= len(sites_seen | answered),
                      newest=max(r.version for r in current.reports.values()))


def pool(reports) -> dict[str, float]:
    """Each metric weighted by the samples of the reports that have it."""
    totals: dict[str, float] = {}
    weights: dict[str, int] = {}
    for report in reports:
        for name, value in report.metrics.items():
            totals[name] = totals.get(name, 0.0) + value * report.num_samples
            weights[name] = weights.get(name, 0) + report.num_samples
    return {name: totals[name] / weights[name] for name in sorted(totals)}

"""The coordinator's state as operators see it.

Built once per tick from the run log, the one snapshot serves three readers: the status message on
the broker (``fedq status`` from any machine), the Prometheus endpoint, and the live progress line.
Everything here is pure; publishing lives in ``shared.transport`` and serving in ``coordinator.metrics``.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable

from coordinator.runlog import RunLog
from shared.protocol import PROTOCOL_VERSION, Histogram, SiteStatus, Status

STALENESS_BOUNDS = (0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, math.inf)
INGEST_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, math.inf)
# A site that said nothing for this long is counted as away (offline, or training a long task).
ACTIVE_SECONDS = 120.0


class Observations:
    """A running histogram of measurements, such as the ingest latency of updates."""

    def __init__(self, bounds: Iterable[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def histogram(self) -> Histogram:
        return Histogram(bounds=self.bounds, counts=tuple(self.counts), sum=self.sum, count=self.count)


def histogram_of(values: Counter[int], bounds: Iterable[float]) -> Histogram:
    """A cumulative histogram of exact counts per value (the run log's staleness counter)."""
    bounds = tuple(bounds)
    counts = tuple(sum(n for value, n in values.items() if value <= bound) for bound in bounds)
    return Histogram(bounds=bounds, counts=counts, sum=float(sum(v * n for v, n in values.items())),
                     count=sum(values.values()))


def build_status(
    runlog: RunLog,
    *,
    run_id: str,
    strategy: str,
    version: int,
    metrics: dict[str, float],
    queue_depths: dict[str, int],
    ingest: Observations,
    every: float,
    site_of_user: Callable[[str], str],
    absent: Collection[str] = (),
) -> Status:
    """The coordinator's state now, as one message; ``absent`` are the sites found to have no
    connection, whose latest updates stand in for them."""
    published_at = time.time()
    refused = Counter()
    for user, n in runlog.rejected_per_user.items():
        refused[site_of_user(user) if user else "(no user)"] += n
    names = sorted(set(runlog.last_seen) | set(runlog.applied_per_site) | set(runlog.dropped_per_site) | set(refused))
    sites = tuple(
        SiteStatus(
            site=name, last_seen=runlog.last_seen.get(name), base_version=runlog.last_base.get(name),
            staleness=runlog.last_staleness.get(name), applied=runlog.applied_per_site[name],
            dropped=runlog.dropped_per_site[name], refused=refused[name], bytes_in=runlog.bytes_in[name],
            absent=name in absent,
        )
        for name in names
    )
    return Status(
        protocol=PROTOCOL_VERSION, run_id=run_id, strategy=strategy, published_at=published_at, every=every,
        elapsed=runlog.elapsed, version=version, evaluated_version=runlog.curve.last[1] if runlog.curve.last else None,
        metrics=metrics, applied=runlog.applied, dropped=runlog.dropped, refused=runlog.rejected,
        updates_per_minute=runlog.updates_per_minute(),
        active_sites=sum(1 for t in runlog.last_seen.values() if published_at - t <= ACTIVE_SECONDS),
        bytes_in=sum(runlog.bytes_in.values()), bytes_out=runlog.bytes_out, queue_depths=queue_depths,
        staleness=histogram_of(runlog.staleness, STALENESS_BOUNDS), ingest_seconds=ingest.histogram(), sites=sites,
    )


def progress_line(status: Status) -> str:
    """The coordinator's live progress, one log line per tick."""
    return (
        f"version {status.version:5d}  {_metrics(status)}  {status.elapsed:7.1f} s  "
        f"updates {status.applied} applied ({status.updates_per_minute:.0f}/min), {status.dropped} dropped, "
        f"{status.refused} refused  sites {status.active_sites} active of {len(status.sites)}{_absent(status)}"
    )


def format_status(status: Status, now: float | None = None) -> str:
    """A table of the sites and the global state, as ``fedq status`` prints it."""
    now = time.time() if now is None else now
    age = now - status.published_at
    lines = [
        f"run {status.run_id}  strategy {status.strategy}  version {status.version}  up {_duration(status.elapsed)}",
        f"last evaluation: {_metrics(status)}"
        + (f" (version {status.evaluated_version})" if status.evaluated_version is not None else ""),
        f"updates: {status.applied} applied ({status.updates_per_minute:.0f}/min), {status.dropped} dropped, "
        f"{status.refused} refused; {_size(status.bytes_in)} in, {_size(status.bytes_out)} out",
        "queues: " + (", ".join(f"{name} {depth}" for name, depth in sorted(status.queue_depths.items())) or "unknown"),
        f"sites: {status.active_sites} active of {len(status.sites)}{_absent(status)}",
    ]
    if age > 3 * status.every:
        lines.append(f"WARNING: this status is {_duration(age)} old (published every {status.every:g} s); "
                     "the coordinator is stopped or cannot reach the broker")
    header = ("SITE", "LAST SEEN", "BASE", "STALENESS", "APPLIED", "DROPPED", "REFUSED", "BYTES IN")
    rows = [
        (
            site.site,
            (f"{_duration(now - site.last_seen)} ago" if site.last_seen is not None else "never")
            + (", no connection" if site.absent else ""),
            _or_dash(site.base_version), _or_dash(site.staleness),
            str(site.applied), str(site.dropped), str(site.refused), _size(site.bytes_in),
        )
        for site in status.sites
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines.append("")
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    if not rows:
        lines.append("(no site has been heard from yet)")
    return "\n".join(lines)


def _absent(status: Status) -> str:
    absent = status.absent_sites
    return f", {absent} with no connection (their latest updates stand in)" if absent else ""


def _metrics(status: Status) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in status.metrics.items()) or "none yet"


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _size(n: float) -> str:
    units = ("B", "kB", "MB", "GB", "TB")
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.0f} {units[i]}" if i == 0 else f"{n:.1f} {units[i]}"

"""The run log: one JSON line per event, and the summary a run ends with.

Times are seconds since the first snapshot was published, the clock the benchmarks use.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

ACCURACY_MILESTONES = (0.90, 0.95)
EVENTS_FILE = "events.jsonl"
#: The most points the summary's curve keeps besides its records (the run log keeps every one).
CURVE_POINTS = 4096

Point = tuple[float, int, float, float]  # seconds, version, accuracy, loss


class Curve:
    """The accuracy curve a run's summary carries, in memory bounded however long the run.

    A run that scores every version would otherwise keep a point per version for good: over 37,000
    in a 40-minute soak. Kept are every record (a point whose accuracy beats all before it: at most
    one per accuracy its test set can give), so the time to any accuracy is exact; the last point;
    and other points thinned evenly: when they pass ``limit``, every other one goes and from then on
    only every other one is taken, and so on.
    """

    def __init__(self, limit: int = CURVE_POINTS):
        self.limit = limit
        self.best: float | None = None
        self.last: Point | None = None
        self._last_is_record = False
        self._kept: list[tuple[Point, bool]] = []  # (point, whether a record), oldest first
        self._others = 0  # non-record points kept
        self._stride = 1
        self._seen = 0  # non-record points offered since the stride last changed

    def add(self, point: Point) -> None:
        if self.last is not None and not self._last_is_record:
            self._offer(self.last)
        accuracy = point[2]
        self._last_is_record = not math.isnan(accuracy) and (self.best is None or accuracy > self.best)
        if self._last_is_record:
            self.best = accuracy
            self._kept.append((point, True))
        self.last = point

    def _offer(self, point: Point) -> None:
        """A point that is no longer the last and was no record: kept on the stride."""
        self._seen += 1
        if (self._seen - 1) % self._stride:
            return
        self._kept.append((point, False))
        self._others += 1
        if self._others > self.limit:
            thinned, index = [], 0
            for kept, is_record in self._kept:
                if is_record or index % 2 == 0:
                    thinned.append((kept, is_record))
                index += not is_record
            self._kept = thinned
            self._others = sum(not is_record for _, is_record in thinned)
            self._stride, self._seen = self._stride * 2, 0

    @property
    def points(self) -> list[Point]:
        """The kept points and the last one, oldest first."""
        kept = [point for point, _ in self._kept]
        return kept if self.last is None or self._last_is_record else [*kept, self.last]


class RunLog:
    """Appends events to ``run_dir/events.jsonl`` (:func:`read_events` reads them back) and keeps what
    the summary needs."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self._file = open(run_dir / EVENTS_FILE, "a", buffering=1, encoding="utf-8")
        self._t0 = time.monotonic()
        self.started_at = time.time()
        #: Whether the run's clock started (its first version), here or before a resume.
        self.clock_started = False
        self.curve = Curve()
        self.staleness: Counter[int] = Counter()
        self.applied = 0
        self.dropped = 0
        self.rejected = 0
        self.bytes_in: Counter[str] = Counter()
        self.applied_per_site: Counter[str] = Counter()
        self.dropped_per_site: Counter[str] = Counter()
        self.rejected_per_user: Counter[str] = Counter()
        # Updates that came again once counted: redeliveries, which at-least-once delivery makes normal.
        self.duplicates_per_site: Counter[str] = Counter()
        # Ingest stages that raised something other than a protocol error: fedq's own gaps.
        self.stage_failures: Counter[str] = Counter()
        self.received = 0
        self.bytes_out = 0
        # What each site did last, for the status table.
        self.last_seen: dict[str, float] = {}
        self.last_base: dict[str, int] = {}
        self.last_staleness: dict[str, int] = {}
        self._recent_applied: deque[float] = deque()

    def start_clock(self) -> None:
        self._t0 = time.monotonic()
        self.started_at = time.time()
        self.clock_started = True

    def resume_clock(self, started_at: float) -> None:
        """Continue a resumed run's clock from its first start, so its downtime counts."""
        self.started_at = started_at
        self._t0 = time.monotonic() - (time.time() - started_at)
        self.clock_started = True

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def event(self, kind: str, **fields: Any) -> None:
        self._file.write(json.dumps({"t": round(self.elapsed, 4), "event": kind, **fields}) + "\n")

    def received_update(self, site: str, size: int) -> None:
        """Count a decoded update's payload bytes against its site."""
        self.bytes_in[site] += size
        self.received += 1
        self.seen(site)

    def seen(self, site: str) -> None:
        self.last_seen[site] = time.time()

    def applied_update(self, site: str, base_version: int, staleness: int) -> None:
        self.applied += 1
        self.applied_per_site[site] += 1
        self.staleness[staleness] += 1
        self.last_base[site], self.last_staleness[site] = base_version, staleness
        self._recent_applied.append(time.monotonic())

    def refused(self, user: str | None) -> None:
        self.rejected += 1
        self.rejected_per_user[user or ""] += 1

    def duplicate(self, site: str, update_id: str) -> None:
        self.duplicates_per_site[site] += 1
        self.event("duplicate", site=site, update_id=update_id)

    def stage_failed(self, stage: str, error: BaseException) -> None:
        self.stage_failures[stage] += 1
        self.event("stage_failed", stage=stage, error=f"{type(error).__name__}: {error}")

    def updates_per_minute(self) -> float:
        """Updates applied in the last minute (scaled up while the run is younger than that)."""
        horizon = time.monotonic() - 60.0
        while self._recent_applied and self._recent_applied[0] < horizon:
            self._recent_applied.popleft()
        return len(self._recent_applied) * 60.0 / max(1.0, min(60.0, self.elapsed))

    def evaluation(self, version: int, metrics: dict[str, float]) -> None:
        accuracy = metrics.get("accuracy", float("nan"))
        self.curve.add((round(self.elapsed, 4), version, accuracy, metrics.get("loss", float("nan"))))
        self.event("evaluation", version=version, **metrics)

    def summary(self, **extra: Any) -> dict[str, Any]:
        """Write and return ``summary.json``: milestones, final accuracy, counts, staleness and the curve."""
        curve = self.curve.points
        result = {
            "time_to_accuracy": {f"{m:.2f}": time_to_accuracy(curve, m) for m in ACCURACY_MILESTONES},
            "final_accuracy": self.curve.last[2] if self.curve.last else None,
            "best_accuracy": self.curve.best,
            "elapsed": round(self.elapsed, 3),
            "updates_applied": self.applied,
            "updates_dropped": self.dropped,
            "updates_rejected": self.rejected,
            "staleness_histogram": {str(k): v for k, v in sorted(self.staleness.items())},
            "bytes_in_per_site": dict(sorted(self.bytes_in.items())),
            "applied_per_site": dict(sorted(self.applied_per_site.items())),
            "dropped_per_site": dict(sorted(self.dropped_per_site.items())),
            "rejected_per_user": dict(sorted(self.rejected_per_user.items())),
            "duplicates_per_site": dict(sorted(self.duplicates_per_site.items())),
            "stage_failures": dict(sorted(self.stage_failures.items())),
            "mean_update_bytes": sum(self.bytes_in.values()) / self.received if self.received else None,
            "bytes_out": self.bytes_out,
            "curve": curve,
            **extra,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(result, indent=1))
        return result

    def counters(self) -> dict[str, Any]:
        """The totals so far, for a checkpoint: a resumed run goes on counting from them."""
        return {
            "applied": self.applied, "dropped": self.dropped, "rejected": self.rejected, "received": self.received,
            "staleness": {str(k): v for k, v in self.staleness.items()}, "bytes_in": dict(self.bytes_in),
            "applied_per_site": dict(self.applied_per_site), "dropped_per_site": dict(self.dropped_per_site),
            "rejected_per_user": dict(self.rejected_per_user), "stage_failures": dict(self.stage_failures),
            "duplicates_per_site": dict(self.duplicates_per_site),
            "bytes_out": self.bytes_out,
            "last_seen": self.last_seen, "last_base": self.last_base, "last_staleness": self.last_staleness,
        }

    def restore_counters(self, counters: dict[str, Any]) -> None:
        self.applied, self.dropped = counters["applied"], counters["dropped"]
        self.rejected, self.received = counters["rejected"], counters["received"]
        self.staleness = Counter({int(k): v for k, v in counters["staleness"].items()})
        self.bytes_in = Counter(counters["bytes_in"])
        self.applied_per_site = Counter(counters["applied_per_site"])
        self.dropped_per_site = Counter(counters["dropped_per_site"])
        self.rejected_per_user = Counter(counters["rejected_per_user"])
        # Absent from older checkpoints:
        self.stage_failures = Counter(counters.get("stage_failures", {}))
        self.duplicates_per_site = Counter(counters.get("duplicates_per_site", {}))
        self.bytes_out = counters["bytes_out"]
        self.last_seen = dict(counters["last_seen"])
        self.last_base = dict(counters["last_base"])
        self.last_staleness = dict(counters["last_staleness"])

    def close(self) -> None:
        self._file.close()


def time_to_accuracy(curve: list[Point], threshold: float) -> float | None:
    """Seconds until accuracy first reached ``threshold``, or None if it never did."""
    return next((t for t, _, accuracy, _ in curve if accuracy >= threshold), None)


def read_events(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The events in ``run_dir``'s run log so far, oldest first, those named ``kind`` only if given; none
    while the log does not exist. A last line without its newline is one the coordinator is still
    writing, not an event yet: reading a live run's log never fails on it."""
    path = run_dir / EVENTS_FILE
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    return [e for e in map(json.loads, filter(str.strip, lines)) if kind is None or e["event"] == kind]

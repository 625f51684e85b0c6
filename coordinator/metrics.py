"""The coordinator's Prometheus endpoint.

Scrapes read the latest ``Status`` the coordinator built (see ``coordinator.status``), never the
coordinator's live counters: the serving thread then shares nothing mutable with the coordinator,
and the numbers Prometheus sees are the ones ``fedq status`` shows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from shared.protocol import Histogram, Status

log = logging.getLogger("fedq.coordinator")


class StatusCollector:
    """Turns the newest Status into Prometheus metrics at every scrape."""

    def __init__(self, latest: Callable[[], Status | None]):
        self.latest = latest

    def collect(self) -> Iterator[Metric]:
        status = self.latest()
        if status is None:
            return
        yield _gauge("fedq_version", "Current global model version.", status.version)
        evaluation = GaugeMetricFamily("fedq_evaluation", "Last evaluation of the global model, per metric.", labels=["metric"])
        for name, value in status.metrics.items():
            evaluation.add_metric([name], value)
        yield evaluation
        if status.evaluated_version is not None:
            yield _gauge("fedq_evaluated_version", "Version the last evaluation scored.", status.evaluated_version)
        for name, help_text, field in (
            ("fedq_updates_applied", "Updates merged into the global model, per site.", "applied"),
            ("fedq_updates_dropped", "Updates dropped (too stale, another run), per site.", "dropped"),
            ("fedq_updates_rejected", "Messages refused and dead-lettered, per site (by broker user).", "refused"),
            ("fedq_update_bytes_received", "Payload bytes of updates received, per site.", "bytes_in"),
        ):
            family = CounterMetricFamily(name, help_text, labels=["site"])
            for site in status.sites:
                family.add_metric([site.site], getattr(site, field))
            yield family
        seen = GaugeMetricFamily("fedq_site_last_seen_timestamp_seconds", "When each site was last heard from.", labels=["site"])
        for site in status.sites:
            if site.last_seen is not None:
                seen.add_metric([site.site], site.last_seen)
        yield seen
        yield CounterMetricFamily("fedq_snapshot_bytes_published", "Snapshot payload bytes published.", value=status.bytes_out)
        yield _gauge("fedq_active_sites", "Sites heard from in the last two minutes.", status.active_sites)
        yield _gauge("fedq_absent_sites", "Sites with no connection, whose latest updates stand in for them.",
                     status.absent_sites)
        yield _gauge("fedq_updates_per_minute", "Updates applied in the last minute.", status.updates_per_minute)
        depths = GaugeMetricFamily("fedq_queue_messages", "Messages ready in fedq's queues.", labels=["queue"])
        for queue, depth in status.queue_depths.items():
            depths.add_metric([queue], depth)
        yield depths
        yield _histogram("fedq_update_staleness", "Staleness of applied updates, in versions.", status.staleness)
        yield _histogram("fedq_ingest_latency_seconds",
                         "From a message's first chunk arriving to the message handled: applied, dropped or refused.",
                         status.ingest_seconds)


def serve_metrics(latest: Callable[[], Status | None], host: str, port: int):
    """Serve the metrics on ``host:port`` (port 0: any free port); returns the server, to shut down."""
    registry = CollectorRegistry()
    registry.register(StatusCollector(latest))
    server, _ = start_http_server(port, addr=host, registry=registry)
    log.info("Prometheus metrics on http://%s:%d/metrics", host, server.server_port)
    return server


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


def _histogram(name: str, help_text: str, histogram: Histogram) -> HistogramMetricFamily:
    buckets = [(floatToGoString(bound), count) for bound, count in zip(histogram.bounds, histogram.counts)]
    return HistogramMetricFamily(name, help_text, buckets=buckets, sum_value=histogram.sum)

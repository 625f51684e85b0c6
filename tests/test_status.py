"""Operator views of a run: the status message, its table, and the Prometheus metrics built from it."""

import json
import subprocess
import sys
import urllib.request
from collections import Counter

import pika
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.metrics import StatusCollector
from coordinator.runlog import RunLog
from coordinator.status import INGEST_BOUNDS, Observations, build_status, format_status, histogram_of
from shared import transport
from shared.protocol import Status, decode_header, encode_payload
from tests.federation_helpers import SiteClient, constant_delta, running_coordinator, wait_for


def a_status(tmp_path, absent=()) -> Status:
    runlog = RunLog(tmp_path)
    for site, base, staleness in [("site-1", 0, 0), ("site-1", 1, 1), ("site-2", 0, 2)]:
        runlog.received_update(site, 1000)
        runlog.applied_update(site, base, staleness)
    runlog.refused("user-3")
    runlog.refused("user-3")
    runlog.evaluation(2, {"accuracy": 0.5, "loss": 1.5})
    ingest = Observations(INGEST_BOUNDS)
    for seconds in (0.003, 0.02, 0.02, 7.0):
        ingest.observe(seconds)
    return build_status(runlog, run_id="0123456789abcdef", strategy="fedbuff", version=3,
                        metrics={"accuracy": 0.5, "loss": 1.5}, queue_depths={transport.UPDATES: 4, transport.REJECTED: 2},
                        ingest=ingest, every=2.0, site_of_user=lambda user: {"user-3": "site-3"}.get(user, user),
                        absent=absent)


def test_status_counts_each_site_and_round_trips_the_protocol(tmp_path):
    status = a_status(tmp_path)
    rows = {site.site: site for site in status.sites}
    assert (rows["site-1"].applied, rows["site-1"].base_version, rows["site-1"].staleness, rows["site-1"].bytes_in) == (2, 1, 1, 2000)
    assert rows["site-3"].refused == 2 and rows["site-3"].last_seen is None, "refusals are counted by the user's site"
    assert status.active_sites == 2 and status.evaluated_version == 2 and status.refused == 2
    decoded, _ = decode_header(b"".join(encode_payload(status, [])))
    assert decoded == status


def test_histograms_are_cumulative():
    histogram = histogram_of(Counter({0: 3, 2: 1, 40: 1}), (0, 1, 2, 34, float("inf")))
    assert histogram.counts == (3, 3, 4, 4, 5) and histogram.sum == 42 and histogram.count == 5
    observed = Observations((0.1, 1.0, float("inf")))
    for value in (0.05, 0.5, 5.0):
        observed.observe(value)
    assert observed.histogram().counts == (1, 2, 3)


def test_status_table_lists_sites_and_warns_when_old(tmp_path):
    status = a_status(tmp_path)
    table = format_status(status, now=status.published_at + 1)
    assert "version 3" in table and "accuracy 0.5000" in table and "fedq.updates 4" in table
    site_1 = next(line for line in table.splitlines() if line.startswith("site-1"))
    assert site_1.split()[4:] == ["1", "1", "2", "0", "0", "2.0", "kB"], site_1
    assert "WARNING" not in table
    assert "WARNING: this status is 1.0 min old" in format_status(status, now=status.published_at + 60)
    assert "no connection" not in table


def test_status_says_which_sites_have_no_connection_and_are_stood_in_for(tmp_path):
    status = a_status(tmp_path, absent={"site-2"})
    assert [site.site for site in status.sites if site.absent] == ["site-2"]
    table = format_status(status, now=status.published_at + 1)
    assert "sites: 2 active of 3, 1 with no connection (their latest updates stand in)" in table
    [site_2] = [line for line in table.splitlines() if line.startswith("site-2")]
    assert "ago, no connection" in site_2
    registry = CollectorRegistry()
    registry.register(StatusCollector(lambda: status))
    assert scrape(generate_latest(registry).decode())["fedq_absent_sites", ()] == 1


def scrape(text: str) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_metrics_are_built_from_the_status(tmp_path):
    registry = CollectorRegistry()
    registry.register(StatusCollector(lambda: a_status(tmp_path)))
    samples = scrape(generate_latest(registry).decode())
    assert samples["fedq_version", ()] == 3
    assert samples["fedq_updates_applied_total", (("site", "site-1"),)] == 2
    assert samples["fedq_updates_rejected_total", (("site", "site-3"),)] == 2
    assert samples["fedq_evaluation", (("metric", "accuracy"),)] == 0.5
    assert samples["fedq_update_staleness_bucket", (("le", "1.0"),)] == 2
    assert samples["fedq_ingest_latency_seconds_count", ()] == 4
    assert samples["fedq_ingest_latency_seconds_bucket", (("le", "0.025"),)] == 3
    assert samples["fedq_queue_messages", (("queue", transport.UPDATES),)] == 4


@pytest.mark.broker
def test_live_federation_serves_metrics_and_fedq_status(broker_url, tmp_path):
    client = SiteClient(broker_url, site="site-1")
    with running_coordinator(broker_url, tmp_path / "run", strategy="fedasync", status_seconds=0.2) as coordinator:
        client.hello()  # its updates then come through a queue of its own
        wait_for(lambda: "site-1" in coordinator.state.sites_seen, 10, "site-1's hello")
        for version in range(3):
            client.send(coordinator, version, constant_delta(coordinator, 0.0))
            wait_for(lambda: coordinator.version == version + 1, 10, f"version {version + 1}")
        client.channel.basic_publish(transport.UPDATE_EXCHANGE, transport.LOBBY_KEY, b"junk", pika.BasicProperties(user_id=client.user))
        wait_for(lambda: coordinator.status and coordinator.status.refused == 1 and coordinator.status.applied == 3,
                 10, "a status with 3 updates applied and 1 refused")

        with urllib.request.urlopen(coordinator.metrics_url, timeout=10) as response:
            samples = scrape(response.read().decode())
        assert samples["fedq_version", ()] == 3
        assert samples["fedq_updates_applied_total", (("site", "site-1"),)] == 3
        assert samples["fedq_updates_rejected_total", (("site", "fedq"),)] == 1, "refused for the sending user"
        assert samples["fedq_update_staleness_count", ()] == 3
        assert samples["fedq_update_bytes_received_total", (("site", "site-1"),)] > 0
        assert samples["fedq_snapshot_bytes_published_total", ()] > 0
        assert samples["fedq_evaluation", (("metric", "accuracy"),)] == coordinator.last_metrics["accuracy"]
        assert samples["fedq_ingest_latency_seconds_count", ()] == 4, "the hello and the updates; junk never became an upload"
        assert ("fedq_queue_messages", (("queue", transport.UPDATES),)) in samples
        assert ("fedq_queue_messages", (("queue", transport.SITE_UPDATE_QUEUES),)) in samples

        command = [sys.executable, "-m", "fedq", "status", "--broker-url", broker_url]
        table = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert table.returncode == 0, table.stderr
        assert f"run {coordinator.run_id}" in table.stdout and "version 3" in table.stdout
        site_row = next(line for line in table.stdout.splitlines() if line.startswith("site-1"))
        assert site_row.split()[4:7] == ["2", "0", "3"], site_row  # base 2, staleness 0, 3 applied
        as_json = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=60)
        assert json.loads(as_json.stdout)["applied"] == 3
    client.close()


@pytest.mark.broker
def test_fedq_status_without_a_coordinator_says_so(broker_url):
    result = subprocess.run([sys.executable, "-m", "fedq", "status", "--broker-url", broker_url],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "no coordinator has published its status in this vhost yet" in result.stderr

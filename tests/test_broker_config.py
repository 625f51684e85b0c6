"""The names and arguments in the code must be exactly those in broker_config/definitions.json:
RabbitMQ refuses to redeclare a queue with other arguments, so drift would stop a deployment."""

import json
import logging
import urllib.parse
from pathlib import Path

import pytest

from shared import transport
from tests.federation_helpers import wait_for

DEFINITIONS = json.loads((Path(__file__).parent.parent / "broker_config" / "definitions.json").read_text())


def test_exchanges_match():
    declared = {e["name"]: e["type"] for e in DEFINITIONS["exchanges"]}
    assert declared == transport.EXCHANGES
    assert all(e["durable"] for e in DEFINITIONS["exchanges"])


def test_queues_and_their_arguments_match():
    declared = {q["name"]: q["arguments"] for q in DEFINITIONS["queues"]}
    assert declared == transport.QUEUES
    assert all(q["durable"] for q in DEFINITIONS["queues"])


def test_bindings_match():
    declared = {(b["source"], b["destination"], b["routing_key"]) for b in DEFINITIONS["bindings"]}
    assert declared == set(transport.BINDINGS)


def test_snapshot_retention_is_bounded_by_a_policy():
    policies = {p["name"]: p for p in DEFINITIONS["policies"]}
    retention = policies["fedq-snapshot-retention"]
    assert retention["pattern"] == "^fedq\\.snapshots$" and retention["apply-to"] == "queues"
    assert retention["definition"]["max-length-bytes"] > 0


@pytest.mark.broker
def test_queues_an_older_fedq_declared_classic_are_replaced_or_kept(broker, broker_url, caplog):
    """Before fedq ran on clusters, the status and the sites' announcement queues were classic: they
    hold only the newest of what is sent again, so they are replaced by replicated ones; the refusals'
    evidence is kept as it is, with a warning that says how to move it."""
    vhost = urllib.parse.unquote(urllib.parse.urlsplit(broker_url).path[1:])
    older = {"x-max-length": 1, "x-overflow": "drop-head"}
    link = transport.connect(broker_url, 30, "test-older-fedq")
    channel = link.channel()
    for name in (transport.STATUS, transport.REJECTED):
        channel.queue_delete(name)
    channel.queue_declare(transport.STATUS, durable=True, arguments=older)
    channel.queue_declare(transport.REJECTED, durable=True)
    channel.queue_declare(transport.site_queue("site-1"), durable=True, arguments=older)
    channel.queue_declare(transport.site_queue("site-2"), durable=True, arguments=older)  # a site still on the older fedq
    channel.confirm_delivery()
    channel.basic_publish("", transport.REJECTED, b"a refused chunk")

    with caplog.at_level(logging.WARNING, logger="shared.transport.topology"):
        publisher = transport.Publisher(link, declare_topology=True)
        transport.Announcements(link, "site-1", lambda headers, body: None)
        # The coordinator greets the older site: its queue, which it consumes, is bound as it is.
        assert publisher.welcome("site-2") is None
    channel = link.channel()
    channel.confirm_delivery()
    channel.basic_publish(transport.ANNOUNCEMENTS, "", b"an announcement")
    assert channel.queue_declare(transport.site_queue("site-2"), passive=True).method.message_count == 1

    kinds = {q["name"]: q["type"] for q in broker.management_api("GET", f"/api/queues/{urllib.parse.quote(vhost, safe='')}")}
    assert kinds[transport.STATUS] == "quorum" and kinds[transport.site_queue("site-1")] == "quorum"
    assert kinds[transport.REJECTED] == "classic" and kinds[transport.site_queue("site-2")] == "classic"
    assert link.channel().queue_declare(transport.REJECTED, passive=True).method.message_count == 1
    warnings = " ".join(record.getMessage() for record in caplog.records)
    assert f"{transport.STATUS} was declared by an older fedq" in warnings and "replacing it" in warnings
    assert f"rabbitmqctl delete_queue {transport.REJECTED}" in warnings
    link.close()


def test_the_brokers_with_a_known_defect_are_named_by_their_version_and_the_release_that_fixed_it():
    told = transport.broker_defects("3.10.8")
    assert len(told) == 1 and told[0].startswith("RabbitMQ 3.10.8 keeps the metric counters")
    assert "fixed in 3.10.11" in told[0] and "restart its nodes" in told[0], "what to do"
    assert transport.broker_defects("3.11.2") and transport.broker_defects("3.10.0")
    for fixed in ("3.10.11", "3.11.3", "3.12.14", "4.0.5"):
        assert transport.broker_defects(fixed) == [], fixed
    for unreadable in (None, "", "main", "3.x"):
        assert transport.broker_defects(unreadable) == [], unreadable
    assert transport.broker_defects("3.10.8+1.g1234") and transport.broker_defects("3.10.8-rc.1"), "build and pre-release tags"


def test_the_broker_says_which_sites_have_a_connection(broker_url):
    """A site's worker consumes its announcement queue while it is connected: that is how the
    coordinator tells a site that left (stand-ins) from one that is only quiet."""
    coordinator, site = transport.connect(broker_url, 30, "test-coordinator"), transport.connect(broker_url, 30, "test-site")
    publisher = transport.Publisher(coordinator, declare_topology=True)
    transport.Announcements(site, "site-1", lambda headers, body: None)
    assert publisher.welcome("site-2") is None  # its queue exists; nobody consumes it
    assert publisher.connected("site-1") is True and publisher.connected("site-2") is False
    assert publisher.connected("site-never-seen") is None, "no queue: the broker cannot say"
    assert publisher.connected("site-1") is True, "the refusal closed a channel of its own"
    site.close()
    assert wait_for(lambda: publisher.connected("site-1") is False, 10, "site-1's consumer gone with its connection")
    assert transport.UPDATES in publisher.queue_depths(), "and the publisher's own channel is open"
    coordinator.close()

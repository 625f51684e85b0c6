"""The names and arguments in the code must be exactly those in broker_config/definitions.json:
RabbitMQ refuses to redeclare a queue with other arguments, so drift would stop a deployment."""

import json
from pathlib import Path

from shared import transport

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

"""Shared fixtures: one real RabbitMQ broker per test session, a fresh vhost per test."""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator

import pytest

from fedq.local_broker import Broker, find_broker

# Coordinators in tests, in-process or not, may overlap; each takes a free port for its metrics.
os.environ.setdefault("FEDQ_METRICS_PORT", "0")


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """The session's real broker (see fedq.local_broker.find_broker), stopped at session end."""
    found = find_broker()
    try:
        yield found
    finally:
        found.close()


@pytest.fixture
def broker_url(broker: Broker, request: pytest.FixtureRequest) -> Iterator[str]:
    """AMQP URL of a fresh vhost holding the project's exchanges, queues and policies; deleted afterwards."""
    short = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:30]
    with broker.temporary_vhost(f"t-{short}-{secrets.token_hex(3)}") as url:
        yield url

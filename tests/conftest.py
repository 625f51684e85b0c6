"""Shared fixtures: real RabbitMQ brokers for the session, a fresh vhost per test.

Two paths give a broker. Tests marked ``container`` run against a broker in a Docker container
(testcontainers, image FEDQ_BROKER_IMAGE) when an engine has or can pull that image; every other test,
and those on a machine without such an engine, run against a throwaway local node (or what
find_broker finds). So a run on a machine with an engine tests both paths. With
FEDQ_REQUIRE_CONTAINERS=1 (CI sets it) a container test that cannot have its container fails instead
of quietly using the local node or being skipped. The summary says which tests used which path."""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

import pytest

from fedq.local_broker import (
    DEFAULT_CONFIG_DIR, Broker, ContainerNode, LocalNode, broker_image, container_unavailable_reason, find_broker,
    start_container_broker,
)

# Coordinators in tests, in-process or not, may overlap; each takes a free port for its metrics.
os.environ.setdefault("FEDQ_METRICS_PORT", "0")

REQUIRE_CONTAINERS = os.environ.get("FEDQ_REQUIRE_CONTAINERS") == "1"
PATH_PROPERTY = "fedq_broker_path"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "container: runs against a broker in a Docker container where an engine has FEDQ_BROKER_IMAGE; "
        "on a local node elsewhere, unless FEDQ_REQUIRE_CONTAINERS=1, which makes that a failure",
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_CONTAINERS and report.skipped and item.get_closest_marker("container") is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"container test skipped while FEDQ_REQUIRE_CONTAINERS=1 ({reason}); "
                           "run scripts/docker-engine.sh and export the DOCKER_HOST and FEDQ_BROKER_IMAGE it prints")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    paths: dict[str, list[str]] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) == "call":
                for name, value in getattr(report, "user_properties", ()):
                    if name == PATH_PROPERTY:
                        paths.setdefault(value, []).append(report.nodeid)
    if not paths:
        return
    terminalreporter.section("fedq broker paths")
    for path, nodeids in sorted(paths.items()):
        terminalreporter.write_line(f"{path}: {len(nodeids)} tests")
        if path.startswith("container") or terminalreporter.verbosity > 0:
            for nodeid in sorted(nodeids):
                terminalreporter.write_line(f"  {nodeid}")


@cache
def session_container_reason() -> str | None:
    """Why this machine cannot run the container path (None: it can), asked once per test process."""
    return container_unavailable_reason(broker_image())


def wants_container(request: pytest.FixtureRequest) -> bool:
    """Whether the requesting test runs on the container path; skips (a failure in CI) when it must and cannot."""
    if request.node.get_closest_marker("container") is None:
        return False
    reason = session_container_reason()
    if reason is not None and REQUIRE_CONTAINERS:
        pytest.skip(reason)
    return reason is None


def record_path(request: pytest.FixtureRequest, kind: str) -> None:
    label = f"container ({broker_image()})" if kind == "container" else kind
    # Fixtures shared by a module are recorded on each test that uses them, in the test's own fixture.
    if isinstance(request.node, pytest.Item):
        request.node.user_properties.append((PATH_PROPERTY, label))


@pytest.fixture(scope="session")
def local_broker() -> Iterator[Broker]:
    """The session's broker for tests not marked ``container``: a local node where one can start."""
    found = find_broker(container=not LocalNode.available())
    try:
        yield found
    finally:
        found.close()


@pytest.fixture(scope="session")
def container_broker() -> Iterator[Broker]:
    """The session's broker in a container, for tests marked ``container``."""
    found = start_container_broker(DEFAULT_CONFIG_DIR)
    try:
        yield found
    finally:
        found.close()


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> Broker:
    """A real broker (see the module's docstring for which), shared by the session."""
    found: Broker = request.getfixturevalue("container_broker" if wants_container(request) else "local_broker")
    record_path(request, found.kind)
    return found


@pytest.fixture
def broker_url(broker: Broker, request: pytest.FixtureRequest) -> Iterator[str]:
    """AMQP URL of a fresh vhost holding the project's exchanges, queues and policies; deleted afterwards."""
    short = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:30]
    with broker.temporary_vhost(f"t-{short}-{secrets.token_hex(3)}") as url:
        yield url


NodeFactory = Callable[..., "LocalNode | ContainerNode"]


@pytest.fixture
def make_node(request: pytest.FixtureRequest) -> Iterator[NodeFactory]:
    """Starts a broker of the test's own (to restart or kill) from broker_config/; removed after the test.
    ``make_node(tls=(ca, cert, key))`` also opens the TLS listener."""
    container = wants_container(request)
    record_path(request, "container" if container else "local-node")
    made: list[LocalNode | ContainerNode] = []

    def make(config_dir: Path = DEFAULT_CONFIG_DIR, **kwargs: object) -> LocalNode | ContainerNode:
        node = ContainerNode(config_dir, **kwargs) if container else LocalNode(config_dir, **kwargs)
        made.append(node)
        node.start()
        return node

    yield make
    for node in made:
        node.close()

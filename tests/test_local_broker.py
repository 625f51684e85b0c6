"""The broker helper against a real RabbitMQ broker: definitions loaded, fresh vhosts, restarts, no guest."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

import docker
import docker.errors
import pika
import pika.exceptions
import pytest
from testcontainers.core.config import testcontainers_config

from shared import transport
from fedq.local_broker import (
    DEFAULT_CONFIG_DIR, Broker, LocalNode, _free_port, container_unavailable_reason, find_broker, vhost_definitions,
)

pytestmark = pytest.mark.broker

DEFS = vhost_definitions(DEFAULT_CONFIG_DIR)


def _connection(url: str) -> pika.BlockingConnection:
    params = pika.URLParameters(url)
    params.connection_attempts, params.socket_timeout, params.blocked_connection_timeout = 1, 5, 10
    return pika.BlockingConnection(params)


def _assert_topology(url: str) -> None:
    with _connection(url) as connection:
        channel = connection.channel()
        # A passive declare of something missing closes the channel with NOT_FOUND, failing the test.
        for exchange in DEFS["exchanges"]:
            channel.exchange_declare(exchange["name"], exchange["type"], passive=True)
        for queue in DEFS["queues"]:
            channel.queue_declare(queue["name"], passive=True)


def _publish_update(url: str, body: bytes) -> None:
    with _connection(url) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        # mandatory + confirms: an unroutable or unconfirmed message raises instead of vanishing.
        channel.basic_publish(
            transport.UPDATE_EXCHANGE, transport.LOBBY_KEY, body, pika.BasicProperties(delivery_mode=2), mandatory=True
        )


def _get_update(url: str) -> bytes | None:
    with _connection(url) as connection:
        channel = connection.channel()
        method, _, body = channel.basic_get(transport.UPDATES, auto_ack=True)
        return body if method is not None else None


@pytest.mark.container
def test_broker_loaded_project_definitions(broker: Broker) -> None:
    _assert_topology(broker.url())
    if broker.management_url is not None:
        vhost = urllib.parse.quote(broker.vhost, safe="")
        types = {q["name"]: q["type"] for q in broker.management_api("GET", f"/api/queues/{vhost}")}
        assert types == {name: arguments["x-queue-type"] for name, arguments in transport.QUEUES.items()}


def test_fresh_vhost_has_topology_and_routes_updates(broker_url: str) -> None:
    _assert_topology(broker_url)
    _publish_update(broker_url, b"update-1")
    assert _get_update(broker_url) == b"update-1"


def test_local_node_keeps_durable_message_across_restart_and_kill() -> None:
    if not LocalNode.available():
        pytest.skip("no RabbitMQ binaries in /usr/lib/rabbitmq to start a separate node")
    node = LocalNode(DEFAULT_CONFIG_DIR)
    try:
        node.start()
        url = f"amqp://fedq:fedq@127.0.0.1:{node.amqp_port}/fedq"
        _publish_update(url, b"survives-restart")
        _publish_update(url, b"survives-kill")
        node.restart()
        assert _get_update(url) == b"survives-restart"
        node.kill()
        assert node.beam_pid() is None
        node.start()
        assert _get_update(url) == b"survives-kill"
    finally:
        node.close()
    assert not node.folder.exists()


def test_a_first_boot_whose_port_was_taken_meanwhile_draws_fresh_ports() -> None:
    """Ports are drawn free, yet a parallel test's node or connection can bind one before the node
    does; a first boot then draws again instead of failing the run."""
    if not LocalNode.available():
        pytest.skip("no RabbitMQ binaries in /usr/lib/rabbitmq to start a separate node")
    node = LocalNode(DEFAULT_CONFIG_DIR)
    taken = node.prometheus_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            node.start()
            assert node.prometheus_port != taken
            _publish_update(f"amqp://fedq:fedq@127.0.0.1:{node.amqp_port}/fedq", b"booted")
            assert "eaddrinuse" in (node.folder / "log" / "startup.out").read_text() + node.log_file.read_text()
        finally:
            node.close()


@pytest.mark.container
def test_guest_cannot_log_in(broker: Broker) -> None:
    if broker.kind not in ("local-node", "container"):
        pytest.skip(f"a {broker.kind} broker was not booted from definitions.json")
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        _connection(f"amqp://guest:guest@{broker.host}:{broker.port}/fedq")


class _Images:
    def __init__(self, present: set[str]) -> None:
        self.present = present

    def get(self, image: str) -> object:
        if image not in self.present:
            raise docker.errors.ImageNotFound(f"No such image: {image}")
        return image


class _Api:
    def __init__(self, pullable: set[str]) -> None:
        self.pullable = pullable

    def inspect_distribution(self, image: str) -> dict[str, object]:
        if image not in self.pullable:
            raise docker.errors.APIError("Get https://registry-1.docker.io/v2/: dial tcp: lookup registry-1.docker.io")
        return {"Descriptor": {}}


class _Engine:
    """What the finder asks a Docker engine, answering as an engine with `present` images and a registry
    serving `pullable` ones would."""

    def __init__(self, present: set[str], pullable: set[str]) -> None:
        self.images, self.api = _Images(present), _Api(pullable)

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        pass


@pytest.mark.parametrize("present, pullable, usable", [
    ({"img:1"}, set(), True), (set(), {"img:1"}, True), (set(), set(), False),
])
def test_the_container_path_needs_the_image_present_or_pullable_not_just_an_engine(
        monkeypatch, present, pullable, usable):
    engine = _Engine(present | {testcontainers_config.ryuk_image}, pullable)
    monkeypatch.setattr(docker, "from_env", lambda **_: engine)
    reason = container_unavailable_reason("img:1")
    if usable:
        assert reason is None
    else:
        assert reason is not None and "img:1" in reason and "cannot be pulled" in reason
        assert "FEDQ_BROKER_IMAGE" in reason and "scripts/docker-engine.sh" in reason


def test_ryuk_is_disabled_when_its_image_cannot_be_had(monkeypatch):
    monkeypatch.delenv("TESTCONTAINERS_RYUK_DISABLED", raising=False)
    monkeypatch.setattr(testcontainers_config, "ryuk_disabled", False)
    monkeypatch.setattr(docker, "from_env", lambda **_: _Engine({"img:1"}, set()))
    assert container_unavailable_reason("img:1") is None
    assert testcontainers_config.ryuk_disabled and os.environ["TESTCONTAINERS_RYUK_DISABLED"] == "true"


@pytest.mark.container
def test_an_engine_without_the_image_or_a_registry_falls_back_to_a_local_node_saying_why(monkeypatch):
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means no engine to test against
        pytest.skip(f"no Docker engine ({type(exc).__name__}); set DOCKER_HOST (scripts/docker-engine.sh)")
    client.close()
    if not LocalNode.available():
        pytest.skip("no RabbitMQ binaries in /usr/lib/rabbitmq to fall back to")
    absent = "fedq-test/absent-broker:never-built"
    monkeypatch.setenv("FEDQ_BROKER_IMAGE", absent)
    monkeypatch.delenv("FEDQ_BROKER_URL", raising=False)
    lines: list[str] = []
    broker = find_broker(log=lines.append)
    try:
        assert broker.kind == "local-node"
        _assert_topology(broker.url())
    finally:
        broker.close()
    assert len(lines) == 1
    assert f"image {absent} is not in the Docker engine and cannot be pulled" in lines[0]
    assert "FEDQ_BROKER_IMAGE" in lines[0] and "starting a local RabbitMQ node" in lines[0]


@pytest.mark.container
def test_a_container_broker_left_open_is_removed_when_its_process_exits(tmp_path):
    """Without Ryuk (no image for it here) nothing outside the process removes its containers: the
    process must, at exit, even when the program never closed its broker."""
    if os.environ.get("FEDQ_BROKER_URL"):
        pytest.skip("FEDQ_BROKER_URL names a broker: the finder starts no container")
    script = (
        "from fedq.local_broker import find_broker\n"
        "broker = find_broker()\n"
        "assert broker.kind == 'container', broker.kind\n"
        "print('CONTAINER', broker.node.node, flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                            cwd=Path(__file__).parent.parent)
    if "a Docker engine answers" not in result.stdout:
        pytest.skip(f"no engine with the broker image: {result.stdout.strip() or result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr[-2000:]
    name = result.stdout.split("CONTAINER ", 1)[1].split()[0]
    client = docker.from_env(timeout=10)
    try:
        assert client.containers.list(all=True, filters={"name": name}) == []
    finally:
        client.close()


def test_a_url_list_connects_to_whichever_node_answers_and_finds_the_broker(broker_url, monkeypatch) -> None:
    dead = urllib.parse.urlsplit(broker_url)._replace(netloc=f"fedq:fedq@127.0.0.1:{_free_port()}").geturl()
    listed = f"{dead},{broker_url}"
    # Shuffled on each connect: in ten, the dead node comes first in some, and costs only a refusal.
    for _ in range(10):
        link = transport.connect(listed, 30, "test-url-list")
        assert link.is_open
        link.close()
    assert transport.probe(listed) is None
    assert transport.probe(f"{dead},{dead}") is not None, "no node answers: probe says why"
    monkeypatch.setenv("FEDQ_BROKER_URL", listed)
    found = find_broker(log=lambda line: None)
    assert found.url() == listed and found.kind == "env"
    assert found.other_nodes == ((urllib.parse.urlsplit(broker_url).hostname, urllib.parse.urlsplit(broker_url).port),)

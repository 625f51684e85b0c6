"""The broker helper against a real RabbitMQ broker: definitions loaded, fresh vhosts, restarts, no guest."""

from __future__ import annotations

import urllib.parse

import pika
import pika.exceptions
import pytest

from shared import transport
from fedq.local_broker import DEFAULT_CONFIG_DIR, Broker, LocalNode, _free_port, find_broker, vhost_definitions

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


def test_guest_cannot_log_in(broker: Broker) -> None:
    if broker.kind not in ("local-node", "container"):
        pytest.skip(f"a {broker.kind} broker was not booted from definitions.json")
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        _connection(f"amqp://guest:guest@{broker.host}:{broker.port}/fedq")


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

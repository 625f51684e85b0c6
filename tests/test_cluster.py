"""fedq on a real three-node RabbitMQ cluster started from broker_config/ (rabbitmq.conf and cluster.conf):
every queue replicated on every node, and a federation that loses nodes mid-run."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from fedq.local_broker import Broker, LocalNode, start_local_cluster
from shared import transport

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def cluster() -> Iterator[Broker]:
    if not LocalNode.available():
        pytest.skip("no RabbitMQ binaries in /usr/lib/rabbitmq to start a local cluster from")
    broker = start_local_cluster(log=lambda line: None)
    try:
        yield broker
    finally:
        broker.close()


def replicas(broker: Broker, vhost: str) -> dict[str, list[str]]:
    """Each queue of ``vhost`` and the nodes that hold a replica of it."""
    listing = json.loads(broker.cluster.rabbitmqctl("list_queues", "-p", vhost, "name", "members", "--formatter", "json"))
    return {queue["name"]: sorted(queue["members"] or []) for queue in listing}


def test_every_fedq_queue_has_a_replica_on_each_of_the_three_nodes(cluster):
    nodes = sorted(node.node for node in cluster.cluster.nodes)
    assert len(cluster.url().split(",")) == 3
    # Loaded from definitions.json while the first node ran alone, then replicated when the others joined.
    assert replicas(cluster, "fedq") == {name: nodes for name in transport.QUEUES}
    # A run's vhost and a site's own queues, declared once the cluster runs, as a coordinator and a site do.
    with cluster.temporary_vhost("t-replicas") as url:
        link = transport.connect(url, 30, "test-replicas")
        channel = link.channel()
        transport.declare_shared_topology(channel)
        transport.bind_site_queue(channel, "site-1")
        transport.declare_site_updates(channel, "site-1")
        link.close()
        expected = [*transport.QUEUES, transport.site_queue("site-1"), transport.site_update_queue("site-1")]
        assert replicas(cluster, "t-replicas") == {name: nodes for name in expected}

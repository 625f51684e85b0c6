"""fedq on a real three-node RabbitMQ cluster started from broker_config/ (rabbitmq.conf and cluster.conf):
every queue replicated on every node, and a federation that loses nodes mid-run."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.checkpoint import read_checkpoint
from fedq.federation import run_federation, site_names
from fedq.local_broker import Broker, LocalNode, start_local_cluster
from shared import transport
from coordinator.runlog import read_events
from tests.federation_helpers import confirmed_updates, wait_for

# One cluster for the module: its tests run in one test process (scripts/test.sh: --dist loadgroup),
# not three clusters of three nodes each on a machine that runs the rest of the suite beside them.
pytestmark = [pytest.mark.broker, pytest.mark.xdist_group("cluster")]


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
    # Imported from definitions.json once the three nodes ran.
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


def leaders(broker: Broker, vhost: str, wanted) -> Counter[str]:
    """How many of the queues of ``vhost`` whose name ``wanted(name)`` accepts each node leads."""
    listing = json.loads(broker.cluster.rabbitmqctl("list_queues", "-p", vhost, "name", "leader", "--formatter", "json"))
    return Counter(queue["leader"] for queue in listing if wanted(queue["name"]) and queue["leader"])


def leader_of(broker: Broker, vhost: str, wanted) -> str:
    """The node that leads the most queues of ``vhost`` whose name ``wanted(name)`` accepts."""
    found = leaders(broker, vhost, wanted)
    assert found, f"no queue of {vhost} that the test looks for has a leader"
    return found.most_common(1)[0][0]


def test_a_consumer_on_a_live_node_goes_on_receiving_when_its_queues_leader_dies(cluster):
    """The coordinator's update consumers need no reconnect when the node that dies is not theirs:
    the queue's new leader delivers to them."""
    nodes = cluster.cluster
    with cluster.temporary_vhost("t-leader-moves") as url:
        leader = nodes.by_name(leader_of(cluster, "t-leader-moves", lambda name: name == transport.UPDATES))
        consumer_node, publisher_node = [node for node in nodes.nodes if node is not leader]
        urls = dict(zip(nodes.nodes, url.split(",")))
        link = transport.connect(urls[consumer_node], 30, "test-inbox")
        inbox = transport.UpdateInbox(link, prefetch=10)
        nodes.kill(leader)
        try:
            # Until the live replicas have elected a leader, the queue nacks publishes (a worker then
            # sends again from its outbox); a publish after that is confirmed.
            wait_for(lambda: set(leaders(cluster, "t-leader-moves", lambda name: name == transport.UPDATES))
                     - {leader.node}, 30, "a new leader")
            sender = transport.connect(urls[publisher_node], 30, "test-sender")
            channel = sender.channel()
            channel.confirm_delivery()
            channel.basic_publish(transport.UPDATE_EXCHANGE, transport.LOBBY_KEY, b"after the leader died")
            sender.close()
            assert link.serve_until(lambda: len(inbox) > 0, timeout=30), "the consumer heard from the new leader"
            delivery = inbox.pop()
            assert b"".join(delivery.body) == b"after the leader died" and delivery.queue == transport.UPDATES
            inbox.ack([delivery.tag])
            link.serve(0.5)
            assert link.is_open, "the consumer's connection lived through it"
            link.close()
        finally:
            nodes.restart(leader)  # the next test needs three nodes, and the vhost's deletion the management API


def sites_on(broker: Broker, node: str) -> set[str]:
    """The sites whose workers have a connection to ``node`` now (the management API's view)."""
    names = [(c.get("node"), (c.get("client_properties") or {}).get("connection_name", ""))
             for c in broker.management_api("GET", "/api/connections")]
    return {name.removeprefix("fedq-worker-") for on, name in names if on == node and name.startswith("fedq-worker-")}


def newest_version(run_dir: Path) -> int:
    """The newest version the run published so far; -1 before its first."""
    try:
        return max((e["version"] for e in read_events(run_dir, "snapshot")), default=-1)
    except (FileNotFoundError, ValueError):  # no run log yet, or its last line half written
        return -1


# The stream leader's death once stalled the run for good: RabbitMQ 3.10 never confirmed the chunks
# in flight to the dead writer (shared/transport/confirms.py); the coordinator now publishes again
# on a new connection after SNAPSHOT_CONFIRM_TIMEOUT, which is then the pause.
@pytest.mark.timeout(480)
def test_a_federation_rides_out_the_death_of_the_updates_leader_and_then_of_the_stream_leader(cluster, tmp_path, caplog):
    """Fedasync makes a version of each update, and each site sends a fixed number: the run's target
    is every update applied, so each one a site saw confirmed must be in the ledger, once. The
    first node killed is started again (it rejoins) before the second dies: two of three must run."""
    # 80 tasks of a second each, a run of about 145 s alone. The stream leader dies only once the first
    # node killed has rejoined, and a run too short for that ended first: at 30 tasks (64 s alone) one
    # run in the full suite reached its last version before the second kill, and at 50 (90 s alone)
    # one in CI saw no new version for 60 s after the stream leader died, with no sign of trouble in
    # the coordinator's warnings: most likely the run was over by then, as the 30-task one was.
    sites, tasks, task = site_names(3), 80, "tests.slow_task:PacedDigits"
    caplog.set_level(logging.INFO, logger="fedq")
    caplog.set_level(logging.INFO, logger="shared")
    nodes = cluster.cluster
    pauses: dict[str, tuple[float, float]] = {}
    killed_at: dict[str, int] = {}
    rejoined_in: list[float] = []
    cut_off: set[str] = set()  # sites whose node was killed under them

    def kill_and_time(what: str, node_name: str) -> None:
        before = killed_at[what] = newest_version(tmp_path)
        cut_off.update(sites_on(cluster, node_name))
        nodes.kill(nodes.by_name(node_name))
        killed = time.monotonic()
        # The first new version may be one the coordinator had in hand; the second needs the whole loop again.
        wait_for(lambda: newest_version(tmp_path) > before, 60, f"a new version after the {what} died")
        first = time.monotonic() - killed
        wait_for(lambda: newest_version(tmp_path) > before + 1, 60, f"a second new version after the {what} died")
        pauses[what] = (first, time.monotonic() - killed)

    def fail_over() -> None:
        wait_for(lambda: newest_version(tmp_path) >= 3, 90, "version 3")
        updates_leader = leader_of(cluster, "fedq", lambda name: name.endswith(".updates"))
        kill_and_time("updates leader", updates_leader)
        restarted = time.monotonic()
        nodes.restart(nodes.by_name(updates_leader))
        rejoined_in.append(time.monotonic() - restarted)
        reached = newest_version(tmp_path)
        assert reached < len(sites) * tasks - 10, (
            f"the run was at version {reached} of {len(sites) * tasks} once the first node killed had rejoined "
            f"({rejoined_in[0]:.1f} s after its restart): too near its end to kill the stream leader mid-run")
        kill_and_time("stream leader", leader_of(cluster, "fedq", lambda name: name == transport.SNAPSHOTS))

    failures: list[BaseException] = []

    def run_fail_over() -> None:
        try:
            fail_over()
        except BaseException as exc:  # reported on the test's thread
            failures.append(exc)

    chaos = threading.Thread(target=run_fail_over, daemon=True)
    chaos.start()
    started = time.monotonic()
    summary = run_federation(cluster.url(), tmp_path, sites, worker={"max_tasks": tasks, "task": task},
                             coordinator={"strategy": "fedasync", "task": task, "max_versions": len(sites) * tasks,
                                          "max_staleness": 100_000, "max_seconds": 400})
    chaos.join(60)
    assert not failures, f"{failures[0]}\n{what_the_run_said(caplog, tmp_path, sites, nodes.nodes)}"
    assert list(pauses) == ["updates leader", "stream leader"], \
        f"both nodes died while the run went on; it ended at version {summary['final_version']}, pauses {pauses}"
    assert summary["final_version"] == len(sites) * tasks, summary["stop_reason"]
    confirmed = set(confirmed_updates(tmp_path / "sites"))
    assert len(confirmed) == len(sites) * tasks
    rows = read_checkpoint(tmp_path / "checkpoint.fedq").ledger_rows
    applied = [row[0] for row in rows if row[3] is not None]
    assert len(applied) == len(set(applied)) and set(applied) == confirmed, "each confirmed update applied once"
    update_events = [e["update_id"] for e in read_events(tmp_path, "update")]
    assert sorted(update_events) == sorted(confirmed)
    logs = {site: (tmp_path / "sites" / f"{site}.log").read_text() for site in sites}
    # Sites pick a node at random: with both leaders on one node, no site may have been on it.
    for site in cut_off:
        assert "reconnecting in" in logs[site], f"{site} was on a killed node and moved to another"
    for site, log in logs.items():
        fetched = [int(v) for v in re.findall(rf"site {site}: snapshot version (\d+) ", log)]
        assert max(fetched) > killed_at["stream leader"], f"{site} read snapshots from the stream after its leader died"
    times = [e["t"] for e in read_events(tmp_path, "snapshot")]
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    print(f"\ncluster failover: {len(sites)} sites, {summary['final_version']} versions ({len(times)} snapshots "
          f"published) in {time.monotonic() - started:.1f} s; "
          f"between snapshots: median {gaps[len(gaps) // 2]:.2f} s, longest {gaps[-1]:.2f} s; "
          f"the first node killed rejoined {rejoined_in[0]:.1f} s after its restart; "
          + "; ".join(f"{what} killed: new versions after {first:.2f} s and {second:.2f} s"
                      for what, (first, second) in pauses.items()))


# Broker log lines of every connection's coming and going, which drown the rest.
_CONNECTION_CHATTER = re.compile(r"accepting AMQP connection|closing AMQP connection|authenticated and granted|"
                                 r"connection_closed_abruptly|client unexpectedly closed")


def what_the_run_said(caplog, run_dir: Path, sites: list[str], nodes: list[LocalNode]) -> str:
    """The last lines of this process's log (the coordinator runs in it), of each site's and of each
    node's: a failure in CI leaves nothing else to tell a broker that went quiet from a process that did."""
    parts = ["the last lines logged here (coordinator, pika):"]
    parts += [f"  {time.strftime('%H:%M:%S', time.localtime(r.created))} {r.name} {r.getMessage()}"
              for r in caplog.records[-20:]]
    for site in sites:
        log = run_dir / "sites" / f"{site}.log"
        lines = log.read_text(errors="replace").splitlines()[-8:] if log.exists() else ["(no log)"]
        parts += [f"{site}'s last lines:", *(f"  {line}" for line in lines)]
    for node in nodes:
        lines = node.log_file.read_text(errors="replace").splitlines() if node.log_file.exists() else ["(no log)"]
        lines = [line for line in lines if not _CONNECTION_CHATTER.search(line)][-15:]
        parts += [f"node {node.node}'s last lines:", *(f"  {line[:300]}" for line in lines)]
    return "\n".join(parts)

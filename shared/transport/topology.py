"""The broker objects fedq uses: their names and arguments, and declaring them.

The names and arguments below must match ``broker_config/definitions.json`` exactly (a test checks
it): RabbitMQ refuses a redeclaration with different arguments, so drift would stop the system.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import ChannelClosedByBroker

# Exchanges and queues never share a name. A site may write to the updates exchange and read the
# snapshot stream; RabbitMQ checks write on the queue and read on the exchange for queue.bind, and
# write on the destination and read on the source for exchange.bind. With shared names, a site could
# bind the updates queue to the snapshot exchange; with these, the only bind open to it is of its
# own queue to an exchange of its own. Sites do not bind their queues either: the coordinator binds
# a site's announcement and update queues when the site says hello, so sites need no read on any
# exchange.
SNAPSHOT_EXCHANGE = "fedq.x.snapshots"
SNAPSHOT_KEY = "snapshot"
SNAPSHOTS = "fedq.snapshots"  # stream queue
ANNOUNCEMENTS = "fedq.x.announcements"  # fanout exchange; one latest-only queue per site
# Each site's updates have a queue of their own, which the coordinator consumes with its own prefetch
# window: a sender that floods the coordinator fills only its own window, not one all sites share
# (with one shared queue, one user streaming partial uploads grew the coordinator by 226 MB, the
# deliveries of a 128-chunk window waiting, and held every honest site's update behind them). A site
# routes by its name: its updates with update_key(site), its hellos with hello_key(site). Until the
# coordinator has greeted a site, no queue is bound to its key, and the updates exchange's alternate
# exchange takes its messages to the lobby, fedq.updates; hellos always go there, so a coordinator that
# has not heard of a site (a new run) still hears it. Provisioned users may publish only their own
# site's keys (topic permissions, fedq/provision.py).
UPDATE_EXCHANGE = "fedq.x.updates"  # topic exchange
LOBBY_EXCHANGE = "fedq.x.lobby"  # fanout: the updates exchange's alternate exchange
UPDATES = "fedq.updates"  # quorum queue: the lobby
# A key no site queue is bound to (site keys begin "site."): it reaches the lobby.
LOBBY_KEY = "lobby"
REJECTED_EXCHANGE = "fedq.x.rejected"
REJECTED = "fedq.rejected"  # messages the coordinator refused, each with the reason
STATUS_EXCHANGE = "fedq.x.status"
STATUS = "fedq.status"  # latest-only queue: the coordinator's state for fedq status

EXCHANGES: dict[str, str] = {
    SNAPSHOT_EXCHANGE: "direct", ANNOUNCEMENTS: "fanout", UPDATE_EXCHANGE: "topic", LOBBY_EXCHANGE: "fanout",
    REJECTED_EXCHANGE: "fanout", STATUS_EXCHANGE: "fanout",
}
EXCHANGE_ARGUMENTS: dict[str, dict[str, Any]] = {UPDATE_EXCHANGE: {"alternate-exchange": LOBBY_EXCHANGE}}
DELIVERY_LIMIT = 1_000_000
# Replicated and durable: a confirmed update survives a broker restart. No payload loops: every error
# it can cause is a refusal, and one that stopped the coordinator is refused when it comes again
# (coordinator/suspects.py). So the delivery limit is only a last resort, far above what lost
# connections count: each returns the whole prefetch window, and at RabbitMQ's 20 (4.x's default) a
# flaky link would dead-letter valid updates the coordinator never got to.
UPDATE_QUEUE_ARGUMENTS = {
    "x-queue-type": "quorum", "x-dead-letter-exchange": REJECTED_EXCHANGE, "x-delivery-limit": DELIVERY_LIMIT,
}

# Every queue is a replicated type, so that in a cluster (broker_config/cluster.conf) no node is one
# that fedq cannot lose: a classic queue lives on one node, and while that node is down declaring it
# fails (404 "home node ... is down or inaccessible"), which held the coordinator (status, rejected)
# and the sites whose announcement queue lived there until the node came back. No replica count is
# given: RabbitMQ's defaults put three on a cluster of three (a quorum queue on up to three nodes, a
# stream on all), and it refuses a redeclaration whose x-quorum-initial-group-size differs, which
# would stop every deployment whose queues already exist.
QUEUES: dict[str, dict[str, Any]] = {
    # A stream stores each snapshot once however many sites read it, and lets a reader attach at
    # any point in time; retention is bounded by a policy (broker_config/definitions.json).
    SNAPSHOTS: {"x-queue-type": "stream", "x-stream-max-segment-size-bytes": 50 * 1024 * 1024},
    UPDATES: UPDATE_QUEUE_ARGUMENTS,
    REJECTED: {"x-queue-type": "quorum"},
    # Only the newest status matters; readers take it and put it back for the next reader.
    STATUS: {"x-queue-type": "quorum", "x-max-length": 1, "x-overflow": "drop-head"},
}
BINDINGS: list[tuple[str, str, str]] = [
    (SNAPSHOT_EXCHANGE, SNAPSHOTS, SNAPSHOT_KEY), (LOBBY_EXCHANGE, UPDATES, ""), (REJECTED_EXCHANGE, REJECTED, ""),
    (STATUS_EXCHANGE, STATUS, ""),
]
# Queues whose depth the coordinator reports.
WATCHED_QUEUES = (UPDATES, REJECTED)
# Only the newest announcement matters to a site that was away; older ones are dropped at the broker.
SITE_QUEUE_ARGUMENTS = {"x-queue-type": "quorum", "x-max-length": 1, "x-overflow": "drop-head"}


def site_queue(site: str) -> str:
    """The site's own announcement queue."""
    return f"fedq.site.{site}.announcements"


def site_update_queue(site: str) -> str:
    """The queue of the site's updates, once the coordinator has greeted it."""
    return f"fedq.site.{site}.updates"


def update_key(site: str) -> str:
    """The routing key of the site's updates and evaluations. Site names hold no * or #, so the
    key of one site's queue matches that site alone."""
    return f"site.{site}"


def hello_key(site: str) -> str:
    """The routing key of the site's hellos: bound to no queue, so they reach the lobby."""
    return f"hello.{site}"


log = logging.getLogger(__name__)

# What happens to a queue an older fedq declared with other arguments (a classic queue, before fedq
# ran on clusters): one that holds only the newest of what is sent again is replaced; the refusals'
# evidence is kept as it is, with a warning, since deleting it would lose what it holds.
REPLACED_WHEN_OLDER = (STATUS,)
KEPT_WHEN_OLDER = (REJECTED,)


class TopologyMismatch(RuntimeError):
    """The broker holds a queue or exchange of fedq's name with other arguments; retrying will not help."""


def declare_shared_topology(channel: BlockingChannel) -> None:
    """Declare the exchanges, queues and bindings every fedq deployment has (idempotent);
    TopologyMismatch if one exists with other arguments, as an older fedq declared it."""
    declarations = [("exchange", name, lambda n=name, k=kind: channel.exchange_declare(
                        n, k, durable=True, arguments=EXCHANGE_ARGUMENTS.get(n)))
                    for name, kind in EXCHANGES.items()]
    declarations += [("queue", name, lambda n=name, a=arguments: channel.queue_declare(n, durable=True, arguments=a))
                     for name, arguments in QUEUES.items() if name not in REPLACED_WHEN_OLDER + KEPT_WHEN_OLDER]
    for name in REPLACED_WHEN_OLDER:
        _declare_or_replace(channel, name, QUEUES[name])
    for name in KEPT_WHEN_OLDER:
        if not _declared(channel, name, QUEUES[name]):
            log.warning("queue %s was declared by an older fedq with other arguments; it is kept as it is, with the "
                        "refusals it holds. In a cluster it lives on one node: once what it holds is read, delete it "
                        "(rabbitmqctl delete_queue %s -p <vhost>) and fedq declares it replicated", name, name)
    for what, name, declare in declarations:
        try:
            declare()
        except ChannelClosedByBroker as exc:
            if exc.reply_code != 406:
                raise
            raise TopologyMismatch(
                f"the broker holds {what} {name} with other arguments than this fedq declares ({exc.reply_text}); an "
                f"older fedq made it. Let the older coordinator take what it holds, then delete it (rabbitmqctl "
                f"delete_{what} {name} -p <vhost>) or load broker_config/definitions.json, and start again"
            ) from None
    for exchange, queue, key in BINDINGS:
        channel.queue_bind(queue, exchange, routing_key=key)


def declare_site_queue(channel: BlockingChannel, site: str) -> str:
    """Declare a site's latest-only announcement queue (a site may declare its own); returns its name."""
    name = site_queue(site)
    _declare_or_replace(channel, name, SITE_QUEUE_ARGUMENTS)
    return name


def _declared(channel: BlockingChannel, name: str, arguments: dict[str, Any]) -> bool:
    """Declare a queue on a channel of its own (a refused declare closes its channel); False if the
    broker holds it with other arguments."""
    trial = channel.connection.channel()
    try:
        trial.queue_declare(name, durable=True, arguments=arguments)
    except ChannelClosedByBroker as exc:
        if exc.reply_code != 406:
            raise
        return False
    trial.close()
    return True


def _declare_or_replace(channel: BlockingChannel, name: str, arguments: dict[str, Any]) -> None:
    """Declare a queue that holds only the newest of what is sent again (the status, a site's
    announcement); one an older fedq declared with other arguments is deleted and declared anew."""
    if _declared(channel, name, arguments):
        return
    log.warning("queue %s was declared by an older fedq with other arguments; it holds only the newest message, "
                "which is sent again: replacing it", name)
    channel.queue_delete(name)
    channel.queue_declare(name, durable=True, arguments=arguments)


def bind_site_queue(channel: BlockingChannel, site: str) -> str:
    """Declare a site's announcement queue unless it exists, and bind it to the announcements (the
    coordinator's, and the development user's, to do); returns its name. A queue that a site running
    an older fedq declared otherwise is bound as it is: replacing it is the site's own to do (its
    consumer would be left on a deleted queue, hearing nothing: seen with an older worker)."""
    name = site_queue(site)
    if not _declared(channel, name, SITE_QUEUE_ARGUMENTS):
        log.info("site %s's announcement queue %s was declared by an older fedq; binding it as it is", site, name)
    channel.queue_bind(name, ANNOUNCEMENTS)
    return name


def declare_site_updates(channel: BlockingChannel, site: str) -> str:
    """Declare the queue of a site's updates and bind it to the site's key (the coordinator's to
    do, when it greets the site); returns its name."""
    name = site_update_queue(site)
    channel.queue_declare(name, durable=True, arguments=UPDATE_QUEUE_ARGUMENTS)
    channel.queue_bind(name, UPDATE_EXCHANGE, routing_key=update_key(site))
    return name


# How the sites' own update queues are reported: their sum, under one name.
SITE_UPDATE_QUEUES = site_update_queue("*")


def queue_depths(channel: BlockingChannel, site_queues: Iterable[str] | None = None) -> dict[str, int]:
    """Messages ready in each watched queue, and, unless ``site_queues`` is None, in all of those
    sites' update queues together (passive declares: nothing is created)."""
    def ready(name: str) -> int:
        return channel.queue_declare(name, passive=True).method.message_count

    depths = {name: ready(name) for name in WATCHED_QUEUES}
    if site_queues is not None:
        depths[SITE_UPDATE_QUEUES] = sum(ready(name) for name in site_queues)
    return depths


def declare_definitions(channel: BlockingChannel, definitions: dict[str, list[dict[str, Any]]]) -> None:
    """Declare the exchanges, queues and bindings of a definitions.json vhost section, as they are
    written there (for a broker whose management API cannot load them)."""
    for e in definitions["exchanges"]:
        channel.exchange_declare(e["name"], e["type"], durable=e["durable"], auto_delete=e["auto_delete"],
                                 internal=e["internal"], arguments=e["arguments"])
    for q in definitions["queues"]:
        channel.queue_declare(q["name"], durable=q["durable"], auto_delete=q["auto_delete"], arguments=q["arguments"])
    for b in definitions["bindings"]:
        bind = channel.queue_bind if b["destination_type"] == "queue" else channel.exchange_bind
        bind(b["destination"], b["source"], routing_key=b["routing_key"], arguments=b["arguments"])

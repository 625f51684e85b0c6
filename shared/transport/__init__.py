"""The one door to RabbitMQ: pika is imported in this package and nowhere else in fedq.

| module | what it does |
| --- | --- |
| ``connection`` | open a connection (TLS verified), drive it (``Link``), reconnect with backoff |
| ``topology`` | the exchanges and queues fedq uses, their arguments, declaring them |
| ``publishing`` | publish with confirms: chunked payloads, snapshots, announcements, updates, refusals, status |
| ``consuming`` | the coordinator's updates queue (manual acks, prefetch), a site's announcement queue |
| ``stream`` | read one chunked snapshot from the stream: attach at its offset (or time), skip foreign payloads, attach again after a silence, give up with a report |
| ``status`` | read the coordinator's status |
| ``frames`` | the pika internals fedq changes, each for a measured reason |
| ``management`` | RabbitMQ's management HTTP API (provisioning, test brokers) |

The coordinator and the workers use what is named here; neither sees a pika object.
"""

from shared.transport.confirms import ConfirmedChannel, ConfirmTimeout
from shared.transport.connection import (
    RECOVERABLE,
    REFUSALS,
    Backoff,
    ChannelClosed,
    ConnectionFailed,
    Link,
    TLSSetupError,
    broker_address,
    broker_defects,
    broker_user,
    connect,
    probe,
    refused_by_broker,
    serve_with_reconnect,
)
from shared.transport.consuming import Announcements, Delivery, UpdateInbox
from shared.transport.frames import RECV_BYTES, cancel_stream_consumer, deliver_fragments
from shared.transport.management import ManagementError, management_call
from shared.transport.publishing import (
    CONFIRM_TIMEOUT, CONFIRM_WINDOW, EVIDENCE_BYTES, MARKER_TIMEOUT, SNAPSHOT_CONFIRM_TIMEOUT, WAKE_AFTER_SECONDS, Publisher,
    confirmed_channel, publish_payload,
)
from shared.transport.status import StatusReader
from shared.transport.stream import SnapshotReader, SnapshotUnavailable, stream_offset_at
from shared.transport.topology import (
    ANNOUNCEMENTS,
    BINDINGS,
    EXCHANGE_ARGUMENTS,
    EXCHANGES,
    LOBBY_EXCHANGE,
    LOBBY_KEY,
    QUEUES,
    REJECTED,
    REJECTED_EXCHANGE,
    SITE_QUEUE_ARGUMENTS,
    SITE_UPDATE_QUEUES,
    SNAPSHOT_EXCHANGE,
    SNAPSHOT_KEY,
    SNAPSHOTS,
    STATUS,
    TopologyMismatch,
    STATUS_EXCHANGE,
    UPDATE_EXCHANGE,
    UPDATE_QUEUE_ARGUMENTS,
    UPDATES,
    WATCHED_QUEUES,
    bind_site_queue,
    declare_definitions,
    declare_shared_topology,
    declare_site_queue,
    declare_site_updates,
    hello_key,
    queue_depths,
    site_queue,
    site_update_queue,
    update_key,
)

__all__ = [
    "ANNOUNCEMENTS", "BINDINGS", "EXCHANGES", "EXCHANGE_ARGUMENTS", "LOBBY_EXCHANGE", "LOBBY_KEY", "QUEUES",
    "RECOVERABLE", "RECV_BYTES", "REFUSALS", "REJECTED", "REJECTED_EXCHANGE", "SITE_QUEUE_ARGUMENTS",
    "SITE_UPDATE_QUEUES", "SNAPSHOTS", "SNAPSHOT_EXCHANGE", "SNAPSHOT_KEY", "STATUS", "STATUS_EXCHANGE", "UPDATES",
    "UPDATE_EXCHANGE", "UPDATE_QUEUE_ARGUMENTS", "WATCHED_QUEUES", "bind_site_queue", "Announcements", "Backoff",
    "CONFIRM_TIMEOUT", "CONFIRM_WINDOW", "ChannelClosed", "ConfirmTimeout", "ConfirmedChannel", "ConnectionFailed",
    "Delivery", "SNAPSHOT_CONFIRM_TIMEOUT", "Link", "ManagementError", "EVIDENCE_BYTES", "MARKER_TIMEOUT",
    "WAKE_AFTER_SECONDS",
    "Publisher", "SnapshotReader", "SnapshotUnavailable", "StatusReader", "TLSSetupError", "TopologyMismatch",
    "UpdateInbox", "broker_address", "broker_defects", "broker_user", "cancel_stream_consumer", "confirmed_channel", "connect", "declare_definitions",
    "declare_shared_topology", "declare_site_queue", "declare_site_updates", "deliver_fragments", "hello_key",
    "management_call", "probe", "publish_payload", "queue_depths", "refused_by_broker", "serve_with_reconnect",
    "site_queue", "site_update_queue", "stream_offset_at", "update_key",
]

"""Everything fedq says to RabbitMQ goes through here: names, declarations, connections, chunked publishing.

The names and arguments below must match ``broker_config/definitions.json`` exactly (a test checks
it): RabbitMQ refuses a redeclaration with different arguments, so drift would stop the system.
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils.io_services_utils import _AsyncTransportBase
from pika.channel import ContentFrameAssembler

from shared.chunking import ChunkInfo, iter_chunks, read_single
from shared.protocol import MAX_CHUNK_BYTES, ProtocolError, Status, decode_header, encode_payload, new_id

log = logging.getLogger(__name__)

# pika reads its socket 4 KiB at a time and appends each read to the frame it is assembling, so a
# 128 KiB frame is copied some thirty times over before it is parsed. Reads of a whole frame make
# receiving 4 MiB chunks several times cheaper. A pika 1.x internal (pinned below 2); tests cover it.
RECV_BYTES = 128 * 1024
_AsyncTransportBase._MAX_RECV_BYTES = RECV_BYTES


class FragmentAssembler(ContentFrameAssembler):
    """Hands a message over with its body as the list of its frames' bytes, not joined into one,
    and notes when its channel's last frame came: on a slow link, the frames of one large message
    are progress, though no message is whole for a while."""

    def __init__(self) -> None:
        super().__init__()
        self.last_frame = time.monotonic()

    def process(self, frame_value):
        self.last_frame = time.monotonic()
        return super().process(frame_value)

    def _finish(self):
        content = (self._method_frame, self._header_frame, self._body_fragments)
        self._reset()  # starts a new list: the one handed over stays the caller's
        return content


def deliver_fragments(channel: BlockingChannel) -> FragmentAssembler:
    """Have ``channel`` deliver each body as a list of bytes (its 128 KiB frames) from now on;
    returns the assembler, whose ``last_frame`` says when the channel last received a frame.

    pika joins a body's frames into one bytes object before delivering it. A reader that copies
    bodies into a buffer of its own (``Reassembly.add`` takes the list) saves that copy: a site
    reading a 100 MB snapshot used about a sixth less CPU. Sites read snapshots this way and the
    coordinator reads updates this way. A pika 1.x internal (pinned below 2);
    tests/test_pika_internals.py checks it.
    """
    assembler = channel._impl._content_assembler = FragmentAssembler()
    return assembler


SNAPSHOTS = "fedq.snapshots"  # exchange and stream queue
SNAPSHOT_KEY = "snapshot"
ANNOUNCEMENTS = "fedq.announcements"  # fanout exchange; one latest-only queue per site
UPDATES = "fedq.updates"  # exchange and quorum queue
UPDATE_KEY = "update"
REJECTED = "fedq.rejected"  # exchange and queue for messages the coordinator refused, with the reason
STATUS = "fedq.status"  # exchange and latest-only queue: the coordinator's state for fedq status

EXCHANGES: dict[str, str] = {
    SNAPSHOTS: "direct", ANNOUNCEMENTS: "fanout", UPDATES: "direct", REJECTED: "fanout", STATUS: "fanout",
}
QUEUES: dict[str, dict[str, Any]] = {
    # A stream stores each snapshot once however many sites read it, and lets a reader attach at
    # any point in time; retention is bounded by a policy (broker_config/definitions.json).
    SNAPSHOTS: {"x-queue-type": "stream", "x-stream-max-segment-size-bytes": 50 * 1024 * 1024},
    # Replicated and durable: a confirmed update survives a broker restart. Messages that keep
    # failing are dead-lettered instead of looping forever.
    UPDATES: {"x-queue-type": "quorum", "x-dead-letter-exchange": REJECTED, "x-delivery-limit": 20},
    REJECTED: {"x-queue-type": "classic"},
    # Only the newest status matters; readers take it and put it back for the next reader.
    STATUS: {"x-queue-type": "classic", "x-max-length": 1, "x-overflow": "drop-head"},
}
BINDINGS: list[tuple[str, str, str]] = [
    (SNAPSHOTS, SNAPSHOTS, SNAPSHOT_KEY), (UPDATES, UPDATES, UPDATE_KEY), (REJECTED, REJECTED, ""), (STATUS, STATUS, ""),
]
# Queues whose depth the coordinator reports.
WATCHED_QUEUES = (UPDATES, REJECTED)
# Only the newest announcement matters to a site that was away; older ones are dropped at the broker.
SITE_QUEUE_ARGUMENTS = {"x-max-length": 1, "x-overflow": "drop-head"}


def site_queue(site: str) -> str:
    """The site's own announcement queue."""
    return f"fedq.site.{site}.announcements"


class TLSSetupError(RuntimeError):
    """TLS cannot work as configured (certificate not trusted, or not a TLS port); retrying will not help."""


def connect(
    url: str, heartbeat: int, name: str, *, ca_file: Path | None = None, cert_file: Path | None = None,
    key_file: Path | None = None,
) -> pika.BlockingConnection:
    """Open a connection named ``name`` (shown in the management UI).

    amqps:// URLs use TLS with the broker's certificate always verified, against ``ca_file`` or the
    system's trust store; ``cert_file``/``key_file`` present a client certificate.
    """
    params = pika.URLParameters(url)
    params.heartbeat = heartbeat
    params.blocked_connection_timeout = 300
    params.client_properties = {"connection_name": name}
    if url.startswith("amqps://"):
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        if cert_file:
            context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        params.ssl_options = pika.SSLOptions(context, params.host)
    try:
        return pika.BlockingConnection(params)
    except ssl.SSLCertVerificationError as exc:
        raise TLSSetupError(
            f"the broker at {params.host}:{params.port} presented a certificate that "
            f"{ca_file or 'the system trust store'} does not trust ({exc.verify_message}); set FEDQ_TLS_CA_FILE "
            "to the CA that signed the broker's certificate"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason != "WRONG_VERSION_NUMBER":
            raise
        raise TLSSetupError(
            f"{params.host}:{params.port} does not speak TLS; amqps:// needs the broker's TLS port (5671 by default)"
        ) from None


def declare_shared_topology(channel: BlockingChannel) -> None:
    """Declare the exchanges, queues and bindings every fedq deployment has (idempotent)."""
    for name, kind in EXCHANGES.items():
        channel.exchange_declare(name, kind, durable=True)
    for name, arguments in QUEUES.items():
        channel.queue_declare(name, durable=True, arguments=arguments)
    for exchange, queue, key in BINDINGS:
        channel.queue_bind(queue, exchange, routing_key=key)


def declare_site_queue(channel: BlockingChannel, site: str) -> str:
    """Declare and bind a site's latest-only announcement queue; returns its name."""
    name = site_queue(site)
    channel.queue_declare(name, durable=True, arguments=SITE_QUEUE_ARGUMENTS)
    channel.queue_bind(name, ANNOUNCEMENTS)
    return name


def publish_payload(
    channel: BlockingChannel,
    exchange: str,
    routing_key: str,
    buffers: list[memoryview],
    payload_id: str,
    *,
    user_id: str | None = None,
    mandatory: bool = True,
    chunk_bytes: int = MAX_CHUNK_BYTES,
    progress: Callable[[ChunkInfo], None] | None = None,
    digest: str | None = None,
) -> ChunkInfo:
    """Publish a payload as persistent chunks on a confirming channel; returns the last chunk's info.

    Each basic_publish returns only once the broker has confirmed the chunk, so when this returns
    the whole payload is safe at the broker; a refusal raises pika's NackError, or UnroutableError
    if ``mandatory`` and no queue took it. ``progress`` is called after each confirmed chunk;
    ``digest``, the payload's digest if the caller already has it, saves hashing it again.
    """
    info = None
    for info, body in iter_chunks(buffers, payload_id, chunk_bytes, digest):
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            headers=info.to_headers(),
            message_id=f"{payload_id}:{info.index}",
            user_id=user_id,
            content_type="application/x-fedq",
        )
        channel.basic_publish(exchange, routing_key, body, properties, mandatory=mandatory)
        if progress is not None:
            progress(info)
    assert info is not None  # iter_chunks always yields at least one chunk
    return info


def queue_depths(channel: BlockingChannel) -> dict[str, int]:
    """Messages ready in each watched queue (a passive declare: nothing is created)."""
    return {name: channel.queue_declare(name, passive=True).method.message_count for name in WATCHED_QUEUES}


def publish_status(channel: BlockingChannel, status: Status) -> None:
    """Replace the status on the broker with ``status``."""
    publish_payload(channel, STATUS, "", encode_payload(status, []), new_id(), mandatory=False)


def read_status(channel: BlockingChannel) -> Status | None:
    """The newest status the coordinator published, or None if there is none; left for other readers."""
    method, properties, body = channel.basic_get(STATUS, auto_ack=False)
    if method is None:
        return None
    channel.basic_nack(method.delivery_tag, requeue=True)
    header, _ = decode_header(read_single(properties.headers, body))
    if not isinstance(header, Status):
        raise ProtocolError(f"{STATUS} holds a {header.kind} payload, not a status")
    return header


def cancel_stream_consumer(channel: BlockingChannel, consumer_tag: str) -> None:
    """Cancel a stream consumer without pika rejecting the deliveries still in flight.

    On cancel, pika rejects (requeues) what a manual-ack consumer was sent but had not dispatched
    yet. Streams do not implement basic.reject, and RabbitMQ answers by closing the whole
    connection (540 NOT_IMPLEMENTED). A stream has nothing to requeue, so those deliveries are
    simply dropped: pika is told to tear this consumer down as if it were no-ack. This reaches
    into pika 1.x internals (pinned below 2 in pyproject.toml); tests cover it.
    """
    channel._consumer_infos[consumer_tag].auto_ack = True
    channel._impl._consumers_with_noack.add(consumer_tag)
    channel.basic_cancel(consumer_tag)


def stream_offset_at(timestamp: float) -> datetime:
    """The x-stream-offset that starts a stream reader at a point in time (whole seconds)."""
    return datetime.fromtimestamp(int(timestamp) - 1, tz=timezone.utc)


def broker_address(url: str) -> str:
    """Where an AMQP URL points, without its credentials: host:port/vhost."""
    params = pika.URLParameters(url)
    return f"{params.host}:{params.port}/{params.virtual_host}"


def broker_user(url: str) -> str:
    """The user name in an AMQP URL, sent as user_id so the broker vouches for the sender."""
    return pika.URLParameters(url).credentials.username


# Failures a new connection can cure. Bad credentials and refused permissions are not among them
# (refused_by_broker): retrying those only hides the mistake, so they stop the process with pika's
# own message. Nor is a TLS set-up error, which is no OSError.
RECOVERABLE = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.ConnectionWrongStateError,
    pika.exceptions.ChannelWrongStateError,
    pika.exceptions.NackError,
    OSError,
)
REFUSALS = (pika.exceptions.ProbableAuthenticationError, pika.exceptions.ProbableAccessDeniedError)


def refused_by_broker(exc: BaseException) -> bool:
    """Whether the broker itself refused the login or the vhost.

    pika reports any connection lost while logging in as a probable refusal, with the cause's repr
    as its message. Only a cause that is the broker's own Connection.Close (403 or 530) is one; a
    link cut at that moment is a lost connection like any other, and is retried.
    """
    return isinstance(exc, REFUSALS) and str(exc.args[0] if exc.args else "").startswith("ConnectionClosedByBroker")


def _recovering(exc: BaseException) -> bool:
    """A queue the broker has not finished recovering after a restart: 404 '... is down or inaccessible'."""
    return (
        isinstance(exc, pika.exceptions.ChannelClosedByBroker)
        and exc.reply_code == 404
        and "down or inaccessible" in exc.reply_text
    )


class Backoff:
    """Exponential backoff with full jitter, bounded: 0.5 s, 1 s, 2 s ... up to ``maximum``."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, rng: random.Random | None = None):
        self.initial, self.maximum = initial, maximum
        self.rng = rng or random.Random()
        self.failures = 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * 2**self.failures)
        self.failures += 1
        # Full jitter: sites that lost the broker together do not all come back in the same instant.
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


def serve_with_reconnect(session: Callable[[Backoff], bool], who: str, stopping: Callable[[], bool]) -> None:
    """Run ``session`` until it returns True, reconnecting with backoff whenever the broker is lost.

    ``session`` opens its own connection, calls ``backoff.reset()`` once connected, and returns True
    when its work is done. ``stopping`` ends the loop instead of a reconnect.
    """
    backoff = Backoff()
    while True:
        try:
            if session(backoff):
                return
        except (*RECOVERABLE, pika.exceptions.ChannelClosedByBroker) as exc:
            if refused_by_broker(exc) or (not isinstance(exc, RECOVERABLE) and not _recovering(exc)):
                raise
            if stopping():
                return
            delay = backoff.next_delay()
            log.warning("%s lost the broker (%s: %s); reconnecting in %.1f s (attempt %d)",
                        who, type(exc).__name__, exc, delay, backoff.failures)
            time.sleep(delay)

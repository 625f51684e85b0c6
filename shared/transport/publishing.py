"""Publishing with confirms: chunked payloads, snapshots and their announcements, updates, refusals, status.

Each publish on a ``Publisher`` returns only once the broker has confirmed every chunk of it, so a
payload whose publish returned is safe at the broker; a refusal raises pika's NackError (retried
with a new connection), UnroutableError when a mandatory message found no queue, and a broker
silent for too long ConfirmTimeout (confirms.py says when that happens). Two exceptions: refusals go
out on a channel without confirms (``Publisher.refusal`` says why), and the marker that wakes a
snapshot's readers leaves its confirm to the next publish (``Publisher.wake_readers``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import ChannelClosedByBroker

from shared.chunking import SITE_HEADER, ChunkInfo, iter_chunks
from shared.protocol import MAX_CHUNK_BYTES, Announcement, Status, encode_payload, new_id
from shared.transport.confirms import ConfirmedChannel
from shared.transport.connection import Link
from shared.transport.frames import cancel_stream_consumer
from shared.transport.topology import (
    ANNOUNCEMENTS, REJECTED_EXCHANGE, SNAPSHOT_EXCHANGE, SNAPSHOT_KEY, SNAPSHOTS, STATUS_EXCHANGE, UPDATE_EXCHANGE,
    bind_site_queue, declare_shared_topology, declare_site_updates, hello_key, queue_depths, site_queue, update_key,
)

#: A marker is a message of the stream with this header and no payload: read back, it tells the
#: coordinator where in the stream it is writing; written after a snapshot, it wakes its readers.
#: Readers skip it, as they skip other payloads.
MARKER_HEADER = "fedq-marker"
# A snapshot followed by no other write for this long gets a marker after it. RabbitMQ 3.10's
# streams (osiris 1.3) can miss telling a reader of a chunk committed just as it attached, and the
# reader then sits until the next write: 4 of 600 reads in a loop here that announced, then wrote.
# In synchronous rounds no later write comes, and the round stalled for good. The marker is that
# write, so readers need not attach again to be sure (in a crowd of 1000, attaching again threw
# away what the broker had begun to send; shared/transport/stream.py). A second bounds what the
# missed notification costs; versions that follow each other within it need no marker.
WAKE_AFTER_SECONDS = 1.0
# What a refusal keeps of the refused bytes: a header and more, and little enough that dead-lettering
# a flood of refused 4 MiB chunks costs the coordinator little. Republished whole, 16 MiB chunks
# made it fall behind the broker and hold 600 MB of deliveries waiting (one hostile user, prefetch
# 128), and filled fedq.rejected's 1 GiB with 64 messages.
EVIDENCE_BYTES = 256 * 1024
# How long the coordinator waits to read its marker back before it falls back to locating
# snapshots by time (a healthy local broker answers in milliseconds).
MARKER_TIMEOUT = 5.0
# Chunks a payload may have unconfirmed while the next ones go out (see confirms.py). Measured here
# (medians of 3, 4 MiB chunks to a stream): one node, 512 MB, 656 MB/s with a confirm per chunk and
# 731 MB/s at 8; a three-node cluster on this machine's 2 cores, 256 MB, 271 and 326 MB/s. Windows
# from 1 to 16 were within each other's noise, the cores being the limit; 8 (32 MiB in flight)
# also covers a link's round trip: 30 ms at 1 GB/s.
CONFIRM_WINDOW = 8
# How long a publisher waits for the broker to confirm anything before it publishes again on a new
# connection. A site's last chunks may sit in its kernel's send buffer (up to 4 MiB here) after the
# publish returned: 32 s to drain at 1 Mbit/s before the broker can confirm them.
CONFIRM_TIMEOUT = 120.0
# The coordinator's, shorter: it writes the snapshot stream, whose confirms RabbitMQ 3.10 drops when
# the stream's writer dies, and this is the pause that costs every site. It is near its broker and
# sends 4 MiB chunks: 15 s is an uplink slower than 2.3 Mbit/s.
SNAPSHOT_CONFIRM_TIMEOUT = 15.0


def confirmed_channel(link: Link, timeout: float = CONFIRM_TIMEOUT) -> ConfirmedChannel:
    """A new channel of ``link`` that publishes payloads with CONFIRM_WINDOW chunks unconfirmed at most."""
    return ConfirmedChannel(link.channel(), window=CONFIRM_WINDOW, timeout=timeout)


def publish_payload(
    channel: ConfirmedChannel,
    exchange: str,
    routing_key: str,
    buffers: list[memoryview],
    payload_id: str,
    *,
    user_id: str | None = None,
    headers: dict[str, str] | None = None,
    mandatory: bool = True,
    chunk_bytes: int = MAX_CHUNK_BYTES,
    progress: Callable[[ChunkInfo], None] | None = None,
    digest: str | None = None,
) -> ChunkInfo:
    """Publish a payload as persistent chunks, and wait until the broker confirmed them all; returns
    the last chunk's info.

    Each chunk carries its place in the payload and ``headers``. ``progress`` is called after each
    chunk has gone out; ``digest``, the payload's digest if the caller already has it, saves
    hashing it again.
    """
    info = None
    for info, body in iter_chunks(buffers, payload_id, chunk_bytes, digest):
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            headers={**info.to_headers(), **(headers or {})},
            message_id=f"{payload_id}:{info.index}",
            user_id=user_id,
            content_type="application/x-fedq",
        )
        channel.publish(exchange, routing_key, body, properties, mandatory=mandatory)
        if progress is not None:
            progress(info)
    channel.settle()
    assert info is not None  # iter_chunks always yields at least one chunk
    return info


class Publisher:
    """A confirming channel on ``link``, and what fedq's processes publish through it."""

    def __init__(self, link: Link, *, declare_topology: bool = False, confirm_timeout: float = CONFIRM_TIMEOUT):
        self.link = link
        self.channel = link.channel()
        if declare_topology:
            declare_shared_topology(self.channel)
        self.confirmed = ConfirmedChannel(self.channel, window=CONFIRM_WINDOW, timeout=confirm_timeout)
        self._side_channels: dict[str, BlockingChannel] = {}
        #: The stream offset the next message written to the snapshot stream gets, or None while
        #: unknown (see ``find_stream_end``).
        self.stream_end: int | None = None
        # When the last snapshot's write ended, while no marker has followed it yet.
        self._unwoken_since: float | None = None

    # -- the coordinator's ------------------------------------------------------------------------

    def find_stream_end(self) -> int | None:
        """Learn where in the snapshot stream this publisher writes: attach a reader at the stream's
        end, write a marker, and read it back. Returns (and keeps) the offset of the next message;
        None, with the reason logged by the caller, if the marker did not come back in time.

        AMQP 0-9-1 tells no publisher the offset of what it published, but the coordinator is the
        stream's only writer, and a stream numbers its messages one by one: once one offset is
        known, each snapshot's first chunk is the end before it is written. Sites then find a
        snapshot by its offset, whatever the coordinator's clock says (a clock a second or more
        ahead of the broker's once hid every snapshot from the sites that looked for it by time).
        """
        heard: list[int] = []
        channel = self.link.channel()
        try:
            channel.basic_qos(prefetch_count=1)

            def on_message(ch, method, properties, body):
                offset = (properties.headers or {}).get("x-stream-offset")
                if (properties.headers or {}).get(MARKER_HEADER) == marker and isinstance(offset, int):
                    heard.append(offset)
                ch.basic_ack(method.delivery_tag)

            tag = channel.basic_consume(SNAPSHOTS, on_message, arguments={"x-stream-offset": "next"})
            marker = new_id()
            self._mark(marker)
            self.link.serve_until(lambda: bool(heard), MARKER_TIMEOUT)
            cancel_stream_consumer(channel, tag)
        finally:
            if channel.is_open:
                channel.close()
        self.stream_end = heard[0] + 1 if heard else None
        return self.stream_end

    def snapshot(self, buffers: list[memoryview], payload_id: str, digest: str) -> None:
        """Write a snapshot's chunks to the stream."""
        end, self.stream_end = self.stream_end, None  # unknown if the publish fails half-way
        last = publish_payload(self.confirmed, SNAPSHOT_EXCHANGE, SNAPSHOT_KEY, buffers, payload_id, digest=digest)
        if end is not None:
            self.stream_end = end + last.count
        self._unwoken_since = time.monotonic()

    def wake_readers(self, after: float = WAKE_AFTER_SECONDS) -> bool:
        """Write a marker after the last snapshot if nothing else was written for ``after`` seconds
        since it (``WAKE_AFTER_SECONDS`` says why); returns whether it wrote one. The coordinator
        calls this on each pass of its loop.

        Unlike every other publish here, this one returns without waiting for its confirm: a broker
        busy sending a snapshot to 1000 sites took 13 s to confirm one (benchmarks/load_sites.py),
        and the coordinator would take no updates meanwhile. The channel keeps order, so the next
        publish's wait covers it, and a refusal raises there: a new connection finds the stream's
        end again.
        """
        if self._unwoken_since is None or time.monotonic() - self._unwoken_since < after:
            return False
        self._unwoken_since = None
        self._mark(new_id(), settle=False)
        if self.stream_end is not None:
            self.stream_end += 1
        return True

    def _mark(self, marker: str, settle: bool = True) -> None:
        """Write the marker ``marker`` to the snapshot stream."""
        self.confirmed.publish(SNAPSHOT_EXCHANGE, SNAPSHOT_KEY, b"", pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent, headers={MARKER_HEADER: marker}), mandatory=True)
        if settle:
            self.confirmed.settle()

    def announcement(self, announcement: Announcement) -> None:
        """Tell every site's latest-only queue of a version. Not mandatory: before any site has
        declared its queue, nobody needs to hear it."""
        publish_payload(self.confirmed, ANNOUNCEMENTS, "", encode_payload(announcement, []), new_id(), mandatory=False)

    def welcome(self, site: str) -> str | None:
        """Bind a site's announcement queue (declaring it if the site has not yet), so that it hears
        every version from now on; returns the broker's refusal, if it refused (a queue the site
        declared with other arguments), which costs only the channel opened for it."""
        return self._on_own_channel(lambda channel: bind_site_queue(channel, site))

    def open_updates(self, site: str) -> str | None:
        """Declare the queue of a site's updates and bind it to the site's key; returns the broker's
        refusal, if it refused (a queue of that name with other arguments)."""
        return self._on_own_channel(lambda channel: declare_site_updates(channel, site))

    def _on_own_channel(self, declare: Callable[[BlockingChannel], object]) -> str | None:
        """Declare on a channel of its own: a refusal closes that channel, not the publisher's."""
        channel = self.link.channel()
        try:
            declare(channel)
        except ChannelClosedByBroker as exc:
            return f"{exc.reply_code} {exc.reply_text}"
        finally:
            if channel.is_open:
                channel.close()
        return None

    def refusal(self, body: bytes | list[bytes], headers: dict | None, reason: str, user_id: str | None) -> None:
        """Dead-letter a message that cannot be used (its first ``EVIDENCE_BYTES``, from the bytes or
        the frames it came in), with the reason, its length and the broker-verified user in its headers.

        Without waiting for a confirm, on a channel of its own: the decision is the coordinator's (its
        run log has it, and the refused delivery is acknowledged only after the next checkpoint), the
        dead-letter is evidence. Waiting for the broker to write each one to disk held the coordinator
        to about 65 refusals a second, so one sender streaming refused chunks filled its prefetch
        window of deliveries in memory."""
        frames = body if isinstance(body, list) else [body]
        length = sum(len(frame) for frame in frames)
        evidence = bytearray()
        for frame in frames:
            if len(evidence) >= EVIDENCE_BYTES:
                break
            evidence += frame[: EVIDENCE_BYTES - len(evidence)]
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            headers={**(headers or {}), "fedq-reason": reason, "fedq-user": user_id or "", "fedq-bytes": length},
        )
        self._side_channel("refusals").basic_publish(REJECTED_EXCHANGE, "", bytes(evidence), properties)

    def status(self, status: Status) -> None:
        """Replace the status on the broker with ``status``."""
        publish_payload(self.confirmed, STATUS_EXCHANGE, "", encode_payload(status, []), new_id(), mandatory=False)

    def connected(self, site: str) -> bool | None:
        """Whether the site's worker has a connection to the broker (it consumes its announcement
        queue while it has one); None when the broker cannot say, for the queue is gone."""
        presence = self._side_channel("presence")  # a refusal (404) closes this channel, not the publisher's
        try:
            return presence.queue_declare(site_queue(site), passive=True).method.consumer_count > 0
        except ChannelClosedByBroker:
            return None

    def _side_channel(self, purpose: str) -> BlockingChannel:
        """A channel of its own for ``purpose``, opened on first use and again once the broker closed it."""
        channel = self._side_channels.get(purpose)
        if channel is None or not channel.is_open:
            channel = self._side_channels[purpose] = self.link.channel()
        return channel

    def queue_depths(self, site_queues: Iterable[str] | None = None) -> dict[str, int]:
        """Messages ready in each watched queue, and, unless None, in ``site_queues`` together."""
        return queue_depths(self.channel, site_queues)

    # -- a site's ---------------------------------------------------------------------------------

    def update(self, buffers: list[memoryview], payload_id: str, user_id: str, site: str,
               progress: Callable[[ChunkInfo], None] | None = None, hello: bool = False) -> ChunkInfo:
        """Send an update or evaluation (or with ``hello``, a hello) of ``site`` to the coordinator,
        as ``user_id``, which the broker checks against the connection's user."""
        key = hello_key(site) if hello else update_key(site)
        return publish_payload(self.confirmed, UPDATE_EXCHANGE, key, buffers, payload_id, user_id=user_id,
                               headers={SITE_HEADER: site}, progress=progress)

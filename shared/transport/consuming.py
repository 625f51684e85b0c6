"""Consuming: the coordinator's updates queue, and a site's announcement queue."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from shared.transport.connection import Link
from shared.transport.frames import deliver_fragments
from shared.transport.topology import UPDATES, declare_site_queue



@dataclass(frozen=True)
class Delivery:
    """One message from the updates queue, unacknowledged until ``UpdateInbox.ack``."""

    tag: int
    headers: dict[str, Any] | None
    #: Who sent it, as the broker checked it against the sender's login; None if it named no one.
    user_id: str | None
    #: The body as the frames it came in (``frames.deliver_fragments``).
    body: list[bytes]


class UpdateInbox:
    """The coordinator's consumer on the updates queue: manual acknowledgements, at most ``prefetch``
    deliveries unacknowledged, bodies handed over as their frames.

    pika's callback only queues each delivery here; the coordinator takes them with ``pop``. pika
    dispatches until nothing is pending, and every snapshot publish and acknowledgement lets more
    arrive: updates handled inside the callback kept a busy coordinator inside pika for good, past
    its stop conditions and status ticks.
    """

    def __init__(self, link: Link, prefetch: int):
        self._channel = link.channel()
        deliver_fragments(self._channel)  # copied into the upload's buffer without pika's join first
        self._channel.basic_qos(prefetch_count=prefetch)
        self._waiting: deque[Delivery] = deque()
        self._channel.basic_consume(UPDATES, self._receive)

    def _receive(self, channel, method, properties, body: list[bytes]) -> None:
        self._waiting.append(Delivery(method.delivery_tag, properties.headers, properties.user_id, body))

    def __len__(self) -> int:
        return len(self._waiting)

    def pop(self) -> Delivery:
        """The oldest delivery not yet taken."""
        return self._waiting.popleft()

    def ack(self, tags: list[int]) -> None:
        """Acknowledge deliveries: the broker forgets them."""
        for tag in tags:
            self._channel.basic_ack(tag)


class Announcements:
    """A site's latest-only announcement queue (declared here), each message acknowledged and handed
    to ``on_message(headers, body)`` as it arrives."""

    def __init__(self, link: Link, site: str, on_message: Callable[[dict[str, Any] | None, bytes], None]):
        self._channel = link.channel()
        self._on_message = on_message
        self._channel.basic_consume(declare_site_queue(self._channel, site), self._receive)

    def _receive(self, channel, method, properties, body: bytes) -> None:
        channel.basic_ack(method.delivery_tag)
        self._on_message(properties.headers, body)

"""Consuming: the coordinator's update queues, and a site's announcement queue."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable

import pika.exceptions

from shared.transport.connection import Link
from shared.transport.frames import deliver_fragments
from shared.transport.topology import UPDATES, declare_site_queue, site_update_queue


@dataclass(frozen=True)
class Delivery:
    """One message from an update queue, unacknowledged until ``UpdateInbox.ack``."""

    tag: int
    headers: dict[str, Any] | None
    #: Who sent it, as the broker checked it against the sender's login; None if it named no one.
    user_id: str | None
    #: The body as the frames it came in (``frames.deliver_fragments``).
    body: list[bytes]
    #: The queue it came from: the lobby, or a site's own.
    queue: str


class UpdateInbox:
    """The coordinator's consumers on the lobby and on each greeted site's update queue: manual
    acknowledgements, at most ``prefetch`` deliveries unacknowledged per queue, bodies handed over
    as their frames.

    pika's callback only queues each delivery here; the coordinator takes them with ``pop``. pika
    dispatches until nothing is pending, and every snapshot publish and acknowledgement lets more
    arrive: updates handled inside the callback kept a busy coordinator inside pika for good, past
    its stop conditions and status ticks.
    """

    def __init__(self, link: Link, prefetch: int):
        self._channel = link.channel()
        deliver_fragments(self._channel)  # copied into the upload's buffer without pika's join first
        # Per consumer, RabbitMQ's default: each queue has a window of its own.
        self._channel.basic_qos(prefetch_count=prefetch)
        self._prefetch = prefetch
        self._waiting: deque[Delivery] = deque()
        self._queue_of: dict[str, str] = {}  # consumer tag -> queue
        # Deliveries taken and not yet acknowledged, by queue: what fills each queue's window.
        self._taken: dict[int, str] = {}
        self._taken_from: Counter[str] = Counter()
        # Deliveries received and not yet acknowledged (waiting or taken), by queue: each queue's window.
        self._held_from: Counter[str] = Counter()
        self._consume(UPDATES)

    def listen(self, site: str) -> None:
        """Consume the site's update queue too (declared and bound by ``Publisher.open_updates``)."""
        queue = site_update_queue(site)
        if queue not in self._queue_of.values():
            self._consume(queue)

    @property
    def site_queues(self) -> list[str]:
        """The sites' own update queues this inbox consumes."""
        return [queue for queue in self._queue_of.values() if queue != UPDATES]

    @property
    def backed_up(self) -> list[str]:
        """The sites' update queues that may hold messages the broker has not delivered: those whose
        window is full. Below its window, a queue's consumer is sent whatever comes in, so the queue
        holds none (in flight aside); a status that asks only these queues for their depth asks a few,
        not one per site every tick."""
        return [queue for queue in self.site_queues if self._held_from[queue] >= self._prefetch]

    def _consume(self, queue: str) -> None:
        self._queue_of[self._channel.basic_consume(queue, self._receive)] = queue

    def _receive(self, channel, method, properties, body: list[bytes]) -> None:
        queue = self._queue_of[method.consumer_tag]
        self._waiting.append(Delivery(method.delivery_tag, properties.headers, properties.user_id, body, queue))
        self._held_from[queue] += 1

    def __len__(self) -> int:
        return len(self._waiting)

    def pop(self) -> Delivery:
        """The oldest delivery not yet taken."""
        delivery = self._waiting.popleft()
        self._taken[delivery.tag] = delivery.queue
        self._taken_from[delivery.queue] += 1
        return delivery

    @property
    def fullest(self) -> int:
        """The most deliveries taken and unacknowledged from any one queue: once that reaches the
        window, the broker sends that queue nothing more until some are acknowledged."""
        return max(self._taken_from.values(), default=0)

    def ack(self, tags: list[int]) -> None:
        """Acknowledge deliveries: the broker forgets them."""
        for tag in tags:
            self._channel.basic_ack(tag)
            queue = self._taken.pop(tag)
            self._taken_from[queue] -= 1
            self._held_from[queue] -= 1


class Announcements:
    """A site's latest-only announcement queue (declared here), each message acknowledged and handed
    to ``on_message(headers, body)`` as it arrives."""

    def __init__(self, link: Link, site: str, on_message: Callable[[dict[str, Any] | None, bytes], None]):
        self._channel = link.channel()
        self._on_message = on_message
        self._queue = declare_site_queue(self._channel, site)
        # Without this a site whose queue was deleted would wait for announcements that never come.
        self._channel.add_on_cancel_callback(self._cancelled)
        self._channel.basic_consume(self._queue, self._receive)

    def _cancelled(self, frame) -> None:
        raise pika.exceptions.ConsumerCancelled(
            f"the broker cancelled this site's consumer of {self._queue} (the queue was deleted); reconnecting declares it again")

    def _receive(self, channel, method, properties, body: bytes) -> None:
        channel.basic_ack(method.delivery_tag)
        self._on_message(properties.headers, body)

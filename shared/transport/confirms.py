"""Publisher confirms, several outstanding at a time, with a bound on how long the broker may stay silent.

pika's BlockingChannel in confirm mode waits for each message's confirm before the next one goes
out: a 2 GB snapshot in 4 MiB chunks took 512 round trips to disk and three replicas. Here the
channel's confirms come to callbacks of our own, the channel publishes without waiting, and the
publisher waits only when ``window`` messages are unconfirmed, and for all of them at the end of a
payload. A message is safe at the broker once ``settle`` has returned.

RabbitMQ 3.10 drops a stream's publishes in flight when the node that writes the stream dies: the
stream's new writer was running 3 s after the kill, and the confirms of what had been sent to the
old one never came (the coordinator waited minutes, on a live connection to a live node). So a
silence longer than ``timeout`` closes the connection and raises: a new connection publishes again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pika
import pika.exceptions
import pika.frame
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel, ReturnedMessage


class ConfirmTimeout(pika.exceptions.AMQPConnectionError):
    """The broker confirmed none of a channel's outstanding messages for too long; the connection is closed."""


class ConfirmedChannel:
    """A channel in confirm mode that lets up to ``window`` messages go unconfirmed."""

    def __init__(self, channel: BlockingChannel, *, window: int, timeout: float):
        if window < 0 or timeout <= 0:
            raise ValueError(f"window must be >= 0 and timeout > 0, not {window} and {timeout}")
        self.channel = channel
        self.window, self.timeout = window, timeout
        self._published = 0  # the broker numbers a confirming channel's messages 1, 2, ... in publish order
        self._outstanding: set[int] = set()
        self._nacked = 0
        self._returned: list[ReturnedMessage] = []
        self._ready: Callable[[], bool] | None = None  # what _serve_until waits for
        selected: list[bool] = []

        def on_selected(frame: pika.frame.Method) -> None:
            selected.append(True)
            self._wake()

        # The implementation's own confirm mode: BlockingChannel.confirm_delivery would make every
        # basic_publish wait for its confirm. tests/test_pika_internals.py pins what this uses.
        channel._impl.confirm_delivery(ack_nack_callback=self._on_confirm, callback=on_selected)
        channel.add_on_return_callback(lambda ch, method, properties, body: self._returned.append(
            ReturnedMessage(method, properties, body)))
        self._serve_until(lambda: bool(selected), "the broker to turn on publisher confirms")

    @property
    def outstanding(self) -> int:
        """Messages published and not yet confirmed."""
        return len(self._outstanding)

    def publish(self, exchange: str, routing_key: str, body: bytes | memoryview,
                properties: pika.BasicProperties | None = None, *, mandatory: bool = False) -> None:
        """Send a message (its bytes handed to the socket when this returns), then wait while more
        than ``window`` are unconfirmed. A refusal of an earlier message may raise here already."""
        # Counted before it goes: basic_publish reads the socket too, and its confirm can come in there.
        self._published += 1
        self._outstanding.add(self._published)
        self.channel.basic_publish(exchange, routing_key, body, properties, mandatory=mandatory)
        self._wait(self.window)

    def settle(self) -> None:
        """Wait until the broker confirmed every message published; raise NackError if it refused
        one, UnroutableError if a mandatory one found no queue."""
        self._wait(0)

    def _wait(self, allowed: int) -> None:
        if len(self._outstanding) > allowed:
            self._serve_until(lambda: len(self._outstanding) <= allowed or self._nacked > 0,
                              f"confirms of {len(self._outstanding)} messages")
        else:
            self.channel.connection.process_data_events(time_limit=0)
        # A return comes just before the confirm of the same message, so every return is in by now.
        if self._nacked:
            refused = pika.exceptions.NackError(self._take_returned())
            refused.args = (f"the broker refused {self._nacked} message(s) (basic.nack)",)
            self._nacked = 0
            raise refused
        if self._returned:
            raise pika.exceptions.UnroutableError(self._take_returned())

    def _take_returned(self) -> list[ReturnedMessage]:
        returned, self._returned = self._returned, []
        return returned

    def _serve_until(self, ready: Callable[[], bool], what: str) -> None:
        """Drive the connection until ``ready()``; close it if the broker says nothing for ``timeout`` seconds."""
        progress, heard = len(self._outstanding), time.monotonic()
        self._ready = ready
        try:
            while not ready():
                self.channel.connection.process_data_events(time_limit=min(1.0, self.timeout))
                if ready():
                    return
                if len(self._outstanding) != progress:
                    progress, heard = len(self._outstanding), time.monotonic()
                elif time.monotonic() - heard > self.timeout:
                    self.channel.connection.close()
                    raise ConfirmTimeout(f"the broker sent nothing for {self.timeout:g} s while fedq waited for "
                                         f"{what}; closed the connection to publish again on a new one")
        finally:
            self._ready = None

    def _wake(self) -> None:
        # Confirms reach the implementation's callbacks, which do not end process_data_events (only
        # the blocking layer's own events do, or its time limit): a callback of its own does.
        if self._ready is not None and self._ready():
            self.channel.connection.add_callback_threadsafe(lambda: None)

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        tags = {t for t in self._outstanding if t <= method.delivery_tag} if method.multiple else {method.delivery_tag}
        self._outstanding -= tags
        if isinstance(method, pika.spec.Basic.Nack):
            self._nacked += len(tags)
        self._wake()

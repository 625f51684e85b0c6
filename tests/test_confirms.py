"""Publisher confirms several at a time, on a real broker: the window is kept, every message is safe
once settle returns, refusals and unroutable messages raise, and a silent broker is given up on."""

import time

import pika
import pika.exceptions
import pytest

from shared import transport
from tests.chaos_proxy import ChaosProxy

pytestmark = pytest.mark.broker


def _queue(link: transport.Link, **arguments) -> str:
    return link.channel().queue_declare("", exclusive=True, arguments=arguments or None).method.queue


def test_at_most_window_messages_go_unconfirmed_and_settle_leaves_none(broker_url):
    link = transport.connect(broker_url, 30, "test-confirms")
    try:
        queue = _queue(link)
        confirmed = transport.ConfirmedChannel(link.channel(), window=4, timeout=30)
        seen = []
        for index in range(40):
            confirmed.publish("", queue, str(index).encode(), pika.BasicProperties(delivery_mode=2), mandatory=True)
            seen.append(confirmed.outstanding)
        confirmed.settle()
        assert max(seen) <= 4 and confirmed.outstanding == 0
        channel = link.channel()
        bodies = [channel.basic_get(queue, auto_ack=True)[2] for _ in range(40)]
        assert bodies == [str(index).encode() for index in range(40)], "every message, in order"
    finally:
        link.close()


def test_a_message_the_broker_refuses_raises_nack_error_and_an_unroutable_one_unroutable_error(broker_url):
    link = transport.connect(broker_url, 30, "test-confirms")
    try:
        full = _queue(link, **{"x-max-length": 1, "x-overflow": "reject-publish"})
        confirmed = transport.ConfirmedChannel(link.channel(), window=4, timeout=30)
        confirmed.publish("", full, b"fits")
        with pytest.raises(pika.exceptions.NackError, match="refused 1 message"):
            confirmed.publish("", full, b"over the queue's length")  # raised here or by settle, whichever hears it
            confirmed.settle()
        with pytest.raises(pika.exceptions.UnroutableError) as raised:
            confirmed.publish("", "fedq.no-such-queue", b"lost", mandatory=True)
            confirmed.settle()
        assert raised.value.messages[0].body == b"lost"
        with pytest.raises(pika.exceptions.NackError):  # the channel goes on: refused, but not closed
            confirmed.publish("", full, b"")
            confirmed.settle()
        assert confirmed.outstanding == 0
    finally:
        link.close()


def test_a_broker_that_confirms_nothing_for_too_long_closes_the_connection_and_raises(broker, broker_url):
    proxy = ChaosProxy(broker.port)
    link = transport.connect(proxy.url(broker_url), 30, "test-confirms")
    try:
        confirmed = transport.ConfirmedChannel(link.channel(), window=4, timeout=1.0)
        queue = _queue(link)
        proxy.stall(4)
        started = time.monotonic()
        confirmed.publish("", queue, b"unheard")
        with pytest.raises(transport.ConfirmTimeout, match="sent nothing for 1 s"):
            confirmed.settle()
        # Closing waits for the broker's close-ok, which the stalled link holds until it flows again.
        assert 1.0 <= time.monotonic() - started < 4 + 5
        assert not link.is_open, "closed, for a new connection to publish again"
        assert isinstance(transport.ConfirmTimeout("x"), transport.RECOVERABLE)
    finally:
        link.close()
        proxy.close()

"""The reconnect loop's decisions, without a broker: what is retried, what stops, how long it waits."""

import random

import pika.exceptions
import pytest

from shared import transport


def test_backoff_grows_exponentially_with_jitter_and_stays_bounded():
    backoff = transport.Backoff(initial=0.5, maximum=8.0, rng=random.Random(0))
    delays = [backoff.next_delay() for _ in range(10)]
    ceilings = [min(8.0, 0.5 * 2**i) for i in range(10)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_connection_losses_and_recovering_queues_are_retried_but_bad_credentials_stop():
    attempts = []
    failures = [
        pika.exceptions.StreamLostError("gone"),
        # The link cut while logging in: pika calls it a probable refusal, but the broker said nothing.
        pika.exceptions.ProbableAuthenticationError(repr(pika.exceptions.StreamLostError("Transport indicated EOF"))),
        pika.exceptions.ChannelClosedByBroker(404, "NOT_FOUND - home node 'n' of durable queue 'q' is down or inaccessible"),
        # A cluster node that rejoined and holds no replica of the stream yet.
        pika.exceptions.ChannelClosedByBroker(
            406, "PRECONDITION_FAILED - queue 'queue 'fedq.snapshots' in vhost 'fedq'' does not have a replica on the local node"),
    ]

    def session(backoff):
        attempts.append(1)
        if failures:
            raise failures.pop(0)
        return True

    transport.serve_with_reconnect(session, "test", lambda: False)
    assert len(attempts) == 5

    # pika wraps the repr of what ended a login: the broker's own Connection.Close is a refusal.
    for refusal in (
        pika.exceptions.ProbableAuthenticationError(repr(pika.exceptions.ConnectionClosedByBroker(403, "ACCESS_REFUSED"))),
        pika.exceptions.ProbableAccessDeniedError(repr(pika.exceptions.ConnectionClosedByBroker(530, "NOT_ALLOWED"))),
    ):
        def refused(backoff):
            raise refusal

        with pytest.raises(type(refusal)):
            transport.serve_with_reconnect(refused, "test", lambda: False)

    for closed in (pika.exceptions.ChannelClosedByBroker(403, "ACCESS_REFUSED"),
                   pika.exceptions.ChannelClosedByBroker(406, "PRECONDITION_FAILED - inequivalent arg 'x-queue-type'")):
        def forbidden(backoff, closed=closed):
            raise closed

        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            transport.serve_with_reconnect(forbidden, "test", lambda: False)

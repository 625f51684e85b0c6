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


@pytest.mark.broker
def test_a_site_whose_announcement_queue_is_deleted_reconnects_and_hears_again(broker_url):
    """The broker cancels the consumer of a deleted queue; the site's session ends with an error it
    reconnects from, and the new session's queue hears the next announcement."""
    heard: list[bytes] = []
    sessions = []

    def session(backoff):
        link = transport.connect(broker_url, 30, "test-site")
        try:
            sessions.append(link)
            transport.Announcements(link, "site-1", lambda headers, body: heard.append(body))
            if len(sessions) == 1:
                other = transport.connect(broker_url, 30, "test-operator")
                other.channel().queue_delete(transport.site_queue("site-1"))
                other.close()
                link.serve(10.0)  # the cancel arrives and is raised from here
                return True  # not reached when the cancel is noticed
            channel = link.channel()
            channel.queue_bind(transport.site_queue("site-1"), transport.ANNOUNCEMENTS)
            channel.basic_publish(transport.ANNOUNCEMENTS, "", b"version 2")
            return link.serve_until(lambda: bool(heard), 10)
        finally:
            link.close()

    transport.serve_with_reconnect(session, "site site-1", lambda: False)
    assert len(sessions) == 2, "the cancelled consumer ended the first session"
    assert heard == [b"version 2"]

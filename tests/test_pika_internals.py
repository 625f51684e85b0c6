"""The pika 1.x internals fedq changes: a pika upgrade that moved them fails here."""

import inspect
import re
import socket
import threading
import time
import urllib.parse

import pika.exceptions
import pika.frame
import pika.spec
import pytest
from pika.adapters.utils.io_services_utils import _AsyncTransportBase

from shared import transport


def test_pika_reads_whole_frames_at_a_time():
    # shared.transport raises pika's 4 KiB socket read; if a pika upgrade renamed the knob, this says so.
    assert _AsyncTransportBase._MAX_RECV_BYTES == transport.RECV_BYTES >= 128 * 1024
    assert "self._MAX_RECV_BYTES" in inspect.getsource(_AsyncTransportBase._consume)


def test_a_fragment_delivering_channel_hands_over_each_body_as_its_frames(broker_url):
    # The site reads snapshots this way.
    body = bytes(range(256)) * 2048  # 512 KiB: four frames of pika's 128 KiB
    connection = transport.connect(broker_url, 30, "fragments-test")
    try:
        channel = connection.channel()
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.basic_publish("", queue, body)
        channel.basic_publish("", queue, b"")
        assembler = transport.deliver_fragments(channel)
        attached = assembler.last_frame
        received = []
        channel.basic_consume(queue, lambda ch, method, properties, got: received.append(got), auto_ack=True)
        deadline = time.monotonic() + 10
        while len(received) < 2 and time.monotonic() < deadline:
            connection.serve(0.2)
    finally:
        connection.close()
    whole, empty = received
    assert isinstance(whole, list) and len(whole) > 1 and b"".join(whole) == body
    assert empty == []
    assert assembler.last_frame > attached, "the time of the channel's last frame, for a site's stall check"


def test_a_link_knows_the_version_its_broker_announced(broker_url):
    # Read from pika's inner connection, for the coordinator's warning of a broker with a known defect.
    link = transport.connect(broker_url, 30, "version-test")
    try:
        version = link.broker_version
    finally:
        link.close()
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", version), version


def test_a_refused_login_is_told_from_a_login_cut_short(broker_url):
    # pika calls both a "probable" refusal; transport.refused_by_broker reads which one it was from the
    # cause pika wraps, so a site whose link drops while it logs in retries instead of exiting.
    parts = urllib.parse.urlsplit(broker_url)
    wrong_password = parts._replace(netloc=f"{parts.username}:not-the-password@{parts.hostname}:{parts.port}").geturl()
    with pytest.raises(pika.exceptions.ProbableAuthenticationError) as refused:
        transport.connect(wrong_password, 30, "refused-test")
    assert transport.refused_by_broker(refused.value)

    with socket.create_server(("127.0.0.1", 0)) as listener, pytest.raises(pika.exceptions.AMQPConnectionError) as cut:
        threading.Thread(target=_greet_then_hang_up, args=(listener,), daemon=True).start()
        transport.connect(f"amqp://user:password@127.0.0.1:{listener.getsockname()[1]}/%2F", 30, "cut-test")
    assert isinstance(cut.value, transport.REFUSALS) and not transport.refused_by_broker(cut.value)


def _greet_then_hang_up(listener: socket.socket) -> None:
    """Act as a broker until the client has sent its credentials, then drop the connection."""
    client, _ = listener.accept()
    with client:
        client.recv(8)  # the protocol header
        start = pika.spec.Connection.Start(server_properties={"product": "test"}, mechanisms="PLAIN", locales="en_US")
        client.sendall(pika.frame.Method(0, start).marshal())
        client.recv(4096)  # Connection.StartOk, with the credentials


def test_a_blocking_channel_can_hand_its_confirms_to_callbacks_of_its_own():
    # shared.transport.confirms turns confirm mode on through the channel's implementation, so that
    # basic_publish does not wait for each confirm; a pika upgrade that changed it fails here.
    from pika.adapters.blocking_connection import BlockingChannel
    from pika.channel import Channel

    assert {"ack_nack_callback", "callback"} <= set(inspect.signature(Channel.confirm_delivery).parameters)
    assert "self._impl.basic_publish" in inspect.getsource(BlockingChannel.basic_publish)

"""The pika 1.x internals fedq changes: a pika upgrade that moved them fails here."""

import inspect
import time

from pika.adapters.utils.io_services_utils import _AsyncTransportBase

from shared import amqp


def test_pika_reads_whole_frames_at_a_time():
    # shared.amqp raises pika's 4 KiB socket read; if a pika upgrade renamed the knob, this says so.
    assert _AsyncTransportBase._MAX_RECV_BYTES == amqp.RECV_BYTES >= 128 * 1024
    assert "self._MAX_RECV_BYTES" in inspect.getsource(_AsyncTransportBase._consume)


def test_a_fragment_delivering_channel_hands_over_each_body_as_its_frames(broker_url):
    # The site reads snapshots this way.
    body = bytes(range(256)) * 2048  # 512 KiB: four frames of pika's 128 KiB
    connection = amqp.connect(broker_url, 30, "fragments-test")
    try:
        channel = connection.channel()
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.basic_publish("", queue, body)
        channel.basic_publish("", queue, b"")
        amqp.deliver_fragments(channel)
        received = []
        channel.basic_consume(queue, lambda ch, method, properties, got: received.append(got), auto_ack=True)
        deadline = time.monotonic() + 10
        while len(received) < 2 and time.monotonic() < deadline:
            connection.process_data_events(time_limit=0.2)
    finally:
        connection.close()
    whole, empty = received
    assert isinstance(whole, list) and len(whole) > 1 and b"".join(whole) == body
    assert empty == []

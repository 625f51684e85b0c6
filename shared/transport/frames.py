"""The pika 1.x internals fedq changes, each for a measured reason; tests/test_pika_internals.py fails
if a pika upgrade moves one (pika is pinned below 2 in pyproject.toml)."""

from __future__ import annotations

import time

from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils.io_services_utils import _AsyncTransportBase
from pika.channel import ContentFrameAssembler

# pika reads its socket 4 KiB at a time and appends each read to the frame it is assembling, so a
# 128 KiB frame is copied some thirty times over before it is parsed. Reads of a whole frame make
# receiving 4 MiB chunks several times cheaper, in every process.
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
    coordinator reads updates this way.
    """
    assembler = channel._impl._content_assembler = FragmentAssembler()
    return assembler


def cancel_stream_consumer(channel: BlockingChannel, consumer_tag: str) -> None:
    """Cancel a stream consumer without pika rejecting the deliveries still in flight.

    On cancel, pika rejects (requeues) what a manual-ack consumer was sent but had not dispatched
    yet. Streams do not implement basic.reject, and RabbitMQ answers by closing the whole
    connection (540 NOT_IMPLEMENTED). A stream has nothing to requeue, so those deliveries are
    simply dropped: pika is told to tear this consumer down as if it were no-ack.
    """
    channel._consumer_infos[consumer_tag].auto_ack = True
    channel._impl._consumers_with_noack.add(consumer_tag)
    channel.basic_cancel(consumer_tag)

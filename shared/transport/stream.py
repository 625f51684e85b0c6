"""Reading one chunked snapshot from the snapshot stream.

The coordinator announces a snapshot before it writes its chunks, with the stream offset its first
chunk will have; a reader attaches there and collects the chunks of that payload id. An
announcement without an offset (the coordinator could not learn where it writes) is read from the
announced time instead, skipping the other snapshots stored near it.
"""

from __future__ import annotations

import logging
import time
import weakref
from datetime import datetime, timezone
from typing import Callable

from shared.chunking import ChunkInfo, Reassembly
from shared.progress import Throttle, megabytes
from shared.protocol import Announcement, ProtocolError
from shared.transport.connection import Link
from shared.transport.frames import cancel_stream_consumer, deliver_fragments
from shared.transport.topology import SNAPSHOTS

# Gives up a read that has not completed in this long; the site then waits for the next version.
READ_TIMEOUT = 300.0
# A read that hears nothing from the stream for this long, not a frame, attaches again just past
# the last message it heard. RabbitMQ 3.10's streams (osiris 1.3) can miss telling a reader of a
# chunk committed just as it attached, and the reader sits until the next write; the coordinator
# makes that write a second after each snapshot (``Publisher.wake_readers``), so attaching again
# is the fallback, for a coordinator that could not. Until 2026-12-06 it came after 1 s of silence:
# in a crowd of 1000 readers of one snapshot that threw away what the broker had begun to send, 2.9
# times per read (benchmarks/stream_fanout.py); after 8 s, 1.5 and 6.5 times per read in two runs
# of 1000 simulated sites, and after 30 s, once per read in three (benchmarks/load_sites.py, whose
# reads took 29 to 46 s at p99). Frames count, not whole messages: over a slow link one 4 MiB chunk
# takes many seconds.
STALL_SECONDS = 30.0
# A read that attaches again waits four times as long before the next time, up to this long, and a
# site's next read starts from that wait (halved after each read that went without a silence).
# 1000 simulated sites that attached again after every second of silence attached 14,135 times in 2
# minutes for 16 completed reads, and the broker grew to 9 GB (benchmarks/load_sites.py); reads
# there took 21 to 57 s. docs/cluster.md has the rules tried.
LONGEST_STALL_SECONDS = 64.0
# The silence each site's link waits for before a read attaches again, as its last read left it.
_patience: weakref.WeakKeyDictionary[Link, float] = weakref.WeakKeyDictionary()
# Chunks the broker may send a reader ahead of its acknowledgements, at most; a snapshot of fewer
# chunks gets a window of its own size. The stream goes on past the snapshot a reader wants (later
# versions follow it), and the broker fills each reader's window from there: 1000 simulated sites
# reading a 4 MB snapshot with a window of 16 took the broker to 14.9 GB, past its memory alarm,
# and delivery's p50 to 23 s (benchmarks/load_sites.py).
PREFETCH = 16


class SnapshotUnavailable(TimeoutError):
    """The snapshot did not arrive in time; the message says how far the read got."""


def stream_offset_at(timestamp: float) -> datetime:
    """The x-stream-offset that starts a stream reader at a point in time (whole seconds)."""
    return datetime.fromtimestamp(int(timestamp) - 1, tz=timezone.utc)


class SnapshotReader:
    """Reads the snapshot ``announcement`` names into ``buffer``, one attachment to the stream at a
    time: at the announced offset (or time) first, then, after each silence, just past the last
    message heard. The first silence that counts is ``STALL_SECONDS`` for a site's first read;
    each later one four times the one before, up to ``LONGEST_STALL_SECONDS``, and the site's next
    read starts from the last (halved, if this read heard no silence).

    The coordinator writes a snapshot's chunks one after the other, with nothing between them, so
    a read that hears the stream go on past its snapshot (another message after one of its chunks)
    before it is whole knows the rest will never come: the coordinator lost the broker mid-write,
    and writes the version again under a new payload id once it is back. The read ends there: it
    gives way to a newer announcement, or raises SnapshotUnavailable, and the site waits for one.

    ``newest()`` is the newest announcement the reader's site has heard. When it names another
    snapshot, the read ends early if that snapshot is of another run, or the run ended, or the read
    has heard nothing for a silence, or the announced offset held another message (the coordinator
    lost the broker before the first chunk, and wrote its marker there once back; without a newer
    announcement the read goes on past such a message, as past any other). A read that is moving
    finishes, newer version or not: reads that started over on every newer version never ended
    where versions came faster than a snapshot reads. 300 simulated sites reading a 4 MB snapshot
    at once completed 164 reads in 75 s (benchmarks/load_sites.py), and a site on a slow link with
    a large model would fare the same beside fast sites. The version read is then a few versions old, which staleness weighting is
    for; a read started again would be as old by the time it ended.

    Its progress goes to ``log``, each line starting with ``who``.
    """

    def __init__(self, link: Link, announcement: Announcement, buffer: memoryview, *,
                 newest: Callable[[], Announcement | None], log: logging.Logger, who: str):
        self.link, self.announcement, self.buffer = link, announcement, buffer
        self.newest, self.log, self.who = newest, log, who
        self.reassembly: Reassembly | None = None
        self.payload: memoryview | None = None
        self.error: ProtocolError | None = None
        #: The stream offset just past the last message heard, where a new attachment starts.
        self.next_offset: int | None = None
        #: How many times this read attached to the stream (more than once after a stall).
        self.attachments = 0
        #: Whether the stream went on past this read's snapshot before it was whole.
        self.overtaken = False
        #: Whether the announced offset held another message than this snapshot's first chunk.
        self.not_at_offset = False
        self._attached_at = time.monotonic()
        #: The silence after which this read attaches again.
        self.patience = _patience.get(link, STALL_SECONDS)
        self._progress, self._stalls = Throttle(), Throttle()

    @property
    def chunks_in(self) -> int:
        return self.reassembly.received if self.reassembly is not None else 0

    def read(self) -> memoryview | None:
        """The whole payload, digest-checked; None if it gave way to a newer announcement.

        Raises ProtocolError for chunks that do not add up, SnapshotUnavailable after READ_TIMEOUT.
        """
        started = time.monotonic()
        self._channel = self.link.channel()
        self._frames = deliver_fragments(self._channel)  # copied into the buffer without pika's join first
        self._channel.basic_qos(prefetch_count=min(PREFETCH, max(1, self.announcement.chunks)))
        self._attach()
        # A lost connection raises out of here as it is: its channel and consumer are gone with it.
        gave_way = False
        while self.payload is None and self.error is None and time.monotonic() - started < READ_TIMEOUT:
            self.link.serve(min(1.0, self.patience / 2))
            if self.payload is not None or self.error is not None:
                break
            stalled = self._stalled()
            gave_way = self._gives_way(stalled or self.overtaken or self.not_at_offset)
            if gave_way or self.overtaken:
                break
            if stalled:
                self._attach_again()
        cancel_stream_consumer(self._channel, self._tag)
        self._channel.close()
        _patience[self.link] = self.patience if self.attachments > 1 else max(STALL_SECONDS, self.patience / 2)
        if self.error is not None:
            raise self.error
        if self.payload is None and not gave_way and self.overtaken:
            raise SnapshotUnavailable(
                f"the stream went on past it after {self.chunks_in} of {self.announcement.chunks} chunks: the "
                "coordinator stopped writing it (most likely it lost the broker mid-write) and will publish the "
                "version again"
            )
        if self.payload is None and not gave_way:
            raise SnapshotUnavailable(
                f"it did not arrive from stream {SNAPSHOTS} within {READ_TIMEOUT:.0f} s: {self.chunks_in} of "
                f"{self.announcement.chunks} chunks came, the reader attached {self.attachments} times, last at "
                f"offset {self.next_offset}; if this repeats, check that the stream's retention keeps at least one "
                "whole snapshot"
            )
        return self.payload

    def _gives_way(self, stuck: bool) -> bool:
        """Whether the newest announcement ends this read (the class's docstring says when)."""
        newest, reading = self.newest(), self.announcement
        return (newest is not None and newest.payload_id != reading.payload_id
                and (newest.final or newest.run_id != reading.run_id or stuck))

    def _attach(self) -> None:
        offset = self.next_offset
        if offset is None:
            announced = self.announcement.stream_offset
            offset = announced if announced is not None else stream_offset_at(self.announcement.published_at)
        self._attached_at = time.monotonic()
        self.attachments += 1
        self._tag = self._channel.basic_consume(SNAPSHOTS, self._on_chunk, arguments={"x-stream-offset": offset})

    def _stalled(self) -> bool:
        return time.monotonic() - max(self._attached_at, self._frames.last_frame) > self.patience

    def _attach_again(self) -> None:
        cancel_stream_consumer(self._channel, self._tag)
        silence, self.patience = self.patience, min(4 * self.patience, LONGEST_STALL_SECONDS)
        self._attach()
        # Rare on a healthy broker: said the first time and then every few seconds, so a read that
        # stays stuck shows in the log how it tried.
        if self.attachments == 2 or self._stalls.due():
            self.log.info("%s: nothing from the stream for %.1f s while reading version %d (%d of %d chunks); "
                          "attached again at offset %s (%d attachments)", self.who, silence,
                          self.announcement.version, self.chunks_in, self.announcement.chunks, self.next_offset,
                          self.attachments)

    def _on_chunk(self, channel, method, properties, body: list[bytes]) -> None:
        channel.basic_ack(method.delivery_tag)
        headers = properties.headers or {}
        offset = headers.get("x-stream-offset")
        if isinstance(offset, int):
            self.next_offset = offset + 1
        if self.payload is not None:
            return
        if headers.get("fedq-payload") != self.announcement.payload_id:
            # Before this snapshot: another stored near it. After one of its chunks: the stream went on without it.
            self.overtaken = self.reassembly is not None
            self.not_at_offset = self.not_at_offset or (offset is not None and offset == self.announcement.stream_offset)
            return
        try:
            info = ChunkInfo.from_headers(headers, self.announcement.size)
            if self.reassembly is None:
                self.reassembly = Reassembly(info, self.buffer)
            if self.reassembly.add(info, body):
                self.payload = self.reassembly.payload()
            elif self._progress.due():
                received = self.reassembly.received
                self.log.info("%s: receiving snapshot version %d: %d of %d chunks (%s of %s)", self.who,
                              self.announcement.version, received, info.count,
                              megabytes(min(received * info.chunk_bytes, info.size)), megabytes(info.size))
        except ProtocolError as exc:
            self.error = exc

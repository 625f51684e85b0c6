"""Updates arriving chunk by chunk: reassembled, refused when they cannot be taken, forgotten when
idle, kept on disk when unfinished uploads fill the window of unacknowledged deliveries.

Every chunk names the site it speaks for (``fedq-site``), and the broker names the user that sent
it; a sender is a user speaking for one site (a site's own user speaks for no other). The first
chunk of an upload is checked before anything of it is held: its user must be allowed to speak for
that site, and the sender must be within its budget of uploads in flight and of bytes they claim.
Later chunks of the upload must come from the same user. Broker-free: deliveries come in as
(tag, headers, user, body), and what must be acknowledged, held or refused goes back to the caller,
which owns the connection.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from coordinator.senders import Senders
from coordinator.upload_spool import UploadSpool
from shared.chunking import SITE_HEADER, BufferPool, ChunkInfo, Reassembly
from shared.protocol import ProtocolError

log = logging.getLogger("fedq.coordinator")


@dataclass
class Upload:
    """An update still arriving chunk by chunk, and the deliveries to settle once it is handled."""

    reassembly: Reassembly
    user_id: str | None = None
    site: str | None = None
    #: Deliveries of its chunks not yet acknowledged.
    tags: list[int] = field(default_factory=list)
    first_chunk: float = field(default_factory=time.monotonic)
    last_chunk: float = field(default_factory=time.monotonic)
    #: Chunks already in its spool file (acknowledged).
    spooled: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class Refusal:
    """Deliveries that cannot be used: dead-letter ``body`` with ``reason``, then settle ``tags``."""

    tags: list[int]
    reason: str
    body: bytes | list[bytes]
    headers: dict | None
    user_id: str | None


@dataclass(frozen=True)
class Budget:
    """What one sender's uploads in flight may hold: how many, and how many bytes they claim
    (and so may take of the coordinator's memory and of its upload spool)."""

    uploads: int = 2
    bytes: int = 4 * 1024**3


class Uploads:
    """The uploads in progress, keyed by payload id.

    ``window`` is how many deliveries may wait unacknowledged: an upload of more chunks could never
    be whole at once, and is refused. ``buffers`` lends the reassembly buffers.
    """

    def __init__(self, spool: UploadSpool, buffers: BufferPool, senders: Senders, *, max_bytes: int, window: int,
                 budget: Budget = Budget(), spool_period: float = 600.0):
        self.spool, self.buffers, self.senders = spool, buffers, senders
        self.max_bytes, self.window, self.budget = max_bytes, window, budget
        self.spool_period = spool_period
        self.arriving: dict[str, Upload] = {}
        # Bytes each sender's uploads had spooled, with when: at most budget.bytes in any spool_period.
        self._spooled_by: dict[tuple[str | None, str | None], deque[tuple[float, int]]] = {}
        # Spooled uploads handled since the last checkpoint: their files go once it is written.
        self._spool_done: list[str] = []

    def __len__(self) -> int:
        return len(self.arriving)

    def add(self, tag: int, headers: dict | None, user_id: str | None, body: list[bytes]) -> Upload | Refusal | None:
        """Place one delivered chunk: the upload once it is whole (no longer arriving), a refusal,
        or None while chunks are missing."""
        try:
            info = ChunkInfo.from_headers(headers, self.max_bytes)
            upload = self.arriving.get(info.payload_id) or self._begin(info, headers, user_id)
            if upload.user_id != user_id:
                raise ProtocolError(f"a chunk of payload {info.payload_id} came from user {user_id!r}, "
                                    f"the upload's first from {upload.user_id!r}")
        except ProtocolError as exc:
            return Refusal([tag], str(exc), body, headers, user_id)
        upload.tags.append(tag)
        upload.last_chunk = time.monotonic()
        try:
            complete = upload.reassembly.add(info, body)
        except ProtocolError as exc:
            self._forget(info.payload_id)
            return Refusal(upload.tags, str(exc), body, headers, user_id)
        if complete:
            self._forget(info.payload_id)
            return upload
        return None

    def _begin(self, info: ChunkInfo, headers: dict, user_id: str | None) -> Upload:
        """A new upload, once its sender may send it; ProtocolError says why not."""
        site = headers.get(SITE_HEADER)
        if isinstance(site, bytes):
            site = site.decode("utf-8", "replace")
        self.senders.check(site, user_id)
        if info.count > self.window:
            # Its chunks could never all be held unacknowledged at once: refused, not left to stall.
            raise ProtocolError(
                f"payload of {info.count} chunks ({info.size} bytes) exceeds the coordinator's window of "
                f"{self.window} chunks; raise FEDQ_PREFETCH on the coordinator or compress updates"
            )
        mine = [upload for upload in self.arriving.values() if (upload.user_id, upload.site) == (user_id, site)]
        claimed = sum(upload.reassembly.size for upload in mine)
        if len(mine) >= self.budget.uploads or claimed + info.size > self.budget.bytes:
            raise ProtocolError(
                f"user {user_id!r} already has {len(mine)} uploads for site {site!r} in flight, claiming {claimed} "
                f"bytes; another of {info.size} bytes exceeds the budget of {self.budget.uploads} uploads and "
                f"{self.budget.bytes} bytes (FEDQ_SENDER_UPLOADS, FEDQ_SENDER_UPLOAD_BYTES)"
            )
        reassembly = Reassembly(info, self.buffers.take(info.size))
        upload = self.arriving[info.payload_id] = Upload(reassembly, user_id=user_id, site=site)
        return upload

    def expire(self, idle_seconds: float) -> list[Upload]:
        """Forget the uploads no chunk has come for in ``idle_seconds``; returns them. Their spool
        files go at once: an expired upload changed nothing a checkpoint must hold first (left for
        the next checkpoint, an idle coordinator kept them, and took them back on a restart)."""
        now = time.monotonic()
        expired = [upload for upload in self.arriving.values() if now - upload.last_chunk > idle_seconds]
        for upload in expired:
            self.arriving.pop(upload.reassembly.payload_id)
            if upload.spooled:
                self.spool.remove(upload.reassembly.payload_id)
        return expired

    def spool_unfinished(self) -> tuple[list[int], list[Refusal]]:
        """The window is full of unfinished uploads, so nothing more would arrive to finish any:
        append the chunks they hold to the spool; returns the deliveries now safe to acknowledge,
        and the uploads refused instead.

        What a sender's uploads spool in any ``spool_period`` stays within its budget of bytes. A
        site sends one upload at a time, and each site's queue has a window of its own, so an
        honest site's uploads are seldom spooled; a sender that abandons its uploads once they are
        spooled, to begin others, made the coordinator write 939.5 MB in 60 s against a budget of
        64 MiB before this bound. An upload past it is refused.
        """
        partial = [upload for upload in self.arriving.values() if upload.tags]
        log.info("%d uploads arriving at once fill the window of %d chunks; keeping their chunks on disk",
                 len(partial), self.window)
        now, acks, refusals = time.monotonic(), [], []
        for upload in partial:
            new = upload.reassembly.seen - upload.spooled
            size = sum(len(upload.reassembly.chunk(index)) for index in new)
            lately = self._spooled_lately((upload.user_id, upload.site), now)
            if lately + size > self.budget.bytes:
                self.arriving.pop(upload.reassembly.payload_id)
                if upload.spooled:
                    self.spool.remove(upload.reassembly.payload_id)
                refusals.append(Refusal(upload.tags, (
                    f"user {upload.user_id!r}'s uploads for site {upload.site!r} had {lately} bytes spooled in the last "
                    f"{self.spool_period:g} s; {size} more of payload {upload.reassembly.payload_id} exceed the budget of "
                    f"{self.budget.bytes} bytes (FEDQ_SENDER_UPLOAD_BYTES, per FEDQ_UPLOAD_TIMEOUT). A site sends one "
                    f"upload at a time: send the next once the last is confirmed"), b"", None, upload.user_id))
                continue
            self.spool.append(upload.reassembly, new, upload.user_id, upload.site)
            self._spooled_by[(upload.user_id, upload.site)].append((now, size))
            upload.spooled |= new
            acks += upload.tags
            upload.tags = []
        return acks, refusals

    def _spooled_lately(self, sender: tuple[str | None, str | None], now: float) -> int:
        """Bytes the sender's uploads spooled in the last ``spool_period``."""
        marks = self._spooled_by.setdefault(sender, deque())
        while marks and marks[0][0] < now - self.spool_period:
            marks.popleft()
        return sum(size for _, size in marks)

    def take_spooled(self) -> None:
        """Go on with the uploads a stopped coordinator left in the spool."""
        for spooled in self.spool.read_all(self.buffers):
            self.arriving[spooled.reassembly.payload_id] = Upload(
                spooled.reassembly, user_id=spooled.user_id, site=spooled.site, spooled=spooled.spooled)
        if self.arriving:
            log.info("resumed %d unfinished uploads from %s", len(self.arriving), self.spool.folder)

    def reconnected(self) -> None:
        """Deliveries of the last connection come again: what they carried is either in the
        checkpoint (and the ledger skips it), in the spool, or redelivered in full. Only spooled
        uploads are kept (a chunk they hold that comes again is the same bytes, and is ignored)."""
        self.arriving = {pid: Upload(u.reassembly, user_id=u.user_id, site=u.site, spooled=u.spooled,
                                     first_chunk=u.first_chunk)
                         for pid, u in self.arriving.items() if u.spooled}

    def checkpointed(self) -> None:
        """A checkpoint holds every upload handled so far: their spool files go."""
        for payload_id in self._spool_done:
            self.spool.remove(payload_id)
        self._spool_done.clear()

    def _forget(self, payload_id: str) -> Upload:
        """Take an upload out of those arriving; its spool file goes with the next checkpoint."""
        upload = self.arriving.pop(payload_id)
        if upload.spooled:
            self._spool_done.append(payload_id)
        return upload

"""Updates arriving chunk by chunk: reassembled, refused when they cannot fit, forgotten when idle,
kept on disk when unfinished uploads fill the window of unacknowledged deliveries.

Broker-free: deliveries come in as (tag, headers, user, body), and what must be acknowledged, held
or refused goes back to the caller, which owns the connection.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from coordinator.upload_spool import UploadSpool
from shared.chunking import BufferPool, ChunkInfo, Reassembly
from shared.protocol import ProtocolError

log = logging.getLogger("fedq.coordinator")


@dataclass
class Upload:
    """An update still arriving chunk by chunk, and the deliveries to settle once it is handled."""

    reassembly: Reassembly
    tags: list[int] = field(default_factory=list)
    user_id: str | None = None
    first_chunk: float = field(default_factory=time.monotonic)
    last_chunk: float = field(default_factory=time.monotonic)
    #: Whether its chunks so far are in the upload spool (and acknowledged).
    spooled: bool = False


@dataclass(frozen=True)
class Refusal:
    """Deliveries that cannot be used: dead-letter ``body`` with ``reason``, then settle ``tags``."""

    tags: list[int]
    reason: str
    body: bytes | list[bytes]
    headers: dict | None
    user_id: str | None


class Uploads:
    """The uploads in progress, keyed by payload id.

    ``window`` is how many deliveries may wait unacknowledged: an upload of more chunks could never
    be whole at once, and is refused. ``buffers`` lends the reassembly buffers.
    """

    def __init__(self, spool: UploadSpool, buffers: BufferPool, *, max_bytes: int, window: int):
        self.spool, self.buffers = spool, buffers
        self.max_bytes, self.window = max_bytes, window
        self.arriving: dict[str, Upload] = {}
        # Spooled uploads handled since the last checkpoint: their files go once it is written.
        self._spool_done: list[str] = []

    def __len__(self) -> int:
        return len(self.arriving)

    @property
    def unfinished_chunks(self) -> int:
        """Deliveries held unacknowledged by uploads not yet whole."""
        return sum(len(upload.tags) for upload in self.arriving.values())

    def add(self, tag: int, headers: dict | None, user_id: str | None, body: list[bytes]) -> Upload | Refusal | None:
        """Place one delivered chunk: the upload once it is whole (no longer arriving), a refusal,
        or None while chunks are missing."""
        try:
            info = ChunkInfo.from_headers(headers, self.max_bytes)
        except ProtocolError as exc:
            return Refusal([tag], str(exc), body, headers, user_id)
        upload = self.arriving.get(info.payload_id)
        if upload is None:
            if info.count > self.window:
                # Its chunks could never all be held unacknowledged at once: refused, not left to stall.
                return Refusal([tag], (
                    f"payload of {info.count} chunks ({info.size} bytes) exceeds the coordinator's window of "
                    f"{self.window} chunks; raise FEDQ_PREFETCH on the coordinator or compress updates"
                ), body, headers, user_id)
            reassembly = Reassembly(info, self.buffers.take(info.size))
            upload = self.arriving[info.payload_id] = Upload(reassembly, user_id=user_id)
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

    def expire(self, idle_seconds: float) -> list[Upload]:
        """Forget the uploads no chunk has come for in ``idle_seconds``; returns them."""
        now = time.monotonic()
        expired = [upload for upload in self.arriving.values() if now - upload.last_chunk > idle_seconds]
        for upload in expired:
            self._forget(upload.reassembly.payload_id)
        return expired

    def spool_unfinished(self) -> list[int]:
        """The window is full of unfinished uploads, so nothing more would arrive to finish any:
        write them to the spool; returns the deliveries now safe to acknowledge, so the rest can come."""
        partial = [upload for upload in self.arriving.values() if upload.tags]
        tags = [tag for upload in partial for tag in upload.tags]
        log.info("%d uploads arriving at once fill the window of %d chunks; keeping their %d chunks on disk",
                 len(partial), self.window, len(tags))
        for upload in partial:
            self.spool.write(upload.reassembly, upload.user_id)
            upload.spooled = True
            upload.tags.clear()
        return tags

    def take_spooled(self) -> None:
        """Go on with the uploads a stopped coordinator left in the spool."""
        for reassembly, user_id in self.spool.read_all():
            self.arriving[reassembly.payload_id] = Upload(reassembly, user_id=user_id, spooled=True)
        if self.arriving:
            log.info("resumed %d unfinished uploads from %s", len(self.arriving), self.spool.folder)

    def reconnected(self) -> None:
        """Deliveries of the last connection come again: what they carried is either in the
        checkpoint (and the ledger skips it), in the spool, or redelivered in full. Only spooled
        uploads are kept, without their unacknowledged chunks."""
        self.arriving = {pid: Upload(u.reassembly, user_id=u.user_id, spooled=True)
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

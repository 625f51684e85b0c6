"""Unfinished uploads the coordinator keeps on disk so that it may acknowledge their chunks.

The broker delivers at most ``prefetch`` chunks unacknowledged, and the coordinator acknowledges a
chunk only once what it carried is durable. When several sites upload at once their chunks
interleave, and the window can fill with uploads none of which is whole: nothing more arrives, and
before this spool the uploads stalled until ``upload_timeout`` discarded them. Now the coordinator
writes those uploads here (atomic, digest-checked files) and acknowledges their chunks; the rest of
each upload still comes from the broker. After a crash the spooled chunks come from disk, the
others from the broker again. A file is removed once the checkpoint holding its update is written.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import msgpack

from shared.chunking import Reassembly
from shared.durable_files import read_durable, write_durable
from shared.protocol import ProtocolError, new_digest

log = logging.getLogger("fedq.coordinator")

MAGIC = b"FEDQUPL2"
_LENGTH = struct.Struct("<I")


class UploadSpool:
    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, payload_id: str) -> Path:
        # Payload ids come from the wire: hashed, so no id can name a path outside the folder.
        return self.folder / f"{new_digest().update(payload_id.encode()).hexdigest()[:32]}.upload"

    def write(self, reassembly: Reassembly, user_id: str | None) -> None:
        header = msgpack.packb({"state": reassembly.state(), "user_id": user_id})
        write_durable(self._path(reassembly.payload_id), MAGIC,
                      [memoryview(_LENGTH.pack(len(header)) + header), reassembly.storage[: reassembly.size]])

    def remove(self, payload_id: str) -> None:
        self._path(payload_id).unlink(missing_ok=True)

    def clear(self) -> None:
        for path in self.folder.glob("*.upload"):
            path.unlink()

    def read_all(self) -> list[tuple[Reassembly, str | None]]:
        """Every spooled upload, to go on with; a damaged file is logged and removed."""
        uploads = []
        for path in sorted(self.folder.glob("*.upload")):
            try:
                body = read_durable(path, MAGIC)
                (length,) = _LENGTH.unpack(body[: _LENGTH.size])
                header = msgpack.unpackb(body[_LENGTH.size : _LENGTH.size + length])
                uploads.append((Reassembly.resume(header["state"], body[_LENGTH.size + length :]), header["user_id"]))
            except (ProtocolError, struct.error, msgpack.UnpackException, ValueError, KeyError, TypeError) as exc:
                log.warning("removed the unfinished upload %s: it cannot be read (%s); its site's chunks are lost", path, exc)
                path.unlink()
        return uploads

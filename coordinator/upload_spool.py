"""Unfinished uploads the coordinator keeps on disk so that it may acknowledge their chunks.

The broker delivers at most ``prefetch`` chunks unacknowledged, and the coordinator acknowledges a
chunk only once what it carried is durable. When several sites upload at once their chunks
interleave, and the window can fill with uploads none of which is whole: nothing more would
arrive. The coordinator then appends the chunks it holds of those uploads here and acknowledges
them; the rest of each upload still comes from the broker.

One file per upload, appended to, never rewritten: a header naming the upload, then one record per
chunk, each with its own digest. Every chunk is written once, when its delivery is about to be
acknowledged, so the bytes written are the bytes that arrived (a file that rewrote each upload
whole at its claimed size let one chunk claiming gigabytes cost gigabytes of disk). Each append is
fsynced before its chunks are acknowledged, so after a crash a record is either whole and
acknowledged, or torn and not acknowledged: the broker delivers it again, and the torn tail is cut
off when the file is read. A restart reads the records back one at a time into the upload's
reassembly buffer. A file is removed once the checkpoint holding its update is written.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack

from shared.chunking import BufferPool, ChunkInfo, Reassembly
from shared.protocol import ProtocolError, new_digest

log = logging.getLogger("fedq.coordinator")

MAGIC = b"FEDQUPL3"  # 3: append-only records (2 rewrote the whole upload)
_LENGTH = struct.Struct("<I")
# index, length, whether the payload's digest follows (the last chunk carries it)
_RECORD = struct.Struct("<IIB")
_DIGEST_BYTES = 32


@dataclass
class SpooledUpload:
    """An upload read back from the spool: its chunks so far, who sent it, which chunks the file holds."""

    reassembly: Reassembly
    user_id: str | None
    site: str | None
    spooled: set[int]


class UploadSpool:
    def __init__(self, folder: Path):
        self.folder = folder
        #: Bytes appended since this spool was made (chunk bytes and record overhead).
        self.bytes_written = 0

    def _path(self, payload_id: str) -> Path:
        # Payload ids come from the wire: hashed, so no id can name a path outside the folder.
        return self.folder / f"{new_digest().update(payload_id.encode()).hexdigest()[:32]}.upload"

    def append(self, reassembly: Reassembly, indices: Iterable[int], user_id: str | None, site: str | None) -> None:
        """Append chunks ``indices`` (all in ``reassembly``) to the upload's file, made with its header
        if it is new, and fsync it: once this returns they may be acknowledged."""
        indices = sorted(indices)
        if not indices:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(reassembly.payload_id)
        new = not path.exists()
        with open(path, "ab") as out:
            written = 0
            if new:
                header = msgpack.packb({"payload_id": reassembly.payload_id, "size": reassembly.size,
                                        "count": reassembly.count, "chunk_bytes": reassembly.chunk_bytes,
                                        "user_id": user_id, "site": site})
                written += out.write(MAGIC + _LENGTH.pack(len(header)) + header)
            for index in indices:
                data = reassembly.chunk(index)
                last = index == reassembly.count - 1 and reassembly.digest is not None
                written += out.write(_RECORD.pack(index, len(data), last))
                if last:
                    written += out.write(bytes.fromhex(reassembly.digest))
                written += out.write(new_digest().update(data).digest())
                written += out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if new:
            _fsync_folder(self.folder)
        self.bytes_written += written

    def remove(self, payload_id: str) -> None:
        self._path(payload_id).unlink(missing_ok=True)

    def clear(self) -> None:
        for path in self.folder.glob("*.upload"):
            path.unlink()

    def read_all(self, buffers: BufferPool | None = None) -> Iterator[SpooledUpload]:
        """Every spooled upload, to go on with, read a record at a time into a reassembly buffer
        (from ``buffers`` if it has one). A file whose header cannot be read is logged and removed;
        a torn or damaged record ends its file there (it was never acknowledged: the broker sends
        that chunk again)."""
        for path in sorted(self.folder.glob("*.upload")):
            try:
                with open(path, "r+b") as source:
                    upload = self._read(path, source, buffers)
            except (ProtocolError, OSError, ValueError, KeyError, TypeError, struct.error, msgpack.UnpackException) as exc:
                log.warning("removed the unfinished upload %s: it cannot be read (%s); its site's chunks are lost",
                            path, exc)
                path.unlink()
                continue
            yield upload

    def _read(self, path: Path, source, buffers: BufferPool | None) -> SpooledUpload:
        if source.read(len(MAGIC)) != MAGIC:
            raise ProtocolError("not an upload spool file of this fedq version")
        (length,) = _LENGTH.unpack(source.read(_LENGTH.size))
        header = msgpack.unpackb(source.read(length))
        first = ChunkInfo(str(header["payload_id"]), 0, int(header["count"]), int(header["size"]),
                          int(header["chunk_bytes"]))
        if not (0 <= first.size and 0 < first.chunk_bytes and first.count == max(1, -(-first.size // first.chunk_bytes))):
            raise ProtocolError(f"its header describes no upload: {header}")
        reassembly = Reassembly(first, buffers.take(first.size) if buffers is not None else None)
        spooled: set[int] = set()
        good = source.tell()
        while True:
            record = _read_record(source, first)
            if record is None:
                break
            index, digest, data = record
            info = ChunkInfo(first.payload_id, index, first.count, first.size, first.chunk_bytes, digest)
            reassembly.add(info, data)
            spooled.add(index)
            good = source.tell()
        if good != os.fstat(source.fileno()).st_size:
            log.info("cut the torn end off the unfinished upload %s (its chunk comes again from the broker)", path)
            source.truncate(good)
        return SpooledUpload(reassembly, header.get("user_id"), header.get("site"), spooled)


def _read_record(source, first: ChunkInfo) -> tuple[int, str | None, bytes] | None:
    """The next whole, intact record (index, payload digest if it carries one, data), or None at the
    end of the file or at a torn or damaged record."""
    head = source.read(_RECORD.size)
    if len(head) < _RECORD.size:
        return None
    index, length, last = _RECORD.unpack(head)
    if index >= first.count or length != min(first.chunk_bytes, first.size - index * first.chunk_bytes):
        return None
    digest = source.read(_DIGEST_BYTES).hex() if last else None
    check = source.read(_DIGEST_BYTES)
    data = source.read(length)
    if len(data) < length or new_digest().update(data).digest() != check:
        return None
    return index, digest, data


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

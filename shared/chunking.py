"""Cutting payloads into messages of at most 4 MiB and putting them back together, verified.

Each chunk travels as one AMQP message whose headers say which payload it belongs to, where it sits
and how large the whole is. The last chunk also carries the digest (BLAKE3) of the whole payload,
which the publisher computes before the first chunk (the coordinator announces it too), and which
the reader computes as chunks arrive in order and checks once it has all.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from shared.protocol import MAX_CHUNK_BYTES, ProtocolError, new_digest

# A reader refuses chunk sizes above what any broker accepts, whatever the sender claims.
_LARGEST_CHUNK = 16 * 1024 * 1024
# Every chunk of an update (or a hello) names the site it speaks for, so that the coordinator can
# check its sender at the first chunk it sees, before it holds anything of the payload.
SITE_HEADER = "fedq-site"
# A payload's digest as the last chunk carries it: BLAKE3's 256 bits in lowercase hex (hexdigest()).
# The coordinator's upload spool keeps it as those 32 bytes.
_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ChunkInfo:
    """Where one message sits in its payload; carried in the message's AMQP headers."""

    payload_id: str
    index: int
    count: int
    size: int
    chunk_bytes: int
    digest: str | None = None

    @property
    def offset(self) -> int:
        return self.index * self.chunk_bytes

    @property
    def length(self) -> int:
        """The exact body length this chunk must have."""
        return min(self.chunk_bytes, self.size - self.offset)

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1

    def to_headers(self) -> dict[str, Any]:
        headers: dict[str, Any] = {
            "fedq-payload": self.payload_id,
            "fedq-chunk": self.index,
            "fedq-chunks": self.count,
            "fedq-size": self.size,
            "fedq-chunk-bytes": self.chunk_bytes,
        }
        if self.digest is not None:
            headers["fedq-digest"] = self.digest
        return headers

    @classmethod
    def from_headers(cls, headers: dict[str, Any] | None, max_size: int) -> "ChunkInfo":
        """Read and check a message's chunk headers; ProtocolError says what is missing or wrong."""
        if not headers or "fedq-payload" not in headers:
            raise ProtocolError("message has no fedq chunk headers")

        def field(key: str, kind: type, required: bool = True) -> Any:
            value = headers.get(key)
            if isinstance(value, bytes) and kind is str:
                value = value.decode("utf-8", "replace")
            if value is None:
                if required:
                    raise ProtocolError(f"header {key} is missing")
                return None
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ProtocolError(f"header {key} is {value!r}, expected {kind.__name__}")
            return value

        info = cls(
            payload_id=field("fedq-payload", str),
            index=field("fedq-chunk", int),
            count=field("fedq-chunks", int),
            size=field("fedq-size", int),
            chunk_bytes=field("fedq-chunk-bytes", int),
            digest=field("fedq-digest", str, required=False),
        )
        if not 0 < len(info.payload_id) <= 64:
            raise ProtocolError("header fedq-payload must be 1 to 64 characters")
        if not 0 < info.chunk_bytes <= _LARGEST_CHUNK:
            raise ProtocolError(f"chunk size {info.chunk_bytes} is outside 1..{_LARGEST_CHUNK}")
        if not 0 <= info.size <= max_size:
            raise ProtocolError(f"payload size {info.size} exceeds the limit of {max_size} bytes")
        if info.count != chunk_count(info.size, info.chunk_bytes):
            raise ProtocolError(f"{info.count} chunks cannot hold {info.size} bytes in {info.chunk_bytes}-byte chunks")
        if not 0 <= info.index < info.count:
            raise ProtocolError(f"chunk index {info.index} is outside 0..{info.count - 1}")
        if info.is_last and info.digest is None:
            raise ProtocolError("the last chunk carries no fedq-digest header")
        if info.digest is not None and not _DIGEST.fullmatch(info.digest):
            raise ProtocolError(f"header fedq-digest is {info.digest[:80]!r}, not a digest (64 lowercase hex digits)")
        return info


def chunk_count(size: int, chunk_bytes: int) -> int:
    """Chunks needed for ``size`` bytes; an empty payload still travels as one empty chunk."""
    return max(1, math.ceil(size / chunk_bytes))


def payload_digest(buffers: list[memoryview]) -> str:
    """The digest of the payload made of ``buffers`` laid end to end, as its last chunk carries it."""
    digest = new_digest()
    for buffer in buffers:
        digest.update(buffer)
    return digest.hexdigest()


def iter_chunks(
    buffers: list[memoryview], payload_id: str, chunk_bytes: int = MAX_CHUNK_BYTES, digest: str | None = None
) -> Iterator[tuple[ChunkInfo, bytes]]:
    """Yield (info, body) for each chunk of the payload made of ``buffers`` laid end to end.

    Only one chunk's bytes exist at a time, so a 2 GB model costs 4 MiB here, not 2 GB. The last
    chunk carries ``digest``, computed here unless the caller already has it.
    """
    size = sum(len(b) for b in buffers)
    count = chunk_count(size, chunk_bytes)
    digest = digest or payload_digest(buffers)
    pieces = _slices(buffers)
    next(pieces)
    for index in range(count):
        want = min(chunk_bytes, size - index * chunk_bytes)
        parts, got = [], 0
        while got < want:
            piece = pieces.send(want - got)
            parts.append(piece)
            got += len(piece)
        # One copy into the body pika sends (it takes bytes only); a chunk inside one tensor is a slice.
        body = bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
        info = ChunkInfo(payload_id, index, count, size, chunk_bytes, digest if index == count - 1 else None)
        yield info, body


def _slices(buffers: list[memoryview]) -> Any:
    """A generator that hands out up to ``n`` bytes per ``send(n)``, walking the buffers in order."""
    n = yield b""
    for buffer in buffers:
        start = 0
        while start < len(buffer):
            piece = buffer[start : start + n]
            start += len(piece)
            n = yield piece


class Reassembly:
    """Collects the chunks of one payload, in any order, into one preallocated buffer.

    The buffer is not zero-filled first (every byte is written before the payload is released), and
    chunks are hashed as soon as they are in order, while they are still in cache: a large payload
    is touched once on arrival, not three times.
    """

    def __init__(self, first: ChunkInfo, buffer: memoryview | None = None):
        """``buffer``, if given and large enough, is written into instead of a new allocation: a
        reader that keeps one buffer across payloads never pays the page faults of fresh memory."""
        self.payload_id = first.payload_id
        self.size = first.size
        self.count = first.count
        self.chunk_bytes = first.chunk_bytes
        self.digest: str | None = None
        if buffer is None or len(buffer) < first.size:
            buffer = memoryview(np.empty(first.size, dtype=np.uint8)).cast("B")
        self.storage = buffer  # the whole buffer, to hand back to a BufferPool once the payload is used
        self._buffer = buffer[: first.size]
        self._seen: set[int] = set()
        self._digest = new_digest()
        self._hashed = 0  # chunks 0 .. _hashed - 1 are in the digest

    @property
    def complete(self) -> bool:
        return len(self._seen) == self.count

    @property
    def received(self) -> int:
        return len(self._seen)

    def add(self, info: ChunkInfo, body: bytes | list[bytes]) -> bool:
        """Place one chunk, whole or as the fragments it arrived in (``shared.transport.deliver_fragments``);
        returns True once every chunk is in. A repeated chunk is ignored."""
        if (info.payload_id, info.size, info.count, info.chunk_bytes) != (
            self.payload_id,
            self.size,
            self.count,
            self.chunk_bytes,
        ):
            raise ProtocolError(f"chunk {info.index} disagrees with earlier chunks of payload {self.payload_id}")
        fragments = body if isinstance(body, list) else [body]
        length = sum(len(fragment) for fragment in fragments)
        if length != info.length:
            raise ProtocolError(f"chunk {info.index} has {length} bytes, expected {info.length}")
        if info.index not in self._seen:
            position = info.offset
            for fragment in fragments:
                self._buffer[position : position + len(fragment)] = fragment
                position += len(fragment)
            self._seen.add(info.index)
            self._hash_in_order()
        if info.digest is not None:
            self.digest = info.digest
        return self.complete

    def _hash_in_order(self) -> None:
        while self._hashed in self._seen:
            start = self._hashed * self.chunk_bytes
            self._digest.update(self._buffer[start : start + self.chunk_bytes])
            self._hashed += 1

    @property
    def seen(self) -> frozenset[int]:
        """The indices of the chunks in."""
        return frozenset(self._seen)

    def chunk(self, index: int) -> memoryview:
        """The bytes of chunk ``index``, once it is in."""
        if index not in self._seen:
            raise KeyError(f"chunk {index} of payload {self.payload_id} has not arrived")
        start = index * self.chunk_bytes
        return self._buffer[start : start + min(self.chunk_bytes, self.size - start)]

    def prefix(self, limit: int) -> bytes:
        """The first ``limit`` bytes of a complete payload, to keep as evidence when it is refused."""
        return bytes(self._buffer[:limit]) if self.complete else b""

    def payload(self) -> memoryview:
        """The verified payload; ProtocolError if chunks are missing or the digest does not match."""
        if not self.complete:
            raise ProtocolError(f"payload {self.payload_id} has {self.received} of {self.count} chunks")
        actual = self._digest.hexdigest()
        if actual != self.digest:
            raise ProtocolError(f"payload {self.payload_id} digest {actual} does not match the sent {self.digest}")
        return self._buffer


class BufferPool:
    """Buffers of payloads already used, kept to receive the next payloads of about the same size.

    Fresh memory costs a page fault per 4 KiB on first write: receiving a 100 MB update into a new
    buffer took several times longer than into one already touched. A reader that knows a payload
    is no longer referenced gives its buffer back; at most ``max_bytes`` are kept.
    """

    def __init__(self, max_bytes: int, min_size: int = MAX_CHUNK_BYTES):
        self.max_bytes = max_bytes
        self.min_size = min_size  # smaller payloads are cheap to allocate and not worth keeping
        self._spare: list[memoryview] = []

    @property
    def spare_bytes(self) -> int:
        return sum(len(buffer) for buffer in self._spare)

    def take(self, size: int) -> memoryview | None:
        """A kept buffer of at least ``size`` bytes and at most twice that, or None."""
        fitting = [b for b in self._spare if size <= len(b) <= 2 * size]
        if size < self.min_size or not fitting:
            return None
        buffer = min(fitting, key=len)
        self._spare.remove(buffer)
        return buffer

    def give(self, buffer: memoryview) -> None:
        """Keep ``buffer`` for a later payload; its contents may be overwritten from now on."""
        if self.min_size <= len(buffer) and self.spare_bytes + len(buffer) <= self.max_bytes:
            self._spare.append(buffer)


def read_single(headers: dict[str, Any] | None, body: bytes, max_size: int = MAX_CHUNK_BYTES) -> memoryview:
    """The verified payload of a message that is a whole payload by itself (announcements)."""
    info = ChunkInfo.from_headers(headers, max_size)
    if info.count != 1:
        raise ProtocolError(f"expected a one-chunk payload, got chunk {info.index} of {info.count}")
    reassembly = Reassembly(info)
    reassembly.add(info, body)
    return reassembly.payload()

"""Files that survive crashes: written atomically, read back only if their digest matches.

A file is ``magic | digest (BLAKE3) of the body | body``. Writing goes to a temporary file that is fsynced
and then renamed over the target (and the folder fsynced), so after a crash the path holds the old
file or the new one, never a torn mix.
"""

from __future__ import annotations

import os
from pathlib import Path

from shared.protocol import ProtocolError, new_digest

_DIGEST = 32


def write_durable(path: Path, magic: bytes, buffers: list[memoryview]) -> None:
    digest = new_digest()
    for buffer in buffers:
        digest.update(buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as out:
        out.write(magic + digest.digest())
        for buffer in buffers:
            out.write(buffer)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def read_durable(path: Path, magic: bytes) -> memoryview:
    """The body of a file ``write_durable`` wrote; ProtocolError if it is damaged or not of this kind."""
    with open(path, "rb") as source:
        # The size of the file opened, not of the path: a writer may replace the path meanwhile.
        size = os.fstat(source.fileno()).st_size
        data = bytearray(size)
        source.readinto(data)
    view = memoryview(data)
    if size < len(magic) + _DIGEST or bytes(view[: len(magic)]) != magic:
        raise ProtocolError(f"{path} is not a {magic.decode(errors='replace')} file (not fedq's, or written by an "
                            "older fedq whose files this one cannot read: move it away and start again)")
    body = view[len(magic) + _DIGEST :]
    if new_digest().update(body).digest() != bytes(view[len(magic) : len(magic) + _DIGEST]):
        raise ProtocolError(f"{path} is damaged: its digest does not match")
    return body

"""Tensors on disk in fedq's own format: the wire payload behind a magic string and its SHA-256.

Used for error-feedback residuals and checkpoints. Writes are atomic (temporary file, fsync, rename,
fsync of the folder), so a crash leaves the old file or the new one, never half of either; reads
verify the digest, so a damaged file is reported, not loaded. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from shared.codecs import Layout, decode_tensors, encode_tensors, get_codec
from shared.protocol import PROTOCOL_VERSION, ProtocolError, TensorFile, decode_payload, encode_payload

MAGIC = b"FEDQTNS1"
_DIGEST = 32


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
    """Write float32 tensors and msgpack-able ``meta`` to ``path`` atomically."""
    specs, parts = encode_tensors(tensors, get_codec("fp32"))
    buffers = encode_payload(TensorFile(protocol=PROTOCOL_VERSION, meta=meta or {}, tensors=specs), parts)
    digest = hashlib.sha256()
    for buffer in buffers:
        digest.update(buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as out:
        out.write(MAGIC + digest.digest())
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


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read what ``save_tensors`` wrote; ProtocolError if the file is damaged or not fedq's."""
    size = path.stat().st_size
    data = bytearray(size)
    with open(path, "rb") as source:
        source.readinto(data)
    view = memoryview(data)
    if size < len(MAGIC) + _DIGEST or bytes(view[: len(MAGIC)]) != MAGIC:
        raise ProtocolError(f"{path} is not a fedq tensor file")
    stored = bytes(view[len(MAGIC) : len(MAGIC) + _DIGEST])
    payload = view[len(MAGIC) + _DIGEST :]
    if hashlib.sha256(payload).digest() != stored:
        raise ProtocolError(f"{path} is damaged: its SHA-256 does not match")
    header, parts = decode_payload(payload)
    if not isinstance(header, TensorFile):
        raise ProtocolError(f"{path} holds a {header.kind} payload, not tensors")
    layout = Layout(tuple((spec.name, spec.shape) for spec in header.tensors))
    return decode_tensors(header.tensors, parts, layout), header.meta

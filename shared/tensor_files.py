"""Tensors on disk in fedq's own format: the wire payload in a durable file (atomic, digest-checked).

Used for error-feedback residuals and checkpoints. Nothing is pickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from shared.codecs import Layout, decode_tensors, encode_tensors, get_codec
from shared.durable_files import read_durable, write_durable
from shared.protocol import FILE_LIMITS, PROTOCOL_VERSION, ProtocolError, TensorFile, decode_payload, encode_payload

MAGIC = b"FEDQTNS2"  # 2: BLAKE3 digests


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
    """Write float32 tensors and msgpack-able ``meta`` to ``path`` atomically."""
    specs, parts = encode_tensors(tensors, get_codec("fp32"))
    write_durable(path, MAGIC, encode_payload(TensorFile(protocol=PROTOCOL_VERSION, meta=meta or {}, tensors=specs), parts))


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read what ``save_tensors`` wrote; ProtocolError if the file is damaged or not fedq's."""
    header, parts = decode_payload(read_durable(path, MAGIC), FILE_LIMITS)
    if not isinstance(header, TensorFile):
        raise ProtocolError(f"{path} holds a {header.kind} payload, not tensors")
    layout = Layout(tuple((spec.name, spec.shape) for spec in header.tensors))
    return decode_tensors(header.tensors, parts, layout), header.meta

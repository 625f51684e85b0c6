"""The worker's outbox: finished updates (and evaluations) wait on disk until the broker has confirmed them.

An update is written here (atomically, with its digest) before it is published, and removed only
after every chunk is confirmed. A worker killed mid-upload, or cut off from the broker, publishes
it again on its next connection under the same update id: the coordinator reassembles chunks by
that id and its ledger counts the update once, so a repeat can never be applied twice, and a
half-sent update can never be applied at all.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from shared.durable_files import read_durable, write_durable
from shared.protocol import ProtocolError

log = logging.getLogger("fedq.worker")
MAGIC = b"FEDQOUT2"  # 2: BLAKE3 digests
KINDS = ("update", "evaluation")


class Outbox:
    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def put(self, payload_id: str, buffers: list[memoryview], kind: str = "update") -> Path:
        """Keep an encoded payload (an ``update`` or an ``evaluation``) until it is confirmed;
        names sort in the order they were made."""
        path = self.folder / f"{time.time_ns():020d}-{payload_id}.{kind}"
        write_durable(path, MAGIC, buffers)
        return path

    def pending(self) -> list[Path]:
        return sorted(path for kind in KINDS for path in self.folder.glob(f"*.{kind}"))

    def read(self, path: Path) -> tuple[str, str, memoryview] | None:
        """The kind, payload id and payload kept at ``path``; a damaged entry is reported and removed."""
        try:
            payload = read_durable(path, MAGIC)
        except (ProtocolError, OSError) as exc:
            log.error("outbox entry %s cannot be sent and is removed: %s", path, exc)
            path.unlink(missing_ok=True)
            return None
        return path.suffix[1:], path.stem.split("-", 1)[1], payload

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)

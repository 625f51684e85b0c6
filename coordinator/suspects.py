"""Payloads that stopped the coordinator: noticed across restarts, refused the next time they come.

Every error a payload can cause in the ingest stages is a verdict, so the updates queue needs no
delivery limit to break a crash loop, and a limit would dead-letter valid updates that were merely
handed over many times: each lost connection returns the whole prefetch window, unprocessed, and
counts one more delivery for each of its messages. What a verdict cannot catch is a payload that
ends the process itself (the kernel's OOM killer, a crash in native code). So before the
coordinator takes an upload whose last chunk the broker has handed over ``SUSPECT_AFTER`` times
or more, it writes the upload's id here, durably, and removes it once the upload has its verdict.
A coordinator that starts and finds an id here stopped while taking that payload; when the payload
comes again it is refused, with that reason, instead of being taken again.

Order: the mark is on disk before the payload is taken; it goes only after the verdict. A crash in
between leaves it, which is the point.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from shared.durable_files import read_durable, write_durable
from shared.protocol import ProtocolError

log = logging.getLogger("fedq.coordinator")

MAGIC = b"FEDQSUS1"
#: Deliveries of a payload's last chunk (RabbitMQ's x-delivery-count counts the earlier ones) from
#: which taking it is guarded. A payload is handed over twice in a healthy run only after the
#: coordinator lost its connection or restarted before acknowledging it.
SUSPECT_AFTER = 2


def deliveries(headers: dict | None) -> int:
    """How many times the broker handed this message over before, as a quorum queue counts it."""
    count = (headers or {}).get("x-delivery-count")
    return count if isinstance(count, int) and count >= 0 else 0


class Suspects:
    """The payload being taken, while it is suspect, and the one that stopped the last run."""

    def __init__(self, path: Path):
        self.path = path
        #: The payload id the last coordinator stopped on, if it did.
        self.stopped_on: str | None = None
        if path.exists():
            try:
                self.stopped_on = json.loads(bytes(read_durable(path, MAGIC)))["payload_id"]
            except (ProtocolError, ValueError, KeyError, TypeError) as exc:
                log.warning("%s cannot be read (%s); no payload is held against the last run", path, exc)
            else:
                log.warning("the coordinator stopped last time while taking payload %s; it is refused if it comes "
                            "again", self.stopped_on)

    def taking(self, payload_id: str, handed_over: int) -> bool:
        """About to take ``payload_id``, handed over ``handed_over`` times before; marks it if that is
        suspect, and returns whether it did."""
        if handed_over < SUSPECT_AFTER:
            return False
        write_durable(self.path, MAGIC, [memoryview(json.dumps({"payload_id": payload_id}).encode())])
        return True

    def taken(self) -> None:
        """The suspect payload has its verdict: it did not stop the coordinator."""
        self.path.unlink(missing_ok=True)

    def refusal(self, payload_id: str, handed_over: int) -> str | None:
        """Why this payload must not be taken again, if it stopped the last coordinator."""
        if payload_id != self.stopped_on:
            return None
        self.stopped_on = None
        self.path.unlink(missing_ok=True)
        return (f"the coordinator stopped while taking this payload (handed over {handed_over + 1} times); it is "
                "refused so that it cannot stop it again. If it is a valid update, its site's log and the coordinator's "
                "last lines before the stop say more")

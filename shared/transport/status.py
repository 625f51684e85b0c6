"""Reading the coordinator's status from the broker, for ``fedq status`` on any machine."""

from __future__ import annotations

from shared.chunking import read_single
from shared.protocol import ProtocolError, Status, decode_header
from shared.transport.connection import Link
from shared.transport.topology import STATUS


class StatusReader:
    """Reads the newest status the coordinator published, leaving it for other readers."""

    def __init__(self, link: Link):
        self._channel = link.channel()

    def read(self) -> Status | None:
        """The newest status, or None if there is none. The broker's refusal (a site's user may not
        read it; no coordinator declared the queue yet) raises ``ChannelClosed``."""
        method, properties, body = self._channel.basic_get(STATUS, auto_ack=False)
        if method is None:
            return None
        self._channel.basic_nack(method.delivery_tag, requeue=True)
        header, _ = decode_header(read_single(properties.headers, body))
        if not isinstance(header, Status):
            raise ProtocolError(f"{STATUS} holds a {header.kind} payload, not a status")
        return header

"""Which broker user may speak for which site.

RabbitMQ checks every message's ``user_id`` against the login of the connection that published it,
so the user is the broker's word; the site a message claims is the sender's. The coordinator takes
a message only from a user allowed to speak for the site it claims: at its first chunk, before
anything of it is held, and again for the whole payload's header.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.protocol import ProtocolError


@dataclass(frozen=True)
class Senders:
    #: Users that may send for any site (the development user; none in production).
    any_site: frozenset[str] = frozenset()
    #: The site of each listed user; a user not listed speaks for the site of its own name.
    site_of: Mapping[str, str] = field(default_factory=dict)

    def check(self, site: object, user: str | None) -> None:
        """ProtocolError unless the broker-verified ``user`` may speak for ``site``."""
        if not user:
            raise ProtocolError("the message carries no user_id, so its sender cannot be verified")
        if not isinstance(site, str) or not site:
            raise ProtocolError(f"the message names no site it speaks for (got {site!r})")
        if user not in self.any_site and self.site_of.get(user, user) != site:
            raise ProtocolError(f"user {user!r} may not send for site {site!r}")

    def site_of_user(self, user: str) -> str:
        """The site a user speaks for, as the status table shows it."""
        return self.site_of.get(user, user)

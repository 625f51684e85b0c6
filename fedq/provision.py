"""Provisioning: one broker user per site, allowed exactly what a site needs and nothing more.

A site may declare and read its own announcement queue, read the snapshot stream, and write to the
updates exchange under its own routing keys. It cannot read updates (its own or anyone's), the
dead-letter queue or another site's queue, cannot send into another site's update queue, cannot
publish snapshots, cannot declare anything else, and cannot bind anything it shares with others.
RabbitMQ checks the ``user_id`` of every message against the connection's user, so a site cannot
speak for another.
"""

from __future__ import annotations

import re
import secrets
import urllib.parse
from dataclasses import dataclass

from shared import transport
from shared.protocol import SITE_NAME_PATTERN

COORDINATOR_PERMISSIONS = {"configure": r"^fedq\..*", "write": r"^fedq\..*", "read": r"^fedq\..*"}


def site_permissions(site: str) -> dict[str, str]:
    """The configure, write and read patterns of a site's user.

    Declaring its own queue needs configure on it; publishing updates, write on the updates
    exchange; consuming, read on its own queue and on the snapshot stream. No exchange is readable
    and no shared queue writable, so a site can bind nothing shared (the coordinator binds its
    queue when it says hello).
    """
    own = re.escape(transport.site_queue(site))
    return {
        "configure": f"^{own}$",
        "write": f"^{re.escape(transport.UPDATE_EXCHANGE)}$",
        "read": f"^({own}|{re.escape(transport.SNAPSHOTS)})$",
    }


def site_topic_permissions(site: str) -> dict[str, str]:
    """The routing keys a site's user may publish to the updates exchange: its own update and hello
    keys only, so its messages reach its own queue or the lobby, never another site's window."""
    keys = "|".join(re.escape(key) for key in (transport.update_key(site), transport.hello_key(site)))
    return {"exchange": transport.UPDATE_EXCHANGE, "write": f"^({keys})$", "read": "^$"}


@dataclass(frozen=True)
class SiteCredentials:
    site: str
    user: str
    password: str
    broker_url: str


def provision_sites(
    management_url: str, admin_user: str, admin_password: str, vhost: str, sites: list[str],
    broker_host: str, broker_port: int, tls: bool = True, coordinator_user: str | None = None,
) -> list[SiteCredentials]:
    """Create (or reset) a user with a fresh password and site permissions for each site, and for
    the coordinator if ``coordinator_user`` is given (its entry's ``site`` is empty)."""
    for site in sites:
        if not re.fullmatch(SITE_NAME_PATTERN, site):
            raise ValueError(f"site name {site!r} must match {SITE_NAME_PATTERN}")
    q = lambda s: urllib.parse.quote(s, safe="")  # noqa: E731
    wanted = [(site, site, site_permissions(site)) for site in sites]
    if coordinator_user:
        wanted.append(("", coordinator_user, COORDINATOR_PERMISSIONS))
    created = []
    for site, user, permissions in wanted:
        password = secrets.token_urlsafe(24)
        transport.management_call(management_url, admin_user, admin_password, "PUT", f"/api/users/{q(user)}",
                        {"password": password, "tags": ""})
        transport.management_call(management_url, admin_user, admin_password, "PUT", f"/api/permissions/{q(vhost)}/{q(user)}",
                        permissions)
        if site:
            transport.management_call(management_url, admin_user, admin_password, "PUT",
                                      f"/api/topic-permissions/{q(vhost)}/{q(user)}", site_topic_permissions(site))
        created.append(SiteCredentials(site, user, password, broker_url(user, password, vhost, broker_host, broker_port, tls)))
    return created


def broker_url(user: str, password: str, vhost: str, hosts: str, port: int, tls: bool = True) -> str:
    """The FEDQ_BROKER_URL of a user: one AMQP URL per host in ``hosts`` (a cluster's nodes, comma-separated;
    users and permissions are the cluster's, so one user reaches every node)."""
    q = lambda s: urllib.parse.quote(s, safe="")  # noqa: E731
    scheme = "amqps" if tls else "amqp"
    return ",".join(f"{scheme}://{q(user)}:{q(password)}@{host.strip()}:{port}/{q(vhost)}" for host in hosts.split(","))

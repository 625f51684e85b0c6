"""Provisioning: one broker user per site, allowed exactly what a site needs and nothing more.

A site may declare and read its own announcement queue, read the snapshot stream, and write to the
updates exchange under its own routing keys. It cannot read updates (its own or anyone's), the
dead-letter queue or another site's queue, cannot send into another site's update queue, cannot
publish snapshots, cannot declare anything else, and cannot bind anything it shares with others.
RabbitMQ checks the ``user_id`` of every message against the connection's user, so a site cannot
speak for another.
"""

from __future__ import annotations

import os
import re
import secrets
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

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


class BundleError(Exception):
    """A bundle cannot be written; the message says why and what to do."""


CA_NAME = "ca.pem"
ENV_NAME = "site.env"
START_NAME = "start.sh"
COORDINATOR_ENV = "coordinator.env"

# Read as `docker run --env-file` reads the same file (one literal KEY=VALUE a line, no quoting), so a value
# is never run as shell and both start paths see the same settings.
START_SCRIPT = """#!/bin/sh
# Starts site {site}'s worker with the settings in site.env beside this script, wherever the bundle is
# unpacked. fedq comes from the virtual environment it is installed in: activate it first, or set
# FEDQ_VENV to its folder. Extra arguments go to fedq worker (see README.txt).
set -eu
bundle=$(cd "$(dirname "$0")" && pwd)
while IFS= read -r line || [ -n "$line" ]; do
  case "$line" in ''|'#'*) continue ;; esac
  export "$line"
done < "$bundle/{env}"
# site.env names the CA relative to the bundle, so that the container can mount it elsewhere.
case "${{FEDQ_TLS_CA_FILE:-/}}" in /*) ;; *) export FEDQ_TLS_CA_FILE="$bundle/$FEDQ_TLS_CA_FILE" ;; esac
fedq="${{FEDQ_VENV:+$FEDQ_VENV/bin/}}fedq"
if ! command -v "$fedq" >/dev/null 2>&1; then
  echo "start.sh: no $fedq command; activate the virtual environment fedq is installed in, or set FEDQ_VENV" \\
       "to its folder, then run $0 again" >&2
  exit 127
fi
exec "$fedq" worker "$@"
"""

README = """fedq site bundle for {site}

  {env}     FEDQ_SITE and FEDQ_BROKER_URL, which holds this site's broker password: keep it private{ca_line}
  {start}     starts this site's worker with those settings

Start the worker in a virtual environment where fedq is installed:

  . /path/to/venv/bin/activate        # or: export FEDQ_VENV=/path/to/venv
  ./{start}                          # flags go to fedq worker: ./{start} --task mypkg.task:MyTask

or in a container of the fedq image, from this folder:

  docker run --rm --env-file {env}{docker_ca} \\
      -v fedq-{site}:/home/fedq fedq worker

The worker keeps its unconfirmed updates in FEDQ_STATE_DIR (default .fedq-state in the working
folder; in the container that is /home/fedq, kept in the volume above): keep it across restarts.
It needs one outbound TCP connection, to {address}, and nothing listening.
`fedq worker --help` lists every other setting.
"""


def _write(path: Path, text: str, mode: int) -> None:
    """Write ``path`` with ``mode`` from its creation on, so a secret is never readable by others, even briefly."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)  # an existing file (--force) keeps its old mode otherwise
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def bundle_paths(folder: Path, sites: list[str], coordinator: bool) -> list[Path]:
    """What a bundle of ``sites`` (and the coordinator's settings) writes under ``folder``, one path per entry."""
    return [folder / site for site in sites] + ([folder / COORDINATOR_ENV] if coordinator else [])


def check_bundle(folder: Path, sites: list[str], coordinator: bool, ca_file: Path | None, tls: bool,
                 force: bool) -> bytes | None:
    """Refuse, before any user is made or reset, a bundle that would overwrite one or could not join;
    returns the CA certificate's bytes."""
    paths = bundle_paths(folder, sites, coordinator)
    if len(set(paths)) != len(paths):
        raise BundleError(f"a site name repeats or is {COORDINATOR_ENV!r}, which names the coordinator's settings; "
                          "give each site a distinct name")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise BundleError(f"{', '.join(existing)} already exist(s); a bundle there may be in use. Choose another "
                          "--bundle folder, or add --force to overwrite (the sites' old passwords stop working)")
    if not tls:
        return None
    if ca_file is None:
        raise BundleError("an amqps:// bundle needs the CA certificate that signed the broker's: add --ca-file "
                          "PATH (or --plain for a development broker without TLS)")
    try:
        ca = ca_file.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read the CA certificate {ca_file} ({exc.strerror}); give --ca-file the path of "
                          "a readable PEM file") from None
    if b"-----BEGIN CERTIFICATE-----" not in ca:
        raise BundleError(f"{ca_file} holds no PEM certificate (no BEGIN CERTIFICATE line); give --ca-file the CA's "
                          "certificate, not its key or a DER file (openssl x509 -inform der -in FILE -out ca.pem)")
    return ca


def write_bundle(folder: Path, created: list[SiteCredentials], ca: bytes | None, ca_file: Path | None,
                 address: str) -> list[Path]:
    """Write each site's folder (site.env, ca.pem, start.sh, README.txt) and, for the coordinator's entry,
    coordinator.env beside them; returns what was written, one path per entry. Folders are 0700 and
    files with a password 0600: they hold the only copy of it."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    written = []
    for entry in created:
        if not entry.site:
            lines = [f"FEDQ_BROKER_URL={entry.broker_url}", "FEDQ_ANY_SITE_USERS=[]"]
            if ca_file is not None:
                lines.append(f"FEDQ_TLS_CA_FILE={ca_file.resolve()}")
            _write(folder / COORDINATOR_ENV, "\n".join(lines) + "\n", 0o600)
            written.append(folder / COORDINATOR_ENV)
            continue
        site = folder / entry.site
        site.mkdir(mode=0o700, exist_ok=True)
        os.chmod(site, 0o700)
        lines = [f"FEDQ_SITE={entry.site}", f"FEDQ_BROKER_URL={entry.broker_url}"]
        if ca is not None:
            lines.append(f"FEDQ_TLS_CA_FILE={CA_NAME}")
            # Readable by the container's user, which is not the operator; the folder keeps others out.
            _write(site / CA_NAME, ca.decode(), 0o644)
        _write(site / ENV_NAME, "\n".join(lines) + "\n", 0o600)
        _write(site / START_NAME, START_SCRIPT.format(site=entry.site, env=ENV_NAME), 0o755)
        _write(site / "README.txt", README.format(
            site=entry.site, env=ENV_NAME, start=START_NAME, address=address,
            ca_line=f"\n  {CA_NAME}       the CA certificate that signed the broker's" if ca is not None else "",
            docker_ca=(f' -e FEDQ_TLS_CA_FILE=/bundle/{CA_NAME} -v "$PWD/{CA_NAME}:/bundle/{CA_NAME}:ro"'
                       if ca is not None else ""),
        ), 0o644)
        written.append(site)
    return written

"""A call to RabbitMQ's management HTTP API, for provisioning sites and for the test broker."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any


class ManagementError(RuntimeError):
    """The management API refused a call or could not be reached; the message says which and why."""


def management_call(base_url: str, user: str, password: str, method: str, path: str, body: Any = None) -> Any:
    """``method`` ``path`` (like "/api/users/site-3") on the API at ``base_url``; the decoded JSON, if any."""
    request = urllib.request.Request(
        base_url.rstrip("/") + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode(),
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            data = response.read()
    except urllib.error.HTTPError as exc:
        raise ManagementError(
            f"management API {method} {path} on {base_url} answered {exc.code}: {exc.read().decode(errors='replace')}"
        ) from exc
    except urllib.error.URLError as exc:
        raise ManagementError(f"management API at {base_url} does not answer: {exc.reason}") from exc
    return json.loads(data) if data else None

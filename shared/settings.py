"""Settings, one class per process, read from flags, ``FEDQ_*`` environment variables and a .env file.

Precedence, highest first: command-line flags, the environment, ``.env`` in the working directory,
the defaults. Everything is validated at start-up; a bad value stops the process with a message
that names the variable and says what would be accepted. What every process takes is here
(``CommonSettings``); each process adds its own (``coordinator.settings``, ``worker.settings``).
"""

from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "FEDQ_"
DEFAULT_TASK = "shared.digits_task:DigitsStraggler"


def redact_url(url: str) -> str:
    """An AMQP URL, or a comma-separated list of them, with each password replaced by ***, fit for logs and
    run logs."""
    # Everything up to the next @ goes, commas included: a password with a raw comma stays hidden.
    return re.sub(r"//([^:/@]*):[^@]*@", r"//\1:***@", url)


def broker_urls(value: str) -> list[str]:
    """The AMQP URLs in a broker URL setting: one, or the nodes of a cluster separated by commas."""
    return [part.strip() for part in value.split(",")]


def check_broker_urls(value: str) -> str:
    """``value`` if each of its URLs is amqp(s):// and all name the same user and vhost; else ValueError
    saying which URL is wrong and how to write the setting."""
    urls = broker_urls(value)
    fix = ("write amqp://user:password@host:port/vhost (amqps:// for TLS), or for a cluster one such URL per node, "
           "separated by commas, each with the same user and vhost (a comma in a password is written %2C)")
    for number, url in enumerate(urls, 1):
        if not url.startswith(("amqp://", "amqps://")):
            # Not echoed: it may be the tail of a password cut at a raw comma.
            raise ValueError(f"address {number} of {len(urls)} does not start with amqp:// or amqps://; {fix}")
    # One process is one user in one vhost: its messages carry that user as user_id, whichever node takes them.
    identities = {_identity(url) for url in urls}
    if len(identities) > 1:
        named = ", ".join(redact_url(url) for url in urls)
        raise ValueError(f"the addresses name different users or vhosts ({named}); {fix}")
    return value


def _identity(url: str) -> tuple[str, str]:
    """The user and vhost an AMQP URL names, decoded; no path and "/" both mean vhost "/"."""
    parts = urllib.parse.urlsplit(url)
    vhost = urllib.parse.unquote(parts.path[1:]) if parts.path not in ("", "/") else "/"
    return urllib.parse.unquote(parts.username or ""), vhost


class SettingsError(SystemExit):
    """Start-up stops here: the message names each bad setting and how to fix it."""


def writable_folder(path: Path, setting: str) -> Path:
    """``path``, made if missing, once this process can write in it; SettingsError naming ``setting``
    (as FEDQ_RUN_DIR) otherwise. A folder a container's user cannot write otherwise surfaced as a
    PermissionError traceback from wherever the first file was opened."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".fedq-write-check-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise SettingsError(
            f"fedq cannot start: it cannot write in {path} ({exc.strerror}), which {setting} names. Give this user "
            f"(uid {os.getuid()}) that folder, or set {setting} to a folder it can write in") from None
    return path


class CommonSettings(BaseSettings):
    # An empty value turns an optional setting off (FEDQ_MAX_STALENESS= means no limit).
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", extra="ignore", validate_default=True, env_parse_none_str=""
    )

    broker_url: str = Field(
        "amqp://fedq:fedq@127.0.0.1:5672/fedq",
        description="AMQP URL of the broker: amqp://user:password@host:port/vhost (amqps:// for TLS); for a cluster, "
        "one URL per node separated by commas, each with the same user and vhost.",
    )
    task: str = Field(DEFAULT_TASK, description="Import path of the task class, module:Class.")
    heartbeat: int = Field(30, ge=1, le=600, description="AMQP heartbeat in seconds.")
    tls_ca_file: Optional[Path] = Field(None, description="CA certificate that signed the broker's (amqps://); default: the system's.")
    tls_cert_file: Optional[Path] = Field(None, description="Client certificate to present (amqps://), if the broker asks.")
    tls_key_file: Optional[Path] = Field(None, description="Key of the client certificate.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Logging level.")
    torch_threads: Optional[int] = Field(
        None, ge=1, description="Threads PyTorch may use for training, merging and evaluation (default: PyTorch's)."
    )
    device: str = Field(
        "auto", description="Where the task's model trains (worker) or is evaluated (coordinator): cpu, cuda, cuda:1, "
        "mps ... (auto: cuda when PyTorch sees one, else cpu)."
    )

    @property
    def torch_device(self) -> str:
        """The device ``device`` names, with auto resolved."""
        import torch

        return ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device

    def public(self) -> dict[str, Any]:
        """The settings as plain values with every secret redacted: what a run log may keep."""
        values = self.model_dump(mode="json")
        values["broker_url"] = redact_url(self.broker_url)
        return values

    def tls_files(self) -> dict[str, Optional[Path]]:
        """The TLS keyword arguments of shared.transport.connect."""
        return {"ca_file": self.tls_ca_file, "cert_file": self.tls_cert_file, "key_file": self.tls_key_file}

    @field_validator("tls_ca_file", "tls_cert_file", "tls_key_file")
    @classmethod
    def _readable(cls, value: Optional[Path]) -> Optional[Path]:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a readable file")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value == "auto":
            return value
        import torch

        try:
            torch.device(value)
        except RuntimeError as exc:
            raise ValueError(f"is not a device PyTorch knows ({exc}); use auto, cpu, cuda or cuda:N") from None
        return value

    @field_validator("broker_url")
    @classmethod
    def _amqp_urls(cls, value: str) -> str:
        return check_broker_urls(value)


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], **overrides) -> S:
    """Build settings from flags (``overrides``), environment and .env, or stop with a clear message."""
    try:
        # None means "not given here"; an empty flag value turns the setting off, as in the environment.
        return cls(**{k: (None if v == "" else v) for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = [f"fedq cannot start: {exc.error_count()} setting(s) are invalid"]
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else ""
            where = f"{ENV_PREFIX}{name.upper()} (--{name.replace('_', '-')})" if name else "settings"
            shown = redact_url(err["input"]) if name == "broker_url" and isinstance(err["input"], str) else err["input"]
            value = f" = {shown!r}" if name and not isinstance(err["input"], dict) else ""
            lines.append(f"  {where}{value}: {err['msg']}")
        lines.append("Fix the value in the environment, .env or the command line, then start again.")
        raise SettingsError("\n".join(lines)) from None

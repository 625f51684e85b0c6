"""Settings, one class per process, read from flags, ``FEDQ_*`` environment variables and a .env file.

Precedence, highest first: command-line flags, the environment, ``.env`` in the working directory,
the defaults below. Everything is validated at start-up; a bad value stops the process with a
message that names the variable and says what would be accepted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional, TypeVar

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.codecs import CODEC_NAMES
from shared.protocol import SITE_NAME_PATTERN

ENV_PREFIX = "FEDQ_"
DEFAULT_TASK = "shared.digits_task:DigitsStraggler"


class SettingsError(SystemExit):
    """Start-up stops here: the message names each bad setting and how to fix it."""


class CommonSettings(BaseSettings):
    # An empty value turns an optional setting off (FEDQ_MAX_STALENESS= means no limit).
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", extra="ignore", validate_default=True, env_parse_none_str=""
    )

    broker_url: str = Field(
        "amqp://fedq:fedq@127.0.0.1:5672/fedq",
        description="AMQP URL of the broker: amqp://user:password@host:port/vhost (amqps:// for TLS).",
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

    def tls_files(self) -> dict[str, Optional[Path]]:
        """The TLS keyword arguments of shared.amqp.connect."""
        return {"ca_file": self.tls_ca_file, "cert_file": self.tls_cert_file, "key_file": self.tls_key_file}

    @field_validator("tls_ca_file", "tls_cert_file", "tls_key_file")
    @classmethod
    def _readable(cls, value: Optional[Path]) -> Optional[Path]:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a readable file")
        return value

    @field_validator("broker_url")
    @classmethod
    def _amqp_scheme(cls, value: str) -> str:
        if not value.startswith(("amqp://", "amqps://")):
            raise ValueError("must start with amqp:// or amqps://")
        return value


class CoordinatorSettings(CommonSettings):
    strategy: Literal["fedasync", "fedbuff", "fedavg"] = Field(
        "fedbuff", description="Aggregation: fedasync (mix each update at once), fedbuff (buffer K), fedavg (synchronous rounds)."
    )
    alpha: float = Field(0.6, gt=0, le=1, description="FedAsync mixing weight for a fresh update.")
    staleness: Literal["constant", "polynomial", "hinge"] = Field("polynomial", description="Staleness weight function.")
    staleness_a: float = Field(0.5, ge=0, description="Exponent of polynomial, slope of hinge.")
    staleness_b: int = Field(4, ge=0, description="Hinge: versions of staleness that still count fully.")
    max_staleness: Optional[int] = Field(
        200, ge=0, description="Drop updates whose base is more than this many versions old (empty: never)."
    )
    buffer_size: int = Field(3, ge=1, description="FedBuff: updates per new version (K).")
    aggregation: Literal["mean", "trimmed-mean", "median"] = Field(
        "mean", description="FedBuff: how the buffer is combined; trimmed-mean and median resist hostile sites."
    )
    trim_fraction: float = Field(0.2, ge=0, lt=0.5, description="Trimmed mean: fraction cut from each side.")
    update_norm_bound: Optional[float] = Field(
        None, gt=0, description="Largest L2 norm an update may have (empty: no bound)."
    )
    update_norm_action: Literal["clip", "refuse"] = Field(
        "clip", description="What to do with an update over the norm bound: scale it down, or dead-letter it."
    )
    dp_noise_multiplier: Optional[float] = Field(
        None, gt=0, description="Central differential privacy: Gaussian noise, in units of dp_clip_norm (empty: off)."
    )
    dp_clip_norm: float = Field(1.0, gt=0, description="Differential privacy: every update is clipped to this L2 norm.")
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="Differential privacy: the delta epsilon is reported for.")
    any_site_users: list[str] = Field(
        ["fedq"], description="Broker users that may send for any site (the development user; empty in production)."
    )
    site_users: dict[str, str] = Field(
        {}, description='Broker user of each site, as JSON {"user": "site"}; a user not listed speaks for the site of its own name.'
    )
    sites: int = Field(10, ge=1, description="FedAvg: sites that answer each synchronous round.")
    server_optimizer: Literal["sgd", "adam", "yogi"] = Field("sgd", description="Server optimizer for FedBuff and FedAvg.")
    server_lr: float = Field(1.0, gt=0, description="Server learning rate.")
    server_momentum: float = Field(0.0, ge=0, lt=1, description="Server SGD momentum.")
    server_beta1: float = Field(0.9, ge=0, lt=1, description="FedAdam/FedYogi first-moment decay.")
    server_beta2: float = Field(0.99, ge=0, lt=1, description="FedAdam/FedYogi second-moment decay.")
    server_tau: float = Field(1e-3, gt=0, description="FedAdam/FedYogi adaptivity (epsilon).")
    snapshot_codec: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="Codec for published snapshots; the coordinator keeps full precision either way."
    )
    eval_every: int = Field(1, ge=1, description="Evaluate the global model when it is published, if N versions or more have passed since the last evaluation.")
    stop_at_accuracy: Optional[float] = Field(None, gt=0, le=1, description="End the run once accuracy reaches this.")
    max_seconds: Optional[float] = Field(None, gt=0, description="End the run after this many seconds.")
    max_versions: Optional[int] = Field(None, ge=1, description="End the run at this version.")
    wait_for_sites: int = Field(0, ge=0, description="Publish the first version only once this many sites have said hello.")
    prefetch: int = Field(
        128, ge=2, description="Update chunks (4 MiB each) the coordinator takes from the broker at once; an update of "
        "more chunks than 7/8 of this is refused, and this much memory may wait in the coordinator's socket buffer."
    )
    max_update_bytes: int = Field(4 * 1024**3, ge=1024, description="Largest update payload accepted, in bytes.")
    run_dir: Path = Field(Path("runs/latest"), description="Where the run log, summary and checkpoint are written.")
    resume: bool = Field(True, description="Resume from run_dir's checkpoint if there is one.")
    checkpoint_seconds: float = Field(
        10.0, ge=0, description="Longest wait before a checkpoint makes taken updates durable (and acknowledged); "
        "a new version or a nearly full prefetch window checkpoints sooner."
    )
    upload_timeout: float = Field(600.0, gt=0, description="Discard an incomplete chunked update idle this many seconds.")
    status_seconds: float = Field(
        2.0, gt=0, description="How often the coordinator publishes its status (for fedq status) and logs its progress."
    )
    metrics_host: str = Field("127.0.0.1", description="Address of the Prometheus endpoint (0.0.0.0: every interface).")
    metrics_port: Optional[int] = Field(
        9464, ge=0, le=65535, description="Port of the Prometheus endpoint /metrics (0: any free port; empty: off)."
    )

    @model_validator(mode="after")
    def _optimizer_needs_a_buffer(self) -> "CoordinatorSettings":
        if self.strategy == "fedasync" and self.server_optimizer != "sgd":
            raise ValueError("strategy fedasync mixes updates directly; server_optimizer applies to fedbuff and fedavg only")
        return self


class WorkerSettings(CommonSettings):
    site: str = Field(..., pattern=SITE_NAME_PATTERN, description="This site's name, e.g. site-3.")
    codec: Literal[CODEC_NAMES] = Field(
        "fp32", description="Codec for this site's updates (topk-int8 is the smallest)."
    )
    topk_fraction: float = Field(0.01, gt=0, le=1, description="Top-k codecs: fraction of each tensor's values sent.")
    error_feedback: bool = Field(True, description="Carry what a lossy codec leaves out into the next update.")
    state_dir: Path = Field(Path(".fedq-state"), description="Where the worker keeps its state (error-feedback residual).")
    max_tasks: Optional[int] = Field(None, ge=1, description="Stop after this many updates (default: run until told).")


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
            value = f" = {err['input']!r}" if name and not isinstance(err["input"], dict) else ""
            lines.append(f"  {where}{value}: {err['msg']}")
        lines.append("Fix the value in the environment, .env or the command line, then start again.")
        raise SettingsError("\n".join(lines)) from None


def settings_table() -> str:
    """docs/settings.md: every setting of every process, with its flag, variable and default."""
    lines = [
        "# Settings",
        "",
        "Every fedq process reads its settings from three places. Highest precedence first:",
        "",
        "1. command-line flags (`fedq coordinator --strategy fedasync`);",
        f"2. environment variables with the prefix `{ENV_PREFIX}` (`{ENV_PREFIX}STRATEGY=fedasync`);",
        "3. a `.env` file in the working directory, in the same `NAME=value` form as the environment;",
        "",
        "and then the defaults below. Lists and maps are JSON (`--any-site-users '[]'`). An empty value turns "
        f"an optional setting off (`{ENV_PREFIX}MAX_STALENESS=`). Every value is checked at start-up; a bad one stops "
        "the process with a message naming the variable and what it accepts. `fedq status` takes the settings "
        "every process has, except `task`, `log_level` and `torch_threads`.",
        "",
        "This page is generated from `shared/settings.py` by `python -m shared.settings > docs/settings.md`; "
        "a test keeps the two in step.",
        "",
        "| flag | environment | default | process | meaning |",
        "|---|---|---|---|---|",
    ]
    common = set(CommonSettings.model_fields)
    for cls, process in ((CommonSettings, "all"), (CoordinatorSettings, "coordinator"), (WorkerSettings, "worker")):
        for name, field in cls.model_fields.items():
            if cls is not CommonSettings and name in common:
                continue
            default = "required" if field.is_required() else _shown(field.default)
            lines.append(f"| `--{name.replace('_', '-')}` | `{ENV_PREFIX}{name.upper()}` | {default} | {process} | "
                         f"{field.description} |")
    return "\n".join(lines) + "\n"


def _shown(default) -> str:
    if default is None:
        return "(off)"
    if isinstance(default, (list, dict)):
        return f"`{json.dumps(default)}`"
    return f"`{default}`"


if __name__ == "__main__":
    print(settings_table(), end="")

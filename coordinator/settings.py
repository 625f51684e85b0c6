"""The coordinator's settings. A plug-in setting takes any name registered in its registry, checked
when the settings are read, so a strategy registered by the user's own code is a choice too."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, Field, model_validator

from coordinator.aggregators import AGGREGATORS
from coordinator.server_optimizers import SERVER_OPTIMIZERS
from coordinator.staleness import STALENESS
from coordinator.strategies import STRATEGIES
from shared.codecs import SNAPSHOT_CODECS
from shared.protocol import RunConfig
from shared.settings import CommonSettings


class CoordinatorSettings(CommonSettings):
    strategy: Annotated[str, AfterValidator(STRATEGIES.check)] = Field(
        "fedbuff", description=f"How updates are merged: {', '.join(STRATEGIES.names)} (see fedq coordinator --help)."
    )
    alpha: float = Field(0.6, gt=0, le=1, description="FedAsync mixing weight for a fresh update.")
    staleness: Annotated[str, AfterValidator(STALENESS.check)] = Field(
        "polynomial", description=f"Staleness weight function: {', '.join(STALENESS.names)}."
    )
    staleness_a: float = Field(0.5, ge=0, description="Exponent of polynomial, slope of hinge.")
    staleness_b: int = Field(4, ge=0, description="Hinge: versions of staleness that still count fully.")
    max_staleness: Optional[int] = Field(
        200, ge=0, description="Drop updates whose base is more than this many versions old (empty: never)."
    )
    buffer_size: Optional[int] = Field(
        None, ge=1, description="FedBuff: updates per new version (K); empty: a quarter of the active sites, rounded up, "
        "and at least three (see active_seconds). Small buffers make versions often; a fixed K=3 was slower than "
        "synchronous FedAvg, or diverged, with 24 non-IID sites, where a quarter of them was quicker than FedAvg "
        "(docs/strategies.md). Trimmed mean, median and differential privacy need a fixed K."
    )
    active_seconds: float = Field(
        60.0, gt=0, description="FedBuff without a fixed buffer_size: a site counts as active while its last update "
        "came within this many seconds."
    )
    stand_in_memory_mb: float = Field(
        256.0, ge=0, description="FedBuff with the mean, without privacy: megabytes for the sites' latest updates "
        "(one dense copy of the trained tensors per site; sites past the budget get none). While a site has no "
        "connection to the broker, its latest update, weighted by its staleness, stands in for it in every step, "
        "for up to active_seconds after it last sent; 0 turns stand-ins off."
    )
    aggregation: Annotated[str, AfterValidator(AGGREGATORS.check)] = Field(
        "mean", description=f"FedBuff: how the buffer is combined: {', '.join(AGGREGATORS.names)}; trimmed-mean and "
        "median resist hostile sites."
    )
    trim_fraction: float = Field(0.2, ge=0, lt=0.5, description="Trimmed mean: fraction cut from each side.")
    buffer_deadline: Optional[float] = Field(
        600.0, gt=0, description="FedBuff and FedAvg: a buffer or round that has held updates this many seconds "
        "closes with those it has, so sites that stop answering never stall the run (empty: wait for all)."
    )
    round_quorum: float = Field(
        1.0, gt=0, le=1, description="FedAvg: the fraction of the sites whose updates close a round."
    )
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
    dp_neighbours: Literal["zero-out", "replace-one"] = Field(
        "zero-out", description="Differential privacy: what neighbouring runs differ in, one site's updates zeroed "
        "or replaced (epsilon is reported for it; see docs/security.md)."
    )
    dp_secure_noise: bool = Field(
        False, description="Differential privacy: draw the noise from the operating system's CSPRNG instead of torch's "
        "generator (slower; for production releases)."
    )
    any_site_users: list[str] = Field(
        ["fedq"], description="Broker users that may send for any site (the development user; empty in production)."
    )
    site_users: dict[str, str] = Field(
        {}, description='Broker user of each site, as JSON {"user": "site"}; a user not listed speaks for the site of its own name.'
    )
    sites: int = Field(10, ge=1, description="FedAvg: sites that answer each synchronous round.")
    server_optimizer: Annotated[str, AfterValidator(SERVER_OPTIMIZERS.check)] = Field(
        "sgd", description=f"Server optimizer for {' and '.join(n for n in STRATEGIES if STRATEGIES[n].uses_server_optimizer)}: "
        f"{', '.join(SERVER_OPTIMIZERS.names)}."
    )
    server_lr: Optional[float] = Field(
        None, gt=0, description="Server learning rate (empty: the optimizer's own, "
        f"{', '.join(f'{name} {SERVER_OPTIMIZERS[name].default_lr:g}' for name in SERVER_OPTIMIZERS.names)})."
    )
    server_momentum: float = Field(0.0, ge=0, lt=1, description="Server SGD momentum.")
    server_beta1: float = Field(0.9, ge=0, lt=1, description="FedAdam/FedYogi first-moment decay.")
    server_beta2: float = Field(0.99, ge=0, lt=1, description="FedAdam/FedYogi second-moment decay.")
    server_tau: float = Field(1e-3, gt=0, description="FedAdam/FedYogi adaptivity (epsilon).")
    snapshot_codec: Literal[SNAPSHOT_CODECS] = Field(
        "fp32", description="Codec for published snapshots; the coordinator keeps full precision either way."
    )
    eval_every: int = Field(1, ge=1, description="Evaluate the global model when it is published, if N versions or more have passed since the last evaluation.")
    site_eval_every: int = Field(5, ge=1, description="Ask the sites to score the global model on their own held-out data every N versions (tasks with evaluate_site).")
    site_eval_wait: float = Field(60.0, gt=0, description="Close a round of site evaluation this many seconds after it opened, with the sites that answered, if not all did.")
    stop_at_accuracy: Optional[float] = Field(None, gt=0, le=1, description="End the run once accuracy reaches this: the coordinator's own evaluation, or the sites' pooled one for a task without evaluate.")
    max_seconds: Optional[float] = Field(None, gt=0, description="End the run after this many seconds.")
    max_versions: Optional[int] = Field(None, ge=1, description="End the run at this version.")
    wait_for_sites: int = Field(0, ge=0, description="Publish the first version only once this many sites have said hello.")
    prefetch: int = Field(
        128, ge=2, description="Update chunks (4 MiB each) the coordinator takes at once from each site's queue, and "
        "from the lobby where hellos and the messages of sites not yet greeted arrive; an update of more chunks than "
        "7/8 of this is refused, and this many chunks of one queue may wait in the coordinator's memory."
    )
    max_update_bytes: int = Field(4 * 1024**3, ge=1024, description="Largest update payload accepted, in bytes.")
    sender_uploads: int = Field(
        2, ge=1, description="Uploads one sender (a broker user, for one site) may have in flight at once; a site "
        "sends one at a time. More are refused at their first chunk."
    )
    sender_upload_bytes: Optional[int] = Field(
        None, ge=1024, description="Bytes one sender's uploads in flight may claim together, and so hold in memory "
        "and in the upload spool; also the most its uploads may write to the spool in any upload_timeout "
        "(empty: max_update_bytes)."
    )
    max_num_samples: int = Field(
        100_000_000, ge=1, description="Most samples an update may claim (its weight in FedBuff's mean and FedAvg); "
        "an update claiming more is refused."
    )
    max_update_value: float = Field(
        1e12, gt=0, description="Largest magnitude any value of an update may have; an update holding a larger one is "
        "refused (no training moves a weight that far, and merged, such values overflow the model)."
    )
    run_config: RunConfig = Field(
        {}, description='Settings for the sites\' tasks, sent with every version, as JSON {"lr": 0.05, "local_epochs": 2}: '
        "numbers, strings and booleans; a site's task reads them as site.config."
    )
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
        if not STRATEGIES[self.strategy].uses_server_optimizer and self.server_optimizer != "sgd":
            users = " and ".join(name for name in STRATEGIES if STRATEGIES[name].uses_server_optimizer)
            raise ValueError(f"strategy {self.strategy} moves the model itself; server_optimizer applies to {users} only")
        if self.strategy == "fedbuff" and self.buffer_size is None and (self.aggregation != "mean" or self.dp_noise_multiplier):
            needs = f"aggregation {self.aggregation}" if self.aggregation != "mean" else "differential privacy"
            raise ValueError(f"{needs} is calibrated for a fixed number of updates per buffer: set buffer_size "
                             f"(FEDQ_BUFFER_SIZE, --buffer-size), for example 5")
        return self

"""A site's worker settings; the codec is any name registered in the codec registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from pydantic import AfterValidator, Field

from shared.codecs import CODECS
from shared.protocol import SITE_NAME_PATTERN
from shared.settings import CommonSettings


class WorkerSettings(CommonSettings):
    site: str = Field(..., pattern=SITE_NAME_PATTERN, description="This site's name, e.g. site-3.")
    codec: Annotated[str, AfterValidator(CODECS.check)] = Field(
        "fp32", description=f"Codec for this site's updates: {', '.join(CODECS.names)} (see fedq worker --help)."
    )
    topk_fraction: float = Field(0.01, gt=0, le=1, description="Top-k codecs: fraction of each tensor's values sent.")
    error_feedback: bool = Field(True, description="Carry what a lossy codec leaves out into the next update.")
    state_dir: Path = Field(Path(".fedq-state"), description="Where the worker keeps its state (error-feedback residual).")
    max_tasks: Optional[int] = Field(None, ge=1, description="Stop after this many updates (default: run until told).")

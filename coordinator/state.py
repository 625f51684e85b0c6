"""The federation as the coordinator holds it, what a checkpoint keeps of it besides the strategy."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from coordinator.ledger import Ledger
from shared.codecs import Layout

Tensors = dict[str, torch.Tensor]


@dataclass
class FederationState:
    """The run, the global model's version and tensors, the sites heard from, the updates counted."""

    run_id: str
    #: The global model's tensors that travel (``Task.trained_tensors``), as float32 CPU tensors.
    params: Tensors
    layout: Layout
    #: The digest of the model's tensors that do not travel (``shared.model_state.frozen_digest``).
    frozen: str | None = None
    version: int = 0
    ledger: Ledger = field(default_factory=Ledger)
    sites_seen: set[str] = field(default_factory=set)

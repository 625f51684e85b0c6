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
    #: The global model's floating-point tensors, sharing storage with the task's model.
    params: Tensors
    layout: Layout
    version: int = 0
    ledger: Ledger = field(default_factory=Ledger)
    sites_seen: set[str] = field(default_factory=set)

"""The task interface: how users plug their model, site data, training and evaluation into fedq.

A task is a class with a no-argument constructor, named by an import path such as
``mypkg.task:MyTask``. The coordinator calls ``build_model`` and ``evaluate``; each worker calls
``build_model`` and ``train`` with its own site's name and loads its own data inside ``train``.
Raw data never leaves the site: only the trained weights' difference does.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

from torch import nn


@dataclass
class SiteContext:
    """What a site's training call knows about its job."""

    site: str
    version: int
    #: Where the worker put the model (FEDQ_DEVICE): put each batch there too.
    device: str = "cpu"
    #: The run's configuration from the coordinator (FEDQ_RUN_CONFIG): names to numbers, strings
    #: and booleans, so the central team can tune training without redeploying sites.
    config: dict[str, float | int | str | bool] = field(default_factory=dict)
    #: Call with the fraction done (0..1) so the worker can show training progress.
    progress: Callable[[float], None] = lambda fraction: None


@dataclass
class TrainResult:
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Task(ABC):
    """A federated learning job: one model, data at each site, and a way to score the model."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model with its initial weights. Must give the same architecture on every process."""

    def prepare_site(self, site: str) -> None:
        """Called once before the worker joins the federation: load and cache the site's data here,
        so the first round does not pay for it. Optional."""

    @abstractmethod
    def train(self, model: nn.Module, site: SiteContext) -> TrainResult:
        """Train ``model`` in place on ``site.site``'s local data, on ``site.device`` (the model is
        there already); return how many samples it saw. It may move or replace the model's tensors:
        fedq reads the trained values by name afterwards."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Score the global model on the coordinator's held-out data; include "accuracy" and "loss"
        where they make sense (the coordinator's stopping rule reads "accuracy"). The model is on the
        coordinator's device (FEDQ_DEVICE); its parameters' own device says which."""


def load_task(path: str) -> Task:
    """Instantiate the task class named ``module.path:ClassName``."""
    module_name, _, class_name = path.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"task {path!r} should look like 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"task module {module_name!r} cannot be imported: {exc}") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ValueError(f"{path!r} is not a subclass of shared.task.Task")
    return cls()

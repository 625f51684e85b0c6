"""The task interface: how users plug their model, site data, training and evaluation into fedq.

A task is a class with a no-argument constructor, named by an import path such as
``mypkg.task:MyTask``. The coordinator calls ``build_model`` and, where the centre holds data,
``evaluate``; each worker calls ``build_model``, ``train`` and ``evaluate_site`` with its own
site's name and loads its own data inside them. Raw data never leaves the site: only the trained
tensors' difference does, and the scores of its own evaluation.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from collections.abc import Collection
from typing import Callable

from torch import nn

from shared.model_state import TaskMismatch, default_trained_tensors

__all__ = ["EvalResult", "SiteContext", "Task", "TaskMismatch", "TrainResult", "load_task"]


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


@dataclass
class EvalResult:
    """A site's score of one version on its own held-out data."""

    num_samples: int
    #: Sample-weighted across sites into the federation's score: "accuracy" (read by the stopping
    #: rule when the task has no central ``evaluate``) and "loss" where they make sense.
    metrics: dict[str, float] = field(default_factory=dict)


class Task(ABC):
    """A federated learning job: one model, data at each site, and a way to score the model,
    centrally (``evaluate``), at the sites (``evaluate_site``), or both."""

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

    def trained_tensors(self, model: nn.Module) -> Collection[str]:
        """The names, in ``model.state_dict()``, of the tensors training changes: only these travel
        in updates and snapshots. By default the parameters with ``requires_grad`` and the floating
        buffers of modules that are not frozen (``shared.model_state.default_trained_tensors``).
        The rest must come out of ``build_model`` the same on every process (pretrained weights,
        a fixed seed): a site whose frozen part differs from the coordinator's refuses to train."""
        return default_trained_tensors(model)

    def evaluate(self, model: nn.Module) -> dict[str, float] | None:
        """Score the global model on the coordinator's own held-out data; include "accuracy" and
        "loss" where they make sense (the stopping rule reads "accuracy"). The model is on the
        coordinator's device (FEDQ_DEVICE). Optional: a coordinator without data is the normal case,
        and then the federation is scored at the sites (``evaluate_site``)."""
        return None

    def evaluate_site(self, model: nn.Module, site: SiteContext) -> EvalResult | None:
        """Score the global model on ``site.site``'s own held-out data (never data it trains on),
        on ``site.device``. The coordinator asks the sites every FEDQ_SITE_EVAL_EVERY versions and pools
        their metrics, weighted by samples. Optional: None means this task scores only centrally."""
        return None

    @property
    def evaluates_centrally(self) -> bool:
        return type(self).evaluate is not Task.evaluate

    @property
    def evaluates_at_sites(self) -> bool:
        return type(self).evaluate_site is not Task.evaluate_site


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

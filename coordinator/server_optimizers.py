"""Server optimizers: how the coordinator moves the global model along an aggregated update.

The aggregated update is the direction the sites moved (new minus old), so it is the negative of a
pseudo-gradient. With SGD at learning rate 1 and no momentum the model simply adds it, which is
FedAvg. FedAdam and FedYogi follow Reddi et al., "Adaptive Federated Optimization" (2021).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from shared.registry import Registry

Tensors = dict[str, torch.Tensor]


class ServerOptimizer(ABC):
    """Applies an aggregated update to the global parameters, in place."""

    #: The learning rate when FEDQ_SERVER_LR is left empty: each optimizer's own scale.
    default_lr: ClassVar[float]

    @classmethod
    def lr_from(cls, settings) -> float:
        return cls.default_lr if settings.server_lr is None else settings.server_lr

    @classmethod
    @abstractmethod
    def from_settings(cls, settings) -> "ServerOptimizer":
        """The optimizer as the coordinator's settings (``server_*``) configure it."""

    @abstractmethod
    def step(self, params: Tensors, update: Tensors) -> None:
        ...

    def state_dict(self) -> dict[str, Tensors]:
        """The optimizer's moments, for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Tensors]) -> None:
        """Restore what ``state_dict`` returned; groups in ``state`` that are not its own are left alone."""


SERVER_OPTIMIZERS: Registry[type[ServerOptimizer]] = Registry("server optimizer")

# FedAdam's and FedYogi's learning rate: a step of about 0.003 per coordinate and version. On
# digits-straggler (FedBuff, K = 3; 2 cores shared with other work) time to 0.95 was, for Adam and
# Yogi: at 0.001 48 and 54 s; at 0.003 10-22 and 15-20 s; at 0.01 58-64 and 16-30 s; at 0.1 neither
# reached it (Adam diverged). docs/strategies.md has the table.
DEFAULT_ADAPTIVE_LR = 0.003


@SERVER_OPTIMIZERS.register("sgd")
class ServerSGD(ServerOptimizer):
    """x <- x + lr * m with m = momentum * m + update; at lr 1 without momentum, FedAvg's step."""

    default_lr = 1.0

    def __init__(self, lr: float = default_lr, momentum: float = 0.0):
        self.lr, self.momentum = lr, momentum
        self.velocity: Tensors = {}

    @classmethod
    def from_settings(cls, settings):
        return cls(cls.lr_from(settings), settings.server_momentum)

    def step(self, params, update):
        for name, delta in update.items():
            if self.momentum:
                v = self.velocity.setdefault(name, torch.zeros_like(delta))
                v.mul_(self.momentum).add_(delta)
                delta = v
            params[name].add_(delta, alpha=self.lr)

    def state_dict(self):
        return {"velocity": self.velocity}

    def load_state_dict(self, state):
        self.velocity = dict(state.get("velocity", {}))


class _Adaptive(ServerOptimizer):
    """Shared first moment and step of FedAdam and FedYogi; they differ in the second moment.

    Their step is about ``lr`` per coordinate whatever the update's size (the moments' ratio is
    near 1), so ``lr`` is a distance, not a fraction of the update as SGD's is: at SGD's 1.0 one
    version moved digits-straggler's weights by about 50 times an update and the run diverged.
    """

    default_lr = DEFAULT_ADAPTIVE_LR

    def __init__(self, lr: float = default_lr, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m: Tensors = {}
        self.v: Tensors = {}

    @classmethod
    def from_settings(cls, settings):
        return cls(cls.lr_from(settings), settings.server_beta1, settings.server_beta2, settings.server_tau)

    @abstractmethod
    def _second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> None:
        ...

    def step(self, params, update):
        for name, delta in update.items():
            m = self.m.setdefault(name, torch.zeros_like(delta))
            v = self.v.setdefault(name, torch.full_like(delta, self.tau**2))
            m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
            self._second_moment(v, delta * delta)
            params[name].addcdiv_(m, v.sqrt().add_(self.tau), value=self.lr)

    def state_dict(self):
        return {"m": self.m, "v": self.v}

    def load_state_dict(self, state):
        self.m, self.v = dict(state.get("m", {})), dict(state.get("v", {}))


@SERVER_OPTIMIZERS.register("adam")
class FedAdam(_Adaptive):
    """FedAdam: Adam's moments over the aggregated updates."""

    def _second_moment(self, v, squared):
        v.mul_(self.beta2).add_(squared, alpha=1 - self.beta2)


@SERVER_OPTIMIZERS.register("yogi")
class FedYogi(_Adaptive):
    """FedYogi: Adam's first moment, a second moment that grows more cautiously."""

    def _second_moment(self, v, squared):
        v.sub_(torch.sign(v - squared).mul_(squared), alpha=1 - self.beta2)

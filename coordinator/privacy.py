"""Central differential privacy: clipped updates, Gaussian noise on every release, and an accountant.

Each update is clipped to L2 norm C before it is used, so one site changes any release by at most
C (FedAsync: one update per release) or C / K (FedBuff: the uniform mean of K updates, at most one
per site). Every release then gets Gaussian noise of standard deviation sigma times that
sensitivity. The accountant (Google's dp-accounting, Renyi DP) composes all releases so far and
reports epsilon for the chosen delta, a bound that holds for every site over the whole run.
"""

from __future__ import annotations

import torch

from coordinator.robust import clip_to_norm
from shared.deltas import Delta

Tensors = dict[str, torch.Tensor]


class GaussianPrivacy:
    def __init__(self, clip_norm: float, noise_multiplier: float, delta: float, seed: int | None = None):
        self.clip_norm, self.noise_multiplier, self.delta = clip_norm, noise_multiplier, delta
        self.releases = 0
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else torch.seed())

    def clip(self, update: Delta) -> None:
        """Bound one update's influence: scale it in place to norm at most C."""
        clip_to_norm(update, self.clip_norm)

    def release(self, aggregate: Tensors, sensitivity: float) -> None:
        """Add noise calibrated to ``sensitivity`` (in units of C) to what is about to move the model."""
        std = self.noise_multiplier * self.clip_norm * sensitivity
        for tensor in aggregate.values():
            tensor.add_(torch.randn(tensor.shape, generator=self.generator) * std)
        self.releases += 1

    def epsilon(self) -> float:
        """Epsilon of all releases so far, for ``delta``."""
        if self.releases == 0:
            return 0.0
        # Imported here: the accountant and SciPy cost a coordinator without privacy 70 MB of memory.
        import dp_accounting
        from dp_accounting import rdp

        accountant = rdp.RdpAccountant()
        accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(self.noise_multiplier),
                                                              self.releases))
        return accountant.get_epsilon(self.delta)

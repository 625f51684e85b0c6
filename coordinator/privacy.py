"""Central differential privacy: clipped updates, Gaussian noise on every release, and an accountant.

**What is protected.** A site's whole contribution: every update it sends. Neighbouring runs differ
in one site's data. Under ``zero-out`` (the default, Kairouz et al. 2021) that site's updates are
replaced by zero vectors; the number of updates a release averages stays the same. Under
``replace-one`` they are replaced by any other updates of norm at most C.

**Sensitivity.** Each update is clipped to L2 norm C before it is used. One release is either one
update (FedAsync) or the uniform mean of n updates, at most one per site (FedBuff, FedAvg; n is the
number taken, the buffer size or fewer at a deadline). Zeroing one site's update moves the mean by
at most C / n; replacing it, by at most 2C / n. Every release gets Gaussian noise of standard
deviation sigma * C / n, so the noise multiplier against the sensitivity is sigma (zero-out) or
sigma / 2 (replace-one).

**Accounting.** The accountant (Google's dp-accounting, Renyi DP) composes every release so far as
if every site took part in each, and reports epsilon for the chosen delta: a bound that holds for
every site over the whole run.

**Only what trains.** Noise and clipping cover the model's trainable floating parameters. The other
floating tensors of an update (BatchNorm statistics, frozen weights) are computed from site data
too, and would leak outside the guarantee, so under privacy they are not taken from updates at all:
they keep the values the task's model starts with.

**Noise.** By default from torch's generator (Mersenne Twister): fast, and predictable to whoever
learns its state. ``secure=True`` draws from the operating system's CSPRNG and sums four Gaussian
draws (half the sum has the same spread) so the low bits of one floating-point sample do not give
the noise away (Holohan and Braghin 2021; Opacus's secure mode does the same).
"""

from __future__ import annotations

import math
import os
from typing import Iterable

import numpy as np
import torch

from coordinator.robust import clip_to_norm
from shared.codecs import Layout
from shared.deltas import Delta, SparseDelta

Tensors = dict[str, torch.Tensor]

#: Neighbouring relations, and what each does to the noise multiplier the accountant sees.
NEIGHBOURS = {"zero-out": 1.0, "replace-one": 0.5}


class GaussianPrivacy:
    def __init__(self, clip_norm: float, noise_multiplier: float, delta: float, seed: int | None = None, *,
                 neighbours: str = "zero-out", secure: bool = False):
        if neighbours not in NEIGHBOURS:
            raise ValueError(f"unknown neighbouring relation {neighbours!r}; choose one of {', '.join(NEIGHBOURS)}")
        if secure and seed is not None:
            raise ValueError("secure noise cannot be seeded: it comes from the operating system's CSPRNG")
        self.clip_norm, self.noise_multiplier, self.delta = clip_norm, noise_multiplier, delta
        self.neighbours, self.secure = neighbours, secure
        self.releases = 0
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else torch.seed())
        #: Tensors updates may not move (names), and their ranges in a sparse update's flat index.
        self.kept: tuple[str, ...] = ()
        self._kept_spans: list[tuple[int, int]] = []

    def cover(self, layout: Layout, trainable: Iterable[str]) -> tuple[str, ...]:
        """Protect only the ``trainable`` tensors of a model of ``layout``; returns the names of the
        others, which updates no longer move."""
        trainable = set(trainable)
        self.kept, self._kept_spans, offset = (), [], 0
        for name, shape in layout.shapes:
            size = math.prod(shape)
            if name not in trainable:
                self.kept += (name,)
                self._kept_spans.append((offset, offset + size))
            offset += size
        return self.kept

    def clip(self, update: Delta) -> None:
        """Bound one update's influence, in place: its values outside the covered tensors go, and
        what is left is scaled to norm at most C."""
        if isinstance(update, SparseDelta):
            if self._kept_spans:
                outside = torch.zeros(len(update), dtype=torch.bool)
                for start, end in self._kept_spans:
                    outside |= (update.indices >= start) & (update.indices < end)
                update.values.masked_fill_(outside, 0.0)
        else:
            for name in self.kept:
                update[name].zero_()
        clip_to_norm(update, self.clip_norm)

    def release(self, aggregate: Tensors, sensitivity: float) -> None:
        """Add noise of sigma * C * ``sensitivity`` (the share of one update in the aggregate) to
        the covered tensors of what is about to move the model."""
        std = self.noise_multiplier * self.clip_norm * sensitivity
        for name, tensor in aggregate.items():
            if name not in self.kept:
                tensor.add_(self._gaussian(tensor.shape) * std)
        self.releases += 1

    def _gaussian(self, shape: torch.Size) -> torch.Tensor:
        """Standard normal noise of ``shape``."""
        if not self.secure:
            return torch.randn(shape, generator=self.generator)
        count = math.prod(shape)
        # Box-Muller on 53-bit uniforms from the OS: each pair of uniforms gives two draws, and each
        # value is the sum of four draws over 2, so 2 * count pairs.
        bits = np.frombuffer(os.urandom(2 * count * 2 * 8), dtype=np.uint64).reshape(2, -1)
        u1, u2 = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
        radius, angle = np.sqrt(-2.0 * np.log(u1)), 2.0 * np.pi * u2
        draws = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)]).reshape(4, count)
        return torch.from_numpy((draws.sum(axis=0) / 2.0).astype(np.float32)).reshape(shape)

    def epsilon(self) -> float:
        """Epsilon of all releases so far, for ``delta``, under the neighbouring relation."""
        if self.releases == 0:
            return 0.0
        # Imported here: the accountant and SciPy cost a coordinator without privacy 70 MB of memory.
        import dp_accounting
        from dp_accounting import rdp

        accountant = rdp.RdpAccountant()
        multiplier = self.noise_multiplier * NEIGHBOURS[self.neighbours]
        accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(multiplier), self.releases))
        return accountant.get_epsilon(self.delta)

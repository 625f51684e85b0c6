"""Model deltas as the coordinator folds them in: dense (one tensor per model tensor) or sparse.

A top-k update names a few positions of the flattened model. Decoded as a ``SparseDelta``, it is
validated, clipped and added into the model or a running sum with ``index_add_``: the work follows
the payload's size, not the model's, and no dense copy of a 2 GB model is made for 1% of it.
Everything that needs every coordinate (noise for privacy, robust statistics) takes a ``dense_copy``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SparseDelta:
    """``values`` at sorted, distinct ``indices`` of the model flattened in layout order; zero elsewhere."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    indices: torch.Tensor  # int64
    values: torch.Tensor  # float32

    def by_tensor(self):
        """(name, positions inside that tensor, values) for every tensor the delta touches."""
        sizes = [math.prod(shape) for _, shape in self.shapes]
        ends = torch.tensor(sizes, dtype=torch.int64).cumsum(0)
        cuts = torch.searchsorted(self.indices, ends).tolist()
        start, offset = 0, 0
        for (name, _), size, cut in zip(self.shapes, sizes, cuts):
            if cut > start:
                yield name, self.indices[start:cut] - offset, self.values[start:cut]
            start, offset = cut, offset + size


Delta = Union[Tensors, SparseDelta]


def value_tensors(delta: Delta) -> list[torch.Tensor]:
    """The tensors holding the delta's values: its norm, clipping and finiteness are theirs."""
    return [delta.values] if isinstance(delta, SparseDelta) else list(delta.values())


def add_scaled(target: Tensors, delta: Delta, alpha: float) -> None:
    """target += alpha * delta, in place."""
    if isinstance(delta, SparseDelta):
        for name, positions, values in delta.by_tensor():
            # view, not reshape: a non-contiguous target would silently take the sum into a copy.
            target[name].view(-1).index_add_(0, positions, values, alpha=alpha)
    else:
        for name, tensor in delta.items():
            target[name].add_(tensor, alpha=alpha)


def dense_copy(delta: Delta, alpha: float = 1.0) -> Tensors:
    """alpha * delta as new dense tensors."""
    if isinstance(delta, SparseDelta):
        out = {name: torch.zeros(shape) for name, shape in delta.shapes}
        add_scaled(out, delta, alpha)
        return out
    return {name: tensor * alpha for name, tensor in delta.items()}

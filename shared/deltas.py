"""Model deltas as the coordinator folds them in: dense (one tensor per model tensor) or sparse.

A top-k update names a few positions of the flattened model. Decoded as a ``SparseDelta``, it is
validated, clipped and added into the model or a running sum with ``index_add_``: the work follows
the payload's size, not the model's, and no dense copy of a 2 GB model is made for 1% of it.
Everything that needs every coordinate (noise for privacy, robust statistics) takes a ``dense_copy``.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
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


class FlatTensors(dict):
    """Named tensors that are views, in order, of one flat tensor ``flat``.

    A sparse delta names positions of the flattened model, so it adds into ``flat`` directly: one
    index_add_ instead of one per tensor, and split across PyTorch's threads.
    """

    def __init__(self, flat: torch.Tensor, shapes: tuple[tuple[str, tuple[int, ...]], ...]):
        views, start = {}, 0
        for name, shape in shapes:
            size = math.prod(shape)
            views[name] = flat[start : start + size].view(shape)
            start += size
        super().__init__(views)
        self.flat, self.shapes = flat, shapes

    @classmethod
    def zeros_like(cls, tensors: Tensors) -> "FlatTensors":
        shapes = tuple((name, tuple(t.shape)) for name, t in tensors.items())
        return cls(torch.zeros(sum(t.numel() for t in tensors.values())), shapes)


def add_scaled(target: Tensors, delta: Delta, alpha: float) -> None:
    """target += alpha * delta, in place."""
    if isinstance(delta, SparseDelta) and isinstance(target, FlatTensors) and target.shapes == delta.shapes:
        _add_into_flat(target.flat, delta.indices, delta.values, alpha)
    elif isinstance(delta, SparseDelta):
        for name, positions, values in delta.by_tensor():
            # view, not reshape: a non-contiguous target would silently take the sum into a copy.
            target[name].view(-1).index_add_(0, positions, values, alpha=alpha)
    else:
        for name, tensor in delta.items():
            target[name].add_(tensor, alpha=alpha)


PARALLEL_MIN = 1 << 16  # values; below this, handing work to a thread costs more than it saves


def _add_into_flat(flat: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float) -> None:
    # A scattered add waits on memory, one cache line per value, and index_add_ uses one thread.
    # The indices are sorted and distinct, so threads given consecutive runs of them never touch
    # the same element; with a core free each, they finish in about 1/threads of the time.
    threads = torch.get_num_threads() if len(indices) >= PARALLEL_MIN else 1
    cuts = [len(indices) * i // threads for i in range(threads + 1)]
    runs = [(indices[a:b], values[a:b]) for a, b in zip(cuts, cuts[1:])]
    others = [_pool(threads - 1).submit(flat.index_add_, 0, i, v, alpha=alpha) for i, v in runs[1:]]
    flat.index_add_(0, *runs[0], alpha=alpha)
    for other in others:
        other.result()


@lru_cache(maxsize=None)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, threads), thread_name_prefix="fedq-add")


def dense_copy(delta: Delta, alpha: float = 1.0) -> Tensors:
    """alpha * delta as new dense tensors."""
    if isinstance(delta, SparseDelta):
        out = {name: torch.zeros(shape) for name, shape in delta.shapes}
        add_scaled(out, delta, alpha)
        return out
    return {name: tensor * alpha for name, tensor in delta.items()}

"""Model deltas as the coordinator folds them in: dense (one tensor per model tensor) or sparse.

A top-k update names a few positions of the flattened model. It arrives as a ``SparseDelta``
holding its wire encoding: validated as it is, added into a running sum straight from it by a
compiled loop, and decoded into positions and values only for what needs them (clipping, a model
held tensor by tensor, a sum too large for the cache). No dense copy of a 2 GB model is made for
1% of it. Into a sum larger than the cache, sparse deltas that together name a fair share of its
positions are folded in together, block by block of the sum (``fold_sparse``). Everything that
needs every coordinate (noise for privacy, robust statistics) takes a ``dense_copy``.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Union

import numpy as np
import torch

from shared.memory import last_level_cache_bytes, zeros_on_huge_pages

if TYPE_CHECKING:
    from shared.codecs import TopKEncoding

Tensors = dict[str, torch.Tensor]
Shapes = tuple[tuple[str, tuple[int, ...]], ...]


class SparseDelta:
    """``values`` at sorted, distinct ``indices`` of the model flattened in layout order; zero elsewhere.

    Built either from those tensors or from the checked wire ``encoding`` it arrived in, which is
    decoded the first time ``indices`` or ``values`` are read; from then on the tensors are the
    delta (clipping scales them in place) and ``encoding`` is None. It owns its memory (it is never
    a view of a received payload), so it may outlive the message it came in: a ``RunningSum`` may
    keep it queued while the next messages are received.
    """

    def __init__(self, shapes: Shapes, indices: torch.Tensor | None = None, values: torch.Tensor | None = None, *,
                 encoding: "TopKEncoding | None" = None):
        if (encoding is None) == (indices is None or values is None):
            raise ValueError("a SparseDelta is built from indices and values, or from an encoding")
        self.shapes = shapes
        self._indices, self._values, self._encoding = indices, values, encoding

    @property
    def encoding(self) -> "TopKEncoding | None":
        """The wire encoding, until something decodes the delta."""
        return self._encoding

    @property
    def indices(self) -> torch.Tensor:
        """Positions, int64."""
        self._decode()
        return self._indices

    @property
    def values(self) -> torch.Tensor:
        """Values, float32."""
        self._decode()
        return self._values

    def _decode(self) -> None:
        if self._encoding is not None:
            self._indices, self._values = self._encoding.decode()
            self._encoding = None

    def __len__(self) -> int:
        return len(self._encoding) if self._encoding is not None else self._values.numel()

    @property
    def nbytes(self) -> int:
        """Memory held: the encoding's, or the tensors'."""
        if self._encoding is not None:
            return self._encoding.nbytes
        return self._indices.nbytes + self._values.nbytes

    def span(self) -> tuple[int, int]:
        """The first and last positions named ((0, -1) when none)."""
        if self._encoding is not None:
            gaps = self._encoding.gaps
            return (int(gaps[0]) - 1, self._encoding.last) if gaps.size else (0, -1)
        if not self._indices.numel():
            return (0, -1)
        return int(self._indices[0]), int(self._indices[-1])

    def gap_form(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
        """(gaps, values, scales, scale_block), as ``kernels.fold_at_gaps`` reads a delta: the
        encoding's own arrays, or gaps taken from the decoded positions."""
        if self._encoding is not None:
            return self._encoding.gap_form()
        return np.diff(self._indices.numpy(), prepend=-1), self._values.numpy(), None, 0

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
    scatter instead of one per tensor.
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
        """Zeros shaped like ``tensors``, in one flat tensor on huge pages (sparse deltas scatter into it)."""
        shapes = tuple((name, tuple(t.shape)) for name, t in tensors.items())
        return cls(zeros_on_huge_pages(sum(t.numel() for t in tensors.values())), shapes)


def add_scaled(target: Tensors, delta: Delta, alpha: float) -> None:
    """target += alpha * delta, in place."""
    if isinstance(delta, SparseDelta) and isinstance(target, FlatTensors) and target.shapes == delta.shapes:
        _add_sparse(target.flat, delta, alpha)
    elif isinstance(delta, SparseDelta):
        for name, positions, values in delta.by_tensor():
            # view, not reshape: a non-contiguous target would silently take the sum into a copy.
            _scatter_add(target[name].view(-1), positions, values, alpha)
    else:
        for name, tensor in delta.items():
            target[name].add_(tensor, alpha=alpha)


def _add_sparse(flat: torch.Tensor, delta: SparseDelta, alpha: float) -> None:
    """flat += alpha * delta: from its encoding if it still has one, else by scatter."""
    if delta.encoding is not None:
        delta.encoding.add_into(flat, alpha)
    else:
        _scatter_add(flat, delta.indices, delta.values, alpha)


def _scatter_add(flat: torch.Tensor, positions: torch.Tensor, values: torch.Tensor, alpha: float) -> None:
    # scatter_add_ on scaled values, not index_add_ with alpha: 250k values from fresh positions
    # into a 25M sum took 1.5 ms against 2.4-2.8 (same float32 product, then the same sum).
    flat.scatter_add_(0, positions, _scaled(values, alpha))


def _scaled(values: torch.Tensor, alpha: float) -> torch.Tensor:
    # By numpy, on this thread: torch would wake its thread pool (see codecs.dequantize_int8).
    return values if alpha == 1.0 else torch.from_numpy(values.numpy() * np.float32(alpha))


def fits_in_cache(nbytes: int) -> bool:
    """Whether a sum of ``nbytes`` can stay in the last-level cache beside everything else running
    (the broker, the sites' publishers): at most half of it."""
    cache = last_level_cache_bytes()
    return cache is not None and nbytes <= cache // 2


def fold_sparse(flat: torch.Tensor, deltas: list[tuple[SparseDelta, float]], helper: Executor | None = None,
                blockwise: bool | None = None) -> None:
    """flat += alpha * delta for every (delta, alpha), in order, each delta naming positions of ``flat``.

    A delta of 1% of a large model touches a sixth of the sum's cache lines. Where the sum does not
    fit in the last-level cache, each of those is a miss; so when the deltas hold together at least
    1/8 as many values as ``flat``, they are folded block by block (``kernels.fold_at_gaps``): every
    delta's positions inside one block of the sum, while it is in cache, then the next block. Into
    a 25M sum with a 32 MiB L3, distinct deltas of 271k values each (medians of 11): 1.6 ms per
    delta one by one, 1.5 for 12 at once, 1.2 for 24. Where the sum fits in the cache
    (``fits_in_cache``; a 100 MB sum in a 300 MiB L3), the scattered adds hit it anyway, and each is
    added straight in, as it is when the deltas are few. ``blockwise`` forces the choice. Every
    position receives its deltas in the given order, so the sum is exactly the one-by-one sum.

    With ``helper``, an executor with a thread to spare, the work is shared out: the later half of
    the sum is folded there while this thread folds the first (a reader waiting for the sum has
    nothing else to do). The halves are disjoint, so the sum is the same.
    """
    for delta, _ in deltas:
        _check_inside(flat, delta)
    if blockwise is None:
        blockwise = not fits_in_cache(flat.numel() * flat.element_size())
    if not blockwise or sum(len(delta) for delta, _ in deltas) < flat.numel() // 8:
        for delta, alpha in deltas:
            _add_sparse(flat, delta, alpha)
        return
    from shared import kernels

    target = flat.numpy()
    gapped = [(*delta.gap_form(), alpha) for delta, alpha in deltas]
    if helper is None:
        kernels.fold_at_gaps(target, gapped)
        return
    middle = target.size // 2
    later = helper.submit(kernels.fold_at_gaps, target, gapped, middle)
    try:
        kernels.fold_at_gaps(target, gapped, 0, middle)
    finally:
        later.result()  # flat is not the caller's again before both halves are in


def _check_inside(flat: torch.Tensor, delta: SparseDelta) -> None:
    # Sorted positions, so the ends suffice. A block-wise fold would silently skip positions past
    # the end instead of failing, so they are refused before anything is added.
    first, last = delta.span()
    if last >= 0 and (first < 0 or last >= flat.numel()):
        raise IndexError(f"a sparse delta names positions {first}..{last}, outside a sum of {flat.numel()} values")


class RunningSum:
    """A sum of deltas in one flat tensor, allocated once.

    Large sparse deltas wait in a queue and are added on a thread of its own while the coordinator
    receives and decodes the next updates; whatever is left is added when the sum is read. Where
    the sum does not fit in the cache, they are folded in together (``fold_sparse``), several for
    the price of a few, once the queue holds a quarter of the sum's bytes; where it fits, each is
    added as soon as the thread is free. The queue holds at most half the sum's bytes (or one
    larger delta): an ``add`` that would overfill it first adds what is queued. Every read of
    ``tensors`` sees the whole sum. ``blockwise`` forces the choice of ``fold_sparse``.
    """

    def __init__(self, like: Tensors, blockwise: bool | None = None):
        self._tensors = FlatTensors.zeros_like(like)
        nbytes = self._tensors.flat.numel() * self._tensors.flat.element_size()
        self._blockwise = not fits_in_cache(nbytes) if blockwise is None else blockwise
        self._batch = nbytes // 4 if self._blockwise else 1
        self._cap = nbytes // 2
        from shared import kernels  # compiled now, not inside the first update's ingest

        kernels.warm_up()
        self._queue: list[tuple[SparseDelta, float]] = []
        self._queued_bytes = 0
        self._folding = False  # whether a fold holds the sum (on the thread, or a reader's)
        self._error: BaseException | None = None
        self._changed = threading.Condition()

    def add(self, delta: Delta, alpha: float) -> None:
        """sum += alpha * delta. A large sparse delta (which owns its memory) may still be queued
        when this returns; a dense one may view its payload, whose memory is reused, so it is not."""
        if not (isinstance(delta, SparseDelta) and self._tensors.shapes == delta.shapes and len(delta) >= BEHIND_MIN):
            self.wait()
            add_scaled(self._tensors, delta, alpha)
            return
        _check_inside(self._tensors.flat, delta)
        size = delta.nbytes
        if self._queued_bytes + size > self._cap:
            self.wait()
        with self._changed:
            self._queue.append((delta, alpha))
            self._queued_bytes += size
            if self._queued_bytes >= self._batch and not self._folding:
                self._folding = True
                _BEHIND.submit(self._fold_batches)

    def _fold_batches(self) -> None:
        while True:
            with self._changed:
                if self._queued_bytes < self._batch:  # the rest waits for more, or for a reader
                    self._folding = False
                    self._changed.notify_all()
                    return
                batch, self._queue, self._queued_bytes = self._queue, [], 0
            try:
                fold_sparse(self._tensors.flat, batch, blockwise=self._blockwise)
            except BaseException as exc:  # kept for the next reader, which raises it
                with self._changed:
                    self._error = self._error or exc

    def wait(self) -> None:
        """Fold whatever is queued; return once every delta given to ``add`` is in the sum, or
        raise what a fold raised."""
        with self._changed:
            self._changed.wait_for(lambda: not self._folding)
            batch, self._queue, self._queued_bytes = self._queue, [], 0
            self._folding = bool(batch)
        try:
            if batch:  # the sum's thread is free (no fold holds the sum): it folds half the blocks
                fold_sparse(self._tensors.flat, batch, helper=_BEHIND, blockwise=self._blockwise)
        finally:
            with self._changed:
                if batch:
                    self._folding = False
                    self._changed.notify_all()
                error, self._error = self._error, None
        if error is not None:
            raise error

    @property
    def tensors(self) -> FlatTensors:
        """The sum, complete."""
        self.wait()
        return self._tensors


_BEHIND = ThreadPoolExecutor(1, thread_name_prefix="fedq-sum")
# Values; a smaller sparse add takes less time than handing it to the thread and back.
BEHIND_MIN = 1 << 16


def dense_copy(delta: Delta, alpha: float = 1.0) -> Tensors:
    """alpha * delta as new dense tensors."""
    if isinstance(delta, SparseDelta):
        out = {name: torch.zeros(shape) for name, shape in delta.shapes}
        add_scaled(out, delta, alpha)
        return out
    return {name: tensor * alpha for name, tensor in delta.items()}

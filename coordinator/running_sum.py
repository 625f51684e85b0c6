"""FedBuff's running sum: the coordinator's aggregation engine.

A sum of weighted deltas in one flat tensor, allocated once on huge pages. A top-k delta names
positions of the flattened model, so it goes into the flat tensor straight from its wire encoding,
through one loop compiled by numba (``coordinator.kernels``) that reads gaps, values and scales
once. Where the sum does not fit in the last-level cache, large sparse deltas are queued and folded
in together, block by block of the sum (``fold_sparse``), on a thread of their own while the
coordinator receives the next updates.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import Executor, ThreadPoolExecutor

import torch

from coordinator.memory import last_level_cache_bytes, zeros_on_huge_pages
from shared.deltas import Delta, SparseDelta, SparseEncoding, add_scaled, scatter_add

Tensors = dict[str, torch.Tensor]


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

    def add(self, delta: Delta, alpha: float) -> None:
        """self += alpha * delta; a sparse delta of this layout goes into the flat tensor at once."""
        if isinstance(delta, SparseDelta) and delta.shapes == self.shapes:
            add_sparse(self.flat, delta, alpha)
        else:
            add_scaled(self, delta, alpha)


def add_sparse(flat: torch.Tensor, delta: SparseDelta, alpha: float) -> None:
    """flat += alpha * delta: from its encoding if it still has one, else by scatter."""
    if delta.encoding is not None:
        add_encoded(flat, delta.encoding, alpha)
    else:
        scatter_add(flat, delta.indices, delta.values, alpha)


def add_encoded(flat: torch.Tensor, encoding: SparseEncoding, alpha: float) -> None:
    """flat += alpha * the delta ``encoding`` holds, with one compiled loop over it (``coordinator.kernels``)."""
    last = encoding.span()[1]
    if last >= flat.numel() or flat.dtype != torch.float32 or not flat.is_contiguous():
        raise ValueError(f"a top-k delta reaching position {last} cannot be added into a "
                         f"{flat.dtype} tensor of {flat.numel()} values")
    from coordinator import kernels  # numba: only processes that sum updates pay for its import

    kernels.fold_at_gaps(flat.numpy(), [(*encoding.gap_form(), alpha)])


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
            add_sparse(flat, delta, alpha)
        return
    from coordinator import kernels

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
        from coordinator import kernels  # compiled now, not inside the first update's ingest

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
            self._tensors.add(delta, alpha)
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

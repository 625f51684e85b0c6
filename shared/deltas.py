"""Model deltas as they arrive at the coordinator: dense (one tensor per model tensor) or sparse.

A top-k update names a few positions of the flattened model. It arrives as a ``SparseDelta``
holding its wire encoding: validated as it is, added into the coordinator's running sum straight
from it (``coordinator.running_sum``), and decoded into positions and values only for what needs
them (clipping, a model held tensor by tensor). No dense copy of a 2 GB model is made for 1% of it.
Everything that needs every coordinate (noise for privacy, robust statistics) takes a ``dense_copy``.
"""

from __future__ import annotations

import math
from typing import Protocol, Union

import numpy as np
import torch

from shared.scans import all_finite, largest_magnitude

Tensors = dict[str, torch.Tensor]
Shapes = tuple[tuple[str, tuple[int, ...]], ...]


class SparseEncoding(Protocol):
    """A sparse delta as it travelled (a codec's, such as ``shared.codecs.TopKEncoding``), checked
    against the model: read without decoding where it can be."""

    def __len__(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    def span(self) -> tuple[int, int]:
        """The first and last positions named ((0, -1) when none)."""

    def decode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (int64) and values (float32), as new tensors."""

    def all_finite(self) -> bool: ...

    def largest_magnitude(self) -> float:
        """At most the largest |value| (exactly it, where the values travel as floats)."""

    def gap_form(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
        """(gaps, values, scales, scale_block), as ``coordinator.kernels.fold_at_gaps`` reads them."""


class SparseDelta:
    """``values`` at sorted, distinct ``indices`` of the model flattened in layout order; zero elsewhere.

    Built either from those tensors or from the checked wire ``encoding`` it arrived in, which is
    decoded the first time ``indices`` or ``values`` are read; from then on the tensors are the
    delta (clipping scales them in place) and ``encoding`` is None. It owns its memory (it is never
    a view of a received payload), so it may outlive the message it came in: a ``RunningSum`` may
    keep it queued while the next messages are received.
    """

    def __init__(self, shapes: Shapes, indices: torch.Tensor | None = None, values: torch.Tensor | None = None, *,
                 encoding: SparseEncoding | None = None):
        if (encoding is None) == (indices is None or values is None):
            raise ValueError("a SparseDelta is built from indices and values, or from an encoding")
        self.shapes = shapes
        self._indices, self._values, self._encoding = indices, values, encoding

    @property
    def encoding(self) -> SparseEncoding | None:
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
            return self._encoding.span()
        if not self._indices.numel():
            return (0, -1)
        return int(self._indices[0]), int(self._indices[-1])

    def all_finite(self) -> bool:
        """No value is NaN or infinite, read from the encoding while there is one."""
        return self._encoding.all_finite() if self._encoding is not None else all_finite(self._values)

    def largest_magnitude(self) -> float:
        """The largest |value| (for an int8 encoding, at most it), read from the encoding while there is one."""
        return self._encoding.largest_magnitude() if self._encoding is not None else largest_magnitude(self._values)

    def gap_form(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
        """(gaps, values, scales, scale_block), as ``coordinator.kernels.fold_at_gaps`` reads a delta: the
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


def update_magnitude(delta: Delta) -> float:
    """The largest |value| of a delta of finite values; a sparse one read without decoding it."""
    if isinstance(delta, SparseDelta):
        return delta.largest_magnitude()
    return max((largest_magnitude(tensor) for tensor in delta.values()), default=0.0)


def add_scaled(target: Tensors, delta: Delta, alpha: float) -> None:
    """target += alpha * delta, in place, tensor by tensor."""
    if isinstance(delta, SparseDelta):
        for name, positions, values in delta.by_tensor():
            # view, not reshape: a non-contiguous target would silently take the sum into a copy.
            scatter_add(target[name].view(-1), positions, values, alpha)
    else:
        for name, tensor in delta.items():
            target[name].add_(tensor, alpha=alpha)


def scatter_add(flat: torch.Tensor, positions: torch.Tensor, values: torch.Tensor, alpha: float) -> None:
    """flat[positions] += alpha * values."""
    # scatter_add_ on scaled values, not index_add_ with alpha: 250k values from fresh positions
    # into a 25M sum took 1.5 ms against 2.4-2.8 (same float32 product, then the same sum).
    flat.scatter_add_(0, positions, _scaled(values, alpha))


def _scaled(values: torch.Tensor, alpha: float) -> torch.Tensor:
    # By numpy, on this thread: torch would wake its thread pool (see codecs.dequantize_int8).
    return values if alpha == 1.0 else torch.from_numpy(values.numpy() * np.float32(alpha))


def dense_bytes(delta: Delta) -> int:
    """The bytes of the delta as dense float32 tensors, as ``dense_copy`` makes them."""
    if isinstance(delta, SparseDelta):
        return 4 * sum(math.prod(shape) for _, shape in delta.shapes)
    return 4 * sum(tensor.numel() for tensor in delta.values())


def copy_into(target: Tensors, delta: Delta) -> None:
    """target = delta, in place (zero where a sparse delta holds no value): a copy made once and
    overwritten, where a fresh one per delta would leave the freed ones in the heap."""
    if isinstance(delta, SparseDelta):
        for tensor in target.values():
            tensor.zero_()
        add_scaled(target, delta, 1.0)
    else:
        for name, tensor in delta.items():
            target[name].copy_(tensor)


def dense_copy(delta: Delta, alpha: float = 1.0) -> Tensors:
    """alpha * delta as new dense tensors."""
    if isinstance(delta, SparseDelta):
        out = {name: torch.zeros(shape) for name, shape in delta.shapes}
        add_scaled(out, delta, alpha)
        return out
    return {name: tensor * alpha for name, tensor in delta.items()}

"""Codecs: how a model's float32 tensors become raw parts on the wire, and back.

Every codec works on a whole set of named tensors against a *layout* (the model's tensor names and
shapes, in order), which both sides know from the task. Dense codecs write one header entry per
tensor; sparse codecs write a single entry for the whole model, so a small update is not dwarfed by
its own header. The codec is named in each entry, so a reader decodes whatever the writer chose.

All codecs are vectorized (torch/numpy, no per-element Python); lossy ones state their error bound.
Each registers itself in ``CODECS`` under the name FEDQ_CODEC and the wire's header entries use: a
new codec is one class here. One whose ``decode_delta`` returns a ``SparseDelta`` is folded into
the coordinator's running sum without a dense copy.
"""

from __future__ import annotations

import math
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from shared.deltas import Delta, SparseDelta, dense_copy
from shared.protocol import PartSpec, ProtocolError, TensorSpec
from shared.registry import Registry
from shared.scans import SCAN_BLOCK

Tensors = dict[str, torch.Tensor]
INT8_BLOCK = 256
_GAP_DTYPES = ("uint8", "uint16", "uint32")
FLAT_NAME = "*"


@dataclass(frozen=True)
class Layout:
    """The model's tensors, names and shapes in order; the frame of reference for every codec."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, tensors: Tensors) -> "Layout":
        return cls(tuple((name, tuple(t.shape)) for name, t in tensors.items()))

    @property
    def total(self) -> int:
        return sum(math.prod(shape) for _, shape in self.shapes)

    @property
    def fingerprint(self) -> int:
        """A CRC of names and shapes: a sparse update made for another model is refused, not misapplied."""
        return zlib.crc32(";".join(f"{name}:{shape}" for name, shape in self.shapes).encode())


class Codec(ABC):
    """Encodes a model's worth of float32 tensors, and decodes them against the layout."""

    name: ClassVar[str]  # set by CODECS.register
    lossy: ClassVar[bool] = True
    #: Whether the coordinator may publish snapshots with it (FEDQ_SNAPSHOT_CODEC): snapshots have no
    #: error feedback, so only codecs that keep every value closely qualify.
    for_snapshots: ClassVar[bool] = False

    @classmethod
    def create(cls, topk_fraction: float = 0.01) -> "Codec":
        """The codec with the worker's settings that concern it (top-k codecs: ``topk_fraction``)."""
        return cls()

    @abstractmethod
    def encode(self, tensors: Tensors) -> tuple[tuple[TensorSpec, ...], list[np.ndarray]]:
        """Header entries and their raw parts, in order, for contiguous float32 CPU tensors."""

    @abstractmethod
    def decode(self, specs: tuple[TensorSpec, ...], parts: list[list[np.ndarray]], layout: Layout) -> Tensors:
        """Rebuild float32 tensors of the layout; ProtocolError if the entries cannot be them."""

    def decode_delta(self, specs: tuple[TensorSpec, ...], parts: list[list[np.ndarray]], layout: Layout) -> Delta:
        """Decode an update for the coordinator to fold in: dense tensors, or a ``SparseDelta``."""
        return self.decode(specs, parts, layout)


CODECS: Registry[type[Codec]] = Registry("codec")


def _spec(name: str, shape: tuple[int, ...], codec: str, arrays: list[np.ndarray], **params) -> TensorSpec:
    return TensorSpec(
        name=name, shape=shape, codec=codec, params=params,
        parts=tuple(PartSpec(dtype=a.dtype.name, shape=tuple(a.shape)) for a in arrays),
    )


def _expect_parts(spec: TensorSpec, parts: list[np.ndarray], want: tuple[tuple[str, int], ...]) -> None:
    """The parts are flat arrays of these (dtype, length): a codec reads them as nothing else."""
    got = tuple((p.dtype.name, p.size if p.ndim == 1 else p.shape) for p in parts)
    if got != want:
        raise ProtocolError(f"tensor {spec.name!r} ({spec.codec}) has parts {got}, expected flat parts {want}")


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    # torch warns on read-only memory; copy only then, otherwise share the payload's buffer.
    return torch.from_numpy(array if array.flags.writeable else array.copy())


class ElementwiseCodec(Codec):
    """A codec that encodes each tensor on its own, one header entry per tensor."""

    @abstractmethod
    def encode_one(self, flat: torch.Tensor) -> list[np.ndarray]:
        ...

    @abstractmethod
    def decode_one(self, spec: TensorSpec, parts: list[np.ndarray], n: int) -> torch.Tensor:
        ...

    def encode(self, tensors):
        specs, parts = [], []
        for name, tensor in tensors.items():
            arrays = self.encode_one(tensor.detach().reshape(-1))
            specs.append(_spec(name, tuple(tensor.shape), self.name, arrays))
            parts.extend(arrays)
        return tuple(specs), parts

    def decode(self, specs, parts, layout):
        expected = dict(layout.shapes)
        out: Tensors = {}
        for spec, arrays in zip(specs, parts, strict=True):
            if spec.name not in expected:
                raise ProtocolError(f"tensor {spec.name!r} is not in the model")
            if spec.name in out:
                raise ProtocolError(f"tensor {spec.name!r} appears twice")
            if spec.shape != expected[spec.name]:
                raise ProtocolError(f"tensor {spec.name!r} has shape {spec.shape}, the model's is {expected[spec.name]}")
            out[spec.name] = self.decode_one(spec, arrays, math.prod(spec.shape)).view(spec.shape)
        missing = expected.keys() - out.keys()
        if missing:
            raise ProtocolError(f"tensors missing from the payload: {sorted(missing)[:5]}")
        return {name: out[name] for name in expected}


@CODECS.register("fp32")
class DenseFloat32(ElementwiseCodec):
    """The reference: exact, 4 bytes per value, decoded without a copy."""

    lossy = False
    for_snapshots = True

    def encode_one(self, flat):
        return [flat.to(torch.float32).numpy()]

    def decode_one(self, spec, parts, n):
        _expect_parts(spec, parts, (("float32", n),))
        return _as_tensor(parts[0])


@CODECS.register("fp16")
class Float16(ElementwiseCodec):
    """IEEE half: relative error at most 2**-11 in range; beyond ±65504 values become inf (and are refused)."""

    for_snapshots = True

    def encode_one(self, flat):
        return [flat.to(torch.float16).numpy()]

    def decode_one(self, spec, parts, n):
        _expect_parts(spec, parts, (("float16", n),))
        return _as_tensor(parts[0]).to(torch.float32)


@CODECS.register("bf16")
class BFloat16(ElementwiseCodec):
    """bfloat16 (float32's range, 8 bits of mantissa): relative error at most 2**-8. Travels as uint16."""

    for_snapshots = True

    def encode_one(self, flat):
        return [flat.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)]

    def decode_one(self, spec, parts, n):
        _expect_parts(spec, parts, (("uint16", n),))
        return _as_tensor(parts[0].view(np.int16)).view(torch.bfloat16).to(torch.float32)


def quantize_int8(values: torch.Tensor, block: int = INT8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one float32 scale per block: |error| <= scale / 2 = max|block| / 254."""
    n = values.numel()
    blocks = -(-n // block)
    padded = torch.nn.functional.pad(values.reshape(-1), (0, blocks * block - n)).view(blocks, block)
    scales = padded.abs().amax(dim=1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(padded / safe[:, None]).clamp_(-127, 127).to(torch.int8).reshape(-1)[:n]
    return q.numpy(), scales.numpy()


def dequantize_int8(q: np.ndarray, scales: np.ndarray, block: int = INT8_BLOCK) -> torch.Tensor:
    """float32 values from int8 and their blocks' scales, converted and scaled in one pass.

    numpy, on this thread: torch would spread a conversion this size over its thread pool, and its
    threads, which spin a while after each task, took 12-22 ms of CPU from the broker and the
    publisher per 50 top-k updates in the ingest benchmark, against 2-6 ms without.
    """
    values = np.empty(q.size, np.float32)
    full = q.size // block * block
    np.multiply(q[:full].reshape(-1, block), scales[: full // block, None], out=values[:full].reshape(-1, block))
    if full < q.size:
        np.multiply(q[full:], scales[-1], out=values[full:])
    return torch.from_numpy(values)


@CODECS.register("int8")
class Int8(ElementwiseCodec):
    """int8 with a float32 scale per block of 256 values: about 3.9x smaller than fp32,
    absolute error at most max|block| / 254 per value."""


    def encode_one(self, flat):
        return list(quantize_int8(flat))

    def decode_one(self, spec, parts, n):
        _expect_parts(spec, parts, (("int8", n), ("float32", -(-n // INT8_BLOCK))))
        return dequantize_int8(parts[0], parts[1])


def top_k_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the k largest magnitudes (ties broken by torch).

    On large tensors a sampled threshold first narrows the search to a few more than k candidates,
    found a block at a time, so no temporary as large as the tensor is made (a 2 GB tensor costs
    tens of MB here, not 2 GB). If the sample misjudged, the exact selection over everything runs
    instead. A delta with fewer than k nonzero values (a sparse embedding's) sends just those.
    """
    n = values.numel()
    if k >= n:
        return torch.arange(n)
    if n > 1_000_000 and k < n // 4:
        sample = values.reshape(-1)[torch.randint(n, (100_000,))].abs()
        threshold = torch.quantile(sample, max(0.0, 1 - 1.5 * k / n)).item()
        candidates = _indices_at_least(values, threshold)  # sorted: scanned in order
        if candidates.numel() >= k or threshold == 0.0:
            if candidates.numel() > k:
                candidates = candidates[torch.topk(values.reshape(-1)[candidates].abs(), k, sorted=False).indices]
                candidates = torch.sort(candidates).values
            return candidates
    return torch.sort(torch.topk(values.abs().reshape(-1), k, sorted=False).indices).values


def _indices_at_least(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """Positions where |value| >= threshold (> 0 if the threshold is 0), scanned a block at a time.

    Every block reuses the same scratch tensors: fresh temporaries freed between the small results
    that survive would fragment the heap, and a 500M-value scan would leave hundreds of MB resident.
    """
    flat = values.reshape(-1)
    magnitude = torch.empty(min(SCAN_BLOCK, flat.numel()))
    hits = torch.empty(magnitude.shape, dtype=torch.bool)
    positions = torch.empty(0, dtype=torch.int64)
    found = []
    for start in range(0, flat.numel(), SCAN_BLOCK):
        block = flat[start : start + SCAN_BLOCK]
        size = block.numel()
        torch.abs(block, out=magnitude[:size])
        if threshold == 0.0:
            torch.gt(magnitude[:size], 0.0, out=hits[:size])
        else:
            torch.ge(magnitude[:size], threshold, out=hits[:size])
        torch.nonzero(hits[:size], out=positions.resize_(0))  # resize_(0) keeps the storage
        found.append(positions.squeeze(1) + start)  # a right-sized copy; the scratch is reused
    return torch.cat(found)


def encode_gaps(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Sorted distinct indices as gaps in the smallest unsigned type that makes the whole smallest.

    A gap larger than the type holds is split into steps, each landing on a filler position whose
    value is 0; returns the gaps and, when there are fillers, where each index's gap lies among
    them (None when there are none, and the gaps are the indices' own).
    """
    gaps = np.diff(indices, prepend=-1)  # each >= 1; int64, as indices are
    best = None
    for dtype in _GAP_DTYPES:
        limit = np.iinfo(dtype).max
        steps = gaps - 1
        steps //= limit
        steps += 1  # ceil(gap / limit), without the temporaries of -(-gaps // limit)
        size = int(steps.sum()) * np.dtype(dtype).itemsize
        if best is None or size < best[0]:
            best = (size, dtype, limit, steps)
        del steps  # one steps array alive at a time beside the best: a 5M-value update's are 40 MB each
    _, dtype, limit, steps = best
    if int(steps.max(initial=1)) == 1:
        return gaps.astype(dtype), None
    ends = np.cumsum(steps, out=steps)
    ends -= 1
    out = np.full(int(ends[-1]) + 1, limit, dtype=dtype)
    # The last step of each gap is what the full steps before it leave: (gap - 1) % limit + 1, in place.
    gaps -= 1
    gaps %= limit
    gaps += 1
    out[ends] = gaps
    return out, ends


def last_gap_position(gaps: np.ndarray, total: int) -> int:
    """The last position the gaps name (-1 for none); ProtocolError unless they are strictly
    increasing and inside ``total``."""
    if gaps.size and int(gaps.min()) < 1:
        raise ProtocolError("sparse indices are not strictly increasing")
    last = int(gaps.sum(dtype=np.int64)) - 1
    if last >= total:
        raise ProtocolError(f"sparse index {last} is outside a model of {total} values")
    return last


def gap_positions(gaps: np.ndarray) -> torch.Tensor:
    """Positions (int64) from gaps that ``last_gap_position`` accepted."""
    # Widened by numpy, summed in place by torch: faster than numpy's cumsum with a dtype (the gaps
    # of a 25M model's top-k update decode in 0.1 ms instead of 0.6), and unlike torch's widening
    # it stays on this thread (see dequantize_int8). A position is the running sum less one: the
    # one comes off the first gap, not off every position.
    positions = torch.from_numpy(gaps.astype(np.int64))
    if positions.numel():
        positions[0] -= 1
    return positions.cumsum_(0)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True, eq=False)
class TopKEncoding:
    """A top-k update as it travelled, checked, in memory of its own (the payload's buffer is
    reused): the gaps between its positions in the flattened layout, its values as float32 or int8,
    and the int8 values' block scales.

    A ``SparseDelta`` holds it until something needs positions and values as tensors; the
    coordinator's running sum adds it without them (``coordinator.running_sum.add_encoded``).
    """

    gaps: np.ndarray
    values: np.ndarray
    scales: np.ndarray | None
    #: The last position named, checked to lie inside the model (-1 when there are none).
    last: int

    def __len__(self) -> int:
        return self.gaps.size

    @property
    def nbytes(self) -> int:
        return self.gaps.nbytes + self.values.nbytes + (0 if self.scales is None else self.scales.nbytes)

    def decode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (int64) and values (float32), as new tensors."""
        values = (torch.from_numpy(self.values.copy()) if self.scales is None
                  else dequantize_int8(self.values, self.scales))
        return gap_positions(self.gaps), values

    def all_finite(self) -> bool:
        """No value is NaN or infinite. An int8 value is finite when its block's scale is, and 127
        times the scale (the largest int8 magnitude) is too: the scales are all there is to read."""
        if self.scales is None:
            with np.errstate(over="ignore", invalid="ignore"):
                return bool(np.isfinite(self.values.sum()) or np.isfinite(self.values).all())
        with np.errstate(invalid="ignore"):
            return bool(np.isfinite(self.scales).all()) and float(np.abs(self.scales).max(initial=0.0)) * 127 <= _FLOAT32_MAX

    def largest_magnitude(self) -> float:
        """The largest |value|; for int8 values, 127 times the largest scale, which an encoder that
        scales each block by its own largest value (``quantize_int8``) makes exact."""
        if self.scales is None:
            return float(np.abs(self.values).max(initial=0.0))
        return float(np.abs(self.scales).max(initial=0.0)) * 127

    def span(self) -> tuple[int, int]:
        """The first and last positions named ((0, -1) when none)."""
        return (int(self.gaps[0]) - 1, self.last) if self.gaps.size else (0, -1)

    def gap_form(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
        """(gaps, values, scales, scale_block), as ``coordinator.kernels.fold_at_gaps`` reads them."""
        return self.gaps, self.values, self.scales, INT8_BLOCK


class TopK(Codec):
    """Keeps the k = ceil(fraction * n) largest magnitudes of each tensor, drops the rest.

    One header entry covers the whole model: gap-encoded positions in the flattened layout (uint8,
    uint16 or uint32, whichever is smallest) and the kept values, as float32 or, with ``values =
    "int8"``, as int8 with a scale per block of 256. What is dropped is not lost when the worker
    runs error feedback: it is carried into the next update.
    """

    #: How the kept values travel: "fp32", or "int8" with a scale per block of 256.
    values: ClassVar[str]

    def __init__(self, fraction: float = 0.01):
        if not 0 < fraction <= 1:
            raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    @classmethod
    def create(cls, topk_fraction: float = 0.01) -> "TopK":
        return cls(topk_fraction)

    def encode(self, tensors):
        picked, kept, offset = [], [], 0
        for tensor in tensors.values():
            flat = tensor.detach().reshape(-1)
            if flat.numel():
                idx = top_k_indices(flat, max(1, math.ceil(self.fraction * flat.numel())))
                picked.append(idx + offset)
                kept.append(flat[idx])
            offset += flat.numel()
        indices = torch.cat(picked).numpy() if picked else np.zeros(0, np.int64)
        values = torch.cat(kept) if kept else torch.zeros(0)
        gaps, ends = encode_gaps(indices)
        if ends is not None:  # fillers were inserted for gaps too wide for the type
            padded = torch.zeros(len(gaps))
            padded[torch.from_numpy(ends)] = values
            values = padded
        layout = Layout.of(tensors)
        arrays = [gaps, *quantize_int8(values)] if self.values == "int8" else [gaps, values.to(torch.float32).numpy()]
        spec = _spec(FLAT_NAME, (layout.total,), self.name, arrays, layout=layout.fingerprint)
        return (spec,), arrays

    def decode(self, specs, parts, layout):
        return dense_copy(self.decode_delta(specs, parts, layout))

    def decode_delta(self, specs, parts, layout: Layout) -> SparseDelta:
        """The update, checked, as a SparseDelta holding its encoding: no dense tensor the size of
        the model, and no positions and values either until something asks for them."""
        if len(specs) != 1 or specs[0].name != FLAT_NAME:
            raise ProtocolError(f"a {self.name} payload has one entry named {FLAT_NAME!r}, got {[s.name for s in specs]}")
        spec, arrays = specs[0], parts[0]
        if spec.params.get("layout") != layout.fingerprint or spec.shape != (layout.total,):
            raise ProtocolError(f"{self.name} update was encoded for another model (layout or size differs)")
        if len(arrays) != (3 if self.values == "int8" else 2) or arrays[0].dtype.name not in _GAP_DTYPES:
            raise ProtocolError(f"{self.name} entry has parts {[a.dtype.name for a in arrays]}")
        gaps = arrays[0]
        if self.values == "int8":
            _expect_parts(spec, arrays, ((gaps.dtype.name, gaps.size), ("int8", gaps.size), ("float32", -(-gaps.size // INT8_BLOCK))))
        else:
            _expect_parts(spec, arrays, ((gaps.dtype.name, gaps.size), ("float32", gaps.size)))
        last = last_gap_position(gaps, layout.total)
        # Copies: the payload's buffer receives the next upload while this delta may wait in a queue.
        encoding = TopKEncoding(gaps.copy(), arrays[1].copy(), arrays[2].copy() if self.values == "int8" else None, last)
        return SparseDelta(layout.shapes, encoding=encoding)


@CODECS.register("topk")
class TopKFloat32(TopK):
    """Top-k with float32 values (46x smaller than fp32 at 1% on digits-straggler)."""

    values = "fp32"


@CODECS.register("topk-int8")
class TopKInt8(TopK):
    """Top-k with int8 values and a scale per block of 256 (73x smaller than fp32 at 1% on digits-straggler)."""

    values = "int8"


SNAPSHOT_CODECS = tuple(name for name in CODECS if CODECS[name].for_snapshots)


def get_codec(name: str, topk_fraction: float = 0.01) -> Codec:
    """The codec called ``name``; top-k codecs keep ``topk_fraction`` of each tensor when encoding."""
    return CODECS[name].create(topk_fraction)


def encode_tensors(tensors: Tensors, codec: Codec) -> tuple[tuple[TensorSpec, ...], list[np.ndarray]]:
    """Encode named tensors (any float dtype) with ``codec``."""
    return codec.encode({name: t.detach().to(torch.float32).contiguous() for name, t in tensors.items()})


def decode_tensors(
    specs: tuple[TensorSpec, ...], parts: list[list[np.ndarray]], layout: Layout, sparse: bool = False
) -> Delta:
    """Decode a payload's tensors against the model's layout; one codec per payload. With ``sparse``,
    a top-k payload stays a SparseDelta (the coordinator folds it in without densifying)."""
    names = {spec.codec for spec in specs}
    if len(names) > 1:
        raise ProtocolError(f"a payload mixes codecs {sorted(names)}")
    if not specs:
        if layout.shapes:
            raise ProtocolError("payload carries no tensors")
        return {}
    name = names.pop()
    if name not in CODECS:
        raise ProtocolError(f"unknown codec {name!r}")
    codec = get_codec(name)
    return codec.decode_delta(specs, parts, layout) if sparse else codec.decode(specs, parts, layout)

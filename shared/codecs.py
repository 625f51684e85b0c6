"""Tensor codecs: how a float32 tensor becomes raw parts on the wire and back.

A codec is named in every tensor's header entry, so the reader decodes whatever the writer chose.
Codecs are pure functions on tensors; lossy ones state their error bound in their docstring.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch

from shared.protocol import PartSpec, ProtocolError, TensorSpec


class Codec(ABC):
    """Turns one float32 tensor into raw parts plus small parameters, and back."""

    name: ClassVar[str]

    @abstractmethod
    def encode(self, tensor: torch.Tensor) -> tuple[dict, list[np.ndarray]]:
        """Return (params, parts) for a contiguous float32 CPU tensor."""

    @abstractmethod
    def decode(self, spec: TensorSpec, parts: list[np.ndarray]) -> torch.Tensor:
        """Rebuild the float32 tensor of ``spec.shape``; ProtocolError if the parts cannot be it."""


def _expect_parts(spec: TensorSpec, parts: list[np.ndarray], dtypes: tuple[str, ...], sizes: tuple[int, ...]) -> None:
    got = tuple((p.dtype.name, p.size) for p in parts)
    want = tuple(zip(dtypes, sizes))
    if got != want:
        raise ProtocolError(f"tensor {spec.name!r} ({spec.codec}) has parts {got}, expected {want}")


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    # torch warns on read-only memory; copy only in that case, otherwise share the payload buffer.
    return torch.from_numpy(array if array.flags.writeable else array.copy())


class DenseFloat32(Codec):
    """The reference: exact, 4 bytes per value, decoded without a copy."""

    name = "fp32"

    def encode(self, tensor):
        return {}, [tensor.detach().reshape(-1).numpy()]

    def decode(self, spec, parts):
        n = math.prod(spec.shape)
        _expect_parts(spec, parts, ("float32",), (n,))
        return _as_tensor(parts[0]).view(spec.shape)


class Float16(Codec):
    """IEEE half precision: relative error at most 2**-11 in range, values beyond ±65504 become inf."""

    name = "fp16"

    def encode(self, tensor):
        return {}, [tensor.detach().reshape(-1).to(torch.float16).numpy()]

    def decode(self, spec, parts):
        n = math.prod(spec.shape)
        _expect_parts(spec, parts, ("float16",), (n,))
        return _as_tensor(parts[0]).to(torch.float32).view(spec.shape)


class BFloat16(Codec):
    """bfloat16 (float32's range, 8 bits of mantissa): relative error at most 2**-8.

    numpy has no bfloat16, so the bits travel as uint16.
    """

    name = "bf16"

    def encode(self, tensor):
        bits = tensor.detach().reshape(-1).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return {}, [bits]

    def decode(self, spec, parts):
        n = math.prod(spec.shape)
        _expect_parts(spec, parts, ("uint16",), (n,))
        bits = _as_tensor(parts[0].view(np.int16))
        return bits.view(torch.bfloat16).to(torch.float32).view(spec.shape)


CODECS: dict[str, Codec] = {codec.name: codec for codec in (DenseFloat32(), Float16(), BFloat16())}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}") from None


def encode_tensors(tensors: dict[str, torch.Tensor], codec: Codec) -> tuple[tuple[TensorSpec, ...], list[np.ndarray]]:
    """Encode named float32 tensors; returns the header entries and the parts in header order."""
    specs, parts = [], []
    for name, tensor in tensors.items():
        params, arrays = codec.encode(tensor.detach().to(torch.float32).contiguous())
        specs.append(
            TensorSpec(
                name=name,
                shape=tuple(tensor.shape),
                codec=codec.name,
                params=params,
                parts=tuple(PartSpec(dtype=a.dtype.name, shape=tuple(a.shape)) for a in arrays),
            )
        )
        parts.extend(arrays)
    return tuple(specs), parts


def decode_tensors(specs: tuple[TensorSpec, ...], parts: list[list[np.ndarray]]) -> dict[str, torch.Tensor]:
    """Decode every tensor of a payload to float32; ProtocolError names the first that does not fit."""
    tensors: dict[str, torch.Tensor] = {}
    for spec, arrays in zip(specs, parts):
        if spec.name in tensors:
            raise ProtocolError(f"tensor {spec.name!r} appears twice")
        codec = CODECS.get(spec.codec)
        if codec is None:
            raise ProtocolError(f"tensor {spec.name!r} uses unknown codec {spec.codec!r}")
        tensors[spec.name] = codec.decode(spec, arrays)
    return tensors

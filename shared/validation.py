"""Checks a set of received tensors must pass before it may touch a model."""

from __future__ import annotations

import numpy as np
import torch

from shared.codecs import SCAN_BLOCK
from shared.deltas import Delta, SparseDelta
from shared.protocol import ProtocolError

Tensors = dict[str, torch.Tensor]


def check_matches_model(model_tensors: Tensors, received: Delta, finite: bool = True) -> None:
    """``received`` names exactly the model's tensors, with the same shapes, and (unless ``finite``
    is False) only finite values.

    A SparseDelta was decoded against the model's layout (its fingerprint checked), so only its
    values remain to be checked.
    """
    if isinstance(received, SparseDelta):
        encoding = received.encoding
        if finite and not (encoding.all_finite() if encoding is not None else all_finite(received.values)):
            raise ProtocolError("the update holds NaN or infinite values")
        return
    missing = model_tensors.keys() - received.keys()
    extra = received.keys() - model_tensors.keys()
    if missing or extra:
        raise ProtocolError(
            f"tensors do not match the model: missing {sorted(missing)[:5]}, unknown {sorted(extra)[:5]}"
        )
    for name, tensor in received.items():
        if tensor.shape != model_tensors[name].shape:
            raise ProtocolError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, the model's is {tuple(model_tensors[name].shape)}"
            )
    if finite and (bad := non_finite_tensor(received)) is not None:
        raise ProtocolError(f"tensor {bad!r} holds NaN or infinite values")


def non_finite_tensor(tensors: Tensors) -> str | None:
    """The name of the first tensor holding a NaN or infinity, or None if all are finite."""
    return next((name for name, tensor in tensors.items() if not all_finite(tensor)), None)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity. Read a block at a time, so no temporary the size of the tensor is made
    (a 2 GB model stays at 2 GB), by numpy on this thread (see codecs.dequantize_int8).

    A NaN or infinity makes its block's sum NaN or infinite; only a sum that overflowed from
    finite values needs a second look.
    """
    flat = tensor.detach().reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):  # the overflow is expected, and handled
        for start in range(0, flat.numel(), SCAN_BLOCK):
            block = flat[start : start + SCAN_BLOCK]
            values = (block.float() if block.dtype == torch.bfloat16 else block).numpy()  # numpy has no bfloat16
            if not np.isfinite(values.sum()) and not np.isfinite(values).all():
                return False
    return True


def float_state(model: torch.nn.Module) -> Tensors:
    """The model's floating-point state (parameters and buffers), sharing storage with the model."""
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}

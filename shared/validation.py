"""Checks a set of received tensors must pass before it may touch a model."""

from __future__ import annotations

import torch

from shared.deltas import Delta, SparseDelta
from shared.protocol import ProtocolError
from shared.scans import all_finite

Tensors = dict[str, torch.Tensor]


def check_matches_model(model_tensors: Tensors, received: Delta, finite: bool = True) -> None:
    """``received`` names exactly the model's tensors, with the same shapes, and (unless ``finite``
    is False) only finite values.

    A SparseDelta was decoded against the model's layout (its fingerprint checked), so only its
    values remain to be checked.
    """
    if isinstance(received, SparseDelta):
        if finite and not received.all_finite():
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

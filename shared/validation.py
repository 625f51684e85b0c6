"""Checks a set of received tensors must pass before it may touch a model."""

from __future__ import annotations

import torch

from shared.protocol import ProtocolError

Tensors = dict[str, torch.Tensor]


def check_matches_model(model_tensors: Tensors, received: Tensors) -> None:
    """``received`` names exactly the model's tensors, with the same shapes, and only finite values."""
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
        if not torch.isfinite(tensor).all():
            raise ProtocolError(f"tensor {name!r} holds NaN or infinite values")


def float_state(model: torch.nn.Module) -> Tensors:
    """The model's floating-point state (parameters and buffers), sharing storage with the model."""
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}

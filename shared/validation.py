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


def float_state(model: torch.nn.Module) -> Tensors:
    """The model's floating-point state (parameters and buffers), sharing storage with the model."""
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def load_values(model: torch.nn.Module, values: Tensors) -> None:
    """Copy ``values`` into the model's floating tensors by name, onto whatever device and dtype the
    model holds them now. Read afresh: a task that moved its model (``model.to(device)``) gave it
    new tensors, and values copied into the old ones would never reach it (training nothing)."""
    for name, tensor in float_state(model).items():
        value = values[name]
        if tensor.device != value.device or tensor.data_ptr() != value.data_ptr():  # not the same storage
            tensor.copy_(value)


def master_state(model_tensors: Tensors) -> Tensors:
    """float32 CPU tensors of the model's values: the same storage where the model holds float32
    on the CPU, copies where it does not. Updates are merged into these: in bfloat16 (8 bits of
    mantissa) an update smaller than about 1/256 of a weight would round away, and many small
    updates make a model."""
    return {name: t if t.dtype == torch.float32 and t.device.type == "cpu"
            else t.detach().to("cpu", torch.float32, copy=True) for name, t in model_tensors.items()}


def trained_delta(model_tensors: Tensors, base: Tensors) -> Tensors:
    """What training moved, as float32 CPU tensors: the model's values minus the ``base`` they were
    loaded from.

    A float32 CPU tensor is turned into its delta in place (a copy would be a third model's worth of
    memory, and it is loaded from the base again before the next training). Another dtype's or
    device's delta is taken against the base as that dtype holds it, which is where training
    started, in a new float32 CPU tensor."""
    return {name: t.sub_(base[name]) if t.dtype == torch.float32 and t.device.type == "cpu"
            else t.to("cpu", torch.float32).sub_(base[name].to(t.dtype).to(torch.float32))
            for name, t in model_tensors.items()}

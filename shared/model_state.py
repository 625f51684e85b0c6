"""Which of a model's tensors travel, and reading and writing them by name.

Only what trains travels: updates and snapshots carry the tensors a task's training changes
(``Task.trained_tensors``: by default its parameters with ``requires_grad`` and the floating
buffers of modules that are not frozen). The frozen rest, such as a pretrained backbone under
LoRA adapters, never goes on the wire: every process builds it in ``build_model``, and its digest
(``frozen_digest``) in each announcement makes a site whose frozen weights differ refuse to train.

Values are always read and written by name, afresh from ``state_dict``: a task that moved its
model (``model.to(device)``) gave it new tensors, and references kept from before would see
nothing of training.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from shared.protocol import new_digest

Tensors = dict[str, torch.Tensor]


class TaskMismatch(RuntimeError):
    """A task's model cannot take part: it names tensors it lacks, trains nothing, or its frozen
    weights are not the coordinator's."""


def default_trained_tensors(model: torch.nn.Module) -> list[str]:
    """The parameters that train (``requires_grad``), and the floating buffers of every module that
    is not frozen (BatchNorm's running statistics where its weights train, or where it has none).

    A module is frozen when it has parameters and none of them trains: its buffers are the
    pretrained backbone's, and training in eval mode leaves them as they are.
    """
    names = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    for prefix, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if own and not any(parameter.requires_grad for parameter in own):
            continue
        names.update(f"{prefix}.{name}" if prefix else name for name, buffer in module.named_buffers(recurse=False)
                     if buffer is not None and buffer.is_floating_point())
    return [name for name in model.state_dict() if name in names]


def checked_names(model: torch.nn.Module, names: Collection[str], task: str = "the task") -> tuple[str, ...]:
    """``names`` in the model's ``state_dict`` order, each a floating tensor of it; TaskMismatch says
    which is not. The order is the wire's: every process must list the same tensors the same way."""
    state = model.state_dict()
    unknown = sorted(set(names) - state.keys())
    if unknown:
        raise TaskMismatch(f"{task}'s trained_tensors() names {unknown[:5]}, which the model's state_dict does not hold")
    integral = sorted(name for name in names if not state[name].is_floating_point())
    if integral:
        raise TaskMismatch(f"{task}'s trained_tensors() names {integral[:5]}, which are not floating-point: only "
                         "floating tensors can be averaged")
    if not names:
        raise TaskMismatch(f"{task}'s model has nothing to train: no parameter has requires_grad and trained_tensors() "
                         "names no buffer. Unfreeze what should learn (for LoRA, wrap the model with peft in "
                         "build_model)")
    return tuple(name for name in state if name in names)


def trained_state(model: torch.nn.Module, names: Collection[str] | None = None) -> Tensors:
    """The tensors that travel, by name, as the model holds them now (sharing its storage)."""
    state = model.state_dict()
    return {name: state[name] for name in (default_trained_tensors(model) if names is None else names)}


def frozen_digest(model: torch.nn.Module, names: Collection[str]) -> str:
    """The digest of everything in the model's ``state_dict`` that does not travel: names, dtypes,
    shapes and bytes, in order. Tensors sharing storage with a travelling one (tied weights) are
    left out: they travel under the other name."""
    state = model.state_dict()
    travelling = {state[name].data_ptr() for name in names if state[name].numel()}
    digest = new_digest()
    for name, tensor in state.items():
        if name in names or (tensor.numel() and tensor.data_ptr() in travelling):
            continue
        cpu = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{cpu.dtype}:{tuple(cpu.shape)};".encode())
        digest.update(cpu.view(-1).view(torch.uint8).numpy().data if cpu.numel() else b"")
    return digest.hexdigest()


def load_values(model: torch.nn.Module, values: Tensors) -> None:
    """Copy ``values`` into the model's tensors of the same names, onto whatever device and dtype
    the model holds them now. Read afresh: a task that moved its model (``model.to(device)``) gave
    it new tensors, and values copied into the old ones would never reach it (training nothing)."""
    state = model.state_dict()
    for name, value in values.items():
        tensor = state[name]
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

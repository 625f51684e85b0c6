"""A model to take away: a version of the global model as a safetensors file of the task's own
``state_dict``, frozen and trained parts together, which loads with

    model = MyTask().build_model()
    model.load_state_dict(safetensors.torch.load_file("runs/latest/model.safetensors"))

The run folder holds ``model.safetensors`` (the final version) and ``model-best.safetensors`` (the
version that scored best); ``fedq export`` writes the checkpointed version of any run folder.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from shared.model_state import load_values

Tensors = dict[str, torch.Tensor]

FINAL_FILE = "model.safetensors"
BEST_FILE = "model-best.safetensors"


def export_model(model: torch.nn.Module, values: Tensors, path: Path, *, run_id: str, version: int,
                 accuracy: float | None) -> None:
    """Write ``model`` with ``values`` loaded into it to ``path``, atomically (a reader never sees
    half a file), with the run, version and accuracy in the file's metadata."""
    from safetensors.torch import save_file

    load_values(model, values)
    # Copies on the CPU: safetensors refuses tensors that share memory (tied weights), and a
    # reader loads each name on its own anyway.
    state = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in model.state_dict().items()}
    metadata = {"fedq_run_id": run_id, "fedq_version": str(version)}
    if accuracy is not None and math.isfinite(accuracy):
        metadata["fedq_accuracy"] = repr(accuracy)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    save_file(state, str(temporary), metadata=metadata)
    os.replace(temporary, path)


def exported_metadata(path: Path) -> dict[str, str]:
    """The fedq metadata of an exported model ({} if there is no such file)."""
    if not path.exists():
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as exported:
        return dict(exported.metadata() or {})


def export_run(run_dir: Path, out: Path, version: int | None = None, task: str | None = None) -> int:
    """Write a version of a run folder's model to ``out``: the checkpointed one (the newest), or the
    best scored; returns the version written. ``task`` builds the model (default: the run's own,
    from its run log). FileNotFoundError or ValueError say what is missing."""
    import shutil

    from coordinator.checkpoint import CHECKPOINT_FILE, read_checkpoint
    from coordinator.runlog import read_events
    from shared.task import load_task

    checkpoint_path = run_dir / CHECKPOINT_FILE
    if not checkpoint_path.exists():
        raise FileNotFoundError(f"{run_dir} holds no checkpoint ({CHECKPOINT_FILE}): is it a coordinator's run folder?")
    checkpoint = read_checkpoint(checkpoint_path)
    best = exported_metadata(run_dir / BEST_FILE)
    if version is None or version == checkpoint.version:
        if task is None:
            starts = read_events(run_dir, "start")
            if not starts:
                raise ValueError(f"{run_dir}'s run log names no task; give it with --task module:Class")
            task = starts[-1]["settings"]["task"]
        export_model(load_task(task).build_model(), checkpoint.params, out, run_id=checkpoint.run_id,
                     version=checkpoint.version, accuracy=None)
        return checkpoint.version
    if best.get("fedq_run_id") == checkpoint.run_id and best.get("fedq_version") == str(version):
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / BEST_FILE, out)
        return version
    kept = f"version {checkpoint.version} (the checkpoint)"
    if best.get("fedq_run_id") == checkpoint.run_id:
        kept += f" and version {best['fedq_version']} (the best scored, accuracy {float(best['fedq_accuracy']):.4f})"
    raise ValueError(f"version {version} was not kept: {run_dir} holds {kept}")

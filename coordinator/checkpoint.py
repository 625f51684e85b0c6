"""The coordinator's checkpoint: everything needed to go on exactly where it stopped.

Two kinds of tensor file (shared.tensor_files: atomic, digest-checked, no pickle) in the run folder:

- ``model-v{version}.fedq``: the model of one version, written once, when the version is first
  checkpointed;
- ``checkpoint.fedq``: the strategy's buffer and the server optimizer's moments as tensors, and the
  run id, version, ledger, the run's clock, counters and per-site statistics as plain values.

Only ``checkpoint.fedq`` is rewritten between versions. FedBuff checkpoints many times per version
(whenever its prefetch window fills), and rewriting an unchanged 2 GB model each time would double
the disk traffic of its ingest. A model file is complete before the checkpoint that needs it is
written, and older ones are deleted only after, so a crash at any point leaves a checkpoint whose
model is on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.protocol import ProtocolError
from shared.tensor_files import load_tensors, save_tensors

Tensors = dict[str, torch.Tensor]
_SEPARATOR = "/"
CHECKPOINT_FILE = "checkpoint.fedq"


@dataclass
class Checkpoint:
    run_id: str
    version: int
    params: Tensors
    strategy_tensors: dict[str, Tensors]
    strategy_values: dict[str, Any]
    ledger_rows: list[list]
    #: Run-level values: sites seen, the clock's start, counters, privacy releases.
    run: dict[str, Any]


def model_file(version: int) -> str:
    return f"model-v{version}.fedq"


class CheckpointFiles:
    """The checkpoint of one run folder, written so that an unchanged model is not written again."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / CHECKPOINT_FILE
        # (run id, version) of the model file this process wrote or read; a file left by a crash
        # between a model file and its checkpoint is never trusted, it is written over.
        self._model_on_disk: tuple[str, int] | None = None

    def exists(self) -> bool:
        return self.path.exists()

    def write(self, checkpoint: Checkpoint) -> None:
        model = self.folder / model_file(checkpoint.version)
        if self._model_on_disk != (checkpoint.run_id, checkpoint.version):
            save_tensors(model, checkpoint.params, {"run_id": checkpoint.run_id, "version": checkpoint.version})
            self._model_on_disk = (checkpoint.run_id, checkpoint.version)
        tensors = {}
        for group, members in checkpoint.strategy_tensors.items():
            tensors.update({f"{group}{_SEPARATOR}{name}": t for name, t in members.items()})
        meta = {
            "run_id": checkpoint.run_id,
            "version": checkpoint.version,
            "model": model.name,
            "strategy": checkpoint.strategy_values,
            "ledger": checkpoint.ledger_rows,
            "run": checkpoint.run,
        }
        save_tensors(self.path, tensors, meta)
        for older in self.folder.glob("model-v*.fedq"):
            if older != model:
                older.unlink(missing_ok=True)

    def read(self) -> Checkpoint:
        """The checkpoint and its model; ProtocolError if a file is damaged or they disagree."""
        checkpoint = read_checkpoint(self.path)
        self._model_on_disk = (checkpoint.run_id, checkpoint.version)
        return checkpoint


def read_checkpoint(path: Path, model: bool = True) -> Checkpoint:
    """Read a checkpoint (with its model unless ``model`` is False, when ``params`` is empty);
    ProtocolError if it is damaged, KeyError if it lacks a field."""
    tensors, meta = load_tensors(path)
    groups: dict[str, Tensors] = {}
    for key, tensor in tensors.items():
        group, _, name = key.partition(_SEPARATOR)
        groups.setdefault(group, {})[name] = tensor
    params: Tensors = {}
    if model:
        params, model_meta = load_tensors(path.parent / meta["model"])
        if (model_meta.get("run_id"), model_meta.get("version")) != (meta["run_id"], meta["version"]):
            raise ProtocolError(
                f"{path.parent / meta['model']} holds version {model_meta.get('version')} of run {model_meta.get('run_id')}, "
                f"but {path} is version {meta['version']} of run {meta['run_id']}"
            )
    return Checkpoint(
        run_id=meta["run_id"], version=int(meta["version"]), params=params, strategy_tensors=groups,
        strategy_values=dict(meta["strategy"]), ledger_rows=[list(r) for r in meta["ledger"]], run=dict(meta["run"]),
    )

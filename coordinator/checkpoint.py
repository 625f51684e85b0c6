"""The coordinator's checkpoint: everything needed to go on exactly where it stopped.

One tensor file (shared.tensor_files: atomic, digest-checked, no pickle) holds the model, the
strategy's buffer and the server optimizer's moments as tensors, and the run id, version, ledger,
the run's clock, counters and per-site statistics as plain values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.tensor_files import load_tensors, save_tensors

Tensors = dict[str, torch.Tensor]
_SEPARATOR = "/"


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


def write_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    tensors = {f"model{_SEPARATOR}{name}": t for name, t in checkpoint.params.items()}
    for group, members in checkpoint.strategy_tensors.items():
        tensors.update({f"{group}{_SEPARATOR}{name}": t for name, t in members.items()})
    meta = {
        "run_id": checkpoint.run_id,
        "version": checkpoint.version,
        "strategy": checkpoint.strategy_values,
        "ledger": checkpoint.ledger_rows,
        "run": checkpoint.run,
    }
    save_tensors(path, tensors, meta)


def read_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint; ProtocolError if it is damaged, KeyError if it lacks a field."""
    tensors, meta = load_tensors(path)
    groups: dict[str, Tensors] = {}
    for key, tensor in tensors.items():
        group, _, name = key.partition(_SEPARATOR)
        groups.setdefault(group, {})[name] = tensor
    params = groups.pop("model", {})
    return Checkpoint(
        run_id=meta["run_id"], version=int(meta["version"]), params=params, strategy_tensors=groups,
        strategy_values=dict(meta["strategy"]), ledger_rows=[list(r) for r in meta["ledger"]], run=dict(meta["run"]),
    )

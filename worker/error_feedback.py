"""Error feedback: what a lossy codec leaves out of one update is added to the next.

Sent updates plus the residual always add up to the true updates, so compression delays
information but never loses it. The residual is kept on disk with the worker's state, so it
survives a restart; one saved for a model of other shapes is dropped with a warning. It belongs to
the run whose updates left it out: folded into an update of another run (a new run of the same
model, another experiment) it would add a stale run's leftovers to a fresh model, so a new run
starts from none.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from shared.codecs import Codec, Layout
from shared.protocol import ProtocolError, TensorSpec
from shared.tensor_files import load_tensors, save_tensors

log = logging.getLogger("fedq.worker")
Tensors = dict[str, torch.Tensor]


def group_parts(specs: tuple[TensorSpec, ...], parts: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Split the flat list of parts ``encode`` returns into one list per header entry."""
    grouped, start = [], 0
    for spec in specs:
        grouped.append(parts[start : start + len(spec.parts)])
        start += len(spec.parts)
    return grouped


def compensate_and_encode(
    delta: Tensors, residual: Tensors, codec: Codec, layout: Layout
) -> tuple[tuple[TensorSpec, ...], list[np.ndarray], Tensors]:
    """Encode ``delta + residual``; returns the entries, their parts, and the new residual
    (what the decoder will not see). ``delta`` is consumed: it is updated in place."""
    for name, tensor in delta.items():
        tensor.add_(residual[name])
    specs, parts = codec.encode(delta)
    sent = codec.decode(specs, group_parts(specs, parts), layout)
    return specs, parts, {name: delta[name] - sent[name] for name in delta}


class ErrorFeedback:
    """A site's residual, in memory and at ``path``."""

    def __init__(self, path: Path, layout: Layout):
        self.path, self.layout = path, layout
        #: The run whose updates left the residual out; None for a residual of zeros.
        self.run_id: str | None = None
        self.residual = self._load()
        self.pending: Tensors | None = None
        self._pending_run: str | None = None

    def _zeros(self) -> Tensors:
        return {name: torch.zeros(shape) for name, shape in self.layout.shapes}

    def _load(self) -> Tensors:
        if not self.path.exists():
            return self._zeros()
        try:
            tensors, meta = load_tensors(self.path)
        except (ProtocolError, OSError) as exc:
            log.warning("error-feedback residual %s cannot be read (%s); starting from none", self.path, exc)
            return self._zeros()
        if Layout.of(tensors) != self.layout:
            log.warning("error-feedback residual %s was saved for a model of other shapes; starting from none", self.path)
            return self._zeros()
        run_id = meta.get("run_id")
        if not isinstance(run_id, str):
            log.warning("error-feedback residual %s names no run; starting from none", self.path)
            return self._zeros()
        self.run_id = run_id
        log.info("resumed the error-feedback residual of run %s from %s", run_id, self.path)
        return tensors

    def encode(self, delta: Tensors, codec: Codec, run_id: str) -> tuple[tuple[TensorSpec, ...], list[np.ndarray]]:
        """Encode an update of run ``run_id`` with what earlier updates of that run left out, and
        remember what this one leaves."""
        if self.run_id is not None and self.run_id != run_id:
            log.info("the error-feedback residual belongs to run %s; an update of run %s starts from none",
                     self.run_id, run_id)
            self.residual = self._zeros()
        specs, parts, self.pending = compensate_and_encode(delta, self.residual, codec, self.layout)
        self._pending_run = run_id
        return specs, parts

    def commit(self) -> None:
        """The update is safely sent: the new residual becomes the one on disk."""
        assert self.pending is not None, "commit() follows encode()"
        self.residual, self.pending, self.run_id = self.pending, None, self._pending_run
        save_tensors(self.path, self.residual, {"run_id": self.run_id})

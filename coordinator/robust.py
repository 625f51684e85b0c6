"""Defences against bad updates: norm bounds, and robust statistics over a buffer of updates.

Pure functions on tensors. A site that sends a huge update is either clipped to the bound or
refused; a buffer aggregated by trimmed mean or median ignores the most extreme values at every
coordinate, so one site out of several cannot drag the model where it wants.
"""

from __future__ import annotations

import math

import torch

from shared.deltas import Delta, value_tensors


def update_norm(delta: Delta) -> float:
    """The L2 norm of the whole update, all tensors taken as one vector."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(t)) ** 2 for t in value_tensors(delta)))


def clip_to_norm(delta: Delta, bound: float) -> float:
    """Scale ``delta`` in place so its norm is at most ``bound``; returns the norm it had."""
    norm = update_norm(delta)
    if norm > bound:
        for tensor in value_tensors(delta):
            tensor.mul_(bound / norm)
    return norm


def trimmed_mean(stacked: torch.Tensor, trim: int) -> torch.Tensor:
    """Coordinate-wise mean of ``stacked[k, ...]`` after dropping the ``trim`` smallest and largest."""
    if not 0 <= 2 * trim < stacked.shape[0]:
        raise ValueError(f"cannot trim {trim} from each side of {stacked.shape[0]} updates")
    ordered = torch.sort(stacked, dim=0).values
    return ordered[trim : stacked.shape[0] - trim].mean(dim=0)


def coordinate_median(stacked: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median; for an even count, the mean of the two middle values."""
    ordered = torch.sort(stacked, dim=0).values
    middle = stacked.shape[0] // 2
    return ordered[middle] if stacked.shape[0] % 2 else (ordered[middle - 1] + ordered[middle]) / 2

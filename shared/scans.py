"""Whole-tensor passes over large models, a block at a time, so that their temporaries stay small
next to a model of gigabytes."""

from __future__ import annotations

import numpy as np
import torch

# 1M values, 4 MB of float32.
SCAN_BLOCK = 1 << 20


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


def largest_magnitude(tensor: torch.Tensor) -> float:
    """The largest |value| of a tensor of finite values (0 for an empty one), a block at a time."""
    flat = tensor.detach().reshape(-1)
    largest = 0.0
    for start in range(0, flat.numel(), SCAN_BLOCK):
        block = flat[start : start + SCAN_BLOCK]
        values = (block.float() if block.dtype == torch.bfloat16 else block).numpy()
        largest = max(largest, float(values.max()), -float(values.min()))
    return largest

"""The coordinator's memory: freed memory kept for reuse, the cache a running sum must fit in, huge pages."""

from __future__ import annotations

import ctypes
import functools
import mmap
import platform
from pathlib import Path

import torch

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from malloc's heaps, where a freed block is reused; larger ones
# are mapped and unmapped each time. 32 MiB is the most glibc allows on 64-bit.
HEAP_BLOCK_MAX = 32 << 20
# Free memory that malloc may keep at the top of a heap before it hands it back to the kernel.
KEEP_FREE_BYTES = 256 << 20


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep memory this process frees for its next allocations, instead of
    handing it back to the kernel at once; returns whether it could (False off glibc).

    The coordinator frees a few MB per update (decoded positions and values) and allocates as much
    for the next one. By default glibc unmaps such blocks, or trims them from the top of its heap,
    so every update's first writes fault fresh pages in again: about 20,000 faults, at 2 us each
    on a virtual machine, for 50 top-k updates of a 25M-parameter model. Kept, the same pages are
    reused. Memory in use is unchanged; what is freed stays resident, up to KEEP_FREE_BYTES per heap.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_MAX)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREE_BYTES))


@functools.cache
def last_level_cache_bytes() -> int | None:
    """The size of the CPU's largest data cache, as Linux reports it, or None where it cannot be read."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (entry / "type").read_text().strip() == "Instruction":
                continue
            text = (entry / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if unit != 1 else text
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=None)


def zeros_on_huge_pages(count: int) -> torch.Tensor:
    """``count`` float32 zeros in memory of their own that the kernel may back with 2 MiB pages
    (transparent huge pages, asked for with madvise), written once so every page is present.

    For a large tensor read and written all over, such as a running sum that sparse deltas are
    scattered into: with 4 KiB pages, nearly every scattered add also misses the TLB. Folding 8
    top-k deltas of 250k values into a 25M sum took 1.03-1.11 ms per delta on huge pages against
    1.26-1.29 on small ones. Where the kernel offers no madvise, the tensor comes from PyTorch.
    """
    if count == 0 or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(count)
    region = mmap.mmap(-1, count * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    # The tensor holds a reference to the mapping, which lives as long as it does.
    return torch.frombuffer(region, dtype=torch.float32, count=count).zero_()

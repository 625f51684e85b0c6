"""The coordinator's process keeps the memory it frees and reuses it, without faulting pages in again;
it knows the size of the cache its running sum may fit in."""

import platform
import queue
import resource
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from coordinator.memory import keep_freed_memory, last_level_cache_bytes, zeros_on_huge_pages


def _thp_mode() -> str:
    try:
        return open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "[never]"


def _anon_huge_bytes() -> int:
    """This process's anonymous memory on transparent huge pages."""
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0

BLOCK_VALUES = 3 << 18  # 3 MB of float32: a decoded 1% top-k update of a 25M model, positions and values
BATCH = 10


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc's settings are glibc's")
def test_memory_freed_on_another_thread_is_reused_without_faults():
    # In a fresh interpreter: in this one, a new thread may take over the heap of a thread an earlier
    # test ended, with pages already in, and its first batch would not show the faults to compare with.
    result = subprocess.run([sys.executable, "-c", "from tests.test_memory import batch_faults; print(*batch_faults())"],
                            capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    faults = [int(count) for count in result.stdout.split()]
    pages = BATCH * BLOCK_VALUES * 4 // 4096
    assert faults[0] > pages // 4, f"the first batch should fault its pages in, faulted {faults}"
    # Once the heaps have grown, a batch is built in memory freed before: no fresh pages.
    assert sum(faults[-3:]) < pages // 20, f"page faults per batch of {pages} pages: {faults}"


def batch_faults() -> list[int]:
    """Page faults of each of 8 batches of decoded updates, made on one thread and freed on
    another, as in FedBuff's ingest (the sum's thread frees the deltas it folded)."""
    assert keep_freed_memory()
    freed: queue.Queue = queue.Queue()
    faults: list[int] = []

    def decode_batches() -> None:
        for _ in range(8):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            batch = [torch.ones(BLOCK_VALUES) for _ in range(BATCH)]
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
            freed.put(batch)
            del batch
            freed.join()

    freer = threading.Thread(target=_free_batches, args=(freed,))
    freer.start()
    decoder = threading.Thread(target=decode_batches)
    decoder.start()
    decoder.join()
    freed.put(None)
    freer.join()
    return faults


def _free_batches(freed: queue.Queue) -> None:
    while (batch := freed.get()) is not None:
        del batch
        freed.task_done()


def test_zeros_on_huge_pages_are_zeros_that_take_writes_and_views():
    flat = zeros_on_huge_pages(3 << 20)
    assert flat.dtype == torch.float32 and flat.shape == (3 << 20,) and not flat.any()
    flat[5:15].view(2, 5).add_(1.0)
    flat.scatter_add_(0, torch.tensor([0, (3 << 20) - 1]), torch.tensor([2.0, 3.0]))
    assert flat.sum().item() == 15.0 and flat[0].item() == 2.0 and flat[-1].item() == 3.0
    assert zeros_on_huge_pages(0).shape == (0,)


@pytest.mark.skipif("[never]" in _thp_mode(), reason="transparent huge pages are off in this kernel")
def test_zeros_on_huge_pages_get_huge_pages():
    before = _anon_huge_bytes()
    flat = zeros_on_huge_pages(16 << 20)  # 64 MiB
    assert _anon_huge_bytes() - before >= 32 << 20, "the kernel backed less than half of 64 MiB with huge pages"
    del flat


@pytest.mark.skipif(shutil.which("lscpu") is None or sys.platform != "linux", reason="needs Linux's lscpu to compare with")
def test_the_last_level_cache_size_is_the_largest_data_cache_lscpu_reports():
    table = subprocess.run(["lscpu", "-C=ONE-SIZE,TYPE", "-B"], capture_output=True, text=True).stdout
    rows = [line.split() for line in table.splitlines()[1:]]  # below the header
    sizes = [int(size) for size, kind in rows if kind != "Instruction"]
    assert last_level_cache_bytes() == max(sizes)

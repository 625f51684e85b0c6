"""Freed memory goes back to the operating system when the worker asks."""

import os
import sys
import threading

import pytest

from shared.memory import release_free_memory


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_memory_freed_on_another_thread_is_returned():
    kept = []

    def train():
        # Below glibc's mmap threshold, so the blocks live in this thread's arena; the last one
        # stays alive, so the arena cannot simply shrink from its top.
        blocks = [bytearray(64 * 1024) for _ in range(4096)]
        kept.append(blocks[-1])

    thread = threading.Thread(target=train)
    thread.start()
    thread.join()
    before = resident_bytes()
    release_free_memory()
    assert before - resident_bytes() > 128 * 1024 * 1024, "256 MB freed by the thread should leave the process"

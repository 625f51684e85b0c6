"""How much memory this process has needed, and giving back what it no longer uses."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys


def peak_resident_bytes() -> int:
    """The most resident memory this process has held so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Return freed heap memory to the operating system (glibc only; elsewhere nothing happens).

    glibc keeps what a thread freed in that thread's arena: after training on its own thread, a
    worker would otherwise carry the training's temporaries, unused but resident, into encoding.
    """
    if _TRIM is not None:
        _TRIM(0)

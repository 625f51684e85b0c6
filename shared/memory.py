"""How much memory a fedq process has needed: every process reports its peak when it stops."""

from __future__ import annotations

import resource
import sys


def peak_resident_bytes() -> int:
    """The most resident memory this process has held so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024

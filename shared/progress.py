"""Progress reports for long work: said every few seconds, so long work shows how it goes and short
work stays quiet."""

from __future__ import annotations

import time

PROGRESS_EVERY = 5.0


class Throttle:
    """Due at most once every ``every`` seconds (the first time ``every`` seconds after it is made)."""

    def __init__(self, every: float = PROGRESS_EVERY):
        self.every = every
        self.last = time.monotonic()

    def due(self) -> bool:
        if time.monotonic() - self.last < self.every:
            return False
        self.last = time.monotonic()
        return True


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"

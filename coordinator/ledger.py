"""The ledger: which update ids have been counted, so a redelivered or replayed update counts once."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    site: str
    base_version: int
    #: The version current when the update was folded in, or None if it was dropped.
    applied_at: int | None
    reason: str | None = None


class Ledger:
    def __init__(self) -> None:
        self.entries: OrderedDict[str, Entry] = OrderedDict()

    def __contains__(self, update_id: str) -> bool:
        return update_id in self.entries

    def record(self, update_id: str, entry: Entry) -> None:
        self.entries[update_id] = entry

    def forget_before(self, base_version: int) -> int:
        """Forget updates trained from versions older than ``base_version``; returns how many.

        Safe when the strategy drops anything that stale: a replay of a forgotten update is then
        refused for its staleness, so the ledger need only span the staleness window.
        """
        old = [uid for uid, e in self.entries.items() if e.base_version < base_version]
        for uid in old:
            del self.entries[uid]
        return len(old)

    def to_rows(self) -> list[list]:
        """Plain rows for a checkpoint: [update_id, site, base_version, applied_at, reason]."""
        return [[uid, e.site, e.base_version, e.applied_at, e.reason] for uid, e in self.entries.items()]

    @classmethod
    def from_rows(cls, rows) -> "Ledger":
        ledger = cls()
        for uid, site, base_version, applied_at, reason in rows:
            ledger.record(uid, Entry(site, base_version, applied_at, reason))
        return ledger

from coordinator.ledger import Entry, Ledger


def test_ledger_round_trips_through_rows():
    ledger = Ledger()
    ledger.record("a" * 16, Entry("site-1", 3, 4))
    ledger.record("b" * 16, Entry("site-2", 1, None, "too stale"))
    restored = Ledger.from_rows(ledger.to_rows())
    assert restored.entries == ledger.entries
    assert [uid for uid, e in restored.entries.items() if e.applied_at is not None] == ["a" * 16]


def test_forgetting_keeps_the_staleness_window():
    ledger = Ledger()
    for version in range(10):
        ledger.record(f"{version:016x}", Entry("site-1", version, version))
    assert ledger.forget_before(7) == 7
    assert [e.base_version for e in ledger.entries.values()] == [7, 8, 9]
    assert f"{6:016x}" not in ledger and f"{7:016x}" in ledger

"""Uploads arriving chunk by chunk, without a broker: deliveries go straight into ``Uploads.add``."""

import os
import time

from coordinator.senders import Senders
from coordinator.upload_spool import UploadSpool
from coordinator.uploads import Budget, Refusal, Upload, Uploads
from shared.chunking import SITE_HEADER, BufferPool, ChunkInfo, iter_chunks


def uploads(tmp_path, window=7, budget=Budget(2, 1 << 20)):
    return Uploads(UploadSpool(tmp_path / "uploads"), BufferPool(1 << 20), Senders(frozenset({"fedq"})),
                   max_bytes=2 << 30, window=window, budget=budget)


class Chunk:
    """One chunk of a payload as a site's worker publishes it: its headers and body."""

    def __init__(self, info, body, site):
        self.info, self.body, self.site = info, body, site

    def to_headers(self):
        return {**self.info.to_headers(), SITE_HEADER: self.site}


def chunks(payload: bytes, payload_id: str, chunk_bytes: int = 100, site: str = "site-1"):
    return [(Chunk(info, body, site), body) for info, body in iter_chunks([memoryview(payload)], payload_id, chunk_bytes)]


def test_chunks_in_any_order_make_one_upload_with_every_delivery_to_settle(tmp_path):
    table = uploads(tmp_path)
    payload = os.urandom(450)
    pieces = chunks(payload, "p1")
    results = [table.add(tag, info.to_headers(), "site-1", [body]) for tag, (info, body) in reversed(list(enumerate(pieces)))]
    assert results[:-1] == [None] * (len(pieces) - 1)
    upload = results[-1]
    assert isinstance(upload, Upload) and bytes(upload.reassembly.payload()) == payload
    assert sorted(upload.tags) == list(range(len(pieces))) and upload.user_id == "site-1" and len(table) == 0


def test_a_chunk_without_fedq_headers_is_refused_alone(tmp_path):
    refusal = uploads(tmp_path).add(3, {"x": 1}, "site-1", [b"junk"])
    assert isinstance(refusal, Refusal) and refusal.tags == [3] and "no fedq chunk headers" in refusal.reason


def test_an_upload_wider_than_the_window_is_refused_at_its_first_chunk(tmp_path):
    table = uploads(tmp_path, window=3)
    info, body = chunks(os.urandom(450), "wide")[0]
    refusal = table.add(1, info.to_headers(), "site-1", [body])
    assert isinstance(refusal, Refusal) and "exceeds the coordinator's window of 3 chunks" in refusal.reason
    assert "raise FEDQ_PREFETCH" in refusal.reason and len(table) == 0


def test_a_chunk_that_disagrees_with_its_upload_refuses_the_whole_upload(tmp_path):
    table = uploads(tmp_path)
    (first, body0), (second, body1), *_ = chunks(os.urandom(450), "p2")
    assert table.add(1, first.to_headers(), "site-1", [body0]) is None
    refusal = table.add(2, second.to_headers(), "site-1", [body1[:-1]])
    assert isinstance(refusal, Refusal) and refusal.tags == [1, 2] and "has 99 bytes, expected 100" in refusal.reason
    assert len(table) == 0


def held(table: Uploads) -> int:
    """Deliveries the table's unfinished uploads hold unacknowledged."""
    return sum(len(upload.tags) for upload in table.arriving.values())


def test_an_idle_upload_expires_with_its_deliveries(tmp_path):
    table = uploads(tmp_path)
    info, body = chunks(os.urandom(450), "idle")[0]
    table.add(9, info.to_headers(), "site-1", [body])
    assert table.expire(60.0) == [] and held(table) == 1
    time.sleep(0.05)
    [expired] = table.expire(0.01)
    assert expired.tags == [9] and len(table) == 0


def test_unfinished_uploads_are_spooled_and_go_on_after_a_restart(tmp_path):
    table = uploads(tmp_path)
    payloads = {f"p{i}": os.urandom(450) for i in range(2)}
    pieces = {pid: chunks(payload, pid) for pid, payload in payloads.items()}
    tag = 0
    for pid in payloads:
        for info, body in pieces[pid][:3]:
            tag += 1
            table.add(tag, info.to_headers(), "site-1", [body])
    assert held(table) == 6
    assert sorted(table.spool_unfinished()[0]) == list(range(1, 7)), "every spooled chunk may be acknowledged"
    assert held(table) == 0

    restarted = uploads(tmp_path)
    restarted.take_spooled()
    assert len(restarted) == 2
    for pid, payload in payloads.items():
        done = [restarted.add(100 + i, info.to_headers(), "site-1", [body]) for i, (info, body) in enumerate(pieces[pid][3:])]
        assert bytes(done[-1].reassembly.payload()) == payload
    assert len(list((tmp_path / "uploads").glob("*.upload"))) == 2, "their files stay until a checkpoint holds them"
    restarted.checkpointed()
    assert not list((tmp_path / "uploads").glob("*.upload"))


def test_a_new_connection_keeps_only_the_spooled_uploads(tmp_path):
    table = uploads(tmp_path)
    spooled, unspooled = chunks(os.urandom(450), "kept"), chunks(os.urandom(450), "lost")
    table.add(1, spooled[0][0].to_headers(), "site-1", [spooled[0][1]])
    table.spool_unfinished()
    table.add(2, unspooled[0][0].to_headers(), "site-1", [unspooled[0][1]])
    table.reconnected()
    assert list(table.arriving) == ["kept"] and held(table) == 0


def test_a_sender_that_may_not_speak_for_the_site_is_refused_at_its_first_chunk(tmp_path):
    table = uploads(tmp_path)
    (chunk, body), *_ = chunks(os.urandom(450), "p3", site="site-2")
    refusal = table.add(1, chunk.to_headers(), "site-1", [body])
    assert isinstance(refusal, Refusal) and "user 'site-1' may not send for site 'site-2'" in refusal.reason
    unnamed = {k: v for k, v in chunk.to_headers().items() if k != SITE_HEADER}
    refusal = table.add(2, unnamed, "site-2", [body])
    assert isinstance(refusal, Refusal) and "names no site" in refusal.reason
    assert len(table) == 0, "nothing of either is held"


def test_a_chunk_from_another_user_is_refused_alone_and_the_upload_goes_on(tmp_path):
    table = uploads(tmp_path)
    payload = os.urandom(250)
    (first, body0), (second, body1), (third, body2) = chunks(payload, "p4")
    assert table.add(1, first.to_headers(), "site-1", [body0]) is None
    refusal = table.add(2, second.to_headers(), "fedq", [bytes(100)])  # a trusted user, but not this upload's
    assert isinstance(refusal, Refusal) and refusal.tags == [2] and "came from user 'fedq'" in refusal.reason
    assert table.add(3, second.to_headers(), "site-1", [body1]) is None
    upload = table.add(4, third.to_headers(), "site-1", [body2])
    assert isinstance(upload, Upload) and bytes(upload.reassembly.payload()) == payload and upload.tags == [1, 3, 4]


def test_a_senders_uploads_in_flight_stay_within_its_budget(tmp_path):
    table = uploads(tmp_path, budget=Budget(uploads=2, bytes=1000))
    first, second, third = (chunks(os.urandom(450), f"p{i}")[0] for i in range(3))
    assert table.add(1, first[0].to_headers(), "site-1", [first[1]]) is None
    assert table.add(2, second[0].to_headers(), "site-1", [second[1]]) is None
    refusal = table.add(3, third[0].to_headers(), "site-1", [third[1]])
    assert isinstance(refusal, Refusal) and "exceeds the budget of 2 uploads" in refusal.reason
    other_site = chunks(os.urandom(450), "p9", site="site-2")[0]
    assert table.add(4, other_site[0].to_headers(), "site-2", [other_site[1]]) is None, "another sender's own budget"
    large = chunks(os.urandom(1001), "big", chunk_bytes=1000, site="site-3")[0]
    refusal = table.add(5, large[0].to_headers(), "site-3", [large[1]])
    assert isinstance(refusal, Refusal) and "1000 bytes" in refusal.reason, "a claim alone can exceed the bytes"
    table.expire(0.0)
    assert table.add(6, third[0].to_headers(), "site-1", [third[1]]) is None, "forgotten uploads free the budget"


def test_spooling_writes_each_chunk_that_arrived_once_whatever_the_upload_claims(tmp_path):
    table = uploads(tmp_path, window=2 << 30, budget=Budget(2, 2 << 30))
    # The last chunk, one byte, of an upload that claims 1.5 GB: spooled, it costs what arrived.
    claim = ChunkInfo("huge", 1_610_612_735, 1_610_612_736, 1_610_612_736, 1, "0" * 64)
    assert table.add(1, {**claim.to_headers(), SITE_HEADER: "site-1"}, "site-1", [b"x"]) is None
    pieces = chunks(os.urandom(1000), "honest")
    for tag, (chunk, body) in enumerate(pieces[:4], start=2):
        table.add(tag, chunk.to_headers(), "site-1", [body])
    assert sorted(table.spool_unfinished()[0]) == [1, 2, 3, 4, 5]
    after_first = table.spool.bytes_written
    assert 401 <= after_first < 401 + 2000, "the bytes that arrived and a little framing, not 1.5 GB"
    for tag, (chunk, body) in enumerate(pieces[4:6], start=6):
        table.add(tag, chunk.to_headers(), "site-1", [body])
    table.spool_unfinished()
    assert 200 <= table.spool.bytes_written - after_first < 200 + 200, "only the new chunks are appended"


def test_a_sender_that_abandons_spooled_uploads_spools_at_most_its_budget_per_period(tmp_path):
    table = uploads(tmp_path, budget=Budget(2, 1000))
    table.spool_period = 60.0
    spooled = refused = 0
    for cycle in range(4):
        # Three chunks of a 450-byte upload, spooled, then abandoned: it idles out unfinished.
        for tag, (chunk, body) in enumerate(chunks(os.urandom(450), f"abandoned-{cycle}")[:3], start=10 * cycle):
            table.add(tag, chunk.to_headers(), "site-1", [body])
        acks, refusals = table.spool_unfinished()
        spooled += len(acks)
        refused += len(refusals)
        table.expire(0.0)
    assert spooled == 9 and refused == 1, "300 bytes a cycle: three cycles fit the budget of 1000, the fourth does not"
    assert 900 < table.spool.bytes_written < 900 + 3 * 250, "three cycles' bytes and their files' framing, no fourth"
    [refusal] = refusals
    assert refusal.tags == [30, 31, 32] and "had 900 bytes spooled in the last 60 s" in refusal.reason
    assert not list((tmp_path / "uploads").glob("*.upload")) and len(table) == 0

    other = chunks(os.urandom(450), "another-site", site="site-2")
    for tag, (chunk, body) in enumerate(other[:3], start=100):
        table.add(tag, chunk.to_headers(), "site-2", [body])
    assert table.spool_unfinished() == ([100, 101, 102], []), "another sender's own budget"
    table.spool_period = 0.0
    for tag, (chunk, body) in enumerate(chunks(os.urandom(450), "later")[:3], start=200):
        table.add(tag, chunk.to_headers(), "site-1", [body])
    assert table.spool_unfinished()[0] == [200, 201, 202], "what was spooled long enough ago no longer counts"

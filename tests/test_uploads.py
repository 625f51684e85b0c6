"""Uploads arriving chunk by chunk, without a broker: deliveries go straight into ``Uploads.add``."""

import os
import time

from coordinator.upload_spool import UploadSpool
from coordinator.uploads import Refusal, Upload, Uploads
from shared.chunking import BufferPool, iter_chunks


def uploads(tmp_path, window=7):
    return Uploads(UploadSpool(tmp_path / "uploads"), BufferPool(1 << 20), max_bytes=1 << 20, window=window)


def chunks(payload: bytes, payload_id: str, chunk_bytes: int = 100):
    return list(iter_chunks([memoryview(payload)], payload_id, chunk_bytes))


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


def test_an_idle_upload_expires_with_its_deliveries(tmp_path):
    table = uploads(tmp_path)
    info, body = chunks(os.urandom(450), "idle")[0]
    table.add(9, info.to_headers(), "site-1", [body])
    assert table.expire(60.0) == [] and table.unfinished_chunks == 1
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
    assert table.unfinished_chunks == 6
    assert sorted(table.spool_unfinished()) == list(range(1, 7)), "every spooled chunk may be acknowledged"
    assert table.unfinished_chunks == 0

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
    assert list(table.arriving) == ["kept"] and table.unfinished_chunks == 0

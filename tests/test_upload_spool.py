"""The upload spool: chunks of an unfinished upload appended to disk go on, after a restart, from where they were."""

import numpy as np

from coordinator.upload_spool import UploadSpool
from shared.chunking import Reassembly, iter_chunks


def spooled_upload(tmp_path, data, payload_id, chunk_bytes=4096, indices=None):
    chunks = list(iter_chunks([memoryview(data)], payload_id, chunk_bytes=chunk_bytes))
    reassembly = Reassembly(chunks[0][0])
    for index in indices if indices is not None else range(len(chunks)):
        reassembly.add(*chunks[index])
    spool = UploadSpool(tmp_path / "uploads")
    spool.append(reassembly, reassembly.seen, "site-user", "site-1")
    return spool, chunks


def test_a_spooled_upload_resumes_and_completes_with_the_chunks_still_to_come(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    # Out of order: the last chunk, with the digest, and the first; three chunks in all.
    spool, chunks = spooled_upload(tmp_path, data, "../../escape", indices=[2, 0])
    assert [p.parent for p in tmp_path.rglob("*.upload")] == [tmp_path / "uploads"], "ids never name paths"

    [resumed] = UploadSpool(tmp_path / "uploads").read_all()  # as after a restart
    assert (resumed.user_id, resumed.site, resumed.spooled) == ("site-user", "site-1", {0, 2})
    assert resumed.reassembly.received == 2 and not resumed.reassembly.complete
    assert resumed.reassembly.add(*chunks[1])
    assert bytes(resumed.reassembly.payload()) == data, "the digest covers spooled and new chunks alike"


def test_appending_writes_only_the_chunks_given_once(tmp_path):
    data = bytes(range(256)) * 64  # 16 KiB: four chunks
    spool, chunks = spooled_upload(tmp_path, data, "p1", indices=[0])
    reassembly = Reassembly(chunks[0][0])
    for index in (0, 1, 2):
        reassembly.add(*chunks[index])
    before = spool.bytes_written
    spool.append(reassembly, {1, 2}, "site-user", "site-1")
    assert 2 * 4096 <= spool.bytes_written - before < 2 * 4096 + 200
    [resumed] = spool.read_all()
    assert resumed.spooled == {0, 1, 2}


def test_a_torn_record_is_cut_off_and_the_rest_reads_back(tmp_path):
    data = bytes(range(256)) * 40
    spool, chunks = spooled_upload(tmp_path, data, "p1", indices=[0, 1])
    [path] = tmp_path.rglob("*.upload")
    path.write_bytes(path.read_bytes()[:-100])  # the crash came during the second record
    [resumed] = spool.read_all()
    assert resumed.spooled == {0} and resumed.reassembly.received == 1
    assert path.stat().st_size < len(data), "the torn end is gone, so later records follow whole ones"
    reassembly = resumed.reassembly
    reassembly.add(*chunks[1])
    spool.append(reassembly, {1}, "site-user", "site-1")
    [again] = spool.read_all()
    assert again.spooled == {0, 1}


def test_a_damaged_record_ends_its_file_there(tmp_path):
    data = bytes(range(256)) * 40
    spool, _ = spooled_upload(tmp_path, data, "p1", indices=[0, 1])
    [path] = tmp_path.rglob("*.upload")
    damaged = bytearray(path.read_bytes())
    damaged[-1] ^= 0xFF
    path.write_bytes(bytes(damaged))
    [resumed] = spool.read_all()
    assert resumed.spooled == {0}


def test_a_spool_file_whose_header_cannot_be_read_is_removed_with_a_warning(tmp_path, caplog):
    spool, _ = spooled_upload(tmp_path, bytes(5000), "p1")
    [path] = tmp_path.rglob("*.upload")
    path.write_bytes(b"FEDQUPL2" + path.read_bytes()[8:])  # an older fedq's spool
    assert list(spool.read_all()) == []
    assert not path.exists() and "cannot be read" in caplog.text

"""The upload spool: an unfinished upload written to disk goes on, after a restart, from where it was."""

import numpy as np
import pytest

from coordinator.upload_spool import UploadSpool
from shared.chunking import Reassembly, iter_chunks
from shared.protocol import ProtocolError


def test_a_spooled_upload_resumes_and_completes_with_the_chunks_still_to_come(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    chunks = list(iter_chunks([memoryview(data)], "../../escape", chunk_bytes=4096))  # 3 chunks
    reassembly = Reassembly(chunks[0][0])
    reassembly.add(*chunks[2])  # out of order: the last chunk, with the digest
    reassembly.add(*chunks[0])
    UploadSpool(tmp_path / "uploads").write(reassembly, "site-user")
    assert [p.parent for p in tmp_path.rglob("*.upload")] == [tmp_path / "uploads"], "ids never name paths"

    [(resumed, user)] = UploadSpool(tmp_path / "uploads").read_all()  # as after a restart
    assert user == "site-user" and resumed.received == 2 and not resumed.complete
    assert resumed.add(*chunks[1])
    assert bytes(resumed.payload()) == data, "the digest covers spooled and new chunks alike"


def test_a_damaged_spool_file_is_removed_with_a_warning(tmp_path, caplog):
    data = bytes(range(256)) * 40
    chunks = list(iter_chunks([memoryview(data)], "p1", chunk_bytes=4096))
    reassembly = Reassembly(chunks[0][0])
    reassembly.add(*chunks[0])
    spool = UploadSpool(tmp_path)
    spool.write(reassembly, None)
    [path] = tmp_path.glob("*.upload")
    damaged = bytearray(path.read_bytes())
    damaged[-1] ^= 0xFF
    path.write_bytes(bytes(damaged))
    assert spool.read_all() == []
    assert not path.exists() and "cannot be read" in caplog.text


def test_a_resumed_state_that_disagrees_with_its_bytes_is_refused():
    data = bytes(5000)
    [first, *_] = list(iter_chunks([memoryview(data)], "p1", chunk_bytes=4096))
    state = Reassembly(first[0]).state()
    with pytest.raises(ProtocolError, match="has 10 bytes"):
        Reassembly.resume(state, memoryview(bytes(10)))
    with pytest.raises(ProtocolError, match="chunks outside"):
        Reassembly.resume({**state, "seen": [0, 7]}, memoryview(data))

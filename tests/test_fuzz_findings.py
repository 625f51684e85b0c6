"""What benchmarks/fuzz_ingest.py found, each rebuilt from its minimized input and fed the
coordinator's way, without a broker: ``Uploads.add``, then ``Ingest.take`` for a whole upload, and
the coordinator's other work on uploads (spooling them when the window fills). Each must end in a
refusal with a reason, never in an exception for the coordinator's safety net to catch."""

import pytest
import torch

from coordinator.ingest import Ingest
from coordinator.runlog import RunLog
from coordinator.senders import Senders
from coordinator.state import FederationState
from coordinator.strategies import FedAsync
from coordinator.upload_spool import UploadSpool
from coordinator.uploads import Budget, Refusal, Upload, Uploads
from shared.chunking import SITE_HEADER, BufferPool, iter_chunks
from shared.codecs import Layout
from shared.protocol import PROTOCOL_VERSION, Hello, encode_payload

SHAPES = {"w": (4, 3), "b": (3,)}


def coordinator_side(tmp_path, window=8):
    """The uploads table and the ingest stages, as the coordinator holds them."""
    params = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    state = FederationState(run_id="0123456789abcdef", params=params, layout=Layout.of(params))
    strategy = FedAsync(alpha=0.5)
    strategy.prepare(params)
    senders = Senders(frozenset({"fedq"}))
    ingest = Ingest(state, strategy, RunLog(tmp_path / "run"), senders=senders)
    uploads = Uploads(UploadSpool(tmp_path / "uploads"), BufferPool(1 << 20, min_size=64), senders,
                      max_bytes=1 << 20, window=window, budget=Budget(2, 1 << 18))
    return uploads, ingest


def deliver(uploads, ingest, tag, headers, user, body):
    """One delivery the coordinator's way (``Coordinator._on_delivery`` and ``_handle``): a refusal or None."""
    placed = uploads.add(tag, headers, user, body)
    if isinstance(placed, Upload):
        try:
            return ingest.take(placed.reassembly.payload(), placed.user_id, placed.first_chunk)
        finally:
            uploads.buffers.give(placed.reassembly.storage)
    return placed


def hello_chunks(chunk_bytes):
    payload = b"".join(encode_payload(Hello(protocol=PROTOCOL_VERSION, site="site-1"), []))
    return [({**info.to_headers(), SITE_HEADER: "site-1"}, body)
            for info, body in iter_chunks([memoryview(payload)], "p0-0", chunk_bytes)]


# crash-ad3bdeeff5807c0fe4baae3e8d7b4d86a1858689: chunks 1 and 2 of a 3-chunk upload, the last with
# fedq-digest '\x00'. Taken and held; when the window filled with unfinished uploads, spooling them
# raised ValueError from bytes.fromhex in UploadSpool.append (outside any safety net). A digest of hex
# digits but the wrong length would have been spooled as a record that cannot be read back.
@pytest.mark.parametrize("digest", ["\x00", "ab", "g" * 64, "AB" * 32])
def test_a_chunk_whose_digest_header_is_no_digest_is_refused_and_never_spooled(tmp_path, digest):
    uploads, ingest = coordinator_side(tmp_path)
    (_, _), (second, body1), (last, body2) = hello_chunks(20)
    assert deliver(uploads, ingest, 2, second, "site-1", [body1]) is None
    refusal = deliver(uploads, ingest, 3, {**last, "fedq-digest": digest}, "site-1", [body2])
    assert isinstance(refusal, Refusal) and refusal.tags == [3]
    assert "header fedq-digest is" in refusal.reason and "64 lowercase hex digits" in refusal.reason
    assert uploads.spool_unfinished() == ([2], []), "the chunk taken is spooled, the refused one is not held"
    assert not ingest.runlog.stage_failures

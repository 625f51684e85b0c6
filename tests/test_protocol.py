"""Payload framing and chunking: round trips and refusals, without a broker."""

import random

import msgpack
import numpy as np
import pytest
import torch

from shared.chunking import BufferPool, ChunkInfo, Reassembly, iter_chunks, read_single
from shared.codecs import Layout, decode_tensors, encode_tensors, get_codec
from shared.protocol import (
    MAX_CHUNK_BYTES,
    PROTOCOL_VERSION,
    Hello,
    ProtocolError,
    UpdateHeader,
    decode_header,
    decode_payload,
    encode_payload,
    new_digest,
    new_id,
)

MiB4 = 4 * 1024 * 1024


def reassemble(buffers, chunk_bytes=MAX_CHUNK_BYTES, shuffle=False):
    chunks = list(iter_chunks(buffers, "p1", chunk_bytes))
    if shuffle:
        random.Random(0).shuffle(chunks)
    reassembly = None
    for info, body in chunks:
        # What travels is headers and bytes; read them back as a receiver would.
        info = ChunkInfo.from_headers(info.to_headers(), max_size=1 << 40)
        reassembly = reassembly or Reassembly(info)
        reassembly.add(info, body)
    return chunks, reassembly.payload()


@pytest.mark.parametrize("size, expected_chunks", [(0, 1), (1, 1), (MiB4, 1), (MiB4 + 1, 2)])
def test_chunking_round_trip(size, expected_chunks):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    chunks, payload = reassemble([memoryview(data)], shuffle=True)
    assert len(chunks) == expected_chunks
    assert all(len(body) <= MAX_CHUNK_BYTES for _, body in chunks)
    assert bytes(payload) == data
    last = next(info for info, _ in chunks if info.is_last)
    assert last.digest == new_digest().update(data).hexdigest()


@pytest.mark.parametrize("shuffle", [False, True])
def test_chunks_cut_across_buffer_boundaries(shuffle):
    pieces = [b"abc", b"", b"defghij", b"k" * 10]
    chunks, payload = reassemble([memoryview(p) for p in pieces], chunk_bytes=4, shuffle=shuffle)
    assert sorted(len(b) for _, b in chunks) == [4, 4, 4, 4, 4]
    assert bytes(payload) == b"".join(pieces)


def test_corrupted_chunk_fails_the_digest():
    chunks = list(iter_chunks([memoryview(b"x" * 100)], "p1", 40))
    reassembly = Reassembly(chunks[0][0])
    for info, body in chunks:
        reassembly.add(info, body if info.index != 1 else b"y" * len(body))
    with pytest.raises(ProtocolError, match="digest"):
        reassembly.payload()


def test_missing_chunk_is_reported():
    chunks = list(iter_chunks([memoryview(b"x" * 100)], "p1", 40))
    reassembly = Reassembly(chunks[0][0])
    reassembly.add(*chunks[0])
    with pytest.raises(ProtocolError, match="1 of 3 chunks"):
        reassembly.payload()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"fedq-chunk": 5}, "outside 0..2"),
        ({"fedq-chunks": 2}, "cannot hold"),
        ({"fedq-size": 10**12}, "exceeds the limit"),
        ({"fedq-chunk-bytes": 0}, "chunk size"),
        ({"fedq-payload": None}, "header fedq-payload is missing"),
        ({"fedq-size": None}, "header fedq-size is missing"),
        ({"fedq-chunk": "1"}, "expected int"),
    ],
)
def test_bad_chunk_headers_are_refused(change, message):
    info, _ = next(iter(iter_chunks([memoryview(b"x" * 100)], "p1", 40)))
    headers = {**info.to_headers(), **change}
    with pytest.raises(ProtocolError, match=message):
        ChunkInfo.from_headers(headers, max_size=1000)


def test_wrong_body_length_is_refused():
    chunks = list(iter_chunks([memoryview(b"x" * 100)], "p1", 40))
    reassembly = Reassembly(chunks[0][0])
    with pytest.raises(ProtocolError, match="has 39 bytes, expected 40"):
        reassembly.add(chunks[0][0], chunks[0][1][:-1])


def test_chunks_arriving_as_fragments_reassemble_like_whole_ones():
    data = np.random.default_rng(7).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    chunks = list(iter_chunks([memoryview(data)], "p1", 300))
    reassembly = Reassembly(chunks[0][0])
    for info, body in reversed(chunks):  # as shared.transport.deliver_fragments hands them over: frames of a body
        reassembly.add(info, [body[i : i + 128] for i in range(0, len(body), 128)])
    assert bytes(reassembly.payload()) == data
    short = Reassembly(chunks[0][0])
    with pytest.raises(ProtocolError, match="has 299 bytes, expected 300"):
        short.add(chunks[0][0], [chunks[0][1][:128], chunks[0][1][128:-1]])


def update_header(tensors=()):
    return UpdateHeader(
        protocol=PROTOCOL_VERSION, update_id=new_id(), run_id=new_id(), site="site-1", base_version=3,
        num_samples=10, train_seconds=0.5, metrics={"loss": 0.25}, tensors=tensors,
    )


def test_payload_round_trip_is_zero_copy():
    tensors = {"a.weight": torch.randn(7, 5), "a.bias": torch.randn(5), "empty": torch.zeros(0)}
    specs, parts = encode_tensors(tensors, get_codec("fp32"))
    header = update_header(specs)
    payload = bytearray(b"".join(encode_payload(header, parts)))
    decoded_header, decoded_parts = decode_payload(payload)
    assert decoded_header == header
    decoded = decode_tensors(decoded_header.tensors, decoded_parts, Layout.of(tensors))
    for name, tensor in tensors.items():
        assert torch.equal(decoded[name], tensor)
    assert np.shares_memory(decoded_parts[0][0], np.frombuffer(payload, dtype=np.uint8))
    base = np.frombuffer(payload, np.uint8).ctypes.data
    assert all((p[0].ctypes.data - base) % p[0].dtype.itemsize == 0 for p in decoded_parts)


def test_header_only_payload_round_trip():
    header = Hello(protocol=PROTOCOL_VERSION, site="site-4")
    buffers = encode_payload(header, [])
    info, body = next(iter(iter_chunks(buffers, "p")))
    decoded, _ = decode_header(read_single(info.to_headers(), body))
    assert decoded == header


def _raw_payload(fields: dict) -> bytes:
    raw = msgpack.packb(fields)
    return len(raw).to_bytes(4, "little") + raw


def test_unsupported_protocol_version_is_named():
    fields = Hello(protocol=PROTOCOL_VERSION, site="s").model_dump()
    fields["protocol"] = 99
    with pytest.raises(ProtocolError, match="protocol version 99 is not supported"):
        decode_header(_raw_payload(fields))


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "too short"),
        (b"\xff\xff\xff\x7f", "does not fit"),
        (b"\x01\x00\x00\x00\xc1", "not valid msgpack"),
        (_raw_payload([1, 2]), "not a map"),
        (_raw_payload({"protocol": 1, "kind": "pickle"}), "fails the schema"),
        (_raw_payload({"protocol": 1, "kind": "hello", "site": "../etc"}), "fails the schema"),
    ],
)
def test_malformed_headers_are_refused(payload, message):
    with pytest.raises(ProtocolError, match=message):
        decode_header(payload)


def test_tensor_parts_past_the_end_are_refused():
    specs, parts = encode_tensors({"w": torch.ones(100)}, get_codec("fp32"))
    payload = b"".join(encode_payload(update_header(specs), parts))
    with pytest.raises(ProtocolError, match="past the end"):
        decode_payload(payload[:-8])


def test_object_dtypes_are_refused_before_numpy_sees_them():
    specs, parts = encode_tensors({"w": torch.ones(2)}, get_codec("fp32"))
    fields = update_header(specs).model_dump()
    fields["tensors"][0]["parts"][0]["dtype"] = "object"
    with pytest.raises(ProtocolError, match="part dtype 'object'"):
        decode_header(_raw_payload(fields))


def test_a_buffer_given_back_receives_the_next_payload_of_about_its_size():
    pool = BufferPool(max_bytes=3000, min_size=100)
    first = np.random.default_rng(1).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    chunks = list(iter_chunks([memoryview(first)], "p1", 400))
    reassembly = Reassembly(chunks[0][0], pool.take(1000))
    for info, body in chunks:
        reassembly.add(info, body)
    assert bytes(reassembly.payload()) == first
    pool.give(reassembly.storage)
    assert pool.take(3000) is None, "a buffer far too small is not handed out"
    assert pool.take(400) is None, "nor one more than twice the size"
    second = bytes(reversed(first))[:990]
    chunks = list(iter_chunks([memoryview(second)], "p2", 400))
    reused = pool.take(990)
    assert reused is reassembly.storage and pool.spare_bytes == 0
    reassembly = Reassembly(chunks[0][0], reused)
    for info, body in chunks:
        reassembly.add(info, body)
    assert bytes(reassembly.payload()) == second and len(reassembly.payload()) == 990
    pool.give(reused)
    pool.give(memoryview(bytearray(2500)))
    assert pool.spare_bytes == 1000, "the pool keeps no more than max_bytes"
    pool.give(memoryview(bytearray(50)))
    assert pool.spare_bytes == 1000, "nor buffers below min_size"

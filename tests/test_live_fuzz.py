"""Schema-aware fuzzing against a live coordinator on the real broker: hypothesis builds valid
updates and hellos for the coordinator's model, then changes one field (of the payload's header, of
one tensor entry, or of the chunk headers) to a value of any type or size. Every message must get
its verdict; none may reach an error fedq's checks did not foresee, stop the coordinator or make
the model hold a NaN. benchmarks/fuzz_ingest.py fuzzes the same path by coverage, without a broker."""

import msgpack
import pika
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.chunking import SITE_HEADER, iter_chunks
from shared.codecs import CODECS, encode_tensors, get_codec
from shared.protocol import PROTOCOL_VERSION, Hello, UpdateHeader, new_id
from shared.transport import LOBBY_KEY, UPDATE_EXCHANGE
from tests.federation_helpers import SiteClient, running_coordinator, wait_for

pytestmark = pytest.mark.broker

EXAMPLES = 150

# Values of every kind a field may be changed to: wrong types, edges of each type, and the huge
# (integers as msgpack can carry them).
INTEGERS = st.integers(min_value=-(2**63), max_value=2**64 - 1)
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), INTEGERS,
    st.sampled_from([0, -1, 1, 2**31, 2**53, 2**63 - 1, 2**64 - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40), st.binary(max_size=40),
    st.lists(st.integers(min_value=-(2**40), max_value=2**40), max_size=70),
    st.dictionaries(st.text(max_size=8), INTEGERS | st.floats() | st.text(max_size=8), max_size=5),
    st.recursive(INTEGERS | st.text(max_size=4), lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=20),
)

# What an AMQP header table carries (no floats in pika's encoder): values of every such kind.
HEADER_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, -1, 2**31, 2**53, 2**63 - 1]), st.text(max_size=80), st.binary(max_size=80),
    st.lists(st.integers(min_value=-(2**31), max_value=2**31), max_size=5),
    st.dictionaries(st.text(max_size=8), st.integers(min_value=0, max_value=2**31) | st.text(max_size=8), max_size=3),
)


def header_and_parts(coordinator, kind: str, codec: str):
    """A valid hello or update for the coordinator's model, as a msgpack-able dict and its parts."""
    if kind == "hello":
        return Hello(protocol=PROTOCOL_VERSION, site="site-1").model_dump(mode="python"), []
    delta = {name: torch.full(tuple(t.shape), 1e-3) for name, t in coordinator.params.items()}
    specs, parts = encode_tensors(delta, get_codec(codec, 0.05))
    header = UpdateHeader(protocol=PROTOCOL_VERSION, update_id=new_id(), run_id=coordinator.run_id, site="site-1",
                          base_version=coordinator.version, num_samples=10, train_seconds=0.5,
                          metrics={"loss": 0.5}, tensors=specs)
    return header.model_dump(mode="python"), parts


def framed(fields: dict, parts) -> bytes:
    """The payload around any header: encode_payload's framing, without its checks of the header."""
    raw = msgpack.packb(fields, use_bin_type=True, default=list)  # tuples of the model's dump as lists
    payload = bytearray(len(raw).to_bytes(4, "little") + raw)
    for part in parts:
        payload += bytes(-len(payload) % part.itemsize) + part.tobytes()
    return bytes(payload)


@st.composite
def mutated_messages(draw, coordinator):
    kind = draw(st.sampled_from(["update", "update", "update", "hello"]))
    codec = draw(st.sampled_from(sorted(CODECS.names)))
    fields, parts = header_and_parts(coordinator, kind, codec)
    target = draw(st.sampled_from(["header", "tensor", "chunk"] if kind == "update" else ["header", "chunk"]))
    chunk_change = None
    if target == "header":
        fields[draw(st.sampled_from(sorted(fields) + ["unknown"]))] = draw(ANY_VALUE)
    elif target == "tensor":
        entry = fields["tensors"][draw(st.integers(0, len(fields["tensors"]) - 1))]
        key = draw(st.sampled_from(["name", "shape", "codec", "params", "parts", "dtype-of-a-part", "shape-of-a-part"]))
        if key.endswith("-of-a-part"):
            part = entry["parts"][draw(st.integers(0, len(entry["parts"]) - 1))]
            part[key.split("-")[0]] = draw(ANY_VALUE)
        else:
            entry[key] = draw(ANY_VALUE)
    else:
        chunk_change = (draw(st.sampled_from(["fedq-payload", "fedq-chunk", "fedq-chunks", "fedq-size",
                                              "fedq-chunk-bytes", "fedq-digest", SITE_HEADER])), draw(HEADER_VALUE))
    return framed(fields, parts), chunk_change


def settled(coordinator, run_dir) -> int:
    """Messages the coordinator has done with: whole payloads through the ingest stages (any
    verdict), chunks refused on their own, and uploads that idled out unfinished."""
    expired = (run_dir / "events.jsonl").read_text().count('"event": "upload_expired"')
    return coordinator.ingest_times.count + coordinator.runlog.rejected + expired


def test_messages_with_one_field_changed_to_anything_each_get_a_verdict(broker_url, tmp_path):
    client = SiteClient(broker_url)
    # Changed chunk counts leave uploads waiting for chunks that never come: they idle out in a second.
    with running_coordinator(broker_url, tmp_path, strategy="fedasync", max_staleness=1000,
                             upload_timeout=1.0) as coordinator:
        seen = {"count": 0}

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(message=mutated_messages(coordinator))
        def one_message(message):
            payload, chunk_change = message
            before = settled(coordinator, tmp_path)
            for info, body in iter_chunks([memoryview(payload)], new_id(), 64 * 1024):
                headers = {**info.to_headers(), SITE_HEADER: "site-1"}
                if chunk_change is not None:
                    name, value = chunk_change
                    headers[name] = value
                client.channel.basic_publish(UPDATE_EXCHANGE, LOBBY_KEY, body, pika.BasicProperties(
                    headers=headers, user_id=client.user))
            seen["count"] += 1
            wait_for(lambda: settled(coordinator, tmp_path) > before or coordinator.stop_reason is not None, 15,
                     "a verdict on the changed message")
            assert coordinator.stop_reason is None
            assert not coordinator.runlog.stage_failures, coordinator.runlog.stage_failures

        one_message()
        assert seen["count"] == EXAMPLES
        assert all(torch.isfinite(t).all() for t in coordinator.params.values())
    client.close()

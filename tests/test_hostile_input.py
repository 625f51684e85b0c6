"""Hostile or broken input on the real broker: each message that once stopped the coordinator, made
it write gigabytes or stalled a run is refused into ``fedq.rejected`` with its reason; the
coordinator stays up, does not see the message again after a restart, and the model is
bit-for-bit unchanged. tests/test_progress.py has the runs that once never ended."""

import struct

import msgpack
import numpy as np
import pika
import pytest
import torch

from shared import transport
from shared.chunking import SITE_HEADER
from shared.protocol import PROTOCOL_VERSION, new_id
from coordinator.runlog import read_events
from tests.federation_helpers import SiteClient, constant_delta, running_coordinator, wait_for

pytestmark = pytest.mark.broker


def framed(fields: dict, parts: tuple[np.ndarray, ...] = ()) -> bytes:
    """A payload around any header, as a hostile sender frames it: each part aligned to its item size."""
    raw = msgpack.packb(fields, use_bin_type=True)
    payload = bytearray(struct.pack("<I", len(raw)) + raw)
    for part in parts:
        payload += bytes(-len(payload) % part.itemsize) + part.tobytes()
    return bytes(payload)


def entry(name, shape, codec="fp32", parts=None):
    return {"name": name, "shape": list(shape), "codec": codec, "params": {},
            "parts": parts if parts is not None else [{"dtype": "float32", "shape": list(shape)}]}


def triggers(coordinator, client) -> dict[str, tuple[bytes, str]]:
    """Each message of issue 19's report, and a phrase of the reason it must be refused with."""
    def update(**changes):
        return {"protocol": PROTOCOL_VERSION, "kind": "update", "update_id": new_id(), "run_id": coordinator.run_id,
                "site": "site-1", "base_version": 0, "num_samples": 1, "train_seconds": 0.0, "metrics": {},
                "tensors": [], **changes}

    hello = {"protocol": PROTOCOL_VERSION, "kind": "hello", "site": "site-1", "tensors": [entry("w", (1,) * 65)]}
    int8 = [{"dtype": "int8", "shape": [64, 2]}, {"dtype": "float32", "shape": [1]}]
    return {
        "a hello with a 65-dimension part": (framed(hello), "at most 32 items"),
        "a part shaped (0, 2**63)": (framed(update(tensors=[entry("0.weight", (0, 2**63))])),
                                     "less than or equal to 281474976710656"),
        "int8 parts of the right size, shaped 2-D": (
            framed(update(tensors=[entry("0.bias", (128,), "int8", int8)]),
                   (np.zeros((64, 2), np.int8), np.ones(1, np.float32))), "expected flat parts"),
        "num_samples 2**64 - 1": (framed(update(num_samples=2**64 - 1)), "num_samples"),
        "num_samples 2**40": (framed(update(num_samples=2**40)), "FEDQ_MAX_NUM_SAMPLES"),
        "a 0.25 MB header of empty maps": (framed(update(metrics=[{}] * 250_000)), "header"),
        # Found by benchmarks/fuzz_ingest.py: finite, and merged, it made the model infinite.
        "finite values of 3e38": (client.update_payload(coordinator, 0, constant_delta(coordinator, 3e38))[1],
                                  "FEDQ_MAX_UPDATE_VALUE"),
    }


def test_every_message_that_once_killed_the_coordinator_is_refused_once_and_changes_nothing(broker_url, tmp_path):
    client = SiteClient(broker_url)
    messages = {}
    with running_coordinator(broker_url, tmp_path, strategy="fedasync") as coordinator:
        before = {name: t.clone() for name, t in coordinator.params.items()}
        for label, (payload, why) in triggers(coordinator, client).items():
            payload_id = new_id()
            client.publish(payload, payload_id)
            messages[payload_id] = (label, why)
        # One byte, the last chunk of an upload that claims 1.86 GB, from a user speaking for a site it is not.
        lone = new_id()
        client.channel.basic_publish(transport.UPDATE_EXCHANGE, transport.LOBBY_KEY, b"x", pika.BasicProperties(
            user_id=client.user, headers={"fedq-payload": lone, "fedq-chunk": 443, "fedq-chunks": 444,
                                          "fedq-size": 1_860_000_000, "fedq-chunk-bytes": 4 * 1024**2,
                                          "fedq-digest": "0" * 64, SITE_HEADER: "site-1"}))
        messages[lone] = ("a lone last chunk claiming 1.86 GB", "window")
        wait_for(lambda: coordinator.runlog.rejected == len(messages), 30, "every refusal")
        assert coordinator.stop_reason is None and coordinator.version == 0
        assert not coordinator.runlog.stage_failures, "each was refused by a check, not by an accident"
        assert all(torch.equal(t, before[name]) for name, t in coordinator.params.items()), "bit-for-bit unchanged"
        assert len(coordinator.uploads) == 0 and not any((tmp_path / "uploads").glob("*")), "nothing held or spooled"
    dead = {}
    channel = client.connection.channel()
    while (got := channel.basic_get(transport.REJECTED, auto_ack=True))[0] is not None:
        dead[got[1].headers["fedq-payload"]] = got[1].headers["fedq-reason"]
    assert dead.keys() == messages.keys(), "every message is in fedq.rejected"
    for payload_id, (label, why) in messages.items():
        assert why in dead[payload_id], f"{label}: {dead[payload_id]}"
    refusals = len(read_events(tmp_path, "rejected"))
    with running_coordinator(broker_url, tmp_path, strategy="fedasync") as restarted:
        assert restarted.version == 0
        assert restarted.ingest.state.run_id == coordinator.run_id, "resumed the same run"
        wait_for(lambda: restarted.runlog.elapsed > 0, 5, "the restarted coordinator serving")
        client.connection.serve(2.0)
        assert len(read_events(tmp_path, "rejected")) == refusals, "a restarted coordinator does not see them again"
        assert all(torch.equal(t, before[name]) for name, t in restarted.params.items())
        depth = channel.queue_declare(transport.UPDATES, passive=True).method.message_count
        assert depth == 0
    client.close()


def test_a_payload_that_stops_the_coordinator_is_refused_after_the_restarts_that_guard_it(broker_url, tmp_path,
                                                                                          monkeypatch):
    """No delivery limit breaks a crash loop any more: a payload that ends the process (here: raises
    SystemExit, which no stage catches) is marked before it is taken once it comes again, and
    refused when it comes after that, with the reason; valid updates after it are applied."""
    import threading

    from coordinator.ingest import Ingest
    from coordinator.server import Coordinator
    from coordinator.settings import CoordinatorSettings
    from coordinator.suspects import SUSPECT_AFTER
    from shared.settings import load_settings
    from shared.task import load_task

    client = SiteClient(broker_url)
    take = Ingest.take
    deadly: set[str] = set()

    def take_or_stop(self, payload, user, first_chunk=None):
        if bytes(payload[-8:]) in deadly:
            raise SystemExit("a payload that ends the process")
        return take(self, payload, user, first_chunk)

    monkeypatch.setattr(Ingest, "take", take_or_stop)
    settings = load_settings(CoordinatorSettings, broker_url=broker_url, run_dir=tmp_path, strategy="fedasync")
    stops = 0
    while True:
        coordinator = Coordinator(settings, load_task(settings.task))
        ended = []
        thread = threading.Thread(target=lambda: ended.append(_run(coordinator)), daemon=True)
        thread.start()
        wait_for(lambda: coordinator.announcement is not None or ended, 30, "the coordinator serving")
        if stops == 0:
            _, payload = client.update_payload(coordinator, 0, constant_delta(coordinator, 0.5))
            deadly.add(payload[-8:])
            client.publish(payload)
        thread.join(30)
        if not isinstance(ended[0], SystemExit):
            break
        stops += 1
        assert stops <= SUSPECT_AFTER + 1, "the crash loop ends"
    assert stops == SUSPECT_AFTER + 1
    refused = read_events(tmp_path, "rejected")
    assert len(refused) == 1 and "the coordinator stopped while taking this payload" in refused[0]["reason"]
    assert coordinator.version == 0 and not (tmp_path / "suspect.fedq").exists()


def _run(coordinator):
    """Serve until stopped (here, 3 s after it is up); the exception that ended it, or None."""
    import threading

    threading.Timer(3.0, lambda: coordinator.stop("test over")).start()
    try:
        coordinator.run()
    except BaseException as exc:  # noqa: BLE001 - the test looks at how it ended
        return exc
    return None

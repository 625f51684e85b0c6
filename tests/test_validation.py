"""Every update is validated before it touches the model; refusals are dead-lettered with a reason."""

import random

import msgpack
import pika
import pytest
import torch

from shared import transport
from shared.protocol import PROTOCOL_VERSION, ProtocolError, new_id
from shared.codecs import SCAN_BLOCK
from shared.validation import all_finite, check_matches_model, non_finite_tensor
from coordinator.runlog import read_events
from tests.federation_helpers import SiteClient, constant_delta, event_for, running_coordinator, wait_for

pytestmark = pytest.mark.broker


def rejected_reasons(run_dir):
    return [e["reason"] for e in read_events(run_dir, "rejected")]


def test_a_user_may_send_only_for_its_own_site(broker_url, tmp_path):
    client = SiteClient(broker_url, site="site-2")
    with running_coordinator(broker_url, tmp_path, strategy="fedasync", any_site_users=[],
                             site_users={"fedq": "site-1"}) as coordinator:
        _, payload = client.update_payload(coordinator, 0, constant_delta(coordinator, 0.1))
        client.publish(payload)
        client.publish(payload, user_id=None)
        wait_for(lambda: len(rejected_reasons(tmp_path)) == 2, 15, "two refusals")
        assert rejected_reasons(tmp_path) == [
            "user 'fedq' may not send for site 'site-2'",
            "the message carries no user_id, so its sender cannot be verified",
        ]
        allowed = SiteClient(broker_url, site="site-1")
        event_for(tmp_path, allowed.send(coordinator, 0, constant_delta(coordinator, 0.1)))
        assert coordinator.version == 1
        allowed.close()
    client.close()


def test_a_site_cannot_claim_another_users_identity(broker_url):
    """RabbitMQ itself refuses a user_id that is not the connection's user."""
    connection = transport.connect(broker_url, 30, "test-spoof")
    channel = connection.channel()
    channel.confirm_delivery()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="PRECONDITION_FAILED"):
        channel.basic_publish(transport.UPDATE_EXCHANGE, transport.LOBBY_KEY, b"x", pika.BasicProperties(user_id="site-7"))
    connection.close()


def test_norm_bound_refuses_or_clips(broker_url, tmp_path):
    client = SiteClient(broker_url)
    with running_coordinator(broker_url, tmp_path / "refuse", strategy="fedasync", alpha=1.0, staleness="constant",
                             update_norm_bound=1.0, update_norm_action="refuse") as coordinator:
        before = {k: v.clone() for k, v in coordinator.params.items()}
        client.send(coordinator, 0, constant_delta(coordinator, 1.0))
        wait_for(lambda: rejected_reasons(tmp_path / "refuse"), 15, "a refusal")
        assert "exceeds the bound 1" in rejected_reasons(tmp_path / "refuse")[0]
        assert all(torch.equal(t, before[k]) for k, t in coordinator.params.items())
    with running_coordinator(broker_url, tmp_path / "clip", strategy="fedasync", alpha=1.0, staleness="constant",
                             update_norm_bound=1.0, update_norm_action="clip") as coordinator:
        before = {k: v.clone() for k, v in coordinator.params.items()}
        event_for(tmp_path / "clip", client.send(coordinator, 0, constant_delta(coordinator, 1.0)))
        moved = torch.cat([(t - before[k]).reshape(-1) for k, t in coordinator.params.items()])
        assert moved.norm().item() == pytest.approx(1.0, rel=1e-4)
    client.close()


def malformed_messages(client, coordinator, valid_payload, valid_id, rng):
    """1000 messages, 100 of each kind: every one refused, but replays, which are set aside as duplicates."""
    def update(**change):
        _, payload = client.update_payload(coordinator, 0, constant_delta(coordinator, 0.01))
        return _rewrite_header(payload, change)

    def delta_with(value):
        delta = constant_delta(coordinator, 0.0)
        next(iter(delta.values())).view(-1)[rng.randrange(10)] = value
        return client.update_payload(coordinator, 0, delta)[1]

    def wrong_shape():
        delta = constant_delta(coordinator, 0.01)
        name = rng.choice(list(delta))
        delta[name] = torch.zeros(delta[name].numel() + 1)
        return client.update_payload(coordinator, 0, delta)[1]

    kinds = {
        "random bytes, no headers": lambda: ("raw", rng.randbytes(rng.randrange(1, 3000)), {}),
        "random bytes as a payload": lambda: ("payload", rng.randbytes(rng.randrange(1, 3000)), None),
        "truncated msgpack": lambda: ("payload", _truncated_header(valid_payload, rng), None),
        "wrong shapes": lambda: ("payload", wrong_shape(), None),
        "NaN or Inf": lambda: ("payload", delta_with(rng.choice([float("nan"), float("inf"), -float("inf")])), None),
        "oversized": lambda: ("raw", b"x" * 64, {"fedq-payload": new_id(), "fedq-chunk": 0, "fedq-chunks": 2**20,
                                                  "fedq-size": 2**42, "fedq-chunk-bytes": 2**22}),
        "wrong protocol version": lambda: ("payload", update(protocol=rng.choice([0, PROTOCOL_VERSION + 1, 99])), None),
        "unknown codec": lambda: ("payload", update(codec="pickle"), None),
        "another site": lambda: ("payload", update(site="site-9"), None),
        "replays": lambda: ("replay", valid_payload, None),
    }
    for kind, make in kinds.items():
        for _ in range(100):
            yield (kind, *make())


def _rewrite_header(payload: bytes, change: dict) -> bytes:
    length = int.from_bytes(payload[:4], "little")
    header = msgpack.unpackb(payload[4 : 4 + length])
    if "codec" in change:
        for tensor in header["tensors"]:
            tensor["codec"] = change.pop("codec")
            break
    header.update(change)
    raw = msgpack.packb(header)
    return len(raw).to_bytes(4, "little") + raw + payload[4 + length :]


def _truncated_header(payload: bytes, rng) -> bytes:
    length = int.from_bytes(payload[:4], "little")
    cut = rng.randrange(1, length)
    return cut.to_bytes(4, "little") + payload[4 : 4 + cut]


def test_fuzz_1000_malformed_messages_are_dead_lettered_and_change_nothing(broker_url, tmp_path):
    rng = random.Random(0)
    client = SiteClient(broker_url, site="site-1")
    with running_coordinator(broker_url, tmp_path, strategy="fedasync", any_site_users=[],
                             site_users={"fedq": "site-1"}, max_update_bytes=2**30) as coordinator:
        valid_id, valid_payload = client.update_payload(coordinator, 0, constant_delta(coordinator, 0.01))
        client.publish(valid_payload, valid_id)
        event_for(tmp_path, valid_id)
        wait_for(lambda: coordinator.version == 1, 10, "the valid update")
        before = {k: v.clone() for k, v in coordinator.params.items()}
        sent = 0
        for _kind, route, body, headers in malformed_messages(client, coordinator, valid_payload, valid_id, rng):
            if route == "raw":
                client.channel.basic_publish(transport.UPDATE_EXCHANGE, transport.LOBBY_KEY, body, pika.BasicProperties(
                    headers=headers or None, user_id=client.user))
            else:
                client.publish(body, valid_id if route == "replay" else None)
            sent += 1
        assert sent == 1000
        # A replay of a counted update is a duplicate, as a redelivery is: set aside, not held against the site.
        wait_for(lambda: coordinator.runlog.rejected + sum(coordinator.runlog.duplicates_per_site.values()) >= 1000, 120,
                 "1000 refusals and duplicates")
        assert coordinator.runlog.duplicates_per_site == {"site-1": 100}
        assert coordinator.stop_reason is None and coordinator.version == 1
        assert all(torch.equal(t, before[k]) for k, t in coordinator.params.items()), "the model is bit-for-bit unchanged"
        reasons = rejected_reasons(tmp_path)
        assert len(reasons) == 900 and all(reasons)
        counted = client.channel.queue_declare(transport.REJECTED, passive=True).method.message_count
        assert counted == 900, "every refused message is in the dead-letter queue"
        method, properties, _ = client.channel.basic_get(transport.REJECTED, auto_ack=True)
        assert properties.headers["fedq-reason"]
    client.close()


def test_a_site_sending_100x_updates_is_outvoted_by_a_trimmed_mean(broker_url, tmp_path):
    from fedq.federation import run_federation, site_names

    summary = run_federation(
        broker_url, tmp_path, site_names(10),
        coordinator={"strategy": "fedbuff", "buffer_size": 5, "aggregation": "trimmed-mean", "trim_fraction": 0.2,
                     "stop_at_accuracy": 0.90, "max_seconds": 150, "max_staleness": 10_000},
        site_settings={"site-0": {"task": "tests.hostile_task:ScaledDigits"}},
    )
    assert summary["best_accuracy"] >= 0.90, summary["stop_reason"]
    assert summary["applied_per_site"].get("site-0", 0) > 0, "the hostile site's updates were taken, and outvoted"


def test_a_non_finite_tensor_is_named_and_only_the_finite_check_can_be_left_out():
    model = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}
    received = {"a": torch.ones(3), "b": torch.tensor([[1.0, float("inf")], [0.0, 0.0]])}
    assert non_finite_tensor(model) is None
    assert non_finite_tensor(received) == "b"
    with pytest.raises(ProtocolError, match="tensor 'b' holds NaN or infinite values"):
        check_matches_model(model, received)
    check_matches_model(model, received, finite=False)  # a snapshot: the coordinator checked it
    with pytest.raises(ProtocolError, match="has shape"):
        check_matches_model(model, {"a": torch.ones(3), "b": torch.ones(4)}, finite=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_finite_values_whose_sum_overflows_are_finite_and_one_bad_value_is_found(dtype):
    big = torch.full((3 * SCAN_BLOCK + 5,), torch.finfo(dtype).max / 2, dtype=dtype)  # the sum overflows
    assert all_finite(big)
    for bad in (float("inf"), float("-inf"), float("nan")):
        tensor = big.clone()
        tensor[2 * SCAN_BLOCK + 3] = bad
        assert not all_finite(tensor)
        assert not all_finite(tensor.view(-1, 1)[:, 0])  # also through a view


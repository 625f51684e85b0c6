"""The ingest stages, one by one and every verdict, without a broker: payloads go straight into
``Ingest.take`` as the coordinator hands them over after reassembly."""

import json
import math
import struct

import msgpack
import pytest
import torch

from coordinator.ingest import APPLIED, DROPPED, GREETED, REFUSED, Ingest, NormBound, Senders
from coordinator.privacy import GaussianPrivacy
from coordinator.runlog import RunLog
from coordinator.staleness import staleness_weight
from coordinator.state import FederationState
from coordinator.strategies import FedAsync, FedBuff
from shared.codecs import Layout, encode_tensors, get_codec
from shared.protocol import (
    PROTOCOL_VERSION, Hello, PartSpec, SnapshotHeader, TensorSpec, UpdateHeader, encode_payload, new_id, now,
)

SHAPES = {"w": (4, 3), "b": (3,)}


def federation(tmp_path, strategy=None, **ingest_settings):
    params = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    state = FederationState(run_id=new_id(), params=params, layout=Layout.of(params))
    strategy = strategy or FedAsync(alpha=0.5)
    strategy.prepare(params)
    runlog = RunLog(tmp_path)
    ingest_settings.setdefault("senders", Senders(frozenset({"fedq"})))
    return Ingest(state, strategy, runlog, **ingest_settings)


def update(ingest, value=0.1, *, site="site-1", base=None, run_id=None, codec="fp32", tensors=None, update_id=None,
           samples=10):
    """An update's payload, as a site's worker would encode it."""
    delta = tensors if tensors is not None else {name: torch.full(shape, value) for name, shape in SHAPES.items()}
    specs, parts = encode_tensors(delta, get_codec(codec))
    header = UpdateHeader(
        protocol=PROTOCOL_VERSION, update_id=update_id or new_id(), run_id=run_id or ingest.state.run_id, site=site,
        base_version=ingest.state.version if base is None else base, num_samples=samples, train_seconds=0.1,
        tensors=specs,
    )
    return header.update_id, memoryview(bytearray(b"".join(encode_payload(header, parts))))


def events(tmp_path, kind):
    return [e for e in map(json.loads, (tmp_path / "events.jsonl").read_text().splitlines()) if e["event"] == kind]


def unchanged(ingest):
    return all(torch.count_nonzero(t) == 0 for t in ingest.state.params.values()) and ingest.state.version == 0


# -- decode --------------------------------------------------------------------------------------


def test_bytes_that_are_no_payload_are_refused(tmp_path):
    ingest = federation(tmp_path)
    verdict = ingest.take(memoryview(b"\x01\x00"), "fedq")
    assert verdict.outcome == REFUSED and "too short" in verdict.reason and unchanged(ingest)


def test_a_payload_of_another_kind_does_not_belong_on_the_updates_queue(tmp_path):
    ingest = federation(tmp_path)
    snapshot = SnapshotHeader(protocol=PROTOCOL_VERSION, run_id=ingest.state.run_id, version=0, created_at=now())
    verdict = ingest.take(memoryview(b"".join(encode_payload(snapshot, []))), "fedq")
    assert verdict.outcome == REFUSED and "a snapshot payload does not belong on the updates queue" in verdict.reason


def test_an_error_no_check_foresaw_is_a_refusal_naming_the_stage_not_a_crash(tmp_path):
    ingest = federation(tmp_path)
    # numpy cannot make an array of 65 dimensions: decoding raises ValueError, not ProtocolError.
    shape = (1,) * 65
    spec = TensorSpec(name="w", shape=shape, codec="fp32", parts=(PartSpec(dtype="float32", shape=shape),))
    header = UpdateHeader(protocol=PROTOCOL_VERSION, update_id=new_id(), run_id=ingest.state.run_id, site="site-1",
                          base_version=0, num_samples=1, train_seconds=0.0, tensors=(spec,))
    raw = msgpack.packb(header.model_dump(mode="python"), use_bin_type=True)
    framed = struct.pack("<I", len(raw)) + raw
    payload = framed + bytes(-len(framed) % 4) + bytes(4)  # the part, aligned to its item size
    verdict = ingest.take(memoryview(payload), "fedq")
    assert verdict.outcome == REFUSED and verdict.reason.startswith("decode failed: ValueError")
    assert unchanged(ingest)


# -- identify ------------------------------------------------------------------------------------


@pytest.mark.parametrize("user, why", [(None, "carries no user_id"), ("site-2", "user 'site-2' may not send for site 'site-1'")])
def test_a_sender_the_broker_did_not_vouch_for_this_site_is_refused(tmp_path, user, why):
    ingest = federation(tmp_path)
    _, payload = update(ingest)
    verdict = ingest.take(payload, user)
    assert verdict.outcome == REFUSED and why in verdict.reason and unchanged(ingest)
    assert "site-1" not in ingest.runlog.bytes_in, "nothing is counted for a site that did not send it"


def test_a_sites_own_user_and_a_mapped_user_may_send_for_it(tmp_path):
    ingest = federation(tmp_path, senders=Senders(site_of={"lab-7": "site-1"}))
    assert ingest.take(update(ingest)[1], "site-1").outcome == APPLIED
    assert ingest.take(update(ingest)[1], "lab-7").outcome == APPLIED
    assert ingest.take(update(ingest)[1], "fedq").outcome == REFUSED, "no user may speak for any site here"


# -- greet, receive --------------------------------------------------------------------------------


def test_a_hello_is_greeted_and_the_site_is_seen(tmp_path):
    ingest = federation(tmp_path)
    hello = memoryview(b"".join(encode_payload(Hello(protocol=PROTOCOL_VERSION, site="site-3"), [])))
    verdict = ingest.take(hello, "site-3")
    assert verdict.outcome == GREETED and verdict.site == "site-3"
    assert "site-3" in ingest.state.sites_seen and "site-3" in ingest.runlog.last_seen and unchanged(ingest)


def test_an_updates_bytes_count_against_its_site(tmp_path):
    ingest = federation(tmp_path)
    _, payload = update(ingest)
    ingest.take(payload, "fedq")
    assert ingest.runlog.bytes_in["site-1"] == len(payload) and "site-1" in ingest.state.sites_seen


# -- current run, replay, staleness --------------------------------------------------------------------


def test_an_update_from_another_run_is_dropped_and_counted_once(tmp_path):
    ingest = federation(tmp_path)
    update_id, payload = update(ingest, run_id=new_id())
    verdict = ingest.take(payload, "fedq")
    assert verdict.outcome == DROPPED and "not the current run" in verdict.reason and unchanged(ingest)
    assert ingest.state.ledger.entries[update_id].applied_at is None and ingest.runlog.dropped == 1
    assert events(tmp_path, "dropped")[0]["update_id"] == update_id


def test_an_update_counted_already_is_refused_as_a_replay(tmp_path):
    ingest = federation(tmp_path)
    update_id, payload = update(ingest)
    assert ingest.take(payload, "fedq").outcome == APPLIED
    moved = {name: t.clone() for name, t in ingest.state.params.items()}
    verdict = ingest.take(payload, "fedq")
    assert verdict.outcome == REFUSED and f"update {update_id} was already counted" in verdict.reason
    assert all(torch.equal(moved[name], t) for name, t in ingest.state.params.items()) and ingest.state.version == 1


def test_a_base_from_the_future_is_refused_and_a_stale_one_is_weighted(tmp_path):
    ingest = federation(tmp_path, FedAsync(alpha=0.5, staleness_weight=staleness_weight("polynomial", 0.5)))
    verdict = ingest.take(update(ingest, base=5)[1], "fedq")
    assert verdict.outcome == REFUSED and "base version 5 is newer than the current version 0" in verdict.reason
    for _ in range(3):
        ingest.take(update(ingest, 0.0)[1], "fedq")
    update_id, payload = update(ingest, 1.0, base=0)
    assert ingest.take(payload, "fedq").outcome == APPLIED
    [event] = [e for e in events(tmp_path, "update") if e["update_id"] == update_id]
    assert event["staleness"] == 3 and event["weight"] == pytest.approx(0.5 * 4**-0.5, rel=1e-5)


# -- validate, bound, privacy --------------------------------------------------------------------------


@pytest.mark.parametrize("tensors, why", [
    ({"w": torch.zeros(3, 4), "b": torch.zeros(3)}, "tensor 'w' has shape (3, 4), the model's is (4, 3)"),
    ({"w": torch.zeros(4, 3)}, "tensors missing from the payload: ['b']"),
    ({"w": torch.full((4, 3), math.nan), "b": torch.zeros(3)}, "holds NaN or infinite values"),
])
def test_tensors_that_do_not_fit_the_model_are_refused(tmp_path, tensors, why):
    ingest = federation(tmp_path)
    verdict = ingest.take(update(ingest, tensors=tensors)[1], "fedq")
    assert verdict.outcome == REFUSED and why in verdict.reason and unchanged(ingest)


def test_a_sparse_update_goes_in_without_a_dense_copy_and_is_checked(tmp_path):
    ingest = federation(tmp_path)
    tensors = {"w": torch.zeros(4, 3), "b": torch.tensor([0.0, 2.0, 0.0])}
    assert ingest.take(update(ingest, tensors=tensors, codec="topk")[1], "fedq").outcome == APPLIED
    assert ingest.state.params["b"][1].item() == pytest.approx(1.0) and torch.count_nonzero(ingest.state.params["w"]) == 0


def test_the_norm_bound_refuses_or_clips(tmp_path):
    refusing = federation(tmp_path / "refuse", norm_bound=NormBound(1.0, "refuse"))
    verdict = refusing.take(update(refusing, 1.0)[1], "fedq")
    assert verdict.outcome == REFUSED and "exceeds the bound 1" in verdict.reason and unchanged(refusing)
    clipping = federation(tmp_path / "clip", FedAsync(alpha=1.0), norm_bound=NormBound(1.0, "clip"))
    assert clipping.take(update(clipping, 1.0)[1], "fedq").outcome == APPLIED
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in clipping.state.params.values()))
    assert norm == pytest.approx(1.0, rel=1e-5)


def test_under_privacy_every_update_is_clipped_to_the_privacy_norm(tmp_path):
    privacy = GaussianPrivacy(clip_norm=0.5, noise_multiplier=1e-9, delta=1e-5, seed=0)
    ingest = federation(tmp_path, FedAsync(alpha=1.0, privacy=privacy))
    assert ingest.take(update(ingest, 1.0)[1], "fedq").outcome == APPLIED
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in ingest.state.params.values()))
    assert norm == pytest.approx(0.5, rel=1e-4)


# -- admit, submit, record -------------------------------------------------------------------------------


def test_the_strategy_drops_what_it_does_not_admit(tmp_path):
    ingest = federation(tmp_path, FedAsync(alpha=0.5, max_staleness=1))
    for _ in range(2):
        ingest.take(update(ingest, 0.0)[1], "fedq")
    update_id, payload = update(ingest, 1.0, base=0)
    verdict = ingest.take(payload, "fedq")
    assert verdict.outcome == DROPPED and verdict.reason == "staleness 2 exceeds the maximum of 1"
    assert ingest.state.ledger.entries[update_id].reason == verdict.reason and ingest.runlog.dropped_per_site["site-1"] == 1


def test_an_applied_update_moves_the_model_and_is_recorded(tmp_path):
    ingest = federation(tmp_path)
    update_id, payload = update(ingest, 0.2)
    verdict = ingest.take(payload, "fedq")
    assert (verdict.outcome, verdict.new_version, verdict.update_id) == (APPLIED, True, update_id)
    assert ingest.state.version == 1 and torch.allclose(ingest.state.params["w"], torch.full((4, 3), 0.1))
    entry = ingest.state.ledger.entries[update_id]
    assert (entry.site, entry.base_version, entry.applied_at) == ("site-1", 0, 0)
    assert ingest.runlog.applied == 1 and events(tmp_path, "update")[0]["bytes"] == len(payload)


def test_a_buffered_update_is_applied_without_a_new_version_until_the_buffer_is_full(tmp_path):
    ingest = federation(tmp_path, FedBuff(buffer_size=2))
    first, second = (ingest.take(update(ingest, 0.2, site=f"site-{i}")[1], "fedq") for i in range(2))
    assert (first.outcome, first.new_version) == (APPLIED, False)
    assert (second.outcome, second.new_version) == (APPLIED, True) and ingest.state.version == 1


class FailingFedAsync(FedAsync):
    def submit(self, params, update, staleness):
        raise RuntimeError("the strategy broke")


def test_a_stage_that_fails_refuses_the_update_and_records_nothing(tmp_path):
    ingest = federation(tmp_path, FailingFedAsync())
    update_id, payload = update(ingest)
    verdict = ingest.take(payload, "fedq")
    assert verdict.outcome == REFUSED and verdict.reason == "submit failed: RuntimeError: the strategy broke"
    assert update_id not in ingest.state.ledger and ingest.runlog.applied == 0 and unchanged(ingest)

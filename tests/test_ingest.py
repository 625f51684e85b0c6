"""The ingest stages, one by one and every verdict, without a broker: payloads go straight into
``Ingest.take`` as the coordinator hands them over after reassembly."""

import math
import struct
import time

import msgpack
import numpy as np
import pytest
import torch

from coordinator.ingest import APPLIED, DROPPED, DUPLICATE, GREETED, REFUSED, Ingest, NormBound
from coordinator.senders import Senders
from coordinator.privacy import GaussianPrivacy
from coordinator.runlog import RunLog, read_events
from coordinator.staleness import staleness_weight
from coordinator.state import FederationState
from coordinator.strategies import FedAsync, FedBuff
from shared.codecs import Layout, encode_tensors, get_codec
from shared.protocol import (
    PROTOCOL_VERSION, Hello, SnapshotHeader, UpdateHeader, encode_payload, new_id, now,
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


def framed(fields: dict, parts: tuple[np.ndarray, ...] = ()) -> memoryview:
    """A payload around any header, as a hostile sender would frame it (``encode_payload`` checks its input):
    each part aligned to its item size."""
    raw = msgpack.packb(fields, use_bin_type=True)
    payload = bytearray(struct.pack("<I", len(raw)) + raw)
    for part in parts:
        payload += bytes(-len(payload) % part.itemsize) + part.tobytes()
    return memoryview(payload)


def update_fields(ingest, **changes) -> dict:
    fields = {"protocol": PROTOCOL_VERSION, "kind": "update", "update_id": new_id(), "run_id": ingest.state.run_id,
              "site": "site-1", "base_version": 0, "num_samples": 1, "train_seconds": 0.0, "metrics": {}, "tensors": []}
    return {**fields, **changes}


def part_entry(name, shape, dtype="float32", codec="fp32", parts=None):
    return {"name": name, "shape": list(shape), "codec": codec, "params": {},
            "parts": parts if parts is not None else [{"dtype": dtype, "shape": list(shape)}]}


@pytest.mark.parametrize("entry, why", [
    # numpy makes no array of 65 dimensions (a ValueError of its own, which once stopped the coordinator).
    (part_entry("w", (1,) * 65), "at most 32 items"),
    (part_entry("w", (0, 2**63)), "less than or equal to 281474976710656"),
    # No dimension is too large, but their product is: no payload holds such a part.
    (part_entry("w", (0, 2**40, 2**40)), "which no"),
    # int8 parts of the right sizes (12 values and a scale), shaped as no codec writes them.
    (part_entry("w", (4, 3), codec="int8", parts=[{"dtype": "int8", "shape": [3, 4]}, {"dtype": "float32", "shape": [1]}]),
     "expected flat parts"),
])
def test_tensor_parts_shaped_to_break_numpy_are_refused_before_numpy_sees_them(tmp_path, entry, why):
    ingest = federation(tmp_path)
    bias = part_entry("b", (3,), codec=entry["codec"], parts=[{"dtype": "int8", "shape": [3]}, {"dtype": "float32", "shape": [1]}]
                      if entry["codec"] == "int8" else None)
    # What the int8 case's header declares; the others are refused before their parts are read.
    parts = (np.zeros((3, 4), np.int8), np.ones(1, np.float32), np.zeros(3, np.int8), np.ones(1, np.float32))
    verdict = ingest.take(framed(update_fields(ingest, tensors=[entry, bias]), parts), "fedq")
    assert verdict.outcome == REFUSED and why in verdict.reason, verdict.reason
    assert unchanged(ingest) and not ingest.runlog.stage_failures, "refused by a check, not by an accident"


@pytest.mark.parametrize("change, why", [
    ({"num_samples": 2**64 - 1}, "num_samples"),
    ({"base_version": 2**62}, "base_version"),
    ({"train_seconds": math.inf}, "finite number"),
    ({"metrics": {"loss": math.nan}}, "finite number"),
    ({"metrics": {f"m{i}": 1.0 for i in range(65)}}, "at most 64 items"),
    ({"metrics": {"nested": {"a": 1.0}}}, "metrics.nested"),
])
def test_header_values_out_of_bounds_are_refused(tmp_path, change, why):
    ingest = federation(tmp_path)
    verdict = ingest.take(framed(update_fields(ingest, **change)), "fedq")
    assert verdict.outcome == REFUSED and why in verdict.reason, verdict.reason
    assert unchanged(ingest) and not ingest.runlog.stage_failures


def test_a_sample_count_over_the_setting_is_refused(tmp_path):
    ingest = federation(tmp_path, max_num_samples=1000)
    verdict = ingest.take(update(ingest, samples=1001)[1], "fedq")
    assert verdict.outcome == REFUSED and "more than the 1000 an update may claim (FEDQ_MAX_NUM_SAMPLES)" in verdict.reason
    assert ingest.take(update(ingest, samples=1000)[1], "fedq").outcome == APPLIED


def test_a_header_of_many_empty_entries_is_refused_without_expanding(tmp_path):
    ingest = federation(tmp_path)
    # A quarter of a megabyte of empty maps: once 1.2 GB of validation errors.
    bloated = framed(update_fields(ingest, tensors=[{}] * 250_000))
    assert len(bloated) > 250_000
    started = time.monotonic()
    verdict = ingest.take(bloated, "fedq")
    assert verdict.outcome == REFUSED and "exceeds the limit" in verdict.reason
    fitting = framed(update_fields(ingest, tensors=[{}] * 200))  # within the limits: one error, not 200
    assert ingest.take(fitting, "fedq").outcome == REFUSED
    assert time.monotonic() - started < 1.0


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
    assert read_events(tmp_path, "dropped")[0]["update_id"] == update_id


def test_an_update_counted_already_is_a_duplicate_not_a_refusal(tmp_path):
    ingest = federation(tmp_path)
    update_id, payload = update(ingest)
    assert ingest.take(payload, "fedq").outcome == APPLIED
    moved = {name: t.clone() for name, t in ingest.state.params.items()}
    received = ingest.runlog.received
    verdict = ingest.take(payload, "fedq")
    assert verdict.outcome == DUPLICATE and f"update {update_id} was counted already" in verdict.reason
    assert all(torch.equal(moved[name], t) for name, t in ingest.state.params.items()) and ingest.state.version == 1
    assert ingest.runlog.duplicates_per_site == {"site-1": 1} and ingest.runlog.rejected == 0
    assert ingest.runlog.received == received, "a redelivery's bytes do not count against its site again"
    assert read_events(tmp_path, "duplicate") == [{"t": read_events(tmp_path, "duplicate")[0]["t"], "event": "duplicate",
                                              "site": "site-1", "update_id": update_id}]


def test_a_base_from_the_future_is_refused_and_a_stale_one_is_weighted(tmp_path):
    ingest = federation(tmp_path, FedAsync(alpha=0.5, staleness_weight=staleness_weight("polynomial", 0.5)))
    verdict = ingest.take(update(ingest, base=5)[1], "fedq")
    assert verdict.outcome == REFUSED and "base version 5 is newer than the current version 0" in verdict.reason
    for _ in range(3):
        ingest.take(update(ingest, 0.0)[1], "fedq")
    update_id, payload = update(ingest, 1.0, base=0)
    assert ingest.take(payload, "fedq").outcome == APPLIED
    [event] = [e for e in read_events(tmp_path, "update") if e["update_id"] == update_id]
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


@pytest.mark.parametrize("codec", ["fp32", "topk"])
def test_finite_values_too_large_to_merge_are_refused(tmp_path, codec):
    """3e38 is finite, and once merged made the model infinite, which stopped the coordinator."""
    ingest = federation(tmp_path)
    verdict = ingest.take(update(ingest, 3e38, codec=codec)[1], "fedq")
    assert verdict.outcome == REFUSED and "FEDQ_MAX_UPDATE_VALUE" in verdict.reason and "3e+38" in verdict.reason
    assert unchanged(ingest)
    assert ingest.take(update(ingest, 1e6, codec=codec)[1], "fedq").outcome == APPLIED, "large, not absurd"


def test_a_sparse_update_goes_in_without_a_dense_copy_and_is_checked(tmp_path):
    ingest = federation(tmp_path)
    tensors = {"w": torch.zeros(4, 3), "b": torch.tensor([0.0, 2.0, 0.0])}
    assert ingest.take(update(ingest, tensors=tensors, codec="topk")[1], "fedq").outcome == APPLIED
    assert ingest.state.params["b"][1].item() == pytest.approx(1.0) and torch.count_nonzero(ingest.state.params["w"]) == 0


def test_a_top_k_update_reaches_the_strategy_still_encoded(tmp_path):
    """Checks read the wire encoding (finite, largest value): FedBuff folds it in from its gaps
    without unpacking positions and values first."""
    seen = []

    class Watching(FedBuff):
        def submit(self, params, update, staleness):
            seen.append(update.delta.encoding is not None)
            return super().submit(params, update, staleness)

    ingest = federation(tmp_path, Watching(buffer_size=2))
    tensors = {"w": torch.zeros(4, 3), "b": torch.tensor([0.0, 2.0, 0.0])}
    for codec in ("topk", "topk-int8"):
        assert ingest.take(update(ingest, tensors=tensors, codec=codec)[1], "fedq").outcome == APPLIED
    assert seen == [True, True]


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
    assert ingest.runlog.applied == 1 and read_events(tmp_path, "update")[0]["bytes"] == len(payload)


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
    assert ingest.runlog.stage_failures == {"submit": 1}, "a gap in fedq's checks is counted"
    assert "the strategy broke" in read_events(tmp_path, "stage_failed")[0]["error"]


def test_a_buffer_closed_at_its_deadline_moves_the_model_to_a_new_version(tmp_path):
    ingest = federation(tmp_path, FedBuff(buffer_size=3, deadline=1.0))
    for site in ("site-1", "site-2"):
        assert ingest.take(update(ingest, 0.3, site=site)[1], "fedq").new_version is False
    opened = ingest.strategy._opened
    assert ingest.flush(opened + 0.5) is None and unchanged(ingest)
    outcome = ingest.flush(opened + 1.0)
    assert outcome.flushed == 2 and ingest.state.version == 1
    assert torch.allclose(ingest.state.params["b"], torch.full((3,), 0.3))
    assert read_events(tmp_path, "flushed") == [{**read_events(tmp_path, "flushed")[0], "updates": 2, "version": 1}]


def test_a_refused_answer_to_a_fedavg_round_counts_towards_closing_it(tmp_path):
    from coordinator.strategies import FedAvgSync

    ingest = federation(tmp_path, FedAvgSync(sites=2))
    assert ingest.take(update(ingest, 0.3, site="site-1")[1], "fedq").outcome == APPLIED
    broken = {name: torch.full(shape, math.nan) for name, shape in SHAPES.items()}
    verdict = ingest.take(update(ingest, site="site-2", tensors=broken)[1], "fedq")
    assert verdict.outcome == REFUSED and "NaN" in verdict.reason and verdict.new_version
    assert ingest.state.version == 1 and torch.allclose(ingest.state.params["b"], torch.full((3,), 0.3))
    assert read_events(tmp_path, "excused")[0]["site"] == "site-2"
    # A sender that may not speak for the site it names excuses nobody.
    ingest.take(update(ingest, 0.3, site="site-1")[1], "fedq")
    assert ingest.take(update(ingest, site="site-2", tensors=broken)[1], "site-1").outcome == REFUSED
    assert ingest.state.version == 1


def test_an_update_that_is_exactly_zero_is_taken_and_said_loudly(tmp_path, caplog):
    ingest = federation(tmp_path)
    update_id, payload = update(ingest, 0.0)
    with caplog.at_level("WARNING"):
        assert ingest.take(payload, "fedq").outcome == APPLIED
    assert "is exactly zero" in caplog.text
    assert read_events(tmp_path, "zero_update")[0]["update_id"] == update_id

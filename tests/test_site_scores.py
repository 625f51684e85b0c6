"""Federated evaluation without a broker: rounds of site scores (``coordinator.site_scores``), the
ingest stage that takes them, and the digits task's held-out split per site. A federation scored
at its sites alone is in tests/test_federation.py."""

import numpy as np
import pytest
import torch

from coordinator.ingest import REFUSED, SCORED
from coordinator.runlog import read_events
from coordinator.site_scores import SiteScores
from shared.digits_task import DigitsStraggler, dataset, site_indices, site_test_indices
from shared.protocol import PROTOCOL_VERSION, EvalReport, ProtocolError, encode_payload, new_id
from shared.task import SiteContext
from tests.test_ingest import federation


def report(site, round_, version, samples, run_id="0123456789abcdef", **metrics):
    return EvalReport(protocol=PROTOCOL_VERSION, report_id=new_id(), run_id=run_id, site=site, round=round_,
                      version=version, num_samples=samples, metrics=metrics)


def test_a_round_pools_by_samples_and_closes_when_every_site_seen_answered():
    scores = SiteScores(every=5, wait=60)
    assert scores.open_if_due(0, now=0.0) and scores.asking == 0
    assert not scores.open_if_due(7, now=1.0), "one round at a time"
    assert scores.add(report("a", 0, 0, 30, accuracy=0.5, loss=2.0), version_now=3) is None
    assert scores.close_if_done({"a", "b"}, now=2.0) is None, "site b has not answered"
    assert scores.add(report("b", 0, 2, 10, accuracy=0.9), version_now=3) is None
    pooled = scores.close_if_done({"a", "b"}, now=3.0)
    assert pooled.version == 0 and pooled.sites == 2 and pooled.samples == 40 and pooled.representative
    assert pooled.newest == 2, "site b scored version 2: the pooled score is of versions 0 to 2"
    assert pooled.metrics["accuracy"] == pytest.approx((0.5 * 30 + 0.9 * 10) / 40)
    assert pooled.metrics["loss"] == 2.0, "a metric is pooled over the sites that report it"
    assert scores.asking is None
    assert not scores.open_if_due(4, now=4.0) and scores.open_if_due(5, now=4.0), "every 5 versions"


def test_a_round_waits_no_longer_than_its_wait_and_few_answers_do_not_stand_for_the_federation():
    scores = SiteScores(every=1, wait=10)
    scores.open_if_due(3, now=0.0)
    sites = {"a", "b", "c"}
    assert scores.close_if_done(sites, now=100.0) is None, "no answer: nothing to pool"
    scores.add(report("a", 3, 3, 5, accuracy=1.0), version_now=3)
    assert scores.close_if_done(sites, now=9.0) is None
    pooled = scores.close_if_done(sites, now=10.0)
    assert pooled.sites == 1 and not pooled.representative and pooled.newest == 3
    scores.open_if_due(4, now=11.0)
    scores.add(report("a", 4, 4, 5, accuracy=1.0), version_now=4)
    scores.add(report("b", 4, 4, 5, accuracy=1.0), version_now=4)
    assert scores.close_if_done(sites, now=30.0).representative, "two of three sites"


def test_answers_to_another_round_or_twice_are_set_aside_and_impossible_ones_refused():
    scores = SiteScores(every=1, wait=10)
    scores.open_if_due(4, now=0.0)
    assert scores.add(report("a", 3, 3, 5, accuracy=1.0), version_now=4) == "round 3 is not open"
    assert scores.add(report("a", 4, 4, 5, accuracy=1.0), version_now=4) is None
    assert "answered round 4 already" in scores.add(report("a", 4, 4, 5, accuracy=0.0), version_now=4)
    with pytest.raises(ProtocolError, match="newer than the current"):
        scores.add(report("b", 4, 9, 5), version_now=4)
    with pytest.raises(ProtocolError, match="older than its round"):
        scores.add(report("b", 4, 2, 5), version_now=4)


def test_the_ingest_stage_takes_a_sites_score_and_refuses_what_no_site_should_send(tmp_path):
    ingest = federation(tmp_path, scores=SiteScores(every=1, wait=10))
    ingest.scores.open_if_due(0, now=0.0)

    def take(header, parts=()):
        return ingest.take(memoryview(bytearray(b"".join(encode_payload(header, list(parts))))), "fedq")

    verdict = take(report("site-1", 0, 0, 20, run_id=ingest.state.run_id, accuracy=0.75))
    assert verdict.outcome == SCORED and verdict.reason is None and "site-1" in ingest.state.sites_seen
    assert read_events(tmp_path, "site_evaluation")[0]["metrics"] == {"accuracy": 0.75}
    other_run = take(report("site-2", 0, 0, 20, run_id=new_id()))
    assert other_run.outcome == SCORED and other_run.reason.startswith("the evaluation is of run")
    assert ingest.scores.current.reports.keys() == {"site-1"}, "another run's score is set aside"
    assert "more than the" in take(report("site-2", 0, 0, 10**9, run_id=ingest.state.run_id)).reason
    with pytest.raises(ValueError):  # the schema itself refuses scores that are not finite numbers in bounds
        report("site-2", 0, 0, 5, accuracy=float("nan"))
    with pytest.raises(ValueError):
        report("site-2", 0, 0, 5, accuracy=1e300)
    unasked = federation(tmp_path / "unasked")
    verdict = unasked.take(memoryview(bytearray(b"".join(encode_payload(
        report("site-1", 0, 0, 5, run_id=unasked.state.run_id), [])))), "fedq")
    assert verdict.outcome == REFUSED and "asks no site to evaluate" in verdict.reason


def test_digits_sites_hold_out_the_test_split_so_their_pooled_score_is_the_central_one():
    task = DigitsStraggler()
    model = task.build_model()
    torch.manual_seed(1)
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(torch.randn_like(tensor) * 0.1)
    held_out = site_test_indices()
    assert sorted(np.concatenate(held_out)) == list(range(len(dataset()[3]))), "every test sample at one site"
    y_train, y_test = dataset()[2], dataset()[3]
    for train, test in zip(site_indices(), held_out):  # each site is scored on data like its own
        assert set(y_test[test]) <= set(y_train[train])
    results = [task.evaluate_site(model, SiteContext(site=f"site-{i}", version=0)) for i in range(10)]
    pooled = sum(r.metrics["accuracy"] * r.num_samples for r in results) / sum(r.num_samples for r in results)
    assert pooled == pytest.approx(task.evaluate(model)["accuracy"], abs=1e-6)

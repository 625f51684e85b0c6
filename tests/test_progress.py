"""Runs end: a site that never answers, or whose every update is refused, does not stall a round or a buffer."""

import pytest

from fedq.federation import run_federation, site_names
from coordinator.runlog import read_events
from tests.federation_helpers import SiteClient, constant_delta, event_for, running_coordinator, wait_for

pytestmark = pytest.mark.broker


def test_fedavg_with_a_site_whose_every_update_is_refused_still_closes_rounds_and_reaches_090(broker_url, tmp_path):
    """Rounds do not retrain: a refused answer was once waited for forever (now: until the deadline,
    which this test leaves at its default of ten minutes)."""
    # Nine sites: without the 3-second straggler, rounds take about a second. Their task moves its
    # model as model.to(device) does (tests/test_devices.py), which once made every update zero.
    moving = "tests.moving_task:MovingDigits"
    summary = run_federation(
        broker_url, tmp_path, site_names(9),
        coordinator={"strategy": "fedavg", "sites": 9, "stop_at_accuracy": 0.90, "max_seconds": 150, "task": moving},
        worker={"task": moving}, site_settings={"site-0": {"task": "tests.hostile_task:NonFiniteDigits"}},
    )
    assert summary["best_accuracy"] >= 0.90, summary["stop_reason"]
    assert summary["rejected_per_user"] and "site-0" not in summary["applied_per_site"]
    # A round waiting for the refused site would close only at the default deadline of 600 s,
    # past this run's 150: every round closed counting the refused answer.
    assert summary["final_version"] >= 2 and not read_events(tmp_path, "flushed")
    assert not read_events(tmp_path, "zero_update"), "the moving task's updates are what it trained"


def test_fedbuff_with_a_trimmed_mean_and_one_live_site_too_few_still_makes_versions(broker_url, tmp_path):
    clients = [SiteClient(broker_url, f"site-{i}") for i in range(3)]
    with running_coordinator(broker_url, tmp_path, strategy="fedbuff", buffer_size=4, aggregation="trimmed-mean",
                             trim_fraction=0.25, buffer_deadline=2.0) as coordinator:
        for client, value in zip(clients, (0.01, 0.02, 5.0)):
            event_for(tmp_path, client.send(coordinator, 0, constant_delta(coordinator, value)))
        assert coordinator.version == 0, "three of four: the buffer waits for its deadline"
        wait_for(lambda: coordinator.version == 1, 10, "the buffer closed at its deadline")
        assert [e["updates"] for e in read_events(tmp_path, "flushed")] == [3]
    for client in clients:
        client.close()

"""Central differential privacy: clipping, calibrated noise, and epsilon from the accountant."""

import pytest
import torch

from coordinator.privacy import GaussianPrivacy
from coordinator.strategies import FedAsync, FedBuff, Update
from tests.federation_helpers import SiteClient, constant_delta, event_for, running_coordinator, wait_for


def test_noise_has_the_calibrated_spread_and_each_release_is_counted():
    privacy = GaussianPrivacy(clip_norm=2.0, noise_multiplier=1.5, delta=1e-5, seed=0)
    aggregate = {"w": torch.zeros(200_000)}
    privacy.release(aggregate, sensitivity=0.25)
    assert aggregate["w"].std().item() == pytest.approx(1.5 * 2.0 * 0.25, rel=0.01)
    assert privacy.releases == 1


def test_epsilon_grows_with_releases_and_shrinks_with_noise():
    quiet, loud = GaussianPrivacy(1.0, 0.8, 1e-5, seed=0), GaussianPrivacy(1.0, 2.0, 1e-5, seed=0)
    assert quiet.epsilon() == 0.0
    for privacy in (quiet, loud):
        privacy.releases = 100
    eps_100 = quiet.epsilon()
    quiet.releases = 1000
    assert 0 < loud.epsilon() < eps_100 < quiet.epsilon()


def test_fedbuff_under_privacy_weights_sites_equally_and_takes_one_update_each():
    privacy = GaussianPrivacy(clip_norm=1.0, noise_multiplier=1e-9, delta=1e-5, seed=0)
    strategy = FedBuff(buffer_size=2, privacy=privacy)
    params = {"w": torch.zeros(1)}
    first = Update("0" * 16, "site-1", 0, 1000, {"w": torch.tensor([1.0])})
    strategy.submit(params, first, staleness=0)
    assert "differential privacy takes one per site" in strategy.admit(first, staleness=0)
    strategy.submit(params, Update("1" * 16, "site-2", 0, 1, {"w": torch.tensor([3.0])}), staleness=0)
    assert params["w"].item() == pytest.approx(2.0, abs=1e-6), "sample counts do not weight updates under DP"
    assert privacy.releases == 1
    with pytest.raises(ValueError, match="calibrated for the mean"):
        FedBuff(buffer_size=3, aggregation="median", privacy=privacy)


def test_fedasync_adds_noise_to_each_update_without_touching_the_sent_one():
    privacy = GaussianPrivacy(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, seed=0)
    update = Update("0" * 16, "site-1", 0, 1, {"w": torch.zeros(10_000)})
    params = {"w": torch.zeros(10_000)}
    FedAsync(alpha=1.0, privacy=privacy).submit(params, update, staleness=0)
    assert params["w"].std().item() == pytest.approx(1.0, rel=0.05)
    assert torch.equal(update.delta["w"], torch.zeros(10_000))


@pytest.mark.broker
def test_the_coordinator_clips_updates_and_reports_epsilon(broker_url, tmp_path):
    client = SiteClient(broker_url)
    with running_coordinator(broker_url, tmp_path, strategy="fedasync", alpha=1.0, staleness="constant",
                             dp_noise_multiplier=1e-6, dp_clip_norm=0.5) as coordinator:
        before = {k: v.clone() for k, v in coordinator.params.items()}
        event_for(tmp_path, client.send(coordinator, 0, constant_delta(coordinator, 1.0)))
        wait_for(lambda: coordinator.version == 1, 10, "the update")
        moved = torch.cat([(t - before[k]).reshape(-1) for k, t in coordinator.params.items()])
        assert moved.norm().item() == pytest.approx(0.5, rel=1e-3), "clipped to dp_clip_norm"
        assert wait_for(lambda: coordinator.last_metrics.get("epsilon"), 10, "epsilon of the first release") > 0
    client.close()


def test_a_buffer_closed_at_its_deadline_gets_noise_for_the_updates_it_held():
    privacy = GaussianPrivacy(clip_norm=1.0, noise_multiplier=2.0, delta=1e-5, seed=0)
    strategy = FedBuff(buffer_size=8, privacy=privacy, deadline=1.0)
    params = {"w": torch.zeros(100_000)}
    for i in range(2):
        strategy.submit(params, Update(f"{i:016x}", f"site-{i}", 0, 1, {"w": torch.zeros(100_000)}), staleness=0)
    assert strategy.flush(params, strategy._opened + 1.0).flushed == 2
    # The mean of 2 moves by at most C / 2 when one update changes: noise of sigma * C / 2, not C / 8.
    assert float(params["w"].std()) == pytest.approx(2.0 * 1.0 / 2, rel=0.02)

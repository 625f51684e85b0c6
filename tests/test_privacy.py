"""Central differential privacy: clipping, calibrated noise, and epsilon from the accountant."""

import math

import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from coordinator.ingest import APPLIED
from coordinator.privacy import GaussianPrivacy
from coordinator.server import Coordinator
from coordinator.settings import CoordinatorSettings
from coordinator.strategies import FedAsync, FedBuff, Update
from shared.codecs import Layout, encode_tensors, get_codec
from shared.deltas import SparseDelta
from shared.protocol import PROTOCOL_VERSION, UpdateHeader, encode_payload, new_id
from shared.settings import load_settings
from shared.task import load_task
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


# -- only what trains ----------------------------------------------------------------------------


LAYOUT = Layout((("weight", (2, 3)), ("running_var", (3,)), ("bias", (3,))))


def test_tensors_that_do_not_train_are_neither_moved_by_updates_nor_noised():
    privacy = GaussianPrivacy(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, seed=0)
    assert privacy.cover(LAYOUT, {"weight", "bias"}) == ("running_var",)
    dense = {"weight": torch.full((2, 3), 3.0), "running_var": torch.full((3,), -50.0), "bias": torch.full((3,), 4.0)}
    privacy.clip(dense)
    assert torch.equal(dense["running_var"], torch.zeros(3))
    assert torch.cat([dense["weight"].reshape(-1), dense["bias"]]).norm().item() == pytest.approx(1.0, rel=1e-6)
    # Flat positions 6..8 are running_var's in a sparse update.
    sparse = SparseDelta(LAYOUT.shapes, torch.tensor([0, 6, 8, 9]), torch.tensor([3.0, -50.0, -50.0, 4.0]))
    privacy.clip(sparse)
    assert sparse.values.tolist() == pytest.approx([0.6, 0.0, 0.0, 0.8], rel=1e-6)
    aggregate = {name: torch.zeros(shape) for name, shape in LAYOUT.shapes}
    privacy.release(aggregate, sensitivity=1.0)
    assert torch.equal(aggregate["running_var"], torch.zeros(3))
    assert torch.count_nonzero(aggregate["weight"]) == 6 and torch.count_nonzero(aggregate["bias"]) == 3


def test_under_privacy_a_batchnorm_model_keeps_its_statistics_and_stays_finite(tmp_path):
    """Noise on running variances once made some negative after 5 releases, and evaluation NaN."""
    settings = load_settings(CoordinatorSettings, broker_url="amqp://127.0.0.1:1", run_dir=tmp_path, strategy="fedasync",
                             task="tests.hostile_task:BatchNormDigits", dp_noise_multiplier=1.0, dp_clip_norm=1.0)
    coordinator = Coordinator(settings, load_task(settings.task))
    statistics = {name: t.clone() for name, t in coordinator.params.items() if "running" in name}
    assert set(coordinator.strategy.privacy.kept) == set(statistics)
    for version in range(5):
        # What a site could send: its statistics pulled far below zero.
        delta = {name: torch.full_like(t, -10.0 if "running" in name else 0.01) for name, t in coordinator.params.items()}
        specs, parts = encode_tensors(delta, get_codec("fp32"))
        header = UpdateHeader(protocol=PROTOCOL_VERSION, update_id=new_id(), run_id=coordinator.run_id, site="site-1",
                              base_version=version, num_samples=10, train_seconds=0.1, tensors=specs)
        payload = memoryview(bytearray(b"".join(encode_payload(header, parts))))
        assert coordinator.ingest.take(payload, "fedq").outcome == APPLIED
    assert coordinator.version == 5
    assert all(torch.equal(coordinator.params[name], t) for name, t in statistics.items())
    assert math.isfinite(coordinator.task.evaluate(coordinator.model)["loss"])


# -- noise ---------------------------------------------------------------------------------------


def test_secure_noise_has_the_calibrated_spread_and_cannot_be_seeded_or_repeated():
    privacy = GaussianPrivacy(clip_norm=2.0, noise_multiplier=1.5, delta=1e-5, secure=True)
    first, second = {"w": torch.zeros(200_000)}, {"w": torch.zeros(200_000)}
    privacy.release(first, sensitivity=0.25)
    privacy.release(second, sensitivity=0.25)
    assert first["w"].std().item() == pytest.approx(0.75, rel=0.01) and abs(first["w"].mean().item()) < 0.01
    # Gaussian, not merely of that spread: kurtosis 3 (a uniform has 1.8).
    centred = first["w"].double() / 0.75
    assert (centred**4).mean().item() == pytest.approx(3.0, abs=0.1)
    assert not torch.equal(first["w"], second["w"])
    with pytest.raises(ValueError, match="cannot be seeded"):
        GaussianPrivacy(1.0, 1.0, 1e-5, seed=0, secure=True)


# -- accounting ----------------------------------------------------------------------------------


def exact_epsilon(noise_multiplier: float, sensitivity: float, delta: float) -> float:
    """The exact epsilon of one Gaussian release of that sensitivity, in units of the noise's
    scale (Balle and Wang 2018, Theorem 8), independent of any accountant."""
    a, b = sensitivity / (2 * noise_multiplier), noise_multiplier / sensitivity

    def excess(eps):
        return norm.cdf(a - eps * b) - math.exp(eps) * norm.cdf(-a - eps * b) - delta

    return brentq(excess, 0.0, 100.0)


@pytest.mark.parametrize("neighbours, sensitivity", [("zero-out", 1.0), ("replace-one", 2.0)])
def test_epsilon_is_a_bound_for_the_stated_neighbouring_relation(neighbours, sensitivity):
    """Noise sigma * C / n on a mean of n updates clipped to C: a zeroed update moves it by C / n,
    a replaced one by 2C / n. One release's exact epsilon for that sensitivity must be below what
    is reported, and the reported Renyi bound not far above it."""
    import dp_accounting

    privacy = GaussianPrivacy(clip_norm=1.0, noise_multiplier=2.0, delta=1e-5, seed=0, neighbours=neighbours)
    privacy.release({"w": torch.zeros(4)}, sensitivity=1 / 8)
    exact = exact_epsilon(2.0, sensitivity, 1e-5)
    assert exact <= privacy.epsilon() <= 1.5 * exact
    # Over 100 releases, the Renyi bound is no lower than what the PLD accountant finds for the same relation.
    privacy.releases = 100
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(dp_accounting.GaussianDpEvent(2.0 / sensitivity), 100)
    assert pld.get_epsilon(1e-5) <= privacy.epsilon() <= 1.3 * pld.get_epsilon(1e-5)

"""Defences against bad updates, by hand-computed results."""

import pytest
import torch

from coordinator.robust import clip_to_norm, coordinate_median, trimmed_mean, update_norm
from coordinator.strategies import FedBuff, Update


def test_norm_covers_all_tensors_and_clipping_scales_to_the_bound():
    delta = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}
    assert update_norm(delta) == pytest.approx(5.0)
    assert clip_to_norm(delta, 1.0) == pytest.approx(5.0)
    assert torch.allclose(delta["a"], torch.tensor([0.6])) and torch.allclose(delta["b"], torch.tensor([0.8]))
    assert clip_to_norm(delta, 10.0) == pytest.approx(1.0) and delta["a"].item() == pytest.approx(0.6)


def test_trimmed_mean_and_median_ignore_one_extreme_value():
    stacked = torch.tensor([[1.0, -2.0], [2.0, 0.0], [3.0, 2.0], [1000.0, -500.0], [4.0, 1.0]])
    assert torch.allclose(trimmed_mean(stacked, 1), torch.tensor([3.0, -1 / 3]))
    assert torch.allclose(coordinate_median(stacked), torch.tensor([3.0, 0.0]))
    assert torch.allclose(coordinate_median(stacked[:4]), torch.tensor([2.5, -1.0]))
    with pytest.raises(ValueError, match="cannot trim 3"):
        trimmed_mean(stacked, 3)


def updates(values):
    return [Update(f"{i:016x}", f"site-{i}", 0, 10 * (i + 1), {"w": torch.tensor([v])}) for i, v in enumerate(values)]


@pytest.mark.parametrize("aggregation, expected", [("trimmed-mean", 2.0), ("median", 2.0), ("mean", None)])
def test_fedbuff_robust_aggregations_by_hand(aggregation, expected):
    params = {"w": torch.zeros(1)}
    strategy = FedBuff(buffer_size=3, aggregation=aggregation, trim_fraction=0.34)
    outcomes = [strategy.submit(params, u, staleness=0) for u in updates([1.0, 2.0, 300.0])]
    assert [o.new_version for o in outcomes] == [False, False, True]
    if expected is None:  # the sample-weighted mean is dragged far away by the outlier
        expected = (10 * 1.0 + 20 * 2.0 + 30 * 300.0) / 60
    assert params["w"].item() == pytest.approx(expected)


def test_a_trimmed_mean_that_trims_nothing_is_refused():
    with pytest.raises(ValueError, match="trims 0 from each side"):
        FedBuff(buffer_size=3, aggregation="trimmed-mean", trim_fraction=0.1)


def test_robust_buffer_survives_a_checkpoint_round_trip():
    strategy = FedBuff(buffer_size=3, aggregation="median")
    params = {"w": torch.zeros(1)}
    for u in updates([1.0, 5.0]):
        strategy.submit(params, u, staleness=0)
    tensors, values = strategy.state()
    restored = FedBuff(buffer_size=3, aggregation="median")
    restored.restore(tensors, values)
    restored.submit(params, updates([0.0, 0.0, 3.0])[2], staleness=0)
    assert params["w"].item() == pytest.approx(3.0)


def test_robust_buffers_take_one_update_per_site():
    strategy = FedBuff(buffer_size=3, aggregation="median")
    first = updates([1.0])[0]
    strategy.submit({"w": torch.zeros(1)}, first, staleness=0)
    assert "already has an update in this buffer" in strategy.admit(first, staleness=0)
    assert FedBuff(buffer_size=3).admit(first, staleness=0) is None, "the plain mean takes any number"


def test_a_trimmed_mean_closed_early_still_trims_and_a_tiny_one_takes_the_median():
    params = {"w": torch.zeros(1)}
    strategy = FedBuff(buffer_size=5, aggregation="trimmed-mean", trim_fraction=0.2, deadline=1.0)
    for u in updates([1.0, 2.0, 3.0, 400.0]):  # four of five: floor(0.2 * 4) is 0, but one is still trimmed
        strategy.submit(params, u, staleness=0)
    strategy.flush(params, strategy._opened + 1.0)
    assert params["w"].item() == pytest.approx(2.5)
    params = {"w": torch.zeros(1)}
    strategy = FedBuff(buffer_size=5, aggregation="trimmed-mean", trim_fraction=0.2, deadline=1.0)
    for u in updates([1.0, 500.0]):
        strategy.submit(params, u, staleness=0)
    strategy.flush(params, strategy._opened + 1.0)
    assert params["w"].item() == pytest.approx(250.5), "two updates: their median, the mean of the middle pair"

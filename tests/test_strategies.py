"""The aggregation math, against results computed by hand."""

import time

import pytest
import torch

from coordinator.server_optimizers import SERVER_OPTIMIZERS, FedAdam, FedYogi, ServerSGD
from coordinator.settings import CoordinatorSettings
from shared.settings import SettingsError, load_settings
from coordinator.stand_ins import StandIns
from coordinator.staleness import constant, staleness_weight
from coordinator.strategies import STRATEGIES, FedAsync, FedAvgSync, FedBuff, Update
from shared.deltas import SparseDelta


def params(*values):
    return {"w": torch.tensor(list(values), dtype=torch.float32)}


def update(site, delta, n=1, base=0):
    return Update(update_id=f"{site:0>16}", site=str(site), base_version=base, num_samples=n, delta={"w": torch.tensor(delta)})


def test_fedasync_mixes_by_alpha_times_staleness_weight():
    p = params(1.0, 2.0)
    strategy = FedAsync(alpha=0.5, staleness_weight=staleness_weight("polynomial", a=0.5))
    outcome = strategy.submit(p, update(1, [4.0, -2.0]), staleness=3)
    # weight = 0.5 * (1 + 3) ** -0.5 = 0.25
    assert outcome.new_version and outcome.weight == pytest.approx(0.25)
    assert torch.allclose(p["w"], torch.tensor([2.0, 1.5]))


def test_fedasync_at_zero_staleness_is_the_papers_mixing():
    base = params(1.0, -1.0)
    site_model = torch.tensor([3.0, 0.0])
    p = {"w": base["w"].clone()}
    FedAsync(alpha=0.3).submit(p, update(1, (site_model - base["w"]).tolist()), staleness=0)
    assert torch.allclose(p["w"], 0.7 * base["w"] + 0.3 * site_model)


def test_fedbuff_waits_for_k_then_steps_along_the_weighted_mean():
    p = params(0.0, 0.0)
    strategy = FedBuff(buffer_size=2, staleness_weight=staleness_weight("polynomial", a=1.0))
    first = strategy.submit(p, update(1, [1.0, 2.0], n=30), staleness=0)
    assert not first.new_version and torch.equal(p["w"], torch.zeros(2))
    second = strategy.submit(p, update(2, [4.0, -4.0], n=10), staleness=1)
    # (30 * 1 * [1, 2] + 10 * 0.5 * [4, -4]) / 40 = [50, 40] / 40
    assert second.new_version and second.weight == pytest.approx(0.5)
    assert torch.allclose(p["w"], torch.tensor([1.25, 1.0]))
    assert strategy.sites == [] and strategy.samples == 0  # buffer emptied


def test_fedbuff_without_a_fixed_size_takes_a_quarter_of_the_sites_active_in_the_last_minute_and_at_least_three(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("coordinator.strategies.time.monotonic", lambda: clock[0])
    p = params(0.0)
    strategy = FedBuff(buffer_size=None, active_seconds=60.0)
    made = []
    for site in ["s0", "s1", "s2", "s3", "s4", "s5", "s0"]:
        made.append(strategy.submit(p, update(site, [1.0]), staleness=0).new_version)
    # active sites after each: 1 2 3 4 5 6 6; K = max(min(3, active), ceil(active / 4)): 1 2 3 3 3 3 3;
    # buffer: 1 1 2 3 1 2 3
    assert made == [True, False, False, True, False, False, True]
    assert strategy.size(clock[0]) == 3
    for site in range(6, 17):  # eleven more sites: 17 active
        strategy.submit(p, update(f"s{site}", [1.0]), staleness=0)
    assert strategy.size(clock[0]) == 5, "ceil(17 / 4)"
    clock[0] += 61.0  # a minute of silence: only the site that speaks next is active
    assert strategy.submit(p, update("s1", [1.0]), staleness=0).new_version and strategy.size(clock[0]) == 1
    assert FedBuff(buffer_size=4).size(0.0) == 4, "a fixed K is K"


def test_the_default_buffer_follows_the_active_sites():
    """The coordinator with no settings: FedBuff whose buffer is a quarter of the active sites."""
    settings = load_settings(CoordinatorSettings)
    strategy = STRATEGIES[settings.strategy].from_settings(settings)
    assert isinstance(strategy, FedBuff) and strategy.buffer_size is None
    p = params(0.0)
    for site in range(17):
        strategy.submit(p, update(f"s{site}", [1.0]), staleness=0)
    assert strategy.size(time.monotonic()) == 5, "seventeen active sites: ceil(17 / 4)"


def test_an_absent_sites_latest_update_joins_each_step_weighted_by_its_age_until_it_sends_again():
    p = params(0.0)
    strategy = FedBuff(buffer_size=2, stand_in_mb=1.0, staleness_weight=staleness_weight("polynomial", a=1.0))
    strategy.submit(p, update("c", [6.0], n=10), staleness=0)
    assert strategy.submit(p, update("a", [2.0], n=10), staleness=0).new_version
    assert p["w"].item() == pytest.approx(4.0), "(10 * 6 + 10 * 2) / 20; nobody is away yet"
    strategy.stand_ins.left("c")
    strategy.submit(p, update("a", [1.0], n=10), staleness=0)
    assert strategy.submit(p, update("b", [4.0], n=20), staleness=0).new_version
    # c's update came at step 0 with staleness 0, and this is the step after step 1: age 1, weight
    # 1 / (1 + 1); its share is its 10 samples: (10 * 1 + 20 * 4 + 10 * 0.5 * 6) / (10 + 20 + 10) = 3
    assert p["w"].item() == pytest.approx(7.0)
    strategy.submit(p, update("c", [2.0], n=10), staleness=1)
    assert strategy.submit(p, update("a", [2.0], n=10), staleness=0).new_version
    assert p["w"].item() == pytest.approx(7.0 + (10 * 0.5 * 2 + 10 * 2) / 20), "c sent again: no stand-in"
    assert strategy.stand_ins.away == set()


def test_stand_ins_ask_about_quiet_sites_keep_within_their_budget_and_expire():
    stand_ins = StandIns(constant, budget=2 * 4 * 3, lifetime=60.0)  # two sites' copies of 3 float32
    delta = {"w": torch.zeros(3)}
    for site, at in (("a", 100.0), ("b", 100.0), ("a", 100.2), ("a", 100.6), ("c", 100.0)):
        stand_ins.keep(site, delta, 1.0, 0, 0, now=at)
    assert set(stand_ins.kept) == {"a", "b"} and stand_ins.nbytes == 24, "c is past the budget"
    assert stand_ins.kept["a"].interval == pytest.approx(0.5 * (0.2 + 0.4))
    assert stand_ins.to_ask(100.9) == [], "quiet for less than a second"
    # at 101.7, b has been quiet 1.7 s and a 1.1 s, both past a second (twice a's smoothed interval is 0.6 s):
    # b is asked about first
    assert stand_ins.to_ask(101.7) == ["b", "a"]
    stand_ins.left("b")
    stand_ins.left("c")  # no stand-in, so it cannot stand in
    assert stand_ins.away == {"b"} and stand_ins.to_ask(101.7) == ["a"]
    added = []
    assert stand_ins.fold(lambda d, weight, share: added.append((weight, share)), step=5) == 1.0 and added == [(1.0, 1.0)]
    stand_ins.keep("a", delta, 1.0, 0, 0, now=150.0)
    assert stand_ins.expire(160.5) == ["b"], "b's minute is up; it was standing in"
    assert stand_ins.away == set() and set(stand_ins.kept) == {"a"} and stand_ins.nbytes == 12
    assert stand_ins.expire(211.0) == [] and stand_ins.kept == {}, "a's minute is up too; it was not away"
    stand_ins.keep("c", delta, 1.0, 0, 0, now=211.0)
    assert "c" in stand_ins.kept, "the room was freed"


def test_a_sites_stand_in_is_one_copy_overwritten_by_each_update_dense_or_sparse():
    stand_ins = StandIns(constant, budget=12, lifetime=60.0)
    stand_ins.keep("a", {"w": torch.tensor([1.0, 2.0, 3.0])}, 1.0, 0, 0, now=0.0)
    copy = stand_ins.kept["a"].delta["w"]
    stand_ins.keep("a", {"w": torch.tensor([4.0, 5.0, 6.0])}, 1.0, 0, 0, now=1.0)
    assert stand_ins.kept["a"].delta["w"] is copy and copy.tolist() == [4.0, 5.0, 6.0]
    sparse = SparseDelta((("w", (3,)),), torch.tensor([1]), torch.tensor([7.0]))
    stand_ins.keep("a", sparse, 1.0, 0, 0, now=2.0)
    assert stand_ins.kept["a"].delta["w"] is copy and copy.tolist() == [0.0, 7.0, 0.0]
    assert stand_ins.nbytes == 12


def test_stand_ins_only_where_every_update_counts_the_same_way():
    assert FedBuff(buffer_size=None, stand_in_mb=1.0).stand_ins is not None
    assert FedBuff(buffer_size=None).stand_ins is None, "no budget: off"
    assert FedBuff(buffer_size=5, aggregation="median", stand_in_mb=1.0).stand_ins is None
    assert FedAvgSync(sites=3).stand_ins is None, "the synchronous baseline waits for its sites"
    settings = load_settings(CoordinatorSettings)
    assert STRATEGIES[settings.strategy].from_settings(settings).stand_ins.budget == 256_000_000, "on by default"


def test_fedbuff_needs_a_fixed_size_for_robust_aggregation_and_privacy():
    with pytest.raises(ValueError, match="median needs a fixed buffer_size"):
        FedBuff(buffer_size=None, aggregation="median")
    with pytest.raises(SettingsError, match="set buffer_size"):
        load_settings(CoordinatorSettings, aggregation="trimmed-mean", buffer_size="")
    with pytest.raises(SettingsError, match="differential privacy is calibrated for a fixed number"):
        load_settings(CoordinatorSettings, dp_noise_multiplier=1.0, dp_clip_norm=1.0, buffer_size="")
    assert load_settings(CoordinatorSettings, aggregation="median", buffer_size=5).buffer_size == 5
    assert load_settings(CoordinatorSettings, buffer_size="").buffer_size is None, "empty: a quarter of the active sites"


def test_fedbuff_with_all_sites_fresh_and_sgd_step_one_is_fedavg():
    torch.manual_seed(0)
    start = {"a": torch.randn(5, 3), "b": torch.randn(3)}
    deltas = [{k: torch.randn_like(v) for k, v in start.items()} for _ in range(4)]
    samples = [7, 100, 33, 1]
    p = {k: v.clone() for k, v in start.items()}
    strategy = FedBuff(buffer_size=4, optimizer=ServerSGD(lr=1.0))
    for i, (d, n) in enumerate(zip(deltas, samples)):
        strategy.submit(p, Update(f"{i:0>16}", f"s{i}", 0, n, d), staleness=0)
    for k in start:
        fedavg = start[k] + sum(n * d[k] for d, n in zip(deltas, samples)) / sum(samples)
        assert torch.allclose(p[k], fedavg, atol=1e-6)


def test_max_staleness_drops_with_a_reason():
    strategy = FedAsync(alpha=0.5, max_staleness=4)
    assert strategy.admit(update(1, [0.0]), staleness=4) is None
    assert strategy.admit(update(1, [0.0]), staleness=5) == "staleness 5 exceeds the maximum of 4"


def test_fedavg_round_takes_each_site_once_and_only_fresh_updates():
    p = params(0.0)
    strategy = FedAvgSync(sites=2)
    assert not strategy.retrain
    assert strategy.admit(update(1, [1.0]), staleness=0) is None
    strategy.submit(p, update(1, [1.0], n=1), staleness=0)
    assert "already answered" in strategy.admit(update(1, [5.0]), staleness=0)
    assert "closed" in strategy.admit(update(2, [5.0]), staleness=1)
    assert strategy.submit(p, update(2, [3.0], n=3), staleness=0).new_version
    assert torch.allclose(p["w"], torch.tensor([2.5]))


def test_server_sgd_momentum_accumulates():
    p = params(0.0)
    opt = ServerSGD(lr=0.5, momentum=0.9)
    opt.step(p, {"w": torch.tensor([1.0])})  # v = 1, x = 0.5
    opt.step(p, {"w": torch.tensor([1.0])})  # v = 1.9, x = 0.5 + 0.95
    assert p["w"].item() == pytest.approx(1.45)


def test_fedadam_first_step_by_hand():
    p = params(0.0)
    FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=0.01).step(p, {"w": torch.tensor([2.0])})
    m = 0.1 * 2.0
    v = 0.99 * 0.01**2 + 0.01 * 4.0
    assert p["w"].item() == pytest.approx(0.1 * m / (v**0.5 + 0.01), rel=1e-5)


def test_fedyogi_first_step_by_hand():
    p = params(0.0)
    FedYogi(lr=0.1, beta1=0.9, beta2=0.99, tau=0.01).step(p, {"w": torch.tensor([2.0])})
    m = 0.1 * 2.0
    v0 = 0.01**2
    v = v0 - 0.01 * 4.0 * (-1.0)  # sign(v0 - 4) = -1
    assert p["w"].item() == pytest.approx(0.1 * m / (v**0.5 + 0.01), rel=1e-5)


@pytest.mark.parametrize("name", ["adam", "yogi"])
def test_adaptive_server_optimizers_default_to_a_step_of_their_own_scale(name):
    """Each coordinate of an adaptive step is about lr, whatever the update's size: at SGD's 1.0, one
    step moved digits-straggler's weights about 50 times an update."""
    settings = load_settings(CoordinatorSettings, strategy="fedbuff", server_optimizer=name)
    optimizer = SERVER_OPTIMIZERS[name].from_settings(settings)
    assert optimizer.lr == SERVER_OPTIMIZERS[name].default_lr < ServerSGD.default_lr
    update = {"w": torch.full((1000,), 1e-3)}  # a typical small update
    p = params(0.0)
    p["w"] = torch.zeros(1000)
    optimizer.step(p, update)
    assert p["w"].abs().max().item() <= 2 * optimizer.lr
    assert SERVER_OPTIMIZERS[name].from_settings(settings.model_copy(update={"server_lr": 0.5})).lr == 0.5
    assert ServerSGD.from_settings(settings.model_copy(update={"server_optimizer": "sgd"})).lr == 1.0


def test_fedbuff_keeps_one_running_sum_across_versions_and_checkpoints_it_only_when_it_holds_updates():
    p = params(0.0, 0.0)
    strategy = FedBuff(buffer_size=2)
    strategy.prepare(p)
    storage = strategy.sum["w"].data_ptr()
    assert "buffer" not in strategy.state()[0], "an empty buffer is all zeros, not worth a checkpoint's bytes"
    strategy.submit(p, update(1, [1.0, 2.0]), staleness=0)
    assert torch.equal(strategy.state()[0]["buffer"]["w"], torch.tensor([1.0, 2.0]))
    strategy.submit(p, update(2, [3.0, 4.0]), staleness=0)
    assert torch.equal(p["w"], torch.tensor([2.0, 3.0]))
    # The next buffer starts from zeros in the same memory: no fresh allocation to page-fault.
    assert strategy.sum["w"].data_ptr() == storage and torch.equal(strategy.sum["w"], torch.zeros(2))
    strategy.submit(p, update(3, [2.0, 2.0]), staleness=0)
    restored = FedBuff(buffer_size=2)
    restored.prepare(params(0.0, 0.0))
    restored.restore(*strategy.state())
    restored.submit(p, update(4, [0.0, 2.0]), staleness=0)
    assert torch.equal(p["w"], torch.tensor([3.0, 5.0]))


def test_a_buffer_that_waited_past_its_deadline_steps_with_what_it_holds():
    p = params(0.0)
    strategy = FedBuff(buffer_size=3, deadline=5.0)
    strategy.submit(p, update(1, [1.0], n=1), staleness=0)
    strategy.submit(p, update(2, [3.0], n=3), staleness=0)
    opened = strategy._opened
    assert strategy.flush(p, opened + 4.9) is None and p["w"].item() == 0.0, "not before its deadline"
    outcome = strategy.flush(p, opened + 5.0)
    assert outcome.new_version and outcome.flushed == 2
    assert p["w"].item() == pytest.approx(2.5), "the sample-weighted mean of the two it held"
    assert strategy.sites == [] and strategy.flush(p, opened + 60) is None, "an empty buffer never flushes"


def test_without_a_deadline_a_buffer_waits_for_all():
    p = params(0.0)
    strategy = FedBuff(buffer_size=3, deadline=None)
    strategy.submit(p, update(1, [1.0]), staleness=0)
    assert strategy.flush(p, strategy._opened + 10**6) is None


def test_a_fedavg_round_closes_at_its_quorum_or_deadline_and_later_answers_are_dropped():
    p = params(0.0)
    strategy = FedAvgSync(sites=4, quorum=0.75, deadline=30.0)
    for site in (1, 2):
        strategy.submit(p, update(site, [float(site)]), staleness=0)
    assert strategy.submit(p, update(3, [3.0]), staleness=0).new_version, "three of four answered: the round closed"
    assert p["w"].item() == pytest.approx(2.0)
    assert "closed" in strategy.admit(update(4, [9.0]), staleness=1)
    strategy.submit(p, update(1, [4.0]), staleness=0)
    outcome = strategy.flush(p, strategy._opened + 30.0)
    assert outcome.new_version and outcome.flushed == 1 and p["w"].item() == pytest.approx(6.0)


def test_a_fedavg_round_counts_a_refused_answer_and_closes_without_it():
    """Rounds do not retrain: a site whose update was refused would otherwise be waited for until the deadline."""
    p = params(0.0)
    strategy = FedAvgSync(sites=3)
    strategy.submit(p, update(1, [1.0]), staleness=0)
    assert strategy.excuse(p, "2", staleness=1) is None and not strategy.excused, "another round's refusal"
    assert strategy.excuse(p, "2", staleness=0) is None, "two of three answered"
    assert "was refused already" in strategy.admit(update(2, [5.0]), staleness=0)
    tensors, values = strategy.state()
    resumed = FedAvgSync(sites=3)
    resumed.prepare(p)
    resumed.restore(tensors, values)
    assert resumed.excused == {"2"}
    outcome = strategy.submit(p, update(3, [3.0]), staleness=0)
    assert outcome.new_version and p["w"].item() == pytest.approx(2.0), "the mean of the two updates taken"
    assert not strategy.excused, "the next round waits for every site again"
    # The round's last answer may be the refused one.
    strategy.submit(p, update(1, [2.0]), staleness=0)
    strategy.submit(p, update(2, [2.0]), staleness=0)
    outcome = strategy.excuse(p, "3", staleness=0)
    assert outcome.new_version and outcome.flushed == 2 and p["w"].item() == pytest.approx(4.0)
    # A round whose every answer was refused starts again as a new version of the same model.
    for site in ("1", "2"):
        assert strategy.excuse(p, site, staleness=0) is None
    outcome = strategy.excuse(p, "3", staleness=0)
    assert outcome.new_version and outcome.flushed == 0 and p["w"].item() == pytest.approx(4.0)

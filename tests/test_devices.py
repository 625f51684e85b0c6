"""Tasks that move their model (``model.to(device)``): fedq reads and loads the model's values by
name, wherever the task left them, so nothing trains or scores a stale copy (a whole federation of
such tasks reaches 0.90 in tests/test_progress.py); the device setting; the run configuration."""

import pytest
import torch

from coordinator.runlog import read_events
from shared.settings import SettingsError, load_settings
from shared.model_state import load_values, trained_delta, trained_state
from tests.moving_task import reallocate
from worker.settings import WorkerSettings


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))


def test_values_loaded_by_name_reach_a_model_that_was_given_new_tensors():
    net = model()
    base = {name: torch.full_like(t, 0.5) for name, t in trained_state(net).items()}
    reallocate(net)  # what model.to("cuda") does to the tensors fedq would have kept
    load_values(net, base)
    assert all(torch.equal(t, base[name]) for name, t in trained_state(net).items())
    reallocate(net)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    delta = trained_delta(trained_state(net), base)
    assert torch.equal(delta["0.weight"], torch.ones(3, 4)) and torch.count_nonzero(delta["0.bias"]) == 0


def test_the_device_setting_is_resolved_and_checked():
    settings = load_settings(WorkerSettings, site="site-1")
    assert settings.device == "auto"
    assert settings.torch_device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert load_settings(WorkerSettings, site="site-1", device="cpu").torch_device == "cpu"
    with pytest.raises(SettingsError, match="FEDQ_DEVICE"):
        load_settings(WorkerSettings, site="site-1", device="toaster")


def test_a_run_configuration_must_be_flat_numbers_strings_and_booleans():
    from coordinator.settings import CoordinatorSettings

    settings = load_settings(CoordinatorSettings, run_config={"lr": 0.05, "local_epochs": 1, "note": "x", "on": True})
    assert settings.run_config == {"lr": 0.05, "local_epochs": 1, "note": "x", "on": True}
    assert isinstance(settings.run_config["local_epochs"], int), "an integer stays one (range() takes it)"
    for bad in ({"nested": {"a": 1}}, {"lr": float("nan")}, {"x": [1, 2]}):
        with pytest.raises(SettingsError, match="FEDQ_RUN_CONFIG"):
            load_settings(CoordinatorSettings, run_config=bad)


@pytest.mark.broker
def test_frozen_weights_stay_home_and_the_run_configuration_reaches_every_sites_task(broker_url, tmp_path):
    """Sites of a frozen-backbone task, configured from the centre: updates and snapshots carry the
    trained head alone, every site's task sees the run configuration, and a site that built other
    frozen weights says so and stops instead of training."""
    from fedq.federation import run_federation, site_names
    from tests.frozen_task import FrozenBackboneDigits

    task = "tests.frozen_task:FrozenBackboneDigits"
    # A limit, not the run's length (it ends at version 6, 24 s alone): in one full suite on a slow
    # day no update came within 60 s.
    summary = run_federation(
        broker_url, tmp_path, site_names(4), worker={"task": task},
        site_settings={"site-3": {"task": "tests.frozen_task:OtherBackboneDigits"}},
        coordinator={"task": task, "strategy": "fedasync", "max_versions": 6, "max_seconds": 150,
                     "run_config": {"lr": 0.05, "local_epochs": 1, "note": "from the centre"}})
    updates = read_events(tmp_path, "update")
    assert updates and all(e["metrics"]["config_lr"] == 0.05 and e["metrics"]["config_local_epochs"] == 1 for e in updates)

    model = FrozenBackboneDigits().build_model()
    trained = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad)
    assert frozen > 5 * trained
    assert max(e["bytes"] for e in updates) <= 1.3 * trained, "an fp32 update carries the trained head alone"
    snapshots = [e["bytes"] for e in read_events(tmp_path, "snapshot")]
    assert snapshots and max(snapshots) <= 1.3 * trained

    assert summary["worker_exit_codes"]["site-3"] == 2
    assert {e["site"] for e in updates} == {"site-0", "site-1", "site-2"}
    said = (tmp_path / "sites" / "site-3.log").read_text()
    assert "cannot train: the frozen part of its model" in said and "same pretrained weights" in said
    assert [e["site"] for e in read_events(tmp_path, "frozen_mismatch")] == ["site-3"]

"""Tasks that move their model (``model.to(device)``): fedq reads and loads the model's values by
name, wherever the task left them, so nothing trains or scores a stale copy (a whole federation of
such tasks reaches 0.90 in tests/test_progress.py); the device setting; the run configuration."""

import pytest
import torch

from shared.settings import SettingsError, load_settings
from shared.validation import float_state, load_values, trained_delta
from tests.moving_task import reallocate
from worker.settings import WorkerSettings


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))


def test_values_loaded_by_name_reach_a_model_that_was_given_new_tensors():
    net = model()
    base = {name: torch.full_like(t, 0.5) for name, t in float_state(net).items()}
    reallocate(net)  # what model.to("cuda") does to the tensors fedq would have kept
    load_values(net, base)
    assert all(torch.equal(t, base[name]) for name, t in float_state(net).items())
    reallocate(net)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    delta = trained_delta(float_state(net), base)
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
def test_the_run_configuration_reaches_every_sites_task(broker_url, tmp_path):
    import json

    from fedq.federation import run_federation, site_names

    run_federation(broker_url, tmp_path, site_names(3), worker={"task": "tests.config_task:ConfigDigits"},
                   coordinator={"strategy": "fedasync", "max_versions": 6, "max_seconds": 60,
                                "run_config": {"lr": 0.05, "local_epochs": 1, "note": "from the centre"}})
    updates = [e for e in map(json.loads, (tmp_path / "events.jsonl").read_text().splitlines()) if e["event"] == "update"]
    assert updates and all(e["metrics"]["config_lr"] == 0.05 and e["metrics"]["config_local_epochs"] == 1 for e in updates)

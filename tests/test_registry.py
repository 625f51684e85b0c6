"""One registry per kind of plug-in: settings, the command line and errors all read it."""

import subprocess
import sys

import pytest

from coordinator.aggregators import AGGREGATORS
from coordinator.server import make_strategy
from coordinator.server_optimizers import SERVER_OPTIMIZERS
from coordinator.settings import CoordinatorSettings
from coordinator.staleness import STALENESS
from coordinator.strategies import STRATEGIES, FedAsync
from shared.codecs import CODECS, get_codec
from shared.registry import Registry, UnknownChoice
from shared.settings import SettingsError, load_settings
from shared.task import Task, load_task
from worker.settings import WorkerSettings


def test_a_registry_names_its_choices_when_asked_for_another():
    kinds = Registry("colour")

    @kinds.register("red")
    class Red:
        """The colour of fire.

        More text that is not the summary."""

    assert Red.name == "red" and kinds["red"] is Red and kinds.names == ("red",)
    assert kinds.summary("red") == "The colour of fire"
    with pytest.raises(UnknownChoice, match="unknown colour 'blue'; choose one of red"):
        kinds["blue"]
    with pytest.raises(ValueError, match="registered twice"):
        kinds.register("red")(Red)


def test_a_strategy_registered_by_user_code_is_a_setting_a_strategy_and_not_in_anothers_way(monkeypatch):
    class HalfStep(FedAsync):
        """FedAsync at half the mixing weight."""

        @classmethod
        def from_settings(cls, settings):
            return cls(settings.alpha / 2)

    monkeypatch.setitem(STRATEGIES._entries, "half-step", HalfStep)
    HalfStep.name = "half-step"
    settings = load_settings(CoordinatorSettings, strategy="half-step", alpha=0.5)
    strategy = make_strategy(settings)
    assert isinstance(strategy, HalfStep) and strategy.alpha == 0.25
    with pytest.raises(SettingsError, match="server_optimizer applies to fedbuff and fedavg only"):
        load_settings(CoordinatorSettings, strategy="half-step", server_optimizer="adam")


@pytest.mark.parametrize("setting, registry", [
    ("strategy", STRATEGIES), ("aggregation", AGGREGATORS), ("staleness", STALENESS),
    ("server_optimizer", SERVER_OPTIMIZERS),
])
def test_coordinator_settings_take_exactly_the_registered_names(setting, registry):
    # The robust aggregations need a fixed buffer (the default follows the active sites).
    fixed = {"buffer_size": 5} if setting == "aggregation" else {}
    for name in registry:
        assert getattr(load_settings(CoordinatorSettings, **{setting: name}, **fixed), setting) == name
    with pytest.raises(SettingsError) as refused:
        load_settings(CoordinatorSettings, **{setting: "no-such-thing"}, **fixed)
    assert f"choose one of {', '.join(registry.names)}" in str(refused.value)


def test_the_worker_takes_every_registered_codec_and_no_other():
    for name in CODECS:
        settings = load_settings(WorkerSettings, site="site-1", codec=name)
        assert get_codec(settings.codec, settings.topk_fraction).name == name
    with pytest.raises(SettingsError, match=f"choose one of {', '.join(CODECS.names)}"):
        load_settings(WorkerSettings, site="site-1", codec="lzma")


def test_help_lists_every_registered_plug_in_with_its_summary():
    def helped(command):
        result = subprocess.run([sys.executable, "-m", "fedq", command, "--help"], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        return " ".join(result.stdout.split())  # argparse wraps long lines

    coordinator = helped("coordinator")
    for registry in (STRATEGIES, AGGREGATORS, STALENESS, SERVER_OPTIMIZERS):
        for name in registry:
            assert f"{name} {registry.summary(name)}" in coordinator, name
    worker = helped("worker")
    for name in CODECS:
        assert f"{name} {CODECS.summary(name)}" in worker, name
    demo = helped("demo")
    assert "{" + ",".join(STRATEGIES.names) + "}" in demo and "{" + ",".join(CODECS.names) + "}" in demo


def test_the_paths_users_type_keep_working():
    assert isinstance(load_task("shared.digits_task:DigitsStraggler"), Task)
    from shared.task import SiteContext, TrainResult  # noqa: F401 - the import is the test

    assert CoordinatorSettings.model_fields["task"].default == "shared.digits_task:DigitsStraggler"

from pathlib import Path

import pytest

from coordinator.settings import CoordinatorSettings
from fedq.settings_page import settings_table
from shared.settings import SettingsError, load_settings
from worker.settings import WorkerSettings


def test_flags_beat_environment_beat_defaults(monkeypatch):
    monkeypatch.setenv("FEDQ_ALPHA", "0.3")
    monkeypatch.setenv("FEDQ_BUFFER_SIZE", "7")
    settings = load_settings(CoordinatorSettings, buffer_size="5")
    assert (settings.alpha, settings.buffer_size, settings.strategy) == (0.3, 5, "fedbuff")


def test_dotenv_file_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("FEDQ_SITE=site-7\nFEDQ_CODEC=fp16\n")
    settings = load_settings(WorkerSettings)
    assert (settings.site, settings.codec) == ("site-7", "fp16")


def test_errors_name_the_variable_the_flag_and_the_fix(monkeypatch):
    monkeypatch.setenv("FEDQ_ALPHA", "1.5")
    with pytest.raises(SettingsError) as caught:
        load_settings(CoordinatorSettings, broker_url="http://nope")
    message = str(caught.value)
    assert "FEDQ_ALPHA (--alpha) = '1.5': Input should be less than or equal to 1" in message
    assert "FEDQ_BROKER_URL (--broker-url) = 'http://nope'" in message and "amqp://" in message
    assert "Fix the value" in message


def test_environment_beats_dotenv_and_empty_turns_an_optional_setting_off(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("FEDQ_SITE=site-7\nFEDQ_CODEC=fp16\nFEDQ_MAX_TASKS=4\n")
    monkeypatch.setenv("FEDQ_CODEC", "int8")
    monkeypatch.setenv("FEDQ_MAX_TASKS", "")
    settings = load_settings(WorkerSettings, site="site-8")
    assert (settings.site, settings.codec, settings.max_tasks) == ("site-8", "int8", None)
    assert load_settings(CoordinatorSettings, metrics_port="").metrics_port is None, "an empty flag too"


def test_the_settings_page_lists_every_setting_as_the_code_defines_it():
    page = (Path(__file__).parents[1] / "docs" / "settings.md").read_text()
    assert page == settings_table(), "docs/settings.md is out of date: python -m fedq.settings_page > docs/settings.md"
    for cls in (CoordinatorSettings, WorkerSettings):
        assert all(f"`FEDQ_{name.upper()}`" in page for name in cls.model_fields)


def test_worker_needs_a_valid_site_name(monkeypatch):
    monkeypatch.delenv("FEDQ_SITE", raising=False)
    with pytest.raises(SettingsError, match="FEDQ_SITE"):
        load_settings(WorkerSettings)
    with pytest.raises(SettingsError, match="should match pattern"):
        load_settings(WorkerSettings, site="../../etc")


def test_server_optimizer_with_fedasync_is_refused():
    with pytest.raises(SettingsError, match="server_optimizer applies to fedbuff and fedavg only"):
        load_settings(CoordinatorSettings, strategy="fedasync", server_optimizer="adam")

from pathlib import Path

import pytest

from coordinator.settings import CoordinatorSettings
from fedq.settings_page import settings_table
from shared import transport
from shared.settings import SettingsError, broker_urls, check_broker_urls, load_settings, redact_url
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


CLUSTER = "amqp://site-1:s%2Ccret@mq1:5672/fedq, amqp://site-1:s%2Ccret@mq2:5673/fedq,amqps://site-1:s%2Ccret@mq3/fedq"


def test_a_cluster_is_a_comma_separated_list_of_its_nodes_urls():
    settings = load_settings(WorkerSettings, site="site-1", broker_url=CLUSTER)
    assert broker_urls(settings.broker_url) == [
        "amqp://site-1:s%2Ccret@mq1:5672/fedq", "amqp://site-1:s%2Ccret@mq2:5673/fedq", "amqps://site-1:s%2Ccret@mq3/fedq"]
    assert transport.broker_address(settings.broker_url) == "mq1:5672,mq2:5673,mq3:5671/fedq"
    assert transport.broker_user(settings.broker_url) == "site-1"
    assert transport.broker_address("amqp://u:p@h:1/%2F") == "h:1//", "one URL reads as before"


def test_every_password_of_a_cluster_url_is_redacted_in_logs_and_run_logs():
    public = load_settings(WorkerSettings, site="site-1", broker_url=CLUSTER).public()
    assert "s%2Ccret" not in public["broker_url"] and public["broker_url"].count("site-1:***@") == 3
    # A raw comma in a password (it should be %2C) still leaves nothing of it in a redacted line.
    assert redact_url("amqp://u:pa,ss@h:1/v") == "amqp://u:***@h:1/v"


@pytest.mark.parametrize("value, complaint", [
    ("amqp://a:p@mq1/fedq,amqp://b:p@mq2/fedq", "different users or vhosts"),
    ("amqp://a:p@mq1/fedq,amqp://a:p@mq2/other", "different users or vhosts"),
    ("amqp://a:p@mq1/fedq,", "address 2 of 2 does not start with amqp:// or amqps://"),
    ("amqp://a:pa,ss@mq1/fedq", "address 2 of 2 does not start with amqp:// or amqps://"),
])
def test_a_cluster_url_that_mixes_users_or_vhosts_or_holds_no_url_is_refused_with_the_fix(value, complaint):
    with pytest.raises(SettingsError) as caught:
        load_settings(WorkerSettings, site="site-1", broker_url=value)
    message = str(caught.value)
    assert "FEDQ_BROKER_URL (--broker-url)" in message and complaint in message
    assert "one such URL per node, separated by commas" in message and "%2C" in message


def test_a_refused_broker_url_is_shown_without_its_passwords():
    with pytest.raises(SettingsError) as caught:
        load_settings(WorkerSettings, site="site-1", broker_url="amqp://a:secret@mq1/fedq,amqp://b:secret@mq2/fedq")
    assert "secret" not in str(caught.value) and "amqp://a:***@mq1/fedq" in str(caught.value)


def test_the_complaint_about_an_address_never_echoes_it_as_it_may_be_a_cut_password():
    with pytest.raises(ValueError) as caught:
        check_broker_urls("amqp://a:pa,ss@mq1/fedq")
    assert "ss@" not in str(caught.value) and "address 2 of 2" in str(caught.value)


def test_the_same_vhost_written_two_ways_is_one_vhost():
    assert check_broker_urls("amqp://a:p@mq1,amqp://a:p@mq2/") == "amqp://a:p@mq1,amqp://a:p@mq2/"


def test_a_folder_the_process_cannot_write_stops_start_up_naming_the_setting(tmp_path):
    from shared.settings import writable_folder

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with pytest.raises(SettingsError, match=r"cannot write in .*a-file/run .*FEDQ_RUN_DIR"):
        writable_folder(blocked / "run", "FEDQ_RUN_DIR")
    assert writable_folder(tmp_path / "new" / "run", "FEDQ_RUN_DIR").is_dir()


def test_the_coordinator_command_says_which_folder_it_cannot_write_without_a_traceback(tmp_path):
    import subprocess
    import sys

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    done = subprocess.run([sys.executable, "-m", "fedq", "coordinator", "--run-dir", str(blocked / "run")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "FEDQ_RUN_DIR" in done.stderr and "Traceback" not in done.stderr, done.stderr

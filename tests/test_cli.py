"""The fedq command as users run it: a subprocess, real broker, output checked."""

import json
import os
import signal
import subprocess
import sys
import time

import matplotlib.image
import pytest
import torch
from safetensors.torch import load_file

from coordinator.runlog import RunLog, read_events
from fedq.cli import _describe
from shared.task import load_task

FEDQ = [sys.executable, "-m", "fedq"]


def run(*args, env=None, timeout=60):
    return subprocess.run([*FEDQ, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("command", [[], ["coordinator"], ["worker"], ["demo"], ["report"], ["export"], ["provision"], ["status"]])
def test_help_works_for_every_command(command):
    result = run(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: fedq" in result.stdout
    if command in (["coordinator"], ["worker"], ["status"]):
        assert "examples:" in result.stdout and "FEDQ_BROKER_URL" in result.stdout


def test_bad_setting_stops_with_the_variable_named():
    result = run("coordinator", env={"FEDQ_STRATEGY": "fedmagic"})
    assert result.returncode == 2
    assert "FEDQ_STRATEGY (--strategy) = 'fedmagic'" in result.stderr
    assert "Traceback" not in result.stderr


def test_provision_with_no_management_api_says_so_without_a_traceback():
    from fedq.local_broker import _free_port

    closed = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    result = run("provision", "site-a", "--management-url", closed, "--admin-password", "x", "--definitions", "--plain")
    assert result.returncode == 2
    assert f"management API at {closed} does not answer" in result.stderr and "Traceback" not in result.stderr


def test_list_and_map_flags_take_json():
    from fedq.cli import _settings_from, build_parser
    from coordinator.settings import CoordinatorSettings

    args = build_parser().parse_args(["coordinator", "--any-site-users", "[]", "--site-users", '{"u1": "site-1"}'])
    settings = _settings_from(args, CoordinatorSettings)
    assert settings.any_site_users == [] and settings.site_users == {"u1": "site-1"}
    result = run("coordinator", "--any-site-users", "nobody")
    assert result.returncode == 2 and "--any-site-users takes JSON" in result.stderr


@pytest.mark.broker
def test_ctrl_c_stops_the_demo_in_order_and_the_command_with_it(broker_url, tmp_path):
    """The coordinator takes SIGINT as a stop like any other (final model, workers told); the
    command that ran the federation must then end too, not carry on as after a finished run."""
    demo = subprocess.Popen([*FEDQ, "demo", "--target", "0.999", "--max-seconds", "120", "--run-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FEDQ_BROKER_URL": broker_url})
    try:
        # Ten sites start before the first version: in the full suite on a day this machine ran the
        # ten-site demo test in 155 s (57 s the day before), 90 s passed without one.
        deadline = time.monotonic() + 180
        while not ((tmp_path / "events.jsonl").exists() and read_events(tmp_path, "snapshot")):
            assert demo.poll() is None and time.monotonic() < deadline, "the demo published no version"
            time.sleep(0.2)
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=60)
    finally:
        demo.kill()
    assert demo.returncode == 130, out + err
    assert f"stopped by Ctrl-C; the run so far (model, checkpoint, logs) is in {tmp_path}" in err
    assert "stopping: received SIGINT" in err
    assert (tmp_path / "model.safetensors").exists()
    for site in range(10):
        log = (tmp_path / "sites" / f"site-{site}.log").read_text()
        assert "the coordinator ended the run" in log, f"site-{site} was not told the run ended"


@pytest.mark.broker
def test_demo_runs_ten_sites_to_the_target_reports_it_and_leaves_a_model_that_loads(broker_url, tmp_path):
    result = run("demo", "--strategy", "fedasync", "--target", "0.9", "--run-dir", str(tmp_path),
                 env={"FEDQ_BROKER_URL": broker_url}, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "time to 0.90:" in result.stdout and "not reached" not in result.stdout.split("time to 0.90:")[1][:20]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_accuracy"] >= 0.90 and summary["updates_rejected"] == 0
    applied = read_events(tmp_path, "update")
    assert len(applied) == summary["updates_applied"] > 0
    # Fast sites carry an asynchronous run; the 3-second site may not have answered by 0.90.
    assert len({e["site"] for e in applied}) >= 5
    for site in range(10):
        log = (tmp_path / "sites" / f"site-{site}.log").read_text()
        assert "the coordinator ended the run" in log and "done;" in log, f"site-{site} left on the final announcement"

    report = run("report", str(tmp_path), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    for name in ("accuracy.png", "staleness.png", "sites.png"):
        image = matplotlib.image.imread(tmp_path / "report" / name)
        assert image.shape[0] >= 400 and image.shape[1] >= 700, f"{name} is {image.shape}"
        assert image[..., :3].std() > 0.05, f"{name} is blank"
    page = (tmp_path / "report" / "report.html").read_text()
    assert all(f'src="{name}"' in page for name in ("accuracy.png", "staleness.png", "sites.png"))

    # The model to take away loads into a fresh build_model() with torch alone and scores as the run said.
    task = load_task("shared.digits_task:DigitsStraggler")

    def score(path):
        model = task.build_model()
        model.load_state_dict(load_file(str(path)))  # strict: every name of the task's own state_dict
        return task.evaluate(model)["accuracy"]

    assert score(tmp_path / "model.safetensors") == pytest.approx(summary["final_accuracy"], abs=1e-6)
    assert score(tmp_path / "model-best.safetensors") == pytest.approx(summary["best_accuracy"], abs=1e-6)
    exported = run("export", str(tmp_path), "--out", str(tmp_path / "exported.safetensors"))
    assert exported.returncode == 0 and exported.stdout.strip().startswith(f"version {summary['final_version']} -> ")
    final = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(t, final[name]) for name, t in load_file(str(tmp_path / "exported.safetensors")).items())
    missing = run("export", str(tmp_path), "--version", "100000", "--out", str(tmp_path / "nope.safetensors"))
    assert missing.returncode == 2 and "version 100000 was not kept" in missing.stderr
    assert f"version {summary['final_version']} (the checkpoint)" in missing.stderr
    best_version = next(e["version"] for e in read_events(tmp_path, "evaluation")
                        if e.get("accuracy") == summary["best_accuracy"])
    best = tmp_path / "best.safetensors"
    assert run("export", str(tmp_path), "--version", str(best_version), "--out", str(best)).returncode == 0
    assert score(best) == pytest.approx(summary["best_accuracy"], abs=1e-6)


def test_report_of_a_folder_without_a_run_says_so(tmp_path):
    result = run("report", str(tmp_path))
    assert result.returncode == 2 and "events.jsonl does not exist" in result.stderr


@pytest.mark.broker
def test_a_queue_an_older_fedq_declared_otherwise_stops_the_coordinator_with_what_to_do(broker_url, tmp_path):
    from shared import transport

    link = transport.connect(broker_url, 30, "test-older-fedq")
    channel = link.channel()
    channel.queue_delete(transport.UPDATES)
    channel.queue_declare(transport.UPDATES, durable=True, arguments={
        "x-queue-type": "quorum", "x-dead-letter-exchange": transport.REJECTED_EXCHANGE, "x-delivery-limit": 20})
    link.close()
    # 7 s alone; over 60 s once in CI, on two cores at a load average of 11.
    result = run("coordinator", env={"FEDQ_BROKER_URL": broker_url, "FEDQ_RUN_DIR": str(tmp_path),
                                     "FEDQ_METRICS_PORT": "", "FEDQ_MAX_SECONDS": "5"}, timeout=180)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the broker holds queue fedq.updates with other arguments" in result.stderr
    assert "rabbitmqctl delete_queue fedq.updates" in result.stderr


def test_provision_gives_a_cluster_user_one_url_per_node():
    from fedq.provision import broker_url
    from shared import transport
    from shared.settings import check_broker_urls

    url = broker_url("site-3", "p@ss,word", "fedq", "mq1.example.org, mq2.example.org,mq3.example.org", 5671)
    assert check_broker_urls(url) == url
    assert transport.broker_address(url) == "mq1.example.org:5671,mq2.example.org:5671,mq3.example.org:5671/fedq"
    assert url.count("p%40ss%2Cword") == 3, "the password is quoted, its comma too"
    assert broker_url("site-3", "pw", "fedq", "broker.example.org", 5671, tls=False) == \
        "amqp://site-3:pw@broker.example.org:5671/fedq"


def test_the_summary_line_of_a_run_that_scored_no_version_says_so(tmp_path):
    """A coordinator on a task with no test set, stopped before any site scored, printed a
    traceback instead of its summary line (seen under benchmarks/load_sites.py)."""
    runlog = RunLog(tmp_path)
    runlog.start_clock()
    summary = runlog.summary(strategy="fedbuff", stop_reason="received SIGTERM", final_version=23)
    runlog.close()
    assert summary["final_accuracy"] is None
    line = _describe(summary)
    assert "final accuracy not scored  version 23" in line and "(received SIGTERM)" in line


def test_a_process_start_is_dated_from_its_launch_not_from_when_it_asks():
    """`fedq worker` dates its start from the process's (fedq.cli.process_started_at), before the
    seconds its imports take."""
    launched = time.time()
    asked = subprocess.run(
        [sys.executable, "-c", ("import time; time.sleep(1.5); from fedq.cli import process_started_at; "
                                "print(process_started_at(), time.time())")],
        capture_output=True, text=True, timeout=60, check=True)
    started, at = map(float, asked.stdout.split())
    assert launched - 0.05 <= started <= launched + 1.0, (launched, started)
    assert at - started >= 1.5, "it is the start, not the time of asking"

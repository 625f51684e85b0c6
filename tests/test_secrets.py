"""No secret reaches a log: the broker password is in no line a process writes, nor in any file of its run."""

import logging
import secrets
import subprocess
import sys
import urllib.parse

import pytest

from fedq.federation import run_federation, site_names

pytestmark = pytest.mark.broker


def test_the_broker_password_is_in_no_log_run_log_or_status(broker, broker_url, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    vhost = urllib.parse.unquote(broker_url.rsplit("/", 1)[1])
    user, password = f"secret-test-{secrets.token_hex(3)}", f"pw-{secrets.token_hex(16)}"
    broker.management_api("PUT", f"/api/users/{user}", {"password": password, "tags": ""})
    broker.management_api("PUT", f"/api/permissions/{urllib.parse.quote(vhost, safe='')}/{user}",
                          {"configure": ".*", "write": ".*", "read": ".*"})
    url = f"amqp://{user}:{password}@{broker.host}:{broker.port}/{urllib.parse.quote(vhost, safe='')}"
    try:
        summary = run_federation(url, tmp_path, site_names(2),
                                 coordinator={"strategy": "fedasync", "max_versions": 3, "any_site_users": [user]})
        assert summary["final_version"] >= 3
        status = subprocess.run([sys.executable, "-m", "fedq", "status", "--broker-url", url, "--json"],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
    finally:
        broker.management_api("DELETE", f"/api/users/{user}")
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.name == "events.jsonl" for path in written) and any(path.suffix == ".log" for path in written)
    assert [path for path in written if password.encode() in path.read_bytes()] == []
    assert password not in caplog.text and password not in status.stdout + status.stderr
    assert f"{user}:***@" in (tmp_path / "events.jsonl").read_text(), "the URL is kept, redacted"

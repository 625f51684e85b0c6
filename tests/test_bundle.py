"""`fedq provision --bundle`: a site joins a TLS broker with its bundle and nothing else."""

import stat
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from fedq.provision import SiteCredentials, check_bundle, write_bundle
from tests.certificates import issue, make_ca
from coordinator.runlog import read_events
from tests.federation_helpers import running_coordinator, wait_for

VENV_BIN = Path(sys.executable).parent
CA_TEXT = b"-----BEGIN CERTIFICATE-----\nnot checked here\n-----END CERTIFICATE-----\n"


def provision(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedq", "provision", *args], capture_output=True, text=True,
                          timeout=60, env={"FEDQ_ADMIN_PASSWORD": "fedq", "PATH": "/usr/bin:/bin"})


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.broker
@pytest.mark.container
def test_a_site_joins_over_tls_with_its_bundle_and_nothing_else(make_node, tmp_path):
    certificates = tmp_path / "pki"
    ca = make_ca(certificates, "fedq-test-ca")
    node = make_node(tls=(ca, *issue(ca, certificates, "broker", hosts=("localhost",))))
    bundles = tmp_path / "bundles"

    # A name the demo task knows: the bundle starts the default task, which has sites site-0 .. site-9.
    made = provision("site-3", "--coordinator", "central", "--management-url",
                     f"http://127.0.0.1:{node.management_port}", "--admin-user", "fedq", "--broker-host", "localhost",
                     "--broker-port", str(node.tls_port), "--bundle", str(bundles), "--ca-file", str(ca))
    assert made.returncode == 0, made.stderr
    bundle = bundles / "site-3"
    assert str(bundle) in made.stdout
    settings = read_env(bundle / "site.env")
    site_url = urllib.parse.urlsplit(settings["FEDQ_BROKER_URL"])
    assert (site_url.scheme, site_url.username, site_url.port) == ("amqps", "site-3", node.tls_port)
    assert site_url.password not in made.stdout + made.stderr, "the password went only into the bundle"
    assert settings["FEDQ_SITE"] == "site-3" and settings["FEDQ_TLS_CA_FILE"] == "ca.pem"
    assert (bundle / "ca.pem").read_bytes() == ca.read_bytes()
    assert {p.name: mode(p) for p in bundle.iterdir()} == {
        "site.env": 0o600, "ca.pem": 0o644, "start.sh": 0o755, "README.txt": 0o644}
    assert mode(bundle) == 0o700 and mode(bundles / "coordinator.env") == 0o600
    coordinator = read_env(bundles / "coordinator.env")

    # The operator unpacks the bundle elsewhere and runs it from another folder, with a venv on PATH as
    # activating it would put it; nothing of this test's environment reaches the worker.
    unpacked = tmp_path / "site-machine" / "bundle"
    unpacked.parent.mkdir()
    subprocess.run(["cp", "-a", str(bundle), str(unpacked)], check=True)
    workdir = tmp_path / "site-machine" / "work"
    workdir.mkdir()
    with running_coordinator(coordinator["FEDQ_BROKER_URL"], tmp_path / "run", strategy="fedasync",
                             any_site_users=[], tls_ca_file=coordinator["FEDQ_TLS_CA_FILE"]) as server:
        worker = subprocess.run([str(unpacked / "start.sh"), "--max-tasks", "1"], cwd=workdir, capture_output=True,
                                text=True, timeout=180,
                                env={"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(tmp_path / "site-machine")})
        assert worker.returncode == 0, worker.stderr[-3000:]
        applied = wait_for(lambda: read_events(tmp_path / "run", "update"), 30, "the site's update applied")
        assert applied[0]["site"] == "site-3" and server.version >= 1
    assert (workdir / ".fedq-state").is_dir(), "the worker kept its state where it was started, not in the bundle"


def test_start_sh_without_fedq_says_where_to_get_it(tmp_path):
    entry = SiteCredentials("lab-a", "lab-a", "secret", "amqps://lab-a:secret@broker.example.org:5671/fedq")
    write_bundle(tmp_path, [entry], CA_TEXT, None, "broker.example.org:5671")
    started = subprocess.run([str(tmp_path / "lab-a" / "start.sh")], capture_output=True, text=True, timeout=30,
                             env={"PATH": "/usr/bin:/bin"})
    assert started.returncode == 127
    assert "no fedq command; activate the virtual environment fedq is installed in, or set FEDQ_VENV" in started.stderr


@pytest.mark.parametrize("args, message", [
    ((), "needs the CA certificate that signed the broker's: add --ca-file"),
    (("--ca-file", "/nonexistent/ca.pem"), "cannot read the CA certificate /nonexistent/ca.pem"),
    (("--ca-file", "/etc/hostname"), "holds no PEM certificate"),
])
def test_an_amqps_bundle_without_a_readable_ca_is_refused_before_any_user_is_made(tmp_path, args, message):
    # Nothing listens on port 9: reaching the management API would fail differently.
    made = provision("lab-a", "--management-url", "http://127.0.0.1:9", "--bundle", str(tmp_path / "b"), *args)
    assert made.returncode == 2 and message in made.stderr, made.stderr
    assert "Traceback" not in made.stderr and not (tmp_path / "b").exists()


def test_an_existing_bundle_is_not_overwritten_without_force(tmp_path):
    (tmp_path / "lab-a").mkdir()
    (tmp_path / "lab-a" / "site.env").write_text("FEDQ_SITE=lab-a\n")
    made = provision("lab-a", "--management-url", "http://127.0.0.1:9", "--bundle", str(tmp_path), "--plain")
    assert made.returncode == 2 and "already exist" in made.stderr and "--force" in made.stderr, made.stderr
    assert (tmp_path / "lab-a" / "site.env").read_text() == "FEDQ_SITE=lab-a\n"


def test_force_rewrites_a_bundle_with_private_modes_again(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_bytes(CA_TEXT)
    entry = SiteCredentials("lab-a", "lab-a", "old", "amqps://lab-a:old@broker.example.org:5671/fedq")
    write_bundle(tmp_path / "b", [entry], CA_TEXT, ca, "broker.example.org:5671")
    (tmp_path / "b" / "lab-a" / "site.env").chmod(0o644)
    (tmp_path / "b" / "lab-a").chmod(0o755)
    assert check_bundle(tmp_path / "b", ["lab-a"], False, ca, tls=True, force=True) == CA_TEXT
    fresh = SiteCredentials("lab-a", "lab-a", "new", "amqps://lab-a:new@broker.example.org:5671/fedq")
    write_bundle(tmp_path / "b", [fresh], CA_TEXT, ca, "broker.example.org:5671")
    assert read_env(tmp_path / "b" / "lab-a" / "site.env")["FEDQ_BROKER_URL"] == fresh.broker_url
    assert mode(tmp_path / "b" / "lab-a" / "site.env") == 0o600 and mode(tmp_path / "b" / "lab-a") == 0o700


def test_ca_file_without_bundle_is_refused():
    made = provision("lab-a", "--management-url", "http://127.0.0.1:9", "--ca-file", "/etc/hostname")
    assert made.returncode == 2 and "--ca-file and --force go with --bundle DIR" in made.stderr, made.stderr

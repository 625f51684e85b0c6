"""TLS on a throwaway broker node started with broker_config/tls.conf and certificates made here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared import transport
from fedq.local_broker import ContainerNode, LocalNode
from tests.certificates import issue, make_ca
from tests.conftest import record_path, wants_container

pytestmark = [pytest.mark.broker, pytest.mark.container]
CONFIG = Path(__file__).parent.parent / "broker_config"


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory, request):
    folder = tmp_path_factory.mktemp("tls")
    ca = make_ca(folder, "fedq-test-ca")
    cert, key = issue(ca, folder, "broker", hosts=("localhost",))
    node = (ContainerNode if wants_container(request) else LocalNode)(CONFIG, tls=(ca, cert, key))
    try:
        node.start()
        yield node, ca, folder
    finally:
        node.close()


@pytest.fixture
def tls_node(tls_broker, request):
    record_path(request, "container" if isinstance(tls_broker[0], ContainerNode) else "local-node")
    return tls_broker


def tls_url(node, host="localhost"):
    return f"amqps://fedq:fedq@{host}:{node.tls_port}/fedq"


def test_tls_with_the_right_ca_works_and_carries_amqp(tls_node):
    node, ca, _ = tls_node
    connection = transport.connect(tls_url(node), 30, "test-tls", ca_file=ca)
    channel = connection.channel()
    channel.confirm_delivery()
    channel.queue_declare(transport.UPDATES, passive=True)
    connection.close()


def test_a_client_certificate_from_the_ca_is_accepted(tls_node):
    node, ca, folder = tls_node
    cert, key = issue(ca, folder, "site-3")
    transport.connect(tls_url(node), 30, "test-client-cert", ca_file=ca, cert_file=cert, key_file=key).close()


def test_a_wrong_ca_fails_with_a_clear_error(tls_node):
    node, _, folder = tls_node
    wrong = make_ca(folder, "some-other-ca")
    with pytest.raises(transport.TLSSetupError, match="does not trust .*set FEDQ_TLS_CA_FILE"):
        transport.connect(tls_url(node), 30, "test-wrong-ca", ca_file=wrong)


def test_a_certificate_for_another_host_is_refused(tls_node):
    node, ca, _ = tls_node
    with pytest.raises(transport.TLSSetupError, match="does not trust"):
        transport.connect(tls_url(node, host="127.0.0.1"), 30, "test-hostname", ca_file=ca)


def test_tls_to_the_plain_port_fails_with_a_clear_error(tls_node):
    node, ca, _ = tls_node
    with pytest.raises(transport.TLSSetupError, match="does not speak TLS"):
        transport.connect(f"amqps://fedq:fedq@localhost:{node.amqp_port}/fedq", 30, "test-plain", ca_file=ca)


def test_the_worker_command_stops_with_the_tls_error_and_no_traceback(tls_node):
    node, _, folder = tls_node
    env = {**os.environ, "FEDQ_BROKER_URL": tls_url(node), "FEDQ_SITE": "site-1",
           "FEDQ_TLS_CA_FILE": str(make_ca(folder, "untrusted")), "FEDQ_STATE_DIR": str(folder / "state")}
    result = subprocess.run([sys.executable, "-m", "fedq", "worker"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert "fedq: the broker at localhost" in result.stderr and "FEDQ_TLS_CA_FILE" in result.stderr
    assert "Traceback" not in result.stderr

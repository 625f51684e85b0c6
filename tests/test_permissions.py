"""Per-site users, as `fedq provision` makes them, on a real broker: allowed what a site needs, refused the rest."""

import subprocess
import sys
import threading
import urllib.parse

import pika
import pytest

from shared import transport
from fedq.provision import provision_sites
from shared.settings import load_settings
from worker.settings import WorkerSettings
from shared.task import load_task
from coordinator.runlog import read_events
from tests.federation_helpers import running_coordinator, wait_for
from worker.site import SiteWorker

pytestmark = [pytest.mark.broker, pytest.mark.container]


@pytest.fixture
def sites(broker, broker_url):
    vhost = urllib.parse.unquote(broker_url.rsplit("/", 1)[1])
    created = provision_sites(broker.management_url, broker.username, broker.password, vhost, ["site-1", "site-2"],
                              broker.host, broker.port, tls=False, coordinator_user="coordinator")
    yield {c.user: c for c in created}
    for c in created:
        broker.management_api("DELETE", f"/api/users/{c.user}")


def refused(url, attempt, code=403):
    """Run ``attempt(channel)`` as the URL's user; assert the broker refuses it with ``code``."""
    connection = transport.connect(url, 30, "test-permissions")
    channel = connection.channel()
    channel.confirm_delivery()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as caught:
        attempt(channel)
        connection.serve(0.5)
    assert caught.value.reply_code == code, caught.value
    connection.close()
    return str(caught.value)


def test_a_site_user_can_do_what_a_site_does(sites):
    connection = transport.connect(sites["site-1"].broker_url, 30, "test-site-1")
    channel = connection.channel()
    channel.confirm_delivery()
    queue = transport.declare_site_queue(channel, "site-1")
    for key in (transport.hello_key("site-1"), transport.update_key("site-1")):
        channel.basic_publish(transport.UPDATE_EXCHANGE, key, b"x", pika.BasicProperties(user_id="site-1"))
    stream = connection.channel()
    stream.basic_qos(prefetch_count=1)
    tag = stream.basic_consume(transport.SNAPSHOTS, lambda *a: None, arguments={"x-stream-offset": "first"})
    transport.cancel_stream_consumer(stream, tag)
    channel.basic_consume(queue, lambda *a: None)
    connection.close()


@pytest.mark.parametrize("what, attempt", [
    ("consume the updates queue", lambda ch: ch.basic_consume(transport.UPDATES, lambda *a: None)),
    ("consume the dead-letter queue", lambda ch: ch.basic_consume(transport.REJECTED, lambda *a: None)),
    ("consume another site's queue", lambda ch: ch.basic_consume(transport.site_queue("site-2"), lambda *a: None)),
    ("publish a snapshot", lambda ch: ch.basic_publish(transport.SNAPSHOT_EXCHANGE, transport.SNAPSHOT_KEY, b"x",
                                                      pika.BasicProperties(user_id="site-1"))),
    ("announce a version", lambda ch: ch.basic_publish(transport.ANNOUNCEMENTS, "", b"x", pika.BasicProperties(user_id="site-1"))),
    ("declare a queue of another name", lambda ch: ch.queue_declare("fedq.site.site-1.other")),
    ("declare another site's queue", lambda ch: ch.queue_declare(transport.site_queue("site-2"), durable=True,
                                                                 arguments=transport.SITE_QUEUE_ARGUMENTS)),
    ("purge the updates queue", lambda ch: ch.queue_purge(transport.UPDATES)),
    ("consume its own update queue", lambda ch: ch.basic_consume(transport.site_update_queue("site-1"), lambda *a: None)),
    ("send into another site's update queue", lambda ch: ch.basic_publish(
        transport.UPDATE_EXCHANGE, transport.update_key("site-2"), b"x", pika.BasicProperties(user_id="site-1"))),
    ("send under a key of no site", lambda ch: ch.basic_publish(
        transport.UPDATE_EXCHANGE, transport.LOBBY_KEY, b"x", pika.BasicProperties(user_id="site-1"))),
    ("read the coordinator's status", lambda ch: ch.basic_get(transport.STATUS)),
])
def test_a_site_user_is_refused(sites, what, attempt):
    site2 = transport.connect(sites["site-2"].broker_url, 30, "test-site-2")
    transport.declare_site_queue(site2.channel(), "site-2")
    site2.close()
    admin = transport.connect(sites["coordinator"].broker_url, 30, "test-coordinator")
    for site in ("site-1", "site-2"):  # as the coordinator declares them when the sites say hello
        transport.declare_site_updates(admin.channel(), site)
    admin.close()
    assert "ACCESS_REFUSED" in refused(sites["site-1"].broker_url, attempt)


SHARED_QUEUES = (transport.SNAPSHOTS, transport.UPDATES, transport.REJECTED, transport.STATUS, transport.site_queue("site-2"),
                 transport.site_update_queue("site-2"), transport.site_update_queue("site-1"))
OWN_QUEUE = transport.site_queue("site-1")
KEYS = ("", transport.LOBBY_KEY, transport.SNAPSHOT_KEY, transport.update_key("site-1"), transport.update_key("site-2"),
        transport.hello_key("site-1"))
ALL_EXCHANGES = (*transport.EXCHANGES, "amq.direct", "amq.fanout", "amq.topic")


def every_attempt_on_shared_objects():
    """Every bind, unbind, declare, delete and purge a site could try on what it shares with others."""
    for queue in (*SHARED_QUEUES, OWN_QUEUE):
        for exchange in ALL_EXCHANGES:
            for key in KEYS:
                yield f"bind queue {queue} to {exchange} by {key!r}", lambda ch, q=queue, x=exchange, k=key: ch.queue_bind(q, x, k)
    for exchange, queue, key in [*transport.BINDINGS, (transport.ANNOUNCEMENTS, transport.site_queue("site-2"), ""),
                                 (transport.UPDATE_EXCHANGE, transport.site_update_queue("site-2"), transport.update_key("site-2"))]:
        yield f"unbind queue {queue} from {exchange}", lambda ch, q=queue, x=exchange, k=key: ch.queue_unbind(q, x, k)
    for destination in ALL_EXCHANGES:
        for source in ALL_EXCHANGES:
            if source != destination:
                yield (f"bind exchange {destination} to {source}",
                       lambda ch, d=destination, s=source: ch.exchange_bind(d, s, transport.update_key("site-2")))
    for name, kind in transport.EXCHANGES.items():
        yield f"declare exchange {name}", lambda ch, n=name, k=kind: ch.exchange_declare(
            n, k, durable=True, arguments=transport.EXCHANGE_ARGUMENTS.get(n))
        yield f"delete exchange {name}", lambda ch, n=name: ch.exchange_delete(n)
    yield "declare a new exchange", lambda ch: ch.exchange_declare("fedq.x.mine", "fanout")
    for queue in SHARED_QUEUES:
        arguments = transport.QUEUES.get(queue, transport.UPDATE_QUEUE_ARGUMENTS if queue.endswith(".updates")
                                         else transport.SITE_QUEUE_ARGUMENTS)
        yield f"declare queue {queue}", lambda ch, q=queue, a=arguments: ch.queue_declare(q, durable=True, arguments=a)
        yield f"delete queue {queue}", lambda ch, q=queue: ch.queue_delete(q)
        yield f"purge queue {queue}", lambda ch, q=queue: ch.queue_purge(q)


def test_the_broker_refuses_every_bind_declare_delete_and_purge_a_site_could_try_on_shared_objects(
        sites, broker, broker_url):
    site2 = transport.connect(sites["site-2"].broker_url, 30, "test-site-2")
    transport.declare_site_queue(site2.channel(), "site-2")
    site2.close()
    admin = transport.connect(sites["coordinator"].broker_url, 30, "test-coordinator")
    transport.bind_site_queue(admin.channel(), "site-2")
    transport.declare_site_queue(admin.channel(), "site-1")
    for site in ("site-1", "site-2"):
        transport.declare_site_updates(admin.channel(), site)
    admin.close()
    vhost = broker_url.rsplit("/", 1)[1]

    def bindings():
        return sorted((b["source"], b["destination"], b["routing_key"])
                      for b in broker.management_api("GET", f"/api/bindings/{vhost}"))

    before = bindings()
    attempts = list(every_attempt_on_shared_objects())
    assert len(attempts) > 150
    allowed, codes = [], []
    site = transport.connect(sites["site-1"].broker_url, 30, "test-site-1")
    for what, attempt in attempts:
        if not site.is_open:  # a refusal the broker answers by closing the connection
            site = transport.connect(sites["site-1"].broker_url, 30, "test-site-1")
        channel = site.channel()
        try:
            attempt(channel)
            allowed.append(what)
        except (pika.exceptions.ChannelClosedByBroker, pika.exceptions.ConnectionClosedByBroker) as exc:
            assert exc.reply_code in (403, 540), f"{what}: {exc}"
            codes.append(exc.reply_code)
        finally:
            if channel.is_open:
                channel.close()
    site.close()
    assert not allowed, "the broker let a site " + "; ".join(allowed)
    assert len(codes) == len(attempts), "every attempt was answered by the broker"
    assert bindings() == before, "nothing was bound or unbound on the way"


def test_a_site_user_cannot_claim_another_users_identity(sites):
    message = refused(sites["site-1"].broker_url, lambda ch: ch.basic_publish(
        transport.UPDATE_EXCHANGE, transport.update_key("site-1"), b"x", pika.BasicProperties(user_id="site-2")), code=406)
    assert "user_id property set to 'site-2' but authenticated user was 'site-1'" in message


def test_provisioned_coordinator_and_site_train_together_trusting_only_site_users(sites, tmp_path):
    with running_coordinator(sites["coordinator"].broker_url, tmp_path, strategy="fedasync",
                             any_site_users=[]) as coordinator:
        worker = SiteWorker(load_settings(WorkerSettings, broker_url=sites["site-1"].broker_url, site="site-1",
                                          max_tasks=1, state_dir=tmp_path / "site-1"),
                            load_task("shared.digits_task:DigitsStraggler"))
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        thread.join(60)
        assert worker.sent == 1
        wait_for(lambda: read_events(tmp_path, "update"), 15, "the site's update")
        assert read_events(tmp_path, "update")[0]["site"] == "site-1" and coordinator.version == 1


def test_provision_command_prints_each_sites_settings(broker, broker_url):
    vhost = urllib.parse.unquote(broker_url.rsplit("/", 1)[1])
    result = subprocess.run(
        [sys.executable, "-m", "fedq", "provision", "lab-a", "--coordinator", "central", "--management-url",
         broker.management_url,
         "--admin-user", broker.username, "--vhost", vhost, "--broker-host", "broker.example.org"],
        capture_output=True, text=True, timeout=60, env={"FEDQ_ADMIN_PASSWORD": broker.password, "PATH": "/usr/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert "FEDQ_SITE=lab-a" in result.stdout
    assert "FEDQ_BROKER_URL=amqps://lab-a:" in result.stdout and "@broker.example.org:5671/" in result.stdout
    assert "FEDQ_BROKER_URL=amqps://central:" in result.stdout and "FEDQ_ANY_SITE_USERS=[]" in result.stdout
    for user in ("lab-a", "central"):
        broker.management_api("DELETE", f"/api/users/{user}")

"""One site's user streaming partial uploads at a real coordinator, on a real broker: the uploads it
holds, in memory and in the upload spool, stay within its sender budget (FEDQ_SENDER_UPLOADS x
FEDQ_SENDER_UPLOAD_BYTES), what is past the budget is refused and says why, and the coordinator
goes on taking an honest site's update. benchmarks/partial_uploads.py runs the same for a minute
with a coordinator process of its own and measures its memory and disk."""

import secrets
import threading
import time
import urllib.parse

import pika
import pytest

from fedq.provision import provision_sites
from shared import transport
from shared.chunking import SITE_HEADER, ChunkInfo, chunk_count
from shared.protocol import new_id
from coordinator.runlog import read_events
from tests.federation_helpers import (
    SiteClient,
    constant_delta,
    event_for,
    running_coordinator,
    wait_for,
)

pytestmark = pytest.mark.broker

CHUNK = 64 * 1024
BUDGET_UPLOADS = 2
BUDGET_BYTES = 16 * CHUNK  # FEDQ_SENDER_UPLOAD_BYTES
PREFETCH = 32  # a window of 28 chunks: the hostile site's repeats fill it, and its uploads are spooled
UPLOAD_TIMEOUT = 6.0
STREAM_SECONDS = 6.0


@pytest.fixture
def site_users(broker, broker_url):
    """A hostile and an honest site, each a provisioned user that speaks for its own site only."""
    if broker.management_url is None:
        pytest.skip("provisioning site users needs the broker's management API")
    vhost = urllib.parse.unquote(broker_url.rsplit("/", 1)[1])
    tag = secrets.token_hex(3)
    created = provision_sites(broker.management_url, broker.username, broker.password, vhost,
                              [f"hostile-{tag}", f"honest-{tag}"], broker.host, broker.port, tls=False)
    yield created
    for credentials in created:
        broker.management_api("DELETE", f"/api/users/{urllib.parse.quote(credentials.user, safe='')}")


class HostileSite:
    """Publishes chunks as its user, each confirmed, and remembers what it sent to which payload."""

    def __init__(self, url: str, site: str):
        self.link = transport.connect(url, 30, f"test-{site}")
        self.channel = self.link.channel()
        self.channel.confirm_delivery()
        self.user, self.site = transport.broker_user(url), site
        self.sent: dict[str, int] = {}  # chunks per payload id
        self.claims: list[tuple[str, int]] = []  # (payload id, claimed size) of its partial uploads

    def chunk(self, payload_id: str, index: int, size: int, chunk_bytes: int = CHUNK, length: int | None = None) -> None:
        count = chunk_count(size, chunk_bytes)
        info = ChunkInfo(payload_id, index, count, size, chunk_bytes, "0" * 64 if index == count - 1 else None)
        body = bytes(min(chunk_bytes, size - info.offset) if length is None else length)
        self.channel.basic_publish(transport.UPDATE_EXCHANGE, transport.update_key(self.site), body, pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent, headers={**info.to_headers(), SITE_HEADER: self.site},
            user_id=self.user), mandatory=True)
        self.sent[payload_id] = self.sent.get(payload_id, 0) + 1

    def partial(self, size: int) -> None:
        """A new upload claiming ``size`` bytes: every chunk but the last."""
        payload_id = new_id()
        for index in range(chunk_count(size, CHUNK) - 1):
            self.chunk(payload_id, index, size)
        self.claims.append((payload_id, size))

    def close(self) -> None:
        self.link.close()


def test_one_site_streaming_partial_uploads_stays_within_its_budget(broker_url, tmp_path, site_users):
    hostile_user, honest_user = site_users
    with running_coordinator(broker_url, tmp_path, strategy="fedasync", any_site_users=[], prefetch=PREFETCH,
                             sender_uploads=BUDGET_UPLOADS, sender_upload_bytes=BUDGET_BYTES,
                             upload_timeout=UPLOAD_TIMEOUT) as coordinator:
        spool = coordinator.uploads.spool
        held: list[tuple[int, int, int]] = []  # (its uploads in flight, bytes they claim, spool bytes written)
        watching = threading.Event()

        def watch():
            while not watching.wait(0.005):
                try:
                    mine = [u for u in list(coordinator.uploads.arriving.values()) if u.user_id == hostile_user.user]
                except RuntimeError:  # the coordinator's thread changed the table meanwhile
                    continue
                held.append((len(mine), sum(u.reassembly.size for u in mine), spool.bytes_written))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        hostile = HostileSite(hostile_user.broker_url, hostile_user.site)
        huge_window, huge_budget = [], []
        deadline = time.monotonic() + STREAM_SECONDS
        while time.monotonic() < deadline:
            for size in (BUDGET_BYTES // 2, BUDGET_BYTES // 2, BUDGET_BYTES, BUDGET_BYTES // 4):
                hostile.partial(size)
            for payload_id, size in hostile.claims[:2]:  # the first two again, chunk by chunk
                for index in range(chunk_count(size, CHUNK) - 1):
                    hostile.chunk(payload_id, index, size)
            # Claims of gigabytes: wider than the window, and within it but far over the budget.
            huge_window.append(new_id())
            hostile.chunk(huge_window[-1], 0, 2 << 30, 16 << 20, length=1024)
            huge_budget.append(new_id())
            hostile.chunk(huge_budget[-1], 0, 16 * (16 << 20), 16 << 20, length=1024)
        hostile.close()

        # Neither site said hello, so both send through the lobby, first in, first out: once the honest
        # site's update is in, so is every hostile chunk.
        honest = SiteClient(honest_user.broker_url, site=honest_user.site)
        update_id = honest.send(coordinator, coordinator.version, constant_delta(coordinator, 0.01))
        applied = event_for(tmp_path, update_id, timeout=30)
        honest.close()
        watching.set()
        watcher.join()
        written = spool.bytes_written
        assert applied["event"] == "update" and coordinator.version == 1, "the honest site's update was applied"

        # What its uploads held stayed within the budget, in memory and on disk.
        assert held and max(count for count, _, _ in held) <= BUDGET_UPLOADS
        assert max(claimed for _, claimed, _ in held) <= BUDGET_BYTES
        assert 0 < written <= BUDGET_BYTES + CHUNK, f"the spool wrote {written} bytes"
        assert max(w for _, _, w in held) <= BUDGET_BYTES + CHUNK
        assert len(list((tmp_path / "uploads").glob("*.upload"))) <= BUDGET_UPLOADS

        # Every chunk past the budget was refused at once, and said which budget it was past.
        taken = [payload_id for payload_id, _ in hostile.claims[:2]]
        reasons = [e["reason"] for e in read_events(tmp_path, "rejected") if e["user"] == hostile_user.user]
        over_budget = [r for r in reasons if "(FEDQ_SENDER_UPLOADS, FEDQ_SENDER_UPLOAD_BYTES)" in r]
        wider = [r for r in reasons if "exceeds the coordinator's window" in r]
        assert len(reasons) == sum(hostile.sent.values()) - sum(hostile.sent[p] for p in taken), \
            "every chunk but those of its first two uploads was refused"
        assert len(over_budget) == sum(n for p, n in hostile.sent.items() if p not in taken) - len(huge_window)
        assert len(wider) == len(huge_window) and len(over_budget) + len(wider) == len(reasons)
        assert all(f"budget of {BUDGET_UPLOADS} uploads and {BUDGET_BYTES} bytes" in r for r in over_budget)
        assert any(f"another of {16 * (16 << 20)} bytes" in r for r in over_budget), "the huge claim within the window"

        # Once it stops, its unfinished uploads idle out, and their spool files go with them.
        wait_for(lambda: len([e for e in read_events(tmp_path, "upload_expired") if e["user"] == hostile_user.user])
                 == len(taken), UPLOAD_TIMEOUT + 10, "the hostile site's uploads to expire")
        wait_for(lambda: not list((tmp_path / "uploads").glob("*.upload")), 2, "the expired uploads' spool files to go")
        assert coordinator.stop_reason is None and not coordinator.uploads.arriving


def test_a_site_flooding_its_queue_fills_only_its_own_window(broker_url, tmp_path, site_users):
    """Greeted sites send into queues of their own, each with its own prefetch window: an honest
    site's update overtakes the backlog of a site that floods the coordinator."""
    hostile_user, honest_user = site_users
    flood = 3000
    with running_coordinator(broker_url, tmp_path, strategy="fedasync", any_site_users=[], prefetch=PREFETCH,
                             status_seconds=0.2) as coordinator:
        honest = SiteClient(honest_user.broker_url, site=honest_user.site)
        hostile = SiteClient(hostile_user.broker_url, site=hostile_user.site)
        for client in (honest, hostile):
            client.hello()
        wait_for(lambda: {honest.site, hostile.site} <= coordinator.state.sites_seen, 15, "both hellos")
        # Unconfirmed, so the backlog builds faster than the coordinator refuses it: a chunk of a
        # payload that claims more than the window, refused one by one.
        flooding = pika.BlockingConnection(pika.URLParameters(hostile_user.broker_url))
        channel = flooding.channel()
        payload_id = new_id()
        for index in range(flood):
            info = ChunkInfo(payload_id, index, flood, flood * CHUNK, CHUNK, "0" * 64 if index == flood - 1 else None)
            channel.basic_publish(transport.UPDATE_EXCHANGE, transport.update_key(hostile.site), b"x", pika.BasicProperties(
                headers={**info.to_headers(), SITE_HEADER: hostile.site}, user_id=hostile_user.user))
        # The status asks only queues whose window is full for their depth: the backlog shows there.
        def count_refused() -> int:
            return sum(e["user"] == hostile_user.user for e in read_events(tmp_path, "rejected"))

        wait_for(lambda: coordinator.status.queue_depths.get(transport.SITE_UPDATE_QUEUES, 0) > 0, 15,
                 "the flooding site's backlog in the status")
        refused_before_send = count_refused()
        update_id = honest.send(coordinator, coordinator.version, constant_delta(coordinator, 0.01))
        event_for(tmp_path, update_id, timeout=30)
        wait_for(lambda: len([e for e in read_events(tmp_path, "rejected") if e["user"] == hostile_user.user]) == flood, 60,
                 "every flooding chunk refused")
        flooding.close()
        for client in (honest, hostile):
            client.close()
    log = [e for e in read_events(tmp_path) if e.get("update_id") == update_id or e.get("user") == hostile_user.user]
    applied_at = next(i for i, e in enumerate(log) if e.get("update_id") == update_id)
    assert log[applied_at]["event"] == "update"
    refused_first = sum(e["event"] == "rejected" for e in log[:applied_at])
    # Through one shared queue it would have come after the whole backlog. Here it waits only for the
    # hostile deliveries already in the coordinator's hands (its window of PREFETCH) and those it
    # refused while the honest update crossed the broker: 15-32 in three runs here. How many it
    # refused before the send depends on the machine's speed, not on fedq.
    assert refused_first - refused_before_send <= 3 * PREFETCH, \
        f"{refused_first - refused_before_send} hostile chunks went first after the honest update was sent"
    assert refused_first < flood, "hostile chunks were still waiting when the honest update was applied"
    assert coordinator.version == 1

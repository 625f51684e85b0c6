"""Intermittent sites and crashes on a real broker: nothing confirmed is lost, nothing counts twice."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from coordinator.checkpoint import read_checkpoint
from fedq.federation import run_federation, site_names, start_coordinator, start_worker
from shared import transport
from shared.protocol import PROTOCOL_VERSION, Announcement, new_id, now
from shared.settings import load_settings
from worker.settings import WorkerSettings
from shared.task import load_task
from tests.chaos_proxy import ChaosProxy
from coordinator.runlog import read_events
from tests.federation_helpers import (
    SiteClient, confirmed_updates, constant_delta, event_for, running_coordinator, wait_for,
)
from worker.site import SiteWorker

pytestmark = pytest.mark.broker
BROKER_CONFIG = Path(__file__).parent.parent / "broker_config"


def made_version(run_dir, version: int) -> bool:
    """Whether the run in ``run_dir`` has scored ``version`` (or a later one)."""
    return any(e.get("version", 0) >= version for e in read_events(run_dir, "evaluation"))


def applied_once(run_dir):
    """Update ids in the final ledger, asserting none is there twice."""
    rows = read_checkpoint(run_dir / "checkpoint.fedq").ledger_rows
    ids = [row[0] for row in rows if row[3] is not None]
    assert len(ids) == len(set(ids))
    return set(ids)


def test_connections_cut_repeatedly_still_reach_090(broker, broker_url, tmp_path):
    proxy = ChaosProxy(broker.port)
    stop = threading.Event()

    def cut_every_second():
        # From the run's first new version on: with the sites' links cut from their start, a run
        # that never began would prove nothing.
        wait_for(lambda: stop.is_set() or made_version(tmp_path, 1), 90, "version 1")
        # Until the run ends: a site whose link still broke every second would never get through the
        # few seconds after each reconnect in which it waits for news, and would be killed.
        while not stop.wait(1.0) and not (tmp_path / "summary.json").exists():
            proxy.cut()

    threading.Thread(target=cut_every_second, daemon=True).start()
    try:
        summary = run_federation(
            broker_url, tmp_path, site_names(10), worker_broker_url=proxy.url(broker_url),
            coordinator={"strategy": "fedbuff", "buffer_size": 5, "stop_at_accuracy": 0.90,
                         "max_seconds": 150, "max_staleness": 10_000},
        )
    finally:
        stop.set()
        proxy.close()
    assert summary["best_accuracy"] >= 0.90, summary["stop_reason"]
    assert proxy.cuts >= 3, "the links were cut while the federation ran"
    assert set(summary["worker_exit_codes"].values()) == {0}, f"every site heard the end: {summary['worker_exit_codes']}"
    applied = applied_once(tmp_path)
    update_events = [e["update_id"] for e in read_events(tmp_path, "update")]
    assert len(update_events) == len(set(update_events)), "no update was counted twice"
    assert set(update_events) == applied
    logs = "".join(p.read_text() for p in (tmp_path / "sites").glob("*.log"))
    assert "reconnecting in" in logs


def worker_processes() -> list[int]:
    """This test process's worker children (run_federation starts one per site)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except (ValueError, OSError, IndexError):
            continue
        if ppid == os.getpid() and command[-3:-1] == [b"fedq", b"worker"]:
            pids.append(int(entry.name))
    return pids


@pytest.mark.container
def test_broker_restart_mid_run_resumes_by_itself(make_node, tmp_path, caplog):
    """On the container path the restart is `docker stop` and `docker start` of the broker's container."""
    node = make_node(BROKER_CONFIG)
    url = f"amqp://fedq:fedq@127.0.0.1:{node.amqp_port}/fedq"
    down = threading.Event()
    versions_before: list[int] = []
    frozen: list[int] = []

    def restart_after_version_1():
        # Early, far from the target: a run with no broker makes no progress, so one that reaches its
        # target afterwards resumed. The sites are frozen (SIGSTOP) while the node stops, so the run
        # stays where it was however long the stop takes under parallel tests: unfrozen, a run once
        # reached its target before a slow stop took the node down, and a small server step that kept
        # it far made the test take 150 s. The frozen sites find their links dead when they go on.
        wait_for(lambda: made_version(tmp_path, 1), 90, "version 1")
        sites = worker_processes()
        frozen.append(len(sites))
        for pid in sites:
            os.kill(pid, signal.SIGSTOP)
        try:
            node.stop()
            versions_before.append(max(e["version"] for e in read_events(tmp_path, "evaluation")))
            down.set()
        finally:
            for pid in sites:
                os.kill(pid, signal.SIGCONT)
        node.start()

    restarter = threading.Thread(target=restart_after_version_1, daemon=True)
    restarter.start()
    summary = run_federation(
        url, tmp_path, site_names(10),
        coordinator={"stop_at_accuracy": 0.90, "max_seconds": 240, "max_staleness": 10_000},
    )
    restarter.join(120)  # before the fixture removes the node under a start still waiting
    assert down.is_set() and not restarter.is_alive(), "the broker stopped mid-run and started again"
    assert frozen == [10], "every site was held still while the node stopped"
    assert summary["best_accuracy"] >= 0.90, summary["stop_reason"]
    reached = min(e["version"] for e in read_events(tmp_path, "evaluation") if e["accuracy"] >= 0.90)
    assert reached > versions_before[0], "the target was reached after the restart, not before it"
    update_events = [e["update_id"] for e in read_events(tmp_path, "update")]
    assert len(update_events) == len(set(update_events))
    assert applied_once(tmp_path) == set(update_events)
    link = transport.connect(url, 30, "version-check")
    defects = transport.broker_defects(link.broker_version)
    link.close()
    told = [record.getMessage() for record in caplog.records if record.name == "fedq.coordinator"]
    assert all(told.count(defect) == 1 for defect in defects), "each known defect of the broker told once, not at each connection"


def test_a_site_that_outlives_its_coordinator_says_hello_to_the_new_run_and_is_heard(broker_url, tmp_path):
    """A coordinator starting a fresh run consumes only the update queues of sites that said hello
    to it; a site still connected from the old run must greet the new one, or its updates would
    wait in its queue for good."""
    first, second = tmp_path / "first", tmp_path / "second"
    coordinator = start_fedasync_coordinator(broker_url, first)
    worker = start_worker(broker_url, "site-0", tmp_path / "sites" / "site-0.log")
    try:
        wait_for(lambda: checkpoint_version(first) >= 2, 90, "version 2 of the first run")
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait()
        coordinator = start_fedasync_coordinator(broker_url, second)
        wait_for(lambda: checkpoint_version(second) >= 2, 90, "version 2 of the second run, from site-0's updates")
        assert worker.poll() is None, "the site stayed connected through the change of run"
    finally:
        coordinator.send_signal(signal.SIGTERM)
        coordinator.wait(timeout=30)
        worker.wait(timeout=30)
    log = (tmp_path / "sites" / "site-0.log").read_text()
    assert "a new run" in log and "saying hello to it" in log
    assert {e["site"] for e in read_events(second, "update")} == {"site-0"}


def test_a_worker_follows_the_end_of_a_run_announced_as_it_started_and_ignores_an_earlier_runs(broker_url, tmp_path):
    """A site's latest-only queue may hold the end of a run that finished before its worker started:
    that is an earlier run's, and the worker waits for the next. An end announced while the worker
    was still importing PyTorch is its own run's (a site brought back as its run reached the
    target once waited on until it was killed)."""
    link = transport.connect(broker_url, 30, "test-run-ends")
    publisher = transport.Publisher(link)

    def announce_the_end() -> None:
        publisher.announcement(Announcement(
            protocol=PROTOCOL_VERSION, run_id=new_id(), version=4, payload_id=new_id(), chunks=1, size=1,
            digest="0" * 64, published_at=now(), final=True))

    def site_log(site: str) -> str:
        path = tmp_path / "sites" / f"{site}.log"
        return path.read_text() if path.exists() else ""

    workers = []
    try:
        assert publisher.welcome("site-8") is None
        announce_the_end()
        time.sleep(0.2)  # the process's start is known to a clock tick (10 ms): clearly after the end
        workers.append(start_worker(broker_url, "site-8", tmp_path / "sites" / "site-8.log"))
        wait_for(lambda: "ignoring the end of an earlier run (version 4)" in site_log("site-8"), 90,
                 "site-8 ignoring an end announced before it started")
        wait_for(lambda: "connected; waiting for a snapshot" in site_log("site-8"), 30, "site-8 waiting for a run")
        assert workers[0].poll() is None, "it waits for the next run"
        workers[0].kill()
        workers[0].wait()

        assert publisher.welcome("site-9") is None
        workers.append(start_worker(broker_url, "site-9", tmp_path / "sites" / "site-9.log"))
        announce_the_end()  # the worker is starting Python and importing PyTorch, seconds from connecting
        assert workers[1].wait(timeout=90) == 0, site_log("site-9")[-2000:]
        assert "the coordinator ended the run at version 4" in site_log("site-9")
        assert "ignoring" not in site_log("site-9")
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        link.close()


def test_sites_taken_offline_on_a_schedule_come_back_on_their_state_and_rounds_wait_for_them(broker_url, tmp_path):
    offline = {"site-2": [(0.5, 6.0)]}
    summary = run_federation(broker_url, tmp_path, site_names(3), offline=offline,
                             coordinator={"strategy": "fedavg", "sites": 3, "max_versions": 3})
    assert summary["final_version"] == 3 and summary["applied_per_site"]["site-2"] == 3
    log = (tmp_path / "sites" / "site-2.log").read_text()
    assert log.count("site site-2 connected") == 2, "killed once and started again, on the same log and state"
    rounds = [e["t"] for e in read_events(tmp_path, "snapshot") if e["version"] >= 1]
    assert rounds and max(rounds) >= 6.0, "a synchronous round waited for the site to come back"


def test_a_site_that_loses_its_connection_is_stood_in_for_by_its_latest_update_until_it_is_back(broker_url, tmp_path):
    """The default FedBuff asks the broker about quiet sites: a worker that was killed has no
    connection, and its latest update joins every step until its site sends again."""
    def start(site):
        return start_worker(broker_url, site, tmp_path / "sites" / f"{site}.log")

    def updates(site, after=0.0):
        return [e for e in read_events(tmp_path, "update") if e["site"] == site and e["t"] > after]

    coordinator = start_coordinator(broker_url, tmp_path, max_staleness=100_000, status_seconds=0.5)
    workers = {site: start(site) for site in site_names(3)}
    try:
        wait_for(lambda: updates("site-2"), 90, "an update from site-2")
        workers["site-2"].kill()
        workers["site-2"].wait()
        absent = wait_for(lambda: read_events(tmp_path, "site_absent"), 30, "site-2 found absent")
        link = transport.connect(broker_url, 30, "test-status")
        try:
            reader = transport.StatusReader(link)
            status = wait_for(lambda: (s := reader.read()) is not None and any(site.absent for site in s.sites) and s,
                              10, "a status that names the absent site")
        finally:
            link.close()
        workers["site-2"] = start("site-2")
        wait_for(lambda: updates("site-2", after=absent[0]["t"]), 90, "an update from site-2 once back")
        versions_while_away = [e for e in read_events(tmp_path, "snapshot") if e["t"] > absent[0]["t"]]
    finally:
        coordinator.send_signal(signal.SIGTERM)
        coordinator.wait(timeout=30)
        for worker in workers.values():
            worker.wait(timeout=30)
    assert [e["site"] for e in read_events(tmp_path, "site_absent")] == ["site-2"], "only the killed site, once"
    assert [site.site for site in status.sites if site.absent] == ["site-2"], "fedq status says so"
    assert versions_while_away, "the others went on while it was away"
    assert {site: w.returncode for site, w in workers.items()} == {site: 0 for site in site_names(3)}


def start_fedasync_coordinator(url, run_dir):
    return start_coordinator(url, run_dir, strategy="fedasync", max_staleness=100_000, checkpoint_seconds=0.2)


def checkpoint_version(run_dir):
    try:
        return read_checkpoint(run_dir / "checkpoint.fedq", model=False).version
    except (FileNotFoundError, OSError):
        return -1


def test_coordinator_killed_mid_run_resumes_and_counts_every_confirmed_update_once(broker_url, tmp_path):
    sites = site_names(6)
    coordinator = start_fedasync_coordinator(broker_url, tmp_path)
    workers = [start_worker(broker_url, site, tmp_path / "sites" / f"{site}.log", max_tasks=10) for site in sites]
    try:
        wait_for(lambda: checkpoint_version(tmp_path) >= 15, 90, "version 15")
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait()
        killed_at = checkpoint_version(tmp_path)
        time.sleep(1.0)  # the sites go on without it; their updates wait in the queue
        coordinator = start_fedasync_coordinator(broker_url, tmp_path)
        for worker in workers:
            assert worker.wait(timeout=120) == 0
        confirmed = confirmed_updates(tmp_path / "sites")
        assert len(confirmed) == 10 * len(sites)
        wait_for(lambda: set(confirmed) <= applied_once(tmp_path), 60, "every confirmed update in the ledger")
    finally:
        coordinator.send_signal(signal.SIGTERM)
        stopped = coordinator.wait(timeout=30)
        for worker in workers:
            worker.kill()
    assert stopped == 0, "SIGTERM ends the coordinator cleanly"
    log = (tmp_path / "coordinator.log").read_text()
    assert "stopping: received SIGTERM" in log
    summary = __import__("json").loads((tmp_path / "summary.json").read_text())
    assert summary["updates_applied"] == len(confirmed), "counts carry over the restart"
    assert sum(summary["applied_per_site"].values()) == len(confirmed)
    assert "resumed run" in log and f"at version {killed_at}" in log
    assert applied_once(tmp_path) == set(confirmed), "each confirmed update applied exactly once"
    assert read_checkpoint(tmp_path / "checkpoint.fedq").version == len(confirmed), "fedasync: one version per update"


def test_worker_killed_mid_upload_delivers_its_update_once(broker, broker_url, tmp_path):
    proxy = ChaosProxy(broker.port)
    proxy.bytes_per_second = 3e6  # a 20 MB update takes about 7 s
    with running_coordinator(broker_url, tmp_path, strategy="fedasync", task="tests.big_task:WideDigits",
                             upload_timeout=3.0) as coordinator:
        site_log = tmp_path / "sites" / "site-1.log"
        worker = start_worker(proxy.url(broker_url), "site-1", site_log, task="tests.big_task:WideDigits", max_tasks=1)
        wait_for(lambda: site_log.exists() and "trained on version 0" in site_log.read_text(), 120, "training done")
        time.sleep(2.0)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        outbox = list((tmp_path / "sites" / "site-1.outbox").glob("*.update"))
        assert len(outbox) == 1, "the unconfirmed update waits in the outbox"
        assert coordinator.version == 0, "half an update is never applied"
        proxy.bytes_per_second = None
        restarted = start_worker(proxy.url(broker_url), "site-1", site_log, task="tests.big_task:WideDigits", max_tasks=1)
        assert restarted.wait(timeout=120) == 0
        update_id = outbox[0].stem.split("-", 1)[1]
        event_for(tmp_path, update_id, timeout=30)
        wait_for(lambda: coordinator.version >= 1, 10, "the update applied")
        time.sleep(4.0)  # time for any repeated chunks to arrive and be discarded or deduplicated
        applied = [e for e in read_events(tmp_path, "update") if e["update_id"] == update_id]
        assert len(applied) == 1 and coordinator.version == 1
        assert not list((tmp_path / "sites" / "site-1.outbox").glob("*.update"))
    proxy.close()


def test_site_offline_for_25_versions_gets_only_the_newest_and_its_stale_update_is_weighted(broker, broker_url, tmp_path):
    proxy = ChaosProxy(broker.port)
    client = SiteClient(broker_url)
    with running_coordinator(broker_url, tmp_path, strategy="fedasync", alpha=0.5, staleness="polynomial",
                             staleness_a=0.5, max_staleness=100) as coordinator:
        worker = SiteWorker(
            load_settings(WorkerSettings, broker_url=proxy.url(broker_url), site="site-5", max_tasks=2,
                          task="tests.slow_task:SlowDigits", state_dir=tmp_path / "site-5"),
            load_task("tests.slow_task:SlowDigits"),
        )
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        wait_for(lambda: worker.snapshots_fetched == [0], 60, "the site's first snapshot")
        proxy.go_down()
        for version in range(25):
            event_for(tmp_path, client.send(coordinator, version, constant_delta(coordinator, 0.0)))
        wait_for(lambda: coordinator.version == 25, 10, "version 25")
        proxy.come_back()
        thread.join(90)
        assert not thread.is_alive()
        # Back online, its stale update lands first (making version 26); then it reads only the newest.
        assert len(worker.snapshots_fetched) == 2 and worker.snapshots_fetched[1] >= 25
        def applied():
            return [e for e in read_events(tmp_path, "update") if e["site"] == "site-5"]

        # The worker is done once the broker confirmed its second update, which may be before it is applied.
        wait_for(lambda: len(applied()) == 2, 30, "both of the site's updates applied")
        mine = applied()
        assert [e["base_version"] for e in mine] == worker.snapshots_fetched
        assert mine[0]["staleness"] == 25 and mine[0]["weight"] == pytest.approx(0.5 * 26**-0.5, rel=1e-5)
    client.close()
    proxy.close()

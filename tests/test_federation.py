"""End to end on a real RabbitMQ broker: coordinator, worker processes, snapshots and updates."""

import itertools
import logging
import multiprocessing
import re
import threading
import time

import pika
import pytest
import torch

from coordinator.checkpoint import read_checkpoint
from coordinator.server import Coordinator, ModelDiverged
from shared import transport
from shared.chunking import SITE_HEADER, chunk_count, iter_chunks, payload_digest
from shared.codecs import encode_tensors, get_codec
from shared.digits_task import dataset, partitions, score, site_number
from fedq.federation import run_federation, site_names
from shared.protocol import (
    MAX_CHUNK_BYTES, PROTOCOL_VERSION, Announcement, SnapshotHeader, decode_header, encode_payload, new_id, now,
    payload_size,
)
from coordinator.settings import CoordinatorSettings
from shared.settings import load_settings
from worker.settings import WorkerSettings
from shared.task import load_task
from coordinator.runlog import read_events
from tests.federation_helpers import (
    SiteClient, constant_delta, event_for, publish_updates, running_coordinator, wait_for,
)
from shared.model_state import trained_state
from shared.transport import stream as stream_module
from worker.site import SiteWorker

pytestmark = pytest.mark.broker


@pytest.mark.container
def test_a_coordinator_without_data_reaches_090_scored_by_its_sites_with_topk_updates_50x_smaller(broker_url,
                                                                                                   tmp_path):
    """The coordinator's task has no evaluate: the sites score versions on their held-out data, and
    the pooled score stops the run; updates are top-k int8, over 50x smaller than dense ones."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    summary = run_federation(
        broker_url, tmp_path, site_names(10),
        coordinator={"task": "tests.site_eval_task:DigitsWithoutCentralData", "strategy": "fedbuff",
                     "stop_at_accuracy": 0.90, "max_seconds": 150, "max_staleness": 10_000},
        worker={"codec": "topk-int8", "topk_fraction": 0.01},
    )
    assert summary["stop_reason"].startswith("accuracy"), summary["stop_reason"]
    assert summary["best_accuracy"] >= 0.90 and summary["updates_rejected"] == 0
    rounds = read_events(tmp_path, "federated_evaluation")
    assert rounds and all(r["sites"] == 10 and r["representative"] for r in rounds), "every site answers each round"
    scores = read_events(tmp_path, "site_evaluation")
    assert {s["site"] for s in scores} == set(site_names(10)) and all(s["set_aside"] is None for s in scores)
    evaluations = read_events(tmp_path, "evaluation")
    assert [e["version"] for e in evaluations] == [r["version"] for r in rounds], "the sites' score is the run's"

    # The best version is exported: it is the round's version, so each site that scored that very
    # version said exactly what the exported model scores on the site's share of the test split.
    best = tmp_path / "model-best.safetensors"
    with safe_open(str(best), framework="pt") as exported:
        said = float(exported.metadata()["fedq_accuracy"])
    task = load_task("shared.digits_task:DigitsStraggler")
    model = task.build_model()
    model.load_state_dict(load_file(str(best)))
    best_round = max(rounds, key=lambda r: r["accuracy"])
    assert said == best_round["accuracy"] >= 0.90
    at_round = [s for s in scores if s["round"] == s["version"] == best_round["version"]]
    _, X_test, _, y_test = dataset()
    for site_score in at_round:
        share = partitions()[1][site_number(site_score["site"])]
        assert score(model, X_test[share], y_test[share])["accuracy"] == pytest.approx(
            site_score["metrics"]["accuracy"], abs=1e-6), f"{site_score['site']} scored the exported version"
    # The sites' shares make up the whole test split, so the pooled score differs from the central
    # one only by the versions scored: a site scores the first version it holds from the round's on,
    # and the 3-second straggler (40 of the 360 samples) one about 30 versions on, in a run that
    # gains about a point of accuracy per version near its target. Two runs measured gaps of 0.014
    # and 0.053.
    central = task.evaluate(model)["accuracy"]
    assert abs(central - said) <= 0.08, (
        f"version {best_round['version']} scores {central:.3f} centrally; its sites said {said:.3f}, scoring "
        f"versions up to {best_round['newest_version']}")

    dense = sum(t.numel() * 4 for t in model.parameters())
    assert 0 < summary["mean_update_bytes"] < dense / 50
    residuals = list((tmp_path / "sites").glob("*.residual"))
    assert residuals, "lossy codecs keep an error-feedback residual on disk"


def test_stale_update_is_weighted_by_its_staleness_and_too_stale_is_dropped(broker_url, tmp_path):
    client = SiteClient(broker_url)
    with running_coordinator(broker_url, tmp_path, strategy="fedasync", alpha=0.5, staleness="polynomial",
                             staleness_a=0.5, max_staleness=3) as coordinator:
        for version in range(5):
            event_for(tmp_path, client.send(coordinator, version, constant_delta(coordinator, 0.0)))
        wait_for(lambda: coordinator.version == 5, 10, "version 5")

        before = {k: v.clone() for k, v in coordinator.params.items()}
        stale = event_for(tmp_path, client.send(coordinator, 3, constant_delta(coordinator, 1.0)))
        assert stale["staleness"] == 2
        assert stale["weight"] == pytest.approx(0.5 * 3**-0.5, rel=1e-5)
        for name, tensor in coordinator.params.items():
            assert torch.allclose(tensor - before[name], torch.full_like(tensor, 0.5 * 3**-0.5), atol=1e-6)

        before = {k: v.clone() for k, v in coordinator.params.items()}
        dropped = event_for(tmp_path, client.send(coordinator, 0, constant_delta(coordinator, 1.0)))
        assert dropped["event"] == "dropped"
        assert dropped["reason"] == "staleness 6 exceeds the maximum of 3"
        assert coordinator.version == 6
        assert all(torch.equal(t, before[k]) for k, t in coordinator.params.items()), "a dropped update changes nothing"
    client.close()
    published = [e["version"] for e in read_events(tmp_path, "snapshot")]
    assert published == sorted(set(published)) and published[-1] == 6, "each version published once, none again at the stop"


def test_site_joining_after_version_5_starts_from_the_newest(broker_url, tmp_path):
    client = SiteClient(broker_url)
    with running_coordinator(broker_url, tmp_path, strategy="fedasync") as coordinator:
        for version in range(6):
            event_for(tmp_path, client.send(coordinator, version, constant_delta(coordinator, 0.001)))
        wait_for(lambda: coordinator.version == 6, 10, "version 6")

        worker = SiteWorker(load_settings(WorkerSettings, broker_url=broker_url, site="site-3", max_tasks=1),
                            load_task("shared.digits_task:DigitsStraggler"))
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        thread.join(60)
        assert not thread.is_alive() and worker.sent == 1
        assert worker.snapshots_fetched == [6], "the late site read only the newest snapshot"
        wait_for(lambda: [e for e in read_events(tmp_path, "update") if e["site"] == "site-3"], 10, "site-3's update")
        joined = [e for e in read_events(tmp_path, "update") if e["site"] == "site-3"]
        assert joined[0]["base_version"] == 6 and joined[0]["staleness"] == 0
    client.close()


def test_garbage_is_dead_lettered_with_a_reason_and_changes_nothing(broker_url, tmp_path):
    with running_coordinator(broker_url, tmp_path, strategy="fedasync") as coordinator:
        before = {k: v.clone() for k, v in coordinator.params.items()}
        connection = transport.connect(broker_url, 30, "test-garbage")
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(transport.UPDATE_EXCHANGE, transport.LOBBY_KEY, b"\x00not a fedq message",
                              pika.BasicProperties(headers={"x-anything": 1}))

        def rejected():
            method, properties, body = channel.basic_get(transport.REJECTED, auto_ack=True)
            return (properties, body) if method else None

        properties, body = wait_for(rejected, 15, "a dead-lettered message")
        assert properties.headers["fedq-reason"] == "message has no fedq chunk headers"
        assert body == b"\x00not a fedq message" and properties.headers["fedq-bytes"] == len(body)
        # A large refused message is kept as evidence, not whole: dead-lettering a flood of them costs little.
        large = bytes(range(256)) * 4096
        channel.basic_publish(transport.UPDATE_EXCHANGE, transport.LOBBY_KEY, large, pika.BasicProperties())
        properties, body = wait_for(rejected, 15, "the large message dead-lettered")
        assert body == large[: transport.EVIDENCE_BYTES] and properties.headers["fedq-bytes"] == len(large)
        assert coordinator.version == 0 and coordinator.stop_reason is None
        assert all(torch.equal(t, before[k]) for k, t in coordinator.params.items())
        connection.close()


def test_training_longer_than_the_heartbeat_keeps_the_connection(broker_url, tmp_path, caplog):
    """With a 2 s heartbeat the broker drops a connection left alone for about 4 s; training takes 8 s."""
    caplog.set_level("INFO", logger="fedq.worker")
    with running_coordinator(broker_url, tmp_path, strategy="fedasync") as coordinator:
        worker = SiteWorker(
            load_settings(WorkerSettings, broker_url=broker_url, site="site-2", max_tasks=1, heartbeat=2,
                          task="tests.slow_task:SlowDigitsWithProgress"),
            load_task("tests.slow_task:SlowDigitsWithProgress"),
        )
        errors = []
        thread = threading.Thread(target=lambda: _capture(worker.run, errors), daemon=True)
        thread.start()
        thread.join(60)
        assert errors == [] and worker.sent == 1
        update = wait_for(lambda: read_events(tmp_path, "update"), 10, "the slow site's update")[0]
        assert update["site"] == "site-2" and update["train_seconds"] >= 8.0
        assert coordinator.version == 1
        assert "site site-2: training on version 0, 60% done" in caplog.text, "long training reports its progress"


def _capture(fn, errors):
    try:
        fn()
    except BaseException as exc:
        errors.append(exc)


def test_an_evaluation_of_three_heartbeats_keeps_the_coordinators_connection(broker_url, tmp_path, caplog):
    """With a 2 s heartbeat the broker drops a connection left alone for about 4 s; evaluating takes 6 s."""
    caplog.set_level("INFO", logger="shared.transport.connection")
    client = SiteClient(broker_url)
    with running_coordinator(broker_url, tmp_path, strategy="fedasync", heartbeat=2,
                             task="tests.slow_task:SlowlyScoredDigits") as coordinator:
        for version in range(2):  # each update makes a version, evaluated for 6 s while the next one waits
            event_for(tmp_path, client.send(coordinator, version, constant_delta(coordinator, 0.01)), timeout=30)
        wait_for(lambda: [e for e in read_events(tmp_path, "evaluation") if e["version"] == 2], 30, "version 2 scored")
        assert coordinator.version == 2
    client.close()
    assert "lost the broker" not in caplog.text, "the connection was kept through every evaluation"
    assert [e["version"] for e in read_events(tmp_path, "evaluation")] == [0, 1, 2]


def test_half_precision_snapshots_keep_a_full_precision_master(broker_url, tmp_path):
    with running_coordinator(broker_url, tmp_path, strategy="fedasync", snapshot_codec="fp16") as coordinator:
        initial = {k: v.clone() for k, v in coordinator.params.items()}
        worker = SiteWorker(load_settings(WorkerSettings, broker_url=broker_url, site="site-4", max_tasks=1),
                            load_task("shared.digits_task:DigitsStraggler"))
        worker.run()
        wait_for(lambda: coordinator.version == 1, 10, "the update")
        for name, tensor in initial.items():
            assert torch.equal(worker.base[name], tensor.half().float()), "the site trained from the fp16 snapshot"
        master = torch.cat([t.reshape(-1) for t in coordinator.params.values()])
        assert master.dtype == torch.float32
        assert not torch.equal(master, master.half().float()), "the coordinator's copy is not rounded to fp16"


def test_snapshot_larger_than_the_brokers_message_limit_arrives_verified(broker_url, tmp_path):
    with running_coordinator(broker_url, tmp_path, strategy="fedasync", task="tests.big_task:WideDigits") as coordinator:
        announcement = coordinator.announcement
        connection = transport.connect(broker_url, 30, "test-big-snapshot")
        channel = connection.channel()
        channel.confirm_delivery()
        # The broker itself refuses the snapshot as one message: chunking is what carries it.
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            channel.basic_publish(transport.REJECTED_EXCHANGE, "", bytes(announcement.size))
        assert refused.value.reply_code == 406 and "larger than configured max size" in refused.value.reply_text
        assert announcement.chunks >= 5

        worker = SiteWorker(load_settings(WorkerSettings, broker_url=broker_url, site="site-1", state_dir=tmp_path / "site"),
                            load_task("tests.big_task:WideDigits"))
        assert worker.fetch_snapshot(connection, announcement), "fetched, reassembled and digest-checked"
        assert worker.base_version == 0
        assert all(torch.equal(worker.base[name], tensor) for name, tensor in coordinator.params.items())
        connection.close()


def test_an_update_wider_than_the_prefetch_window_is_refused_not_left_to_stall(broker_url, tmp_path):
    client = SiteClient(broker_url)
    with running_coordinator(broker_url, tmp_path, strategy="fedasync", prefetch=8) as coordinator:
        update_id, payload = client.update_payload(coordinator, 0, constant_delta(coordinator, 0.01))
        transport.publish_payload(client.payloads, transport.UPDATE_EXCHANGE, transport.LOBBY_KEY, [memoryview(payload)], update_id,
                                  user_id=client.user, headers={SITE_HEADER: client.site},
                                  chunk_bytes=4096)  # 10 chunks; the window of prefetch 8 is 7
        refusals = wait_for(lambda: [e for e in read_events(tmp_path, "rejected") if "window of 7 chunks" in e["reason"]],
                            15, "the refusal")
        assert "raise FEDQ_PREFETCH" in refusals[0]["reason"]
        event_for(tmp_path, client.send(coordinator, 0, constant_delta(coordinator, 0.01)))
        assert coordinator.version == 1, "the coordinator goes on with updates that fit"
    client.close()


def publish_chunk(client: SiteClient, info, body: bytes, site: str) -> None:
    client.channel.basic_publish(transport.UPDATE_EXCHANGE, transport.LOBBY_KEY, body, pika.BasicProperties(
        delivery_mode=pika.DeliveryMode.Persistent, headers={**info.to_headers(), SITE_HEADER: site},
        user_id=client.user), mandatory=True)


def site_of(payload: bytes) -> str:
    return decode_header(payload)[0].site


def publish_interleaved(client: SiteClient, payloads: list[tuple[str, bytes]], chunk_bytes: int) -> None:
    """Publish the payloads' chunks in turn, one of each, as sites uploading at the same time do."""
    streams = [[(info, body, site_of(payload)) for info, body in iter_chunks([memoryview(payload)], payload_id, chunk_bytes)]
               for payload_id, payload in payloads]
    for row in itertools.zip_longest(*streams):
        for info, body, site in filter(None, row):
            publish_chunk(client, info, body, site)


def test_uploads_that_fill_the_window_together_are_spooled_and_all_applied(broker_url, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fedq.coordinator")
    client = SiteClient(broker_url)
    with running_coordinator(broker_url, tmp_path, strategy="fedasync", prefetch=8) as coordinator:
        payloads = [client.update_payload(coordinator, 0, constant_delta(coordinator, 0.01), site=f"site-{i}")
                    for i in range(3)]
        # Five chunks each, fifteen in all, interleaved: the window of 7 fills before any is whole.
        publish_interleaved(client, payloads, chunk_bytes=8192)
        for update_id, _ in payloads:
            event_for(tmp_path, update_id)
        assert coordinator.version == 3
        assert any("fill the window" in r.getMessage() for r in caplog.records), "nothing was spooled"
        # The versions come before their checkpoint: the files go with it, a moment later.
        wait_for(lambda: not list((tmp_path / "uploads").glob("*")), 10,
                 "spooled uploads are removed once applied and checkpointed")
    client.close()


def test_spooled_uploads_survive_a_coordinator_restart(broker_url, tmp_path):
    client = SiteClient(broker_url)
    with running_coordinator(broker_url, tmp_path, strategy="fedasync", prefetch=8) as coordinator:
        payloads = [client.update_payload(coordinator, 0, constant_delta(coordinator, 0.01), site=f"site-{i}")
                    for i in range(3)]
        chunked = [list(iter_chunks([memoryview(payload)], update_id, 8192)) for update_id, payload in payloads]
        for row in zip(*(chunks[:3] for chunks in chunked)):  # three of each five: nine, the window is 7
            for (info, body), (_, payload) in zip(row, payloads):
                publish_chunk(client, info, body, site_of(payload))
        wait_for(lambda: len(list((tmp_path / "uploads").glob("*.upload"))) == 3, 15, "three spooled uploads")
    with running_coordinator(broker_url, tmp_path, strategy="fedasync", prefetch=8) as coordinator:
        assert len(coordinator.uploads) == 3, "the restarted coordinator took the spooled uploads back"
        for chunks, (_, payload) in zip(chunked, payloads):
            for info, body in chunks[3:]:
                publish_chunk(client, info, body, site_of(payload))
        for update_id, _ in payloads:
            event_for(tmp_path, update_id)
        assert coordinator.version == 3
    client.close()


def test_a_site_reading_a_snapshot_moves_on_when_a_newer_one_is_announced(broker_url, tmp_path):
    client = SiteClient(broker_url)
    with running_coordinator(broker_url, tmp_path, strategy="fedasync") as coordinator:
        worker = SiteWorker(load_settings(WorkerSettings, broker_url=broker_url, site="site-1", state_dir=tmp_path / "site"),
                            load_task("shared.digits_task:DigitsStraggler"))
        connection = transport.connect(broker_url, 30, "test-superseded")
        transport.bind_site_queue(connection.channel(), "site-1")  # as the coordinator does on a site's hello
        transport.Announcements(connection, "site-1", worker.on_announcement)
        # A snapshot announced but never written, as when the coordinator lost the broker mid-write.
        lost = coordinator.announcement.model_copy(update={"payload_id": new_id()})
        worker.announcement = lost
        threading.Timer(1.0, lambda: client.send(coordinator, 0, constant_delta(coordinator, 0.01))).start()
        started = time.monotonic()
        assert not worker.fetch_snapshot(connection, lost)
        assert time.monotonic() - started < 30, "it did not wait out the snapshot timeout"
        assert worker.announcement.version == 1
        assert worker.fetch_snapshot(connection, worker.announcement) and worker.base_version == 1
        connection.close()
    client.close()


def digits_snapshot(version: int) -> tuple[dict[str, torch.Tensor], list, Announcement]:
    """The digits model as snapshot ``version`` in 8 KiB chunks: its tensors, payload and announcement."""
    params = trained_state(load_task("shared.digits_task:DigitsStraggler").build_model())
    specs, parts = encode_tensors(params, get_codec("fp32"))
    header = SnapshotHeader(protocol=PROTOCOL_VERSION, run_id=new_id(), version=version, created_at=now(), tensors=specs)
    buffers = encode_payload(header, parts)
    size = payload_size(buffers)
    announcement = Announcement(protocol=PROTOCOL_VERSION, run_id=header.run_id, version=version, payload_id=new_id(),
                                chunks=chunk_count(size, 8192), size=size, digest=payload_digest(buffers), published_at=now())
    return params, buffers, announcement


def publish_snapshot_chunks(broker_url: str, buffers: list, announcement: Announcement, count: int | None = None,
                            pause: float = 0.0) -> None:
    """Write the first ``count`` chunks (all by default) to the snapshot stream, ``pause`` seconds before each."""
    client = SiteClient(broker_url)
    chunks = iter_chunks(buffers, announcement.payload_id, 8192, announcement.digest)
    for info, body in itertools.islice(chunks, count):
        time.sleep(pause)
        client.channel.basic_publish(transport.SNAPSHOT_EXCHANGE, transport.SNAPSHOT_KEY, body,
                                     pika.BasicProperties(headers=info.to_headers()), mandatory=True)
    client.close()


def fetch_as_worker(broker_url: str, tmp_path, site: str, announcement: Announcement) -> tuple[SiteWorker, bool]:
    """A site worker that heard ``announcement`` reads it; the worker and whether the read succeeded."""
    worker = SiteWorker(load_settings(WorkerSettings, broker_url=broker_url, site=site, state_dir=tmp_path),
                        load_task("shared.digits_task:DigitsStraggler"))
    worker.announcement = announcement
    connection = transport.connect(broker_url, 30, f"test-read-{site}")
    try:
        return worker, worker.fetch_snapshot(connection, announcement)
    finally:
        connection.close()


def test_sites_find_each_snapshot_by_its_offset_whatever_the_coordinators_clock_says(broker_url, tmp_path, monkeypatch):
    """Snapshots were once looked for by the coordinator's clock: one a second or more ahead of the
    broker's hid every snapshot from the sites. Here it is a minute ahead."""
    import coordinator.server as server_module

    monkeypatch.setattr(server_module, "now", lambda: time.time() + 60)
    monkeypatch.setattr(stream_module, "READ_TIMEOUT", 20.0)  # by time, the read would never find it
    client = SiteClient(broker_url)
    # Somebody else's message in the stream before the coordinator starts must not shift its count.
    publish_snapshot_chunks(broker_url, *digits_snapshot(0)[1:], count=1)
    with running_coordinator(broker_url, tmp_path, strategy="fedasync") as coordinator:
        announcements = [coordinator.announcement]
        for version in range(2):
            client.send(coordinator, version, constant_delta(coordinator, 0.01))
            wait_for(lambda: coordinator.announcement.version == version + 1, 10, f"version {version + 1}")
            announcements.append(coordinator.announcement)
        worker, fetched = fetch_as_worker(broker_url, tmp_path, "site-1", announcements[-1])
        assert fetched and worker.base_version == 2 and worker.stream_attachments == 1
        assert all(torch.equal(worker.base[name], tensor) for name, tensor in coordinator.params.items())
        # Each announced offset is that of its snapshot's first chunk, exactly.
        channel = client.connection.channel()
        channel.basic_qos(prefetch_count=1)
        for announcement in announcements:
            heard = []
            tag = channel.basic_consume(transport.SNAPSHOTS, lambda ch, m, p, b: heard.append(p.headers),
                                        arguments={"x-stream-offset": announcement.stream_offset})
            while not heard:
                client.connection.serve(0.1)
            transport.cancel_stream_consumer(channel, tag)
            assert heard[0]["fedq-payload"] == announcement.payload_id and heard[0]["fedq-chunk"] == 0
        # Nothing follows the last snapshot, so the coordinator writes a marker after it a second
        # later, which wakes a reader the broker forgot to tell of its last chunk.
        last, heard = announcements[-1], []
        tag = channel.basic_consume(transport.SNAPSHOTS, lambda ch, m, p, b: heard.append(p.headers),
                                    arguments={"x-stream-offset": last.stream_offset + last.chunks})
        deadline = time.monotonic() + 10
        while not heard and time.monotonic() < deadline:
            client.connection.serve(0.1)
        transport.cancel_stream_consumer(channel, tag)
        assert heard and "fedq-marker" in heard[0], "a marker follows the last snapshot"
        # The coordinator's thread counts it just after writing it: the test may hear it first.
        wait_for(lambda: coordinator._publisher.stream_end == last.stream_offset + last.chunks + 1, 10,
                 "the marker counted in the stream's end")
    client.close()


@pytest.mark.parametrize("newer_run", [False, True], ids=["newer-version", "new-run"])
def test_a_snapshot_read_that_is_moving_finishes_whatever_version_is_announced_meanwhile(broker_url, tmp_path, newer_run):
    """Reads that started over on every newer version never ended where versions came faster than a
    snapshot reads. A read that is moving finishes; only a new run (or the run's end) stops it."""
    params, buffers, announcement = digits_snapshot(3)
    assert announcement.chunks >= 4
    newer = announcement.model_copy(update={"version": 4, "payload_id": new_id()})
    if newer_run:
        newer = newer.model_copy(update={"run_id": new_id()})
    worker = SiteWorker(load_settings(WorkerSettings, broker_url=broker_url, site="site-1", state_dir=tmp_path),
                        load_task("shared.digits_task:DigitsStraggler"))
    worker.announcement = announcement
    publisher = threading.Thread(target=publish_snapshot_chunks, args=(broker_url, buffers, announcement),
                                 kwargs={"pause": 0.2}, daemon=True)
    announced = threading.Timer(0.5, lambda: setattr(worker, "announcement", newer))
    connection = transport.connect(broker_url, 30, "test-read-moving")
    try:
        publisher.start()
        announced.start()
        fetched = worker.fetch_snapshot(connection, announcement)
        heard = worker.announcement
    finally:
        announced.cancel()
        connection.close()
        publisher.join(10)
    assert heard is newer, "the newer announcement came while the snapshot was being read"
    if newer_run:
        assert not fetched and worker.base is None, "a snapshot of an earlier run is of no use"
    else:
        assert fetched and worker.base_version == 3, "read whole though version 4 was announced meanwhile"
        assert all(torch.equal(worker.base[name], tensor) for name, tensor in params.items())


def test_a_snapshot_read_that_hears_nothing_attaches_again_just_past_what_it_heard(broker_url, tmp_path, monkeypatch,
                                                                                  caplog):
    """RabbitMQ 3.10 can miss telling a stream reader of a chunk committed as it attached; the worker
    attaches again after a silence. Here the pauses between chunks are such silences."""
    monkeypatch.setattr(stream_module, "STALL_SECONDS", 0.05)
    # At the test's scale: the waits grew by 4 from 0.05 s to 64 s, and once in CI (2026-12-07) the
    # read took all of pytest's 300 s, the same as READ_TIMEOUT, so nothing said how far it got.
    monkeypatch.setattr(stream_module, "LONGEST_STALL_SECONDS", 0.8)
    monkeypatch.setattr(stream_module, "READ_TIMEOUT", 120.0)
    params, buffers, announcement = digits_snapshot(3)
    assert announcement.chunks >= 4
    publisher = threading.Thread(target=publish_snapshot_chunks, args=(broker_url, buffers, announcement),
                                 kwargs={"pause": 0.4}, daemon=True)
    publisher.start()
    with caplog.at_level(logging.INFO, logger="fedq.worker"):
        worker, fetched = fetch_as_worker(broker_url, tmp_path, "site-1", announcement)
    publisher.join(10)
    assert fetched, f"read whole and digest-checked; the read said: {[r.getMessage() for r in caplog.records]}"
    assert worker.base_version == 3
    assert all(torch.equal(worker.base[name], tensor) for name, tensor in params.items())
    assert worker.stream_attachments >= 2, "it attached again past the chunks it had heard"


def test_a_snapshot_whose_chunks_stop_coming_is_given_up_with_how_far_the_read_got(broker_url, tmp_path, monkeypatch,
                                                                                   caplog):
    monkeypatch.setattr(stream_module, "STALL_SECONDS", 0.2)
    monkeypatch.setattr(stream_module, "READ_TIMEOUT", 2.0)
    _, buffers, announcement = digits_snapshot(5)
    sent = announcement.chunks // 2  # the coordinator was lost halfway through its publish
    publish_snapshot_chunks(broker_url, buffers, announcement, count=sent)
    with caplog.at_level(logging.INFO, logger="fedq.worker"):
        worker, fetched = fetch_as_worker(broker_url, tmp_path, "site-2", announcement)
    assert not fetched
    assert worker.base is None and worker.announcement is None, "it waits for the next version"
    [message] = [r.getMessage() for r in caplog.records if "cannot use snapshot version 5" in r.getMessage()]
    assert f"{sent} of {announcement.chunks} chunks came" in message
    attached = int(re.search(r"attached (\d+) times", message).group(1))
    assert attached == worker.stream_attachments >= 2, "it attached again after each silence"
    assert any("attached again at offset" in r.getMessage() for r in caplog.records), "and said so"


def test_a_publisher_wakes_the_readers_of_its_last_snapshot_once_and_counts_the_marker(broker_url):
    """RabbitMQ 3.10 can miss telling a stream reader of a chunk committed as it attached; the reader
    then waits for the next write. The coordinator writes one after a quiet second."""
    link = transport.connect(broker_url, 30, "test-wake-publisher")
    reading = transport.connect(broker_url, 30, "test-wake-reader")
    try:
        publisher = transport.Publisher(link)
        first_end = publisher.find_stream_end()
        assert first_end is not None
        assert not publisher.wake_readers(after=0.0), "nothing to wake before any snapshot"
        _, buffers, first = digits_snapshot(1)
        publisher.snapshot(buffers, first.payload_id, first.digest)
        after_first = publisher.stream_end
        assert after_first is not None and after_first > first_end
        assert not publisher.wake_readers(after=30.0), "not before the quiet time"
        assert publisher.wake_readers(after=0.0) and publisher.stream_end == after_first + 1
        assert not publisher.wake_readers(after=0.0), "once per snapshot"
        params, buffers, second = digits_snapshot(2)
        second = second.model_copy(update={"stream_offset": publisher.stream_end,
                                           "chunks": chunk_count(second.size, MAX_CHUNK_BYTES)})
        publisher.snapshot(buffers, second.payload_id, second.digest)
        reader = transport.SnapshotReader(reading, second, memoryview(bytearray(second.size)), newest=lambda: second,
                                          log=logging.getLogger("test"), who="site-1")
        assert reader.read() is not None and reader.attachments == 1, "the marker is not counted as a chunk"
    finally:
        link.close()
        reading.close()


@pytest.mark.parametrize("newer_announced", [False, True], ids=["same-version", "newer-version"])
def test_a_read_whose_stream_goes_on_past_its_snapshot_ends_at_once(broker_url, newer_announced):
    """The coordinator writes a snapshot's chunks back to back; another message after some of them
    means it lost the broker mid-write. Waiting out a silence would cost the site 30 s at first for
    a snapshot that will never be whole."""
    _, buffers, broken = digits_snapshot(5)
    sent = broken.chunks // 2
    publish_snapshot_chunks(broker_url, buffers, broken, count=sent)
    _, buffers, republished = digits_snapshot(5)
    republished = republished.model_copy(update={"run_id": broken.run_id})
    publish_snapshot_chunks(broker_url, buffers, republished)  # the version again, under its new payload id
    newest = republished if newer_announced else broken
    connection = transport.connect(broker_url, 30, "test-read-overtaken")
    started = time.monotonic()
    try:
        reader = transport.SnapshotReader(connection, broken, memoryview(bytearray(broken.size)),
                                          newest=lambda: newest, log=logging.getLogger("test"), who="site-3")
        if newer_announced:
            assert reader.read() is None, "it gives way to the version written again"
        else:
            with pytest.raises(transport.SnapshotUnavailable, match=f"went on past it after {sent} of {broken.chunks}"):
                reader.read()
    finally:
        connection.close()
    assert time.monotonic() - started < stream_module.STALL_SECONDS
    assert reader.attachments == 1 and reader.overtaken


@pytest.mark.parametrize("newer_announced", [False, True], ids=["no-newer-version", "newer-version"])
def test_a_read_that_finds_something_else_at_its_offset_gives_way_to_a_newer_version(broker_url, newer_announced):
    """A coordinator that lost the broker after announcing a snapshot, before its first chunk, writes
    a marker where the chunk would have been once it is back, then the version again. The read must
    not sit through those writes until a silence (30 s at first): it gives way to the newer
    announcement. With none, it reads on past, as past any message not its own."""
    link = transport.connect(broker_url, 30, "test-not-at-offset")
    reading = transport.connect(broker_url, 30, "test-not-at-offset-reader")
    try:
        publisher = transport.Publisher(link)
        end = publisher.find_stream_end()
        _, buffers, lost = digits_snapshot(5)
        lost = lost.model_copy(update={"stream_offset": end, "chunks": chunk_count(lost.size, MAX_CHUNK_BYTES)})
        newer = lost.model_copy(update={"payload_id": new_id(), "stream_offset": end + 1})
        publisher.find_stream_end()  # the coordinator back: a marker at the lost snapshot's offset
        publisher.snapshot(buffers, newer.payload_id if newer_announced else lost.payload_id, lost.digest)
        started = time.monotonic()
        reader = transport.SnapshotReader(reading, lost, memoryview(bytearray(lost.size)),
                                          newest=lambda: newer if newer_announced else lost,
                                          log=logging.getLogger("test"), who="site-4")
        payload = reader.read()
        assert time.monotonic() - started < stream_module.STALL_SECONDS and reader.attachments == 1
        if newer_announced:
            assert payload is None, "it gave way to the version written again"
        else:
            assert payload is not None, "its chunks came after the marker, and it read them"
    finally:
        link.close()
        reading.close()


def test_each_silence_of_a_read_is_waited_out_longer_and_the_sites_next_read_starts_there(broker_url, monkeypatch):
    """A broker serving a crowd of readers leaves most of them silent for seconds; readers that
    attached again after every second of it, read after read, threw away what the broker had begun
    to send them (1000 simulated sites: 16 reads completed in 2 minutes)."""
    monkeypatch.setattr(stream_module, "STALL_SECONDS", 0.1)
    monkeypatch.setattr(stream_module, "LONGEST_STALL_SECONDS", 1.6)
    monkeypatch.setattr(stream_module, "READ_TIMEOUT", 2.5)
    _, buffers, never_written = digits_snapshot(6)
    link = transport.connect(broker_url, 30, "test-read-patience")
    other = transport.connect(broker_url, 30, "test-read-patience-other")
    try:
        reader = transport.SnapshotReader(link, never_written, memoryview(bytearray(never_written.size)),
                                          newest=lambda: never_written, log=logging.getLogger("test"), who="site-1")
        assert reader.patience == 0.1
        with pytest.raises(transport.SnapshotUnavailable):
            reader.read()
        # Silences of 0.1, 0.4 and 1.6 s, and 1.6 s from then on: 2.5 s hold three attachments or four.
        assert 3 <= reader.attachments <= 4
        assert reader.patience == 1.6
        _, buffers, written = digits_snapshot(7)
        publish_snapshot_chunks(broker_url, buffers, written)
        fresh = lambda link: transport.SnapshotReader(
            link, written, memoryview(bytearray(written.size)), newest=lambda: written,
            log=logging.getLogger("test"), who="site-1")
        nearer_the_crowd, elsewhere = fresh(link), fresh(other)
        assert (nearer_the_crowd.patience, elsewhere.patience) == (1.6, 0.1), "patience belongs to the site's link"
        assert nearer_the_crowd.read() is not None and nearer_the_crowd.attachments == 1
        assert fresh(link).patience == 0.8, "a read without a silence halves the next one's wait"
    finally:
        link.close()
        other.close()


def test_a_coordinator_waiting_for_sites_logs_who_came_not_a_clock_that_has_not_started(broker_url, tmp_path, caplog):
    config = load_settings(CoordinatorSettings, broker_url=broker_url, run_dir=tmp_path, wait_for_sites=2,
                           status_seconds=0.2, metrics_port="")
    coordinator = Coordinator(config, load_task(config.task))
    with caplog.at_level(logging.INFO, logger="fedq.coordinator"):
        summary: list[dict] = []
        serving = threading.Thread(target=lambda: summary.append(coordinator.run()), daemon=True)
        serving.start()
        wait_for(lambda: sum("waiting for sites" in r.getMessage() for r in caplog.records) >= 3, 15, "waiting lines")
        coordinator.stop("test finished")
        serving.join(15)
    [summary] = summary  # the run ended cleanly, with its summary
    assert summary["stop_reason"] == "test finished" and summary["final_version"] == 0
    lines = [r.getMessage() for r in caplog.records]
    assert "waiting for sites: 0 of 2 said hello" in lines
    assert not any(line.startswith("version ") for line in lines), "no progress line before the first version"
    assert coordinator.announcement is None, "no version without its sites"


def test_a_merge_that_overflows_stops_the_run_before_the_model_is_checkpointed_or_published(broker_url, tmp_path):
    client = SiteClient(broker_url)
    with pytest.raises(ModelDiverged, match=r"version 2 of the model holds NaN or infinite values"):
        # The largest-value guard lifted (FEDQ_MAX_UPDATE_VALUE refuses such updates), as a server
        # optimizer that diverges would leave the model all the same.
        with running_coordinator(broker_url, tmp_path, strategy="fedasync", max_update_value=3.5e38) as coordinator:
            # Each update is finite; FedAsync mixes in 0.6 of each, and the second sum overflows float32.
            client.send(coordinator, 0, constant_delta(coordinator, 3e38))
            wait_for(lambda: coordinator.version == 1, 15, "version 1")
            client.send(coordinator, 1, constant_delta(coordinator, 3e38))
            wait_for(lambda: read_events(tmp_path, "diverged"), 15, "the divergence to be noticed")
            assert coordinator.announcement.version == 1, "the diverged version was announced"
    assert read_checkpoint(tmp_path / "checkpoint.fedq", model=False).version == 1
    # The update that overflowed was never acknowledged: it waits on the queue for a restart.
    depths = wait_for(lambda: (d := transport.queue_depths(client.channel))[transport.UPDATES] and d, 15, "the update requeued")
    assert depths == {transport.UPDATES: 1, transport.REJECTED: 0}
    client.close()


def test_a_coordinator_under_a_steady_flood_of_updates_still_stops_on_time(broker_url, tmp_path):
    """pika hands a consumer deliveries until none are pending, and publishing a snapshot lets more
    arrive: a coordinator that handled updates inside pika's callback never got back to its checks."""
    context = multiprocessing.get_context("spawn")
    ready, run_ids = context.Event(), context.Queue()
    # Ready first: the publisher's start-up (PyTorch's import) is not part of the coordinator's 3 s.
    flood = context.Process(target=publish_updates, args=(broker_url, ready, run_ids, 10**6), daemon=True)
    flood.start()
    try:
        assert ready.wait(60), "the publisher process did not start"
        with running_coordinator(broker_url, tmp_path, strategy="fedasync", max_seconds=3, max_staleness=10**6) as coordinator:
            run_ids.put(coordinator.run_id)
            wait_for(lambda: coordinator.stop_reason is not None, 20, "the coordinator to stop at max_seconds")
            assert coordinator.stop_reason == "ran for 3 s"
            applied = read_events(tmp_path, "update")
            assert applied and flood.is_alive(), "updates were still arriving when it stopped"
            assert applied[-1]["t"] < 4.0, "it stopped within a second of its limit"
    finally:
        flood.kill()
        flood.join()

"""Helpers for integration tests: a coordinator on a thread and a site client that speaks the real
protocol to the real broker. Nothing here stands in for RabbitMQ."""

from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from coordinator.runlog import read_events
from coordinator.server import Coordinator
from shared import transport
from shared.chunking import SITE_HEADER
from shared.codecs import encode_tensors, get_codec
from shared.protocol import PROTOCOL_VERSION, Hello, UpdateHeader, encode_payload, new_id
from coordinator.settings import CoordinatorSettings
from shared.settings import load_settings
from shared.task import load_task


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextmanager
def running_coordinator(broker_url: str, run_dir: Path, **settings: Any) -> Iterator[Coordinator]:
    """A coordinator serving on a background thread until the block ends."""
    config = load_settings(CoordinatorSettings, broker_url=broker_url, run_dir=run_dir, **settings)
    coordinator = Coordinator(config, load_task(config.task))
    errors: list[BaseException] = []

    def serve():
        try:
            coordinator.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    wait_for(lambda: coordinator.announcement is not None or errors, 30, "the first snapshot")
    try:
        yield coordinator
    finally:
        coordinator.stop("test finished")
        thread.join(15)
    if errors:
        raise errors[0]


def event_for(run_dir: Path, update_id: str, timeout: float = 15) -> dict:
    return wait_for(
        lambda: next((e for e in read_events(run_dir) if e.get("update_id") == update_id), None), timeout, f"update {update_id}"
    )


class SiteClient:
    """Publishes hand-made updates through the broker exactly as a worker would."""

    def __init__(self, broker_url: str, site: str = "site-1"):
        self.connection = transport.connect(broker_url, 30, f"test-{site}")
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()  # raw publishes, each confirmed before the next
        self.payloads = transport.confirmed_channel(self.connection)  # payloads, chunked as a worker sends them
        self.site = site
        self.user = transport.broker_user(broker_url)

    def update_payload(self, coordinator: Coordinator, base_version: int, delta: dict[str, torch.Tensor],
                       num_samples: int = 10, site: str | None = None) -> tuple[str, bytes]:
        """A well-formed update's id and payload bytes."""
        specs, parts = encode_tensors(delta, get_codec("fp32"))
        header = UpdateHeader(
            protocol=PROTOCOL_VERSION, update_id=new_id(), run_id=coordinator.run_id, site=site or self.site,
            base_version=base_version, num_samples=num_samples, train_seconds=0.0, tensors=specs,
        )
        return header.update_id, b"".join(encode_payload(header, parts))

    def publish(self, payload: bytes, payload_id: str | None = None, user_id: str | None = "",
                site: str | None = None) -> None:
        """Publish payload bytes as chunks, naming ``site`` (this client's by default); ``user_id=None``
        sends none, "" sends this client's user."""
        transport.publish_payload(self.payloads, transport.UPDATE_EXCHANGE, transport.update_key(site or self.site),
                                  [memoryview(payload)],
                                  payload_id or new_id(), user_id=self.user if user_id == "" else user_id,
                                  headers={SITE_HEADER: site or self.site})

    def hello(self) -> None:
        """Say hello as a worker does: the coordinator opens this site's own update queue."""
        transport.publish_payload(self.payloads, transport.UPDATE_EXCHANGE, transport.hello_key(self.site),
                                  encode_payload(Hello(protocol=PROTOCOL_VERSION, site=self.site), []), new_id(),
                                  user_id=self.user, headers={SITE_HEADER: self.site})

    def send(self, coordinator: Coordinator, base_version: int, delta: dict[str, torch.Tensor], num_samples: int = 10) -> str:
        update_id, payload = self.update_payload(coordinator, base_version, delta, num_samples)
        self.publish(payload, update_id)
        return update_id

    def close(self) -> None:
        self.connection.close()


def publish_updates(broker_url: str, ready, run_ids, count: int) -> None:
    """Set the event ``ready`` once connected, then publish ``count`` zero updates of the digits
    model, as fast as the broker confirms them, to the run whose id arrives on the queue
    ``run_ids``. Run in a process of its own, it outpaces a coordinator that makes a version of each."""
    client = SiteClient(broker_url)
    zero = {name: torch.zeros(t.shape) for name, t in load_task("shared.digits_task:DigitsStraggler").build_model().state_dict().items()}
    specs, parts = encode_tensors(zero, get_codec("fp32"))
    ready.set()
    run_id = run_ids.get(timeout=60)
    for _ in range(count):
        header = UpdateHeader(protocol=PROTOCOL_VERSION, update_id=new_id(), run_id=run_id, site=client.site,
                              base_version=0, num_samples=10, train_seconds=0.0, tensors=specs)
        client.publish(b"".join(encode_payload(header, parts)), header.update_id)
    client.close()


def constant_delta(coordinator: Coordinator, value: float) -> dict[str, torch.Tensor]:
    return {name: torch.full(tuple(t.shape), value) for name, t in coordinator.params.items()}


def confirmed_updates(log_folder: Path) -> list[str]:
    """Update ids the workers logged as confirmed by the broker."""
    ids = []
    for log_file in log_folder.glob("*.log"):
        ids += re.findall(r"update ([0-9a-f]{16}) confirmed by the broker", log_file.read_text())
    return ids

"""load sites: N simulated sites against a real coordinator, at the protocol level (no training).

Each simulated site is what a worker is to the broker: a connection of its own, its latest-only
announcement queue, a hello. It reads every snapshot it is told about from the stream (through the
worker's own ``SnapshotReader``, digest-checked), waits a training time drawn from an exponential
distribution of mean ``--train-seconds``, and sends a top-k int8 update of the model (1% of its
values, as workers send by default) based on the version it read. Sites are threads, each with its
own connection, spread over ``--processes`` processes. The coordinator is a real one, FedBuff with a
buffer of ``--buffer-size`` updates (3 by default: a version every three updates, the most
versions and so the hardest case for delivery, as every earlier table here was measured; empty for
the coordinator's default, a quarter of the active sites and at least three), on a model of
``--parameters`` fp32 values in one linear layer. A simulated site does not train a version twice:
it waits for the next, so with a buffer of a quarter of the sites, a quarter of them read each new
version at once.

Measured at each N, over ``--seconds`` after the first version (every site has said hello by then):

- updates applied per second, and updates refused (the coordinator's run log);
- snapshot delivery: for each snapshot a site read, from its announcement's ``published_at`` (the
  coordinator's clock, the same machine's) to the read's end, p50 and p99 over every read; and the
  same for the announcement alone;
- the coordinator's resident memory (sampled each second: first and last after start-up, peak),
  the broker node's memory (management API) and its connections.

    python benchmarks/load_sites.py --sites 100 300 1000
    python benchmarks/load_sites.py --sites 20 --seconds 20      # a quick check

Writes benchmarks/results/load_sites.json and load_sites.md, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import random
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coordinator.strategies import ACTIVE_SITES_PER_PLACE, SMALLEST_BUFFER
from shared.task import Task

RESULTS = Path(__file__).parent / "results"
# What a row with --buffer-size "" ran, from the rule itself: rows outlive a change of default.
DEFAULT_BUFFER = f"1/{ACTIVE_SITES_PER_PLACE} of the active sites, at least {SMALLEST_BUFFER} (the default)"
PARAMETERS_VARIABLE = "FEDQ_BENCH_PARAMETERS"  # the coordinator builds the same model from it
log = logging.getLogger("fedq.load")


class FlatModel(Task):
    """A model of one linear layer with about ``FEDQ_BENCH_PARAMETERS`` values; sites never train it
    here, and nobody scores it."""

    def build_model(self) -> nn.Module:
        side = max(1, int(int(os.environ.get(PARAMETERS_VARIABLE, "1000000")) ** 0.5))
        torch.manual_seed(0)
        return nn.Linear(side, side, bias=False)

    def train(self, model, site):
        raise NotImplementedError("the load generator's sites send updates without training")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class SimulatedSite(threading.Thread):
    """One site: connect, hello, then read each announced snapshot and answer it with an update."""

    def __init__(self, url: str, site: str, update_parts, update_specs, train_seconds: float, seconds: float,
                 start_by: float, rng: random.Random):
        super().__init__(name=site, daemon=True)
        self.url, self.site, self.parts, self.specs = url, site, update_parts, update_specs
        self.train_seconds, self.seconds, self.start_by, self.rng = train_seconds, seconds, start_by, rng
        self.announcement = None
        self.announced_at: dict[int, float] = {}  # version -> when this site heard of it
        self.reads: list[tuple[int, float, float]] = []  # (version, published_at, read done)
        self.sent = 0
        self.attachments = 0  # to the stream, over all its reads: more than one per read after silences
        self.error: str | None = None

    def on_announcement(self, headers, body) -> None:
        from shared.chunking import read_single
        from shared.protocol import Announcement, decode_header

        header, _ = decode_header(read_single(headers, body))
        if isinstance(header, Announcement):
            self.announcement = header
            self.announced_at.setdefault(header.version, time.time())

    def run(self) -> None:
        from shared import transport
        from shared.protocol import (
            PROTOCOL_VERSION,
            Hello,
            UpdateHeader,
            encode_payload,
            new_id,
        )

        try:
            link = transport.connect(self.url, 60, f"load-{self.site}")
            publisher = transport.Publisher(link)
            transport.Announcements(link, self.site, self.on_announcement)
            user = transport.broker_user(self.url)
            publisher.update(encode_payload(Hello(protocol=PROTOCOL_VERSION, site=self.site), []), new_id(), user,
                             self.site, hello=True)
            # The clock is the first version's: it comes once every site has said hello.
            link.serve_until(lambda: self.announcement is not None, timeout=max(0.0, self.start_by - time.time()))
            if self.announcement is None:
                raise TimeoutError("no version was announced by the time start-up should have ended")
            stop_at = self.announcement.published_at + self.seconds
            held = None
            while time.time() < stop_at:
                link.serve_until(lambda held=held: self.announcement is not None and self.announcement.version != held
                                 and not self.announcement.final, timeout=stop_at - time.time())
                announcement = self.announcement
                if announcement is None or announcement.final or announcement.version == held:
                    continue
                buffer = memoryview(bytearray(announcement.size))
                reader = transport.SnapshotReader(
                    link, announcement, buffer, log=log, who=self.site, newest=lambda: self.announcement)
                payload = reader.read()
                self.attachments += reader.attachments
                if payload is None:
                    continue  # it gave way to a newer announcement: read that one
                self.reads.append((announcement.version, announcement.published_at, time.time()))
                held = announcement.version
                link.sleep(self.rng.expovariate(1.0 / self.train_seconds))
                header = UpdateHeader(protocol=PROTOCOL_VERSION, update_id=new_id(), run_id=announcement.run_id,
                                      site=self.site, base_version=held, num_samples=100, train_seconds=0.0,
                                      tensors=self.specs)
                publisher.update(encode_payload(header, self.parts), header.update_id, user, self.site)
                self.sent += 1
            link.close()
        except Exception as exc:  # noqa: BLE001 - reported with the results, so one site's failure is seen
            self.error = f"{type(exc).__name__}: {exc}"


def run_sites(url: str, names: list[str], parameters: int, train_seconds: float, seconds: float, start_by: float,
              out: Path) -> None:
    """One process's sites, as threads; writes what each saw to ``out``."""
    from shared.codecs import encode_tensors, get_codec

    os.environ[PARAMETERS_VARIABLE] = str(parameters)
    model = FlatModel().build_model()
    delta = {name: torch.randn(t.shape) * 1e-3 for name, t in model.state_dict().items()}
    specs, parts = encode_tensors(delta, get_codec("topk-int8"))
    rng = random.Random(names[0])
    sites = [SimulatedSite(url, name, parts, specs, train_seconds, seconds, start_by, random.Random(rng.random()))
             for name in names]
    for site in sites:
        site.start()
        time.sleep(0.005)  # a thousand logins at once would measure the login storm, not the federation
    # One deadline for all: each site ends ``seconds`` after the first version, announced by start_by.
    deadline = start_by + seconds + 120
    for site in sites:
        site.join(timeout=max(0.0, deadline - time.time()))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.write_text(json.dumps({"cpu_seconds": usage.ru_utime + usage.ru_stime,
                               "sites": {site.site: {"reads": site.reads, "announced_at": site.announced_at,
                                                     "sent": site.sent, "attachments": site.attachments,
                                                     "error": site.error} for site in sites}}))


def cpu_seconds(pid: int | None) -> float | None:
    """User and system CPU seconds process ``pid`` has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def resident_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure(broker, sites: int, parameters: int, seconds: float, train_seconds: float, processes: int,
            buffer_size: str, work_dir: Path) -> dict:
    from coordinator.runlog import read_events
    from fedq.federation import site_names, start_coordinator

    vhost = f"load-{sites}-{int(time.time())}"
    url = broker.create_vhost(vhost)
    run_dir = work_dir / f"load-{sites}"
    names = site_names(sites)
    os.environ[PARAMETERS_VARIABLE] = str(parameters)
    started = time.time()
    coordinator = start_coordinator(url, run_dir, task="benchmarks.load_sites:FlatModel", wait_for_sites=sites,
                                    torch_threads=1, metrics_port="", status_seconds=5, buffer_size=buffer_size)
    samples: list[tuple[float, int]] = []
    coordinator_cpu = None
    broker_memory: list[int] = []
    connections = 0
    try:
        # Each site stops ``seconds`` after the first version, which comes once all have said hello:
        # their start-up is not measured. 1000 sites once took more than a minute to say hello.
        start_by = time.time() + 60 + sites * 0.2
        context = multiprocessing.get_context("spawn")
        outputs = [work_dir / f"sites-{sites}-{p}.json" for p in range(processes)]
        workers = [context.Process(target=run_sites, args=(url, names[p::processes], parameters, train_seconds,
                                                         seconds, start_by, outputs[p])) for p in range(processes)]
        for worker in workers:
            worker.start()
        tick = 0
        beam = broker.node.beam_pid() if broker.node is not None else None
        broker_cpu_before = cpu_seconds(beam)
        while any(worker.is_alive() for worker in workers):
            coordinator_cpu = cpu_seconds(coordinator.pid) or coordinator_cpu
            rss = resident_bytes(coordinator.pid)
            if rss is not None:
                samples.append((time.time(), rss))
            tick += 1
            if broker.management_url is not None and tick % 5 == 0:
                # Both are filled in by the broker's statistics a few seconds after it starts.
                used = broker.management_api("GET", "/api/nodes")[0].get("mem_used")
                if used is not None:
                    broker_memory.append(used)
                totals = broker.management_api("GET", "/api/overview").get("object_totals", {})
                connections = max(connections, totals.get("connections", 0))
            time.sleep(1.0)
        broker_cpu = cpu_seconds(beam)
        seen, sites_cpu = {}, 0.0
        for output in outputs:
            if output.exists():
                report = json.loads(output.read_text())
                seen.update(report["sites"])
                sites_cpu += report["cpu_seconds"]
    finally:
        coordinator.terminate()
        coordinator.wait(timeout=120)
        broker.delete_vhost(vhost)
    events = read_events(run_dir)
    first = next((e["t"] for e in events if e["event"] == "snapshot"), None)
    applied = [e for e in events if e["event"] == "update"]
    refused = [e for e in events if e["event"] == "rejected"]
    span = max((e["t"] for e in applied), default=0.0) - (first or 0.0)
    reads = [done - published for site in seen.values() for _, published, done in site["reads"]]
    heard = []
    published_at = {e["version"]: None for e in events if e["event"] == "snapshot"}
    for site in seen.values():
        for version, published, _ in site["reads"]:
            published_at[version] = published
    for site in seen.values():
        heard += [float(at) - published_at[int(v)] for v, at in site["announced_at"].items()
                  if published_at.get(int(v)) is not None]
    # From the first version on: every site has said hello, and the model and its buffers exist.
    after_start = [rss for t, rss in samples if first is not None and t >= started + first]
    errors = sorted({site["error"] for site in seen.values() if site["error"]})
    return {
        "sites": sites, "sites_reporting": len(seen), "site_errors": errors[:5], "parameters": parameters,
        "buffer_size": buffer_size or DEFAULT_BUFFER,
        "seconds": round(span, 1), "versions": len(published_at),
        "updates_sent": sum(site["sent"] for site in seen.values()), "updates_applied": len(applied),
        "updates_refused": len(refused), "applied_per_second": round(len(applied) / span, 1) if span > 0 else None,
        "snapshot_reads": len(reads), "stream_attachments": sum(site["attachments"] for site in seen.values()),
        "delivery_p50": percentile(reads, 0.50), "delivery_p99": percentile(reads, 0.99),
        "announcement_p50": percentile(heard, 0.50), "announcement_p99": percentile(heard, 0.99),
        "coordinator_rss_first": after_start[0] if after_start else None,
        "coordinator_rss_last": after_start[-1] if after_start else None,
        "coordinator_rss_peak": max((rss for _, rss in samples), default=None),
        "broker_memory_peak": max(broker_memory, default=None), "connections_peak": connections,
        # Where the machine's CPU went, over the whole measurement (start-up included).
        "cpu_seconds": {"coordinator": coordinator_cpu, "sites": round(sites_cpu, 1),
                        "broker": None if broker_cpu is None or broker_cpu_before is None
                        else round(broker_cpu - broker_cpu_before, 1)},
        "wall_seconds": round(time.time() - started, 1),
    }


def table(rows: list[dict]) -> str:
    def seconds(value):
        return "-" if value is None else f"{value:.2f} s"

    def megabytes(value):
        return "-" if value is None else f"{value / 1e6:.0f} MB"

    def per_read(r):
        # Reads that gave way to a newer version, or were still under way at the end, attached too.
        return f"{r['stream_attachments'] / r['snapshot_reads']:.1f}" if r.get("snapshot_reads") else "-"

    # Delivery times are of the reads that completed: where few did, their count says more.
    lines = [("| sites | updates applied/s (refused) | snapshot reads completed | snapshot delivery p50 / p99 | "
              "announcement p50 / p99 | coordinator memory (first, last, peak) | broker memory peak | connections | "
              "stream attachments per read |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['sites']} | {r['applied_per_second']} ({r['updates_refused']}) | {r['snapshot_reads']} | "
            f"{seconds(r['delivery_p50'])} / "
            f"{seconds(r['delivery_p99'])} | {seconds(r['announcement_p50'])} / {seconds(r['announcement_p99'])} | "
            f"{megabytes(r['coordinator_rss_first'])}, {megabytes(r['coordinator_rss_last'])}, "
            f"{megabytes(r['coordinator_rss_peak'])} | {megabytes(r['broker_memory_peak'])} | {r['connections_peak']} | "
            f"{per_read(r)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--parameters", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=60.0, help="measured, after every site has said hello")
    parser.add_argument("--train-seconds", type=float, default=10.0, help="mean of each site's simulated training")
    parser.add_argument("--processes", type=int, default=4, help="processes the sites' threads are spread over")
    parser.add_argument("--buffer-size", default="3", help=f"the coordinator's FedBuff K; empty: "
                        f"{DEFAULT_BUFFER}")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", type=Path, help="keep each size's coordinator log and run log in this folder "
                        "(by default they go with a temporary one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

    from fedq.local_broker import find_broker

    rows = []
    broker = find_broker()
    try:
        with tempfile.TemporaryDirectory(prefix="fedq-load-") as temporary:
            work = args.keep or temporary
            for sites in args.sites:
                row = measure(broker, sites, args.parameters, args.seconds, args.train_seconds, args.processes,
                              args.buffer_size, Path(work))
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        broker.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load_sites.json").write_text(json.dumps(rows, indent=1))
    (args.out / "load_sites.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()

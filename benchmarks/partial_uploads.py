"""partial uploads: one hostile site streams unfinished uploads at a real coordinator for a minute.

The coordinator runs as its own process (``python -m fedq coordinator``) on a throwaway vhost of the
local broker, with a 4.9M-parameter model (tests.big_task:WideDigits, 19.7 MB updates), FedAsync,
and a small sender budget (FEDQ_SENDER_UPLOADS x FEDQ_SENDER_UPLOAD_BYTES) so that its bound shows.
Sites are provisioned users (FEDQ_ANY_SITE_USERS=[]), so the hostile user speaks for one site only.
Both sites say hello first, as workers do, so each sends into a queue of its own with a prefetch
window of its own: the hostile site can fill only its own.
For ``--seconds`` it publishes, as fast as the broker takes them (no confirms; the harness keeps
at most ``--backlog`` messages waiting on the queue, so the coordinator always has a full prefetch
window to take), a cycle of:

  partial      new payload ids claiming up to the budget, every chunk but the last (4 MiB chunks)
  repeat       chunks of its first uploads again (they fill the coordinator's window, so it spools)
  huge-window  a claim of FEDQ_MAX_UPDATE_BYTES in the broker's largest messages, more chunks than the window
  huge-budget  a claim of up to 1.5 GiB in the broker's largest messages, within the window, far over the budget
  over-max     a claim of 1 TiB, over FEDQ_MAX_UPDATE_BYTES
  other-site   a partial upload naming the honest site
  abandon      (with --abandon only) a chunk of the wrong length for each of the two uploads it
               began in the cycle, which makes the coordinator drop them and so frees its budget
               for the next cycle's (whose repeats then fill the window on their own)

Measured from outside the coordinator process: resident memory idle (VmRSS) and the peak while
under attack (VmHWM, reset just before the attack through /proc/PID/clear_refs, and VmRSS sampled
every 50 ms); bytes it wrote (/proc/PID/io write_bytes) and, by sampling its upload spool folder,
what the spool held at most at once and wrote in all; chunks sent, and refusals from its run log
(events.jsonl) and the fedq.rejected queue. Afterwards an honest site sends one update, which must
be applied.

    python benchmarks/partial_uploads.py [--seconds 60] [--moves partial,repeat,...] [--abandon]

Writes benchmarks/results/partial_uploads.json (with other moves or prefetch than the default, the
file name says which: partial_uploads.huge-window.json, partial_uploads.abandon.json,
partial_uploads.prefetch16.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import sys
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the model lives with the tests

RESULTS = Path(__file__).parent / "results"
TASK = "tests.big_task:WideDigits"
MiB = 1024 * 1024
CHUNK = 4 * MiB  # what sites send (shared.protocol.MAX_CHUNK_BYTES)
PREFETCH = 128  # the coordinator's default FEDQ_PREFETCH


def broker_max_message_size() -> int:
    """The largest message the broker takes (broker_config/rabbitmq.conf): the largest chunk a hostile site can send."""
    found = re.search(r"^max_message_size\s*=\s*(\d+)", (ROOT / "broker_config" / "rabbitmq.conf").read_text(), re.MULTILINE)
    return int(found.group(1)) if found else 128 * MiB  # RabbitMQ's default


BIG_CHUNK = broker_max_message_size()
MOVES = ("partial", "repeat", "huge-window", "huge-budget", "over-max", "other-site")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def proc_io(pid: int) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())}


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current resident size (Linux 4.0+: clear_refs 5)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class Sampler(threading.Thread):
    """Every 50 ms: the coordinator's resident memory, and the files in its upload spool."""

    def __init__(self, pid: int, spool: Path):
        super().__init__(daemon=True)
        self.pid, self.spool = pid, spool
        self.max_rss = 0
        self.max_spool_bytes = 0  # the most the spool folder held at once
        self.max_spool_files = 0
        self.file_sizes: dict[tuple[str, int], int] = {}  # (name, inode) -> largest size seen
        self.stopped = threading.Event()
        self.started: float | None = None  # when the attack began: from then on, one point a second
        self.series: list[tuple[float, int, int]] = []  # (seconds into the attack, VmRSS, spool bytes)

    def sample(self) -> None:
        try:
            self._rss = proc_status(self.pid)["VmRSS"]
        except (OSError, KeyError):
            return
        self.max_rss = max(self.max_rss, self._rss)
        total = files = 0
        for path in self.spool.glob("*.upload"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            key = (path.name, stat.st_ino)
            self.file_sizes[key] = max(self.file_sizes.get(key, 0), stat.st_size)
            total += stat.st_size
            files += 1
        self.max_spool_bytes = max(self.max_spool_bytes, total)
        self.max_spool_files = max(self.max_spool_files, files)
        if self.started is not None:
            elapsed = time.monotonic() - self.started
            if not self.series or elapsed - self.series[-1][0] >= 1.0:
                self.series.append((round(elapsed, 2), self._rss, total))

    @property
    def spool_written(self) -> int:
        """Bytes appended to spool files, as far as samples saw them (files are append-only)."""
        return sum(self.file_sizes.values())

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            self.sample()


class HostileSite:
    """One site's user publishing partial uploads, as fast as the broker takes them."""

    def __init__(self, url: str, site: str, other_site: str, budget_bytes: int, max_update_bytes: int, window: int,
                 moves: list[str], throttle):
        import pika

        from shared import transport

        self.pika, self.transport = pika, transport
        self.link = transport.connect(url, 30, f"hostile-{site}")
        # No confirms: it publishes as fast as the broker takes messages (the broker's flow control,
        # and ``throttle``, which keeps the queue's backlog bounded, are all that slow it down).
        self.channel = self.link.channel()
        self.throttle = throttle
        self.deadline = float("inf")
        self.user = transport.broker_user(url)
        self.site, self.other_site = site, other_site
        self.budget_bytes, self.max_update_bytes, self.window = budget_bytes, max_update_bytes, window
        self.moves = moves
        self.bodies = {size: os.urandom(size) for size in (CHUNK, BIG_CHUNK)}
        self.sent: Counter[str] = Counter()
        self.bytes_sent = 0
        self.started: list[tuple[str, int]] = []  # (payload id, claimed size) of its partial uploads

    def chunk(self, move: str, payload_id: str, index: int, size: int, chunk_bytes: int, *, length: int | None = None,
              site: str | None = None) -> None:
        from shared.chunking import SITE_HEADER, ChunkInfo, chunk_count

        if time.monotonic() >= self.deadline:
            return
        if sum(self.sent.values()) % 16 == 0:
            self.throttle()
            if time.monotonic() >= self.deadline:
                return
        count = chunk_count(size, chunk_bytes)
        info = ChunkInfo(payload_id, index, count, size, chunk_bytes, "0" * 64 if index == count - 1 else None)
        length = min(chunk_bytes, size - info.offset) if length is None else length
        body = self.bodies[chunk_bytes][:length] if length != chunk_bytes else self.bodies[chunk_bytes]
        self.channel.basic_publish(
            self.transport.UPDATE_EXCHANGE, self.transport.update_key(self.site), body,
            self.pika.BasicProperties(delivery_mode=2, headers={**info.to_headers(), SITE_HEADER: site or self.site},
                                      user_id=self.user), mandatory=True)
        self.sent[move] += 1
        self.bytes_sent += length

    def partial(self, size: int, site: str | None = None, move: str = "partial") -> None:
        """A new upload claiming ``size`` bytes: every chunk but the last."""
        from shared.protocol import new_id

        payload_id = new_id()
        count = -(-size // CHUNK)
        for index in range(count - 1):
            self.chunk(move, payload_id, index, size, CHUNK, site=site)
        if site is None:
            self.started.append((payload_id, size))

    def cycle(self) -> None:
        from shared.protocol import new_id

        abandon = "abandon" in self.moves
        first = len(self.started)
        if "partial" in self.moves:
            for size in (self.budget_bytes // 2, self.budget_bytes // 2, self.budget_bytes, self.budget_bytes // 4):
                self.partial(size)
        if "repeat" in self.moves and self.started:
            # Chunks of the two uploads the coordinator holds, again: its first two (they never finish,
            # and each repeat keeps them from idling out), or this cycle's first two when it abandons
            # its uploads every cycle. Repeats fill the coordinator's window, so it spools them; when
            # it abandons, it repeats enough to fill the window every cycle.
            held = self.started[first : first + 2] if abandon else self.started[:2]
            sent = max(1, sum(-(-size // CHUNK) - 1 for _, size in held))
            for _ in range(-(-self.window // sent) if abandon else 1):
                for payload_id, size in held:
                    for index in range(-(-size // CHUNK) - 1):
                        self.chunk("repeat", payload_id, index, size, CHUNK)
        if "huge-window" in self.moves:
            count = max(self.window + 1, -(-self.max_update_bytes // BIG_CHUNK))
            self.chunk("huge-window", new_id(), 0, min(self.max_update_bytes, count * BIG_CHUNK), BIG_CHUNK)
        if "huge-budget" in self.moves:
            self.chunk("huge-budget", new_id(), 0, min(self.window, 96) * BIG_CHUNK, BIG_CHUNK)
        if "over-max" in self.moves:
            self.chunk("over-max", new_id(), 0, 1 << 40, BIG_CHUNK, length=1024)
        if "other-site" in self.moves:
            self.partial(2 * CHUNK, site=self.other_site, move="other-site")
        if abandon:
            # A chunk too short for each upload it began this cycle: the coordinator refuses it and drops
            # the whole upload, which frees the budget for the next cycle's.
            for payload_id, size in self.started[first:first + 2]:
                self.chunk("abandon", payload_id, 0, size, CHUNK, length=1024)

    def run(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.cycles = 0
        while time.monotonic() < self.deadline:
            self.cycle()
            self.cycles += 1
        # A synchronous round trip on the channel: every message published before it has reached the
        # broker before the connection closes.
        self.channel.basic_qos(prefetch_count=0)

    def close(self) -> None:
        self.link.close()


def honest_update(url: str, run_id: str, version: int) -> str:
    """One well-formed update from the honest site; its id."""
    import torch

    from shared import transport
    from shared.chunking import SITE_HEADER
    from shared.codecs import encode_tensors, get_codec
    from shared.protocol import PROTOCOL_VERSION, UpdateHeader, encode_payload, new_id
    from shared.task import load_task

    model = load_task(TASK).build_model()
    delta = {name: torch.full(t.shape, 1e-3) for name, t in model.state_dict().items()}
    specs, parts = encode_tensors(delta, get_codec("fp32"))
    user = transport.broker_user(url)
    header = UpdateHeader(protocol=PROTOCOL_VERSION, update_id=new_id(), run_id=run_id, site=user,
                          base_version=version, num_samples=10, train_seconds=0.0, tensors=specs)
    link = transport.connect(url, 30, f"honest-{user}")
    channel = transport.confirmed_channel(link)
    transport.publish_payload(channel, transport.UPDATE_EXCHANGE, transport.update_key(user), encode_payload(header, parts),
                              header.update_id, user_id=user, headers={SITE_HEADER: user})
    link.close()
    return header.update_id


def say_hello(url: str) -> None:
    """The site of ``url``'s user says hello, as a worker does: the coordinator opens its own queue."""
    from shared import transport
    from shared.chunking import SITE_HEADER
    from shared.protocol import PROTOCOL_VERSION, Hello, encode_payload, new_id

    user = transport.broker_user(url)
    link = transport.connect(url, 30, f"hello-{user}")
    channel = transport.confirmed_channel(link)
    transport.publish_payload(channel, transport.UPDATE_EXCHANGE, transport.hello_key(user),
                              encode_payload(Hello(protocol=PROTOCOL_VERSION, site=user), []), new_id(), user_id=user,
                              headers={SITE_HEADER: user})
    link.close()


def refusal_kind(reason: str) -> str:
    if "FEDQ_SENDER_UPLOADS" in reason:
        return "budget"
    if "window" in reason:
        return "window"
    if "exceeds the limit" in reason:
        return "max-update-bytes"
    if "may not send for site" in reason:
        return "other-site"
    if "bytes, expected" in reason:
        return "wrong-length"
    if "spooled in the last" in reason:
        return "spool-budget"
    return "other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the hostile site streams")
    parser.add_argument("--sender-uploads", type=int, default=2, help="FEDQ_SENDER_UPLOADS")
    parser.add_argument("--sender-upload-bytes", type=int, default=64 * MiB, help="FEDQ_SENDER_UPLOAD_BYTES")
    parser.add_argument("--prefetch", type=int, default=PREFETCH, help="FEDQ_PREFETCH (per site's queue)")
    parser.add_argument("--upload-timeout", type=float, default=600.0, help="FEDQ_UPLOAD_TIMEOUT")
    parser.add_argument("--backlog", type=int, default=None,
                        help="most messages left waiting on the broker's updates queue (default: FEDQ_PREFETCH)")
    parser.add_argument("--abandon", action="store_true", help="also drop its own uploads to free their budget")
    parser.add_argument("--moves", default=",".join(MOVES),
                        help="the moves each cycle makes, comma-separated (default: all but abandon)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from coordinator.runlog import read_events
    from fedq.federation import start_coordinator
    from fedq.local_broker import find_broker
    from fedq.provision import provision_sites
    from shared import transport
    from shared.protocol import MAX_CHUNK_BYTES
    from shared.task import load_task
    from tests.federation_helpers import wait_for

    budget_bytes = args.sender_upload_bytes
    args.backlog = args.prefetch if args.backlog is None else args.backlog
    moves = [move for move in args.moves.split(",") if move] + (["abandon"] if args.abandon else [])
    window = args.prefetch - max(1, args.prefetch // 8)  # coordinator.server.Coordinator._window
    max_update_bytes = 4 * 1024**3  # FEDQ_MAX_UPDATE_BYTES, the default
    params = sum(t.numel() for t in load_task(TASK).build_model().state_dict().values())
    pool_bytes = params * 4 + MAX_CHUNK_BYTES  # the BufferPool the coordinator keeps for one dense update
    max_message_size = BIG_CHUNK
    name = "partial_uploads" + ("" if args.moves == ",".join(MOVES) else "." + args.moves.replace(",", "-")) + (
        ".abandon" if args.abandon else "") + ("" if args.prefetch == PREFETCH else f".prefetch{args.prefetch}")
    run_dir = args.out / "runs" / name
    if run_dir.exists():
        for path in sorted(run_dir.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

    broker = find_broker()
    tag = secrets.token_hex(3)
    vhost = f"partial-uploads-{tag}"
    hostile_site, honest_site = f"hostile-{tag}", f"honest-{tag}"
    url = broker.create_vhost(vhost)
    users = provision_sites(broker.management_url, broker.username, broker.password, vhost, [hostile_site, honest_site],
                            broker.host, broker.port, tls=False)
    site_urls = {c.site: c.broker_url for c in users}
    coordinator = None
    try:
        coordinator = start_coordinator(
            url, run_dir, task=TASK, strategy="fedasync", any_site_users="[]", metrics_port=0, prefetch=args.prefetch,
            sender_uploads=args.sender_uploads, sender_upload_bytes=budget_bytes, upload_timeout=args.upload_timeout,
            torch_threads=1,
        )
        pid = coordinator.pid
        start = wait_for(lambda: next(iter(read_events(run_dir, "start")), None), 120, "the coordinator's first version")
        wait_for(lambda: read_events(run_dir, "snapshot") and read_events(run_dir, "evaluation"), 60, "version 0")
        time.sleep(3.0)  # settled: version 0 published and evaluated, nothing arriving
        idle = proc_status(pid)
        peak_reset = reset_peak(pid)
        io_before = proc_io(pid)
        sampler = Sampler(pid, run_dir / "uploads")
        sampler.start()
        print(f"coordinator pid {pid} idle at {idle['VmRSS'] / 1e6:.0f} MB resident; hostile site {hostile_site} "
              f"streams for {args.seconds:g} s", flush=True)

        admin = transport.connect(url, 30, "partial-uploads-bench")

        def declared(queue: str):
            """The queue's declare-ok, or None while it does not exist (a passive declare of a
            missing queue closes its channel, so each look has a channel of its own)."""
            look = admin.channel()
            try:
                return look.queue_declare(queue, passive=True).method
            except transport.ChannelClosed:
                return None
            finally:
                if look.is_open:
                    look.close()

        def ready(queue: str) -> int:
            return declared(queue).message_count

        # Both sites say hello first, as workers do: each then sends into a queue of its own.
        hostile_queue = transport.site_update_queue(hostile_site)
        for site in (hostile_site, honest_site):
            say_hello(site_urls[site])
            wait_for(lambda q=transport.site_update_queue(site): (d := declared(q)) is not None and d.consumer_count,
                     30, f"the coordinator to consume {site}'s queue")

        def throttle() -> None:
            """Keep at most --backlog messages waiting on the broker: the coordinator always has a full
            prefetch window to take, and the broker does not pile up gigabytes meanwhile."""
            while ready(hostile_queue) > args.backlog and time.monotonic() < hostile.deadline:
                admin.sleep(0.02)

        hostile = HostileSite(site_urls[hostile_site], hostile_site, honest_site, budget_bytes, max_update_bytes,
                              window, moves, throttle)
        started = time.monotonic()
        sampler.started = started
        hostile.run(args.seconds)
        streamed = time.monotonic() - started
        hostile.close()
        sent = sum(hostile.sent.values())

        # Until the coordinator has taken everything the hostile site sent: nothing waits on the queue,
        # and its run log (a line per refusal) has not grown for three seconds.
        log_sizes: list[tuple[float, int]] = []

        def drained_now() -> bool:
            log_sizes.append((time.monotonic(), (run_dir / "events.jsonl").stat().st_size))
            quiet = [size for at, size in log_sizes if at >= log_sizes[-1][0] - 3.0]
            return log_sizes[0][0] <= log_sizes[-1][0] - 3.0 and len(set(quiet)) == 1 and ready(hostile_queue) == 0

        wait_for(drained_now, 900, "the coordinator to take every chunk the hostile site sent")
        drained = time.monotonic() - started
        sampler.sample()
        attack_status, io_after, attack_max_rss = proc_status(pid), proc_io(pid), sampler.max_rss

        version = max(e["version"] for e in read_events(run_dir, "snapshot"))
        update_id = honest_update(site_urls[honest_site], start["run_id"], version)
        applied = wait_for(lambda: next((e for e in read_events(run_dir, "update") if e["update_id"] == update_id),
                                        None), 120, "the honest site's update")
        after_honest = proc_status(pid)
        rejected_depth = ready(transport.REJECTED)
        admin.close()
        sampler.stopped.set()
        sampler.join()

        refusals = [e for e in read_events(run_dir, "rejected") if e["user"] == hostile_site]
        kinds = Counter(refusal_kind(e["reason"]) for e in refusals)
        spool_log = [line for line in (run_dir / "coordinator.log").read_text().splitlines() if "fill the window" in line]
    finally:
        if coordinator is not None and coordinator.poll() is None:
            coordinator.send_signal(signal.SIGTERM)
            try:
                coordinator.wait(60)
            except Exception:  # noqa: BLE001 - a benchmark that cannot stop its coordinator kills it
                coordinator.kill()
        for user in users:
            broker.management_api("DELETE", f"/api/users/{urllib.parse.quote(user.user, safe='')}")
        broker.delete_vhost(vhost)
        broker.close()

    peak = max(attack_status["VmHWM"], attack_max_rss) if peak_reset else attack_max_rss
    growth = peak - idle["VmRSS"]
    allowance = budget_bytes + pool_bytes
    # What the broker may have handed the coordinator and it not yet taken: a full prefetch window of
    # the largest messages the broker accepts (a sender picks its chunk size, up to that). The sender
    # has a queue, and so a window, of its own: the honest site's window is not its to fill.
    window_bytes = args.prefetch * max_message_size
    spool_bound = budget_bytes + CHUNK  # the claims' bytes, and record overhead well within one chunk
    written = io_after["write_bytes"] - io_before["write_bytes"]
    other_files = sum(p.stat().st_size for p in run_dir.iterdir() if p.is_file())  # log, run log, checkpoint
    result = {
        "benchmark": "partial uploads",
        "task": TASK, "model_parameters": params, "strategy": "fedasync",
        "settings": {"backlog_messages": args.backlog, "sender_uploads": args.sender_uploads, "sender_upload_bytes": budget_bytes,
                     "prefetch": args.prefetch, "window_chunks": window, "max_update_bytes": max_update_bytes,
                     "upload_timeout": args.upload_timeout, "moves": moves},
        "seconds_streamed": round(streamed, 2),
        "seconds_until_drained": round(drained, 2),
        "hostile": {"cycles": hostile.cycles, "chunks_sent": sent, "chunks_by_move": dict(hostile.sent),
                    "bytes_sent": hostile.bytes_sent, "refusals": len(refusals), "refusals_by_kind": dict(kinds),
                    "rejected_queue_depth": rejected_depth},
        "memory": {"idle_rss": idle["VmRSS"], "hwm_before_attack": idle["VmHWM"], "peak_reset": peak_reset,
                   "hwm_after_attack": attack_status["VmHWM"], "max_sampled_rss": attack_max_rss,
                   "rss_after_attack": attack_status["VmRSS"], "peak": peak, "growth": growth,
                   "hwm_after_honest_update": after_honest["VmHWM"],
                   "series_seconds_rss_spool": sampler.series},
        "disk": {"write_bytes": written, "spool_written_sampled": sampler.spool_written,
                 "spool_files_seen": len(sampler.file_sizes), "spool_peak_bytes": sampler.max_spool_bytes,
                 "spool_peak_files": sampler.max_spool_files, "spool_events": len(spool_log),
                 "other_run_files_at_end": other_files},
        "budget": {"uploads": args.sender_uploads, "bytes": budget_bytes, "buffer_pool_bytes": pool_bytes,
                   "memory_allowance": allowance, "spool_allowance": spool_bound,
                   "broker_max_message_size": max_message_size, "prefetch_window_bytes": window_bytes},
        "honest_update": {"update_id": update_id, "applied": applied is not None, "base_version": applied["base_version"]},
        "within_budget": {"memory": growth <= allowance, "memory_with_prefetch_window": growth <= allowance + window_bytes, "spool_peak": sampler.max_spool_bytes <= spool_bound,
                          "spool_written": sampler.spool_written <= spool_bound},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))

    # Resident memory a quarter, half, three quarters of the way through the attack, and at its end.
    quarters = [min(sampler.series, key=lambda point: abs(point[0] - streamed * q)) for q in (0.25, 0.5, 0.75, 1.0)]

    def mb(n: int) -> str:
        return f"{n / 1e6:,.1f} MB"

    rows = [
        ("hostile chunks sent", f"{sent} ({mb(hostile.bytes_sent)}) in {streamed:.0f} s, {hostile.cycles} cycles"),
        ("  by move", ", ".join(f"{k} {v}" for k, v in hostile.sent.items())),
        ("refused (run log)", f"{len(refusals)}: " + ", ".join(f"{k} {v}" for k, v in kinds.items())),
        ("fedq.rejected depth", str(rejected_depth)),
        ("budget", f"{args.sender_uploads} uploads x {mb(budget_bytes)}; buffer pool {mb(pool_bytes)}"),
        ("idle RSS", mb(idle["VmRSS"])),
        ("peak RSS under attack", f"{mb(peak)} (VmHWM {mb(attack_status['VmHWM'])}, sampled {mb(attack_max_rss)})"),
        ("RSS over the attack", ", ".join(f"{t:.0f} s {mb(rss)}" for t, rss, _ in quarters)),
        ("growth", (f"{mb(growth)} vs budget + pool {mb(allowance)}: {'within' if growth <= allowance else 'OVER'}; "
                    f"vs that + prefetch x max message {mb(allowance + window_bytes)}: "
                    f"{'within' if growth <= allowance + window_bytes else 'OVER'}")),
        ("spool peak on disk", f"{mb(sampler.max_spool_bytes)} in {sampler.max_spool_files} files vs {mb(spool_bound)}"),
        ("spool written (sampled)", (f"{mb(sampler.spool_written)} in {len(sampler.file_sizes)} files, "
                                     f"{len(spool_log)} spool events")),
        ("/proc io write_bytes", f"{mb(written)} (run files other than the spool at the end: {mb(other_files)})"),
        ("honest update", f"applied, version {applied['base_version']} -> {applied['base_version'] + 1}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0 if result["honest_update"]["applied"] else 1


if __name__ == "__main__":
    sys.exit(main())

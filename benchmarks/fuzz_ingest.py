"""fuzz ingest: coverage-guided fuzzing of the coordinator's whole ingest path, without a broker.

Every input is a short sequence of deliveries, built mostly by mutating valid ones so that the
fuzzer gets deep: hellos and updates (codecs fp32, fp16, bf16, int8, topk, topk-int8) with their
msgpack headers, tensor entries, parts and bytes changed, cut into chunks whose AMQP headers, site,
user, order and bodies are changed too; besides those, payloads of other kinds and raw bytes. Each
delivery goes the coordinator's way: ``Uploads.add``, then for a whole upload ``Ingest.take`` on
its payload, then the buffer back to the pool (``Coordinator._on_delivery`` and ``_handle``);
between deliveries, what the coordinator also does with uploads and strategies: deadline flushes,
expiry, spooling unfinished uploads when the window fills, a new connection, a restart. The
federation is small (models of a few small tensors) and, as the input says, runs FedAsync or
FedBuff (mean, trimmed mean, median, FedAvg rounds with FedAdam), with or without a norm bound or
central differential privacy.

A finding is an exception escaping ``Uploads.add`` (the coordinator's safety net would have to
catch it) or the upload spool, or escaping ``Ingest.take`` other than ProtocolError, any ingest
stage failure (the run log's ``stage_failures``), a verdict of no outcome Ingest defines (or a
refusal without a reason), an exception from a deadline flush, or NaN or infinity in the model
after a verdict that changed it where updates are bounded (by FEDQ_MAX_UPDATE_VALUE, which Ingest
has since commit 4a55a7e, a norm bound or privacy clipping; unbounded finite updates may sum past
float32's range, which the coordinator stops for with ModelDiverged: where Ingest has no largest
value, such inputs are counted, per configuration, as ``diverged_unbounded``).

libFuzzer (through atheris, fedq's modules instrumented) runs in a child process; a finding is
saved as a crash file, and the child is started again on the same corpus for the time left, with
the findings seen so far counted but no longer stopping it.

    pip install atheris
    python benchmarks/fuzz_ingest.py --seconds 600
    python benchmarks/fuzz_ingest.py --reproduce benchmarks/results/fuzz_crashes/crash-...

Writes benchmarks/results/fuzz_ingest.json (figures and findings) and prints a summary; crash
files go to benchmarks/results/fuzz_crashes/, the corpus to benchmarks/results/runs/fuzz_ingest_corpus/
(seeded with a few valid deliveries: hello, fp32, int8, top-k and multi-chunk updates, rounds).
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import json
import logging
import math
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = Path(__file__).parent / "results"
CORPUS = RESULTS / "runs" / "fuzz_ingest_corpus"
CRASHES = RESULTS / "fuzz_crashes"
WORK = RESULTS / "runs" / "fuzz_ingest"
MAX_LEN = 64 * 1024
RSS_LIMIT_MB = 4096

RUN_ID = "0123456789abcdef"
OTHER_RUN_ID = "fedcba9876543210"
# The models: a few small tensors (the second spans several int8 blocks and has a scalar).
MODELS = (
    {"w": (4, 3), "b": (3,)},
    {"emb": (300, 2), "scale": (), "b": (5,)},
)
CODEC_NAMES = ("fp32", "fp16", "bf16", "int8", "topk", "topk-int8")
SITES = ("site-1", "site-2", "site-3", "site-4", "lab-7")
USERS = ("own", "fedq", "lab-7", None, "", "site-2")
CHUNK_KEYS = ("fedq-payload", "fedq-chunk", "fedq-chunks", "fedq-size", "fedq-chunk-bytes", "fedq-digest", "fedq-site")
HEADER_KEYS = ("protocol", "kind", "update_id", "run_id", "site", "base_version", "num_samples", "train_seconds",
               "metrics", "tensors", "name", "shape", "codec", "params", "parts", "dtype", "layout", "version",
               "created_at", "payload_id", "meta", "loss", "x")
WORDS = ("", "fp32", "fp16", "bf16", "int8", "topk", "topk-int8", "*", "w", "b", "emb", "scale", "float32",
         "float16", "uint8", "uint16", "uint32", "int16", "int32", "int64", "object", "update", "hello", "snapshot",
         "announcement", "tensors", "status", "site-1", "site-2", "lab-7", "fedq", RUN_ID, OTHER_RUN_ID, "0" * 64,
         "\u00e9\x00", "site 1", "a" * 65)
INTERESTING_INTS = (0, 1, -1, 2, 3, 7, 8, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32, 2**48, 2**48 + 1, 2**53,
                    2**53 + 1, 2**63 - 1, 2**64 - 1, -(2**63), 100_000_000, 100_000_001, 16 * 1024 * 1024 + 1)
INTERESTING_FLOATS = (0.0, -0.0, 0.1, -0.5, 1.0, 3.0, 1e-3, 1e4, 65504.0, 65520.0, 1e-40, 3e38, 3.4028235e38, 1e308,
                      5e-324, math.nan, math.inf, -math.inf)
F32_MAX = 3.4028234663852886e38
VALUES = (0.1, -0.5, 0.0, 1e-3, 3.0, 1e4, 65504.0, 70000.0, 3e38, -F32_MAX, 1e-40, math.nan, math.inf, -math.inf)
TOPK_FRACTIONS = (0.01, 0.25, 0.5, 1.0)
SAMPLES = (10, 1, 100_000_000, 1000, 7)
DIMS = (0, 1, 2, 3, 4, 5, 12, 15, 300, 600, 606, 2**40)
PART_DTYPE_NAMES = ("float32", "float16", "uint16", "int8", "uint8", "int16", "int32", "uint32", "int64", "float64")
WINDOW = 8
# fedq's modules on the ingest path, instrumented so that their coverage guides the fuzzer.
INSTRUMENTED = ("coordinator.aggregators", "coordinator.ingest", "coordinator.running_sum", "coordinator.strategies",
                "coordinator.uploads", "coordinator.upload_spool", "shared.chunking", "shared.codecs", "shared.deltas",
                "shared.protocol", "shared.validation")


class Finding(Exception):
    """What the fuzzer looks for: the ingest path misbehaved on this input."""


class _Known(Exception):
    """A finding seen before in this run: counted, and the input abandoned without a crash file."""


# -- choices: what the input decides ------------------------------------------------------------------------------


class Fuzzed:
    """Choices read from the fuzzer's input."""

    def __init__(self, fdp):
        self.fdp = fdp

    def int(self, lo: int, hi: int, label: str = "") -> int:
        return self.fdp.ConsumeIntInRange(lo, hi)

    def bool(self, label: str = "") -> bool:
        return self.fdp.ConsumeBool()

    def bytes(self, n: int, label: str = "") -> bytes:
        return self.fdp.ConsumeBytes(n)

    def pick(self, seq, label: str = ""):
        return seq[self.int(0, len(seq) - 1, label)]


class Scripted(Fuzzed):
    """Choices given by label (every other choice its lowest value), written as the input that
    makes the fuzzer's data provider give the same choices: how the seed corpus is made.

    atheris reads integers from the end of the input, most significant byte first, in as many bytes
    as their range needs; bytes, and a byte per boolean, from its front."""

    def __init__(self, answers: dict):
        self.answers = {label: list(v) if isinstance(v, (list, tuple)) else [v] for label, v in answers.items()}
        self.front = bytearray()
        self.back: list[int] = []  # in the order they are read

    def _answer(self, label, default):
        queue = self.answers.get(label)
        return queue.pop(0) if queue else default

    def int(self, lo, hi, label=""):
        value = self._answer(label, lo)
        if not lo <= value <= hi:
            raise ValueError(f"{label}: {value} outside {lo}..{hi}")
        span, offset, width = hi - lo, 0, 0
        while offset < 64 and span >> offset:
            offset += 8
            width += 1
        self.back.extend((value - lo).to_bytes(width, "big") if width else b"")
        return value

    def bool(self, label=""):
        value = bool(self._answer(label, False))
        self.front.append(int(value))
        return value

    def bytes(self, n, label=""):
        data = bytes(self._answer(label, b""))[:n].ljust(n, b"\0")
        self.front += data
        return data

    def data(self) -> bytes:
        return bytes(self.front) + bytes(reversed(self.back))


# -- building payloads and deliveries --------------------------------------------------------------------------


def fuzz_value(ch, wire: bool = False):
    """A value of any type msgpack (or, with ``wire``, an AMQP header table) may carry."""
    kind = ch.int(0, 12 if wire else 11, "value")
    if kind == 0:
        return None
    if kind == 1:
        return ch.bool()
    if kind == 2:
        return ch.int(-4, 300)
    if kind == 3:
        return ch.pick(INTERESTING_INTS)
    if kind == 4:
        return ch.pick(INTERESTING_FLOATS)
    if kind == 5:
        return ch.bytes(ch.int(0, 70)).decode("utf-8", "replace")
    if kind == 6:
        return ch.bytes(ch.int(0, 70))
    if kind == 7:
        return [ch.int(0, 20) for _ in range(ch.int(0, 4))]
    if kind == 8:
        return {ch.pick(HEADER_KEYS): ch.pick(INTERESTING_FLOATS) for _ in range(ch.int(0, 3))}
    if kind == 9:
        return ch.pick(WORDS)
    if kind == 10:
        return [0] * ch.int(0, 700)
    if kind == 11:
        return [ch.pick(INTERESTING_INTS) for _ in range(ch.int(0, 40))]
    return Decimal(ch.int(-5, 5))  # AMQP decimals, as pika decodes them


def mutate_tree(ch, tree):
    """One structural change somewhere in a msgpack tree of maps and lists: a value set, a key
    removed or added, an entry duplicated, dropped or replaced. Returns the (maybe new) tree."""
    depth = ch.int(0, 4, "depth")
    node = tree
    for _ in range(depth):
        children = list(node.values()) if isinstance(node, dict) else node
        containers = [c for c in children if isinstance(c, (dict, list)) and c]
        if not containers:
            break
        node = ch.pick(containers)
    action = ch.int(0, 4, "action")
    if isinstance(node, dict):
        keys = sorted(node, key=str)
        if action == 0 and keys:
            node[ch.pick(keys)] = fuzz_value(ch)
        elif action == 1 and keys:
            del node[ch.pick(keys)]
        elif action == 2:
            node[ch.pick(HEADER_KEYS)] = fuzz_value(ch)
        elif action == 3 and keys:  # a key of a type msgpack maps may hold but the schema never names
            node[ch.pick((1, b"site", -1))] = fuzz_value(ch)
        elif keys:
            key = ch.pick(keys)
            if isinstance(node[key], (int, float)) and not isinstance(node[key], bool):
                node[key] = ch.pick(INTERESTING_INTS) if isinstance(node[key], int) else ch.pick(INTERESTING_FLOATS)
    elif isinstance(node, list):
        if action == 0 and node:
            node[ch.int(0, len(node) - 1)] = fuzz_value(ch)
        elif action == 1 and node:
            del node[ch.int(0, len(node) - 1)]
        elif action == 2 and node:
            node.append(_copy(node[ch.int(0, len(node) - 1)]))
        elif action == 3 and len(node) > 1:
            i, j = ch.int(0, len(node) - 1), ch.int(0, len(node) - 1)
            node[i], node[j] = node[j], node[i]
        else:
            node.append(fuzz_value(ch))
    return tree


def _parts_of(entry) -> list:
    """A tensor entry's list of parts, or none where the entry or its parts are no longer a map and a list."""
    parts = entry.get("parts") if isinstance(entry, dict) else None
    return parts if isinstance(parts, list) else []


def _copy(value):
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def frame(fields, parts, np) -> bytearray:
    """A payload around any header, each part aligned to its item size (as a hostile sender frames it)."""
    import msgpack

    raw = msgpack.packb(fields, use_bin_type=True)
    payload = bytearray(struct.pack("<I", len(raw)) + raw)
    for part in parts:
        itemsize = part.itemsize if isinstance(part, np.ndarray) else 1
        payload += bytes(-len(payload) % itemsize) + (part.tobytes() if isinstance(part, np.ndarray) else part)
    return payload


class Federation:
    """A small federation and an uploads table, built once; every input starts it afresh."""

    def __init__(self, workdir: Path):
        import numpy as np
        import torch

        from coordinator import ingest as ingest_module
        from coordinator.ingest import NormBound
        from coordinator.privacy import GaussianPrivacy
        from coordinator.senders import Senders
        from coordinator.server_optimizers import FedAdam
        from coordinator.strategies import FedAsync, FedAvgSync, FedBuff
        from coordinator.upload_spool import UploadSpool
        from coordinator.uploads import Budget, Uploads
        from shared.chunking import BufferPool
        from shared.codecs import Layout

        self.np, self.torch = np, torch
        self.workdir = workdir
        self.runlog = None
        self._new_runlog()
        self.senders = Senders(frozenset({"fedq"}), {"lab-7": "site-1"})
        self.buffers = BufferPool(1 << 20, min_size=64)
        self.uploads = Uploads(UploadSpool(workdir / "uploads"), self.buffers, self.senders, max_bytes=1 << 20,
                               window=WINDOW, budget=Budget(2, 1 << 18))
        self.params = [{name: torch.zeros(shape) for name, shape in model.items()} for model in MODELS]
        self.layouts = [Layout.of(params) for params in self.params]
        self.fingerprints = tuple(layout.fingerprint for layout in self.layouts)

        def privacy():
            return GaussianPrivacy(clip_norm=1.0, noise_multiplier=0.1, delta=1e-5, seed=0)

        # (name, strategy factory, norm bound, max samples): bounded when a norm bound or privacy clips updates.
        self.configs = [
            ("fedasync", lambda: FedAsync(alpha=0.5), None, 100_000_000),
            ("fedasync+clip", lambda: FedAsync(alpha=0.5, max_staleness=1), NormBound(1.0, "clip"), 100_000_000),
            ("fedasync+privacy", lambda: FedAsync(alpha=1.0, privacy=privacy()), None, 1000),
            ("fedbuff-mean+refuse", lambda: FedBuff(buffer_size=2, deadline=1.0), NormBound(10.0, "refuse"),
             100_000_000),
            ("fedbuff-trimmed+clip", lambda: FedBuff(buffer_size=4, aggregation="trimmed-mean", trim_fraction=0.25,
                                                      deadline=1.0), NormBound(5.0, "clip"), 100_000_000),
            ("fedbuff-median", lambda: FedBuff(buffer_size=3, aggregation="median"), None, 100_000_000),
            # Without a bound or privacy, top-k updates are added into the running sum from their encoding
            # (coordinator.kernels, compiled without bounds checks).
            ("fedbuff-mean", lambda: FedBuff(buffer_size=3, deadline=1.0), None, 100_000_000),
            ("fedbuff-mean+privacy", lambda: FedBuff(buffer_size=2, deadline=1.0, privacy=privacy()), None, 1000),
            ("fedavg-adam+clip", lambda: FedAvgSync(sites=2, optimizer=FedAdam(lr=0.1), deadline=1.0),
             NormBound(1.0, "clip"), 100_000_000),
        ]
        # One strategy per (model, config), prepared once (a running sum compiles its kernels), reset per input.
        self.strategies = {}
        for m, params in enumerate(self.params):
            for c, (_, make, _, _) in enumerate(self.configs):
                strategy = make()
                strategy.prepare(params)
                if strategy.privacy is not None and hasattr(strategy.privacy, "cover"):
                    # As the coordinator has it: privacy covers the trainable tensors; the scalar is not one.
                    strategy.privacy.cover(self.layouts[m], [name for name in params if name != "scale"])
                self.strategies[m, c] = strategy
        self.NormBound, self.ingest_module = NormBound, ingest_module
        self.gaps: list[BaseException] = []
        original = ingest_module.report_gap

        def report_gap(runlog, stage, error, user):  # the gap's exception, with its trace, for the finding
            self.gaps.append(error)
            return original(runlog, stage, error, user)

        ingest_module.report_gap = report_gap
        self.inputs = 0
        self.known: set[str] = set()
        self.known_hits = 0
        self.diverged_unbounded: dict[str, int] = {}
        self.verdicts: dict[str, int] = {}
        self.findings_file: Path | None = None
        self.verbose = bool(os.environ.get("FEDQ_FUZZ_VERBOSE"))

    def _new_runlog(self) -> None:
        from coordinator.runlog import RunLog

        if self.runlog is not None:
            self.runlog.close()
            (self.workdir / "runlog" / "events.jsonl").unlink(missing_ok=True)
        self.runlog = RunLog(self.workdir / "runlog")

    # -- one input --------------------------------------------------------------------------------------------

    def reset(self, model: int, config: int) -> None:
        from coordinator.aggregators import Mean
        from coordinator.ingest import Ingest
        from coordinator.state import FederationState
        from coordinator.strategies import FedBuff

        if (self.workdir / "runlog" / "events.jsonl").stat().st_size > 8 << 20:
            self._new_runlog()
        params = self.params[model]
        for tensor in params.values():
            tensor.zero_()
        name, _, bound, max_samples = self.configs[config]
        strategy = self.strategies[model, config]
        if isinstance(strategy, FedBuff):
            if isinstance(strategy.aggregator, Mean):
                strategy.aggregator.running.wait()
            strategy.aggregator.reset()
            strategy.samples, strategy.sites, strategy._opened = 0, [], 0.0
            if isinstance(getattr(strategy, "excused", None), set):  # a round's sites excused for refused updates
                strategy.excused.clear()
            for group in ("m", "v", "velocity"):
                if hasattr(strategy.optimizer, group):
                    getattr(strategy.optimizer, group).clear()
        if strategy.privacy is not None:
            strategy.privacy.generator.manual_seed(0)
            strategy.privacy.releases = 0
        self.config_name = name
        self.state = FederationState(run_id=RUN_ID, params=params, layout=self.layouts[model])
        self.ingest = Ingest(self.state, strategy, self.runlog, senders=self.senders, norm_bound=bound,
                             max_num_samples=max_samples)
        # Updates are bounded by a norm bound, privacy's clipping, or a largest value (FEDQ_MAX_UPDATE_VALUE,
        # since commit 4a55a7e): the model they make stays finite.
        self.bounded = (bound is not None or strategy.privacy is not None
                        or math.isfinite(getattr(self.ingest, "max_update_value", math.inf)))
        self.uploads.arriving.clear()
        self.uploads._spool_done.clear()
        if self.uploads.spool.folder.exists():
            self.uploads.spool.clear()
        self.buffers._spare.clear()
        self.gaps.clear()
        self.tag = 0
        self.payloads = 0
        self.last_payload: tuple[bytearray, str] | None = None
        self.last_update_id: str | None = None
        self.last_payload_id: str | None = None

    def run(self, ch: Fuzzed) -> None:
        self.inputs += 1
        model = ch.int(0, len(MODELS) - 1, "model")
        config = ch.int(0, len(self.configs) - 1, "config")
        self.reset(model, config)
        for _ in range(ch.int(1, 6, "ops")):
            op = ch.int(0, 10, "op")
            if op == 0:
                self.deliver(ch, *self.update_payload(ch))
            elif op == 1:
                self.deliver(ch, *self.hello_payload(ch))
            elif op == 2:
                self.deliver(ch, *self.other_payload(ch))
            elif op == 3:
                self.deliver(ch, bytearray(ch.bytes(ch.int(0, 4096, "raw_len"), "raw")), ch.pick(SITES, "site"))
            elif op == 4:
                self.raw_delivery(ch)
            elif op == 5:
                self.flush(ch)
            elif op == 6:
                self.uploads.expire(-1.0)
            elif op == 7:
                if self.last_payload is not None:  # the same payload again: a redelivery, or a replay
                    self.deliver(ch, bytearray(self.last_payload[0]), self.last_payload[1])
            elif op in (8, 9):
                self.spool(restart=op == 9)
            else:  # updates from several sites in a row, as fill a buffer or a round
                for site in SITES[: ch.int(2, len(SITES), "round")]:
                    self.deliver(ch, *self.update_payload(ch, site))

    def spool(self, restart: bool) -> None:
        """As the coordinator does when unfinished uploads fill its window (their chunks to the spool),
        then on a new connection (only spooled uploads kept), or on a restart (read back from the spool)."""
        from coordinator.uploads import Uploads

        try:
            self.uploads.spool_unfinished()
            if restart:
                old = self.uploads
                self.uploads = Uploads(old.spool, old.buffers, old.senders, max_bytes=old.max_bytes,
                                       window=old.window, budget=old.budget)
                self.uploads.take_spooled()
            else:
                self.uploads.reconnected()
        except Exception as exc:  # noqa: BLE001
            self.finding(signature("spool", exc), f"the upload spool raised {type(exc).__name__}: {exc}", exc)

    # -- payloads ---------------------------------------------------------------------------------------------

    def values(self, ch) -> dict:
        torch, np = self.torch, self.np
        layout = self.state.layout
        mode = ch.int(0, 3, "values")
        if mode == 0:
            value = ch.pick(VALUES, "value_pick")
            return {name: torch.full(shape, value) for name, shape in layout.shapes}
        if mode == 1:  # every value from the input's bytes
            raw = ch.bytes(layout.total * 4, "value_bytes").ljust(layout.total * 4, b"\0")
            flat = torch.from_numpy(np.frombuffer(raw, np.float32).copy())
        elif mode == 2:
            flat = torch.full((layout.total,), float(np.frombuffer(ch.bytes(4).ljust(4, b"\0"), np.float32)[0]))
        else:  # mostly zeros, a few values
            flat = torch.zeros(layout.total)
            for _ in range(ch.int(0, 4)):
                flat[ch.int(0, layout.total - 1)] = ch.pick(VALUES)
        tensors, start = {}, 0
        for name, shape in layout.shapes:
            size = math.prod(shape)
            tensors[name] = flat[start : start + size].reshape(shape)
            start += size
        return tensors

    def update_payload(self, ch, site: str | None = None):
        from shared.codecs import encode_tensors, get_codec
        from shared.protocol import PROTOCOL_VERSION, UpdateHeader

        codec = get_codec(ch.pick(CODEC_NAMES, "codec"), ch.pick(TOPK_FRACTIONS, "topk"))
        specs, parts = encode_tensors(self.values(ch), codec)
        self.payloads += 1
        update_id = f"{self.payloads:016x}"
        if ch.bool("same_update_id") and self.last_update_id is not None:
            update_id = self.last_update_id
        self.last_update_id = update_id
        site = site or ch.pick(SITES, "site")
        behind = ch.int(0, 4, "behind")  # 4: a base from the future
        base = self.state.version + 1 if behind == 4 else self.state.version - behind
        header = UpdateHeader(
            protocol=PROTOCOL_VERSION, update_id=update_id, run_id=OTHER_RUN_ID if ch.bool("other_run") else RUN_ID,
            site=site, base_version=max(0, base), num_samples=ch.pick(SAMPLES, "samples"),
            train_seconds=0.1, metrics={"loss": 0.5} if ch.bool("metrics") else {}, tensors=specs,
        )
        return self.mutated(ch, header, parts), site

    def hello_payload(self, ch):
        from shared.protocol import PROTOCOL_VERSION, Hello

        site = ch.pick(SITES, "site")
        return self.mutated(ch, Hello(protocol=PROTOCOL_VERSION, site=site), []), site

    def other_payload(self, ch):
        kind = ch.int(0, 3, "kind")
        fields = ({"protocol": 3, "kind": "snapshot", "run_id": RUN_ID, "version": 0, "created_at": 0.0, "tensors": []},
                  {"protocol": 3, "kind": "tensors", "meta": {}, "tensors": []},
                  {"protocol": 3, "kind": "announcement", "run_id": RUN_ID, "version": 0, "payload_id": "p",
                   "chunks": 1, "size": 0, "digest": "0" * 64, "published_at": 0.0},
                  {"protocol": 3, "kind": "update", "update_id": "0" * 16, "run_id": RUN_ID, "site": "site-1",
                   "base_version": 0, "num_samples": 1, "train_seconds": 0.0, "tensors": []})[kind]
        return self.mutated(ch, None, [], fields), "site-1"

    def mutated(self, ch, header, parts, fields=None) -> bytearray:
        """The payload of ``header`` and ``parts``, its header's tree, its parts and its bytes changed
        as the input says (not at all, where it says nothing)."""
        import msgpack

        np = self.np
        if fields is None:
            fields = msgpack.unpackb(msgpack.packb(header.model_dump(mode="python"), use_bin_type=True), raw=False)
        parts = list(parts)
        for _ in range(ch.int(0, 4, "mutations")):
            kind = ch.int(0, 8, "mutation")
            if kind <= 1:
                fields = mutate_tree(ch, fields)
            elif kind == 2 and parts:  # a part replaced by one of another dtype and length, declared as it is
                i = ch.int(0, len(parts) - 1)
                dtype = ch.pick(PART_DTYPE_NAMES, "dtype")
                n = ch.int(0, 40)
                itemsize = np.dtype(dtype).itemsize
                parts[i] = np.frombuffer(ch.bytes(n * itemsize).ljust(n * itemsize, b"\0"), dtype)
                tensors = fields.get("tensors")
                declared = [p for t in (tensors if isinstance(tensors, list) else ()) for p in _parts_of(t)
                            if isinstance(p, dict)]
                if i < len(declared) and ch.bool("declare"):
                    declared[i]["dtype"], declared[i]["shape"] = dtype, [n]
            elif kind == 3 and parts:  # a part's bytes, left as declared
                i = ch.int(0, len(parts) - 1)
                raw = bytearray(parts[i].tobytes() if isinstance(parts[i], np.ndarray) else parts[i])
                action = ch.int(0, 2)
                if action == 0 and raw:
                    del raw[ch.int(0, len(raw) - 1):]
                elif action == 1:
                    raw += ch.bytes(ch.int(1, 16))
                elif raw:
                    at = ch.int(0, len(raw) - 1)
                    raw[at] ^= ch.int(1, 255)
                parts[i] = bytes(raw)
            elif kind == 4:  # every tensor entry's shape (the model's, reordered), or an entry's codec
                tensors = fields.get("tensors")
                if isinstance(tensors, list) and tensors and isinstance(tensors[0], dict):
                    entry = tensors[ch.int(0, len(tensors) - 1)]
                    if isinstance(entry, dict):
                        if ch.bool():
                            entry["codec"] = ch.pick(CODEC_NAMES + ("fp64", ""))
                        elif isinstance(entry.get("shape"), list):
                            entry["shape"] = list(reversed(entry["shape"])) or [ch.int(0, 3)]
            elif kind == 5 and parts:
                del parts[ch.int(0, len(parts) - 1)]
            elif kind == 6:  # one field of a tensor entry, to a value of the type the schema takes
                entries = [t for t in fields.get("tensors", ()) if isinstance(t, dict)] \
                    if isinstance(fields.get("tensors"), list) else []
                if entries:
                    entry = ch.pick(entries)
                    field = ch.int(0, 4)
                    if field == 0:
                        entry["name"] = ch.pick(WORDS)
                    elif field == 1:
                        entry["shape"] = [ch.pick(DIMS) for _ in range(ch.int(0, 3))]
                    elif field == 2:
                        entry["codec"] = ch.pick(WORDS)
                    elif field == 3:
                        entry["params"] = {"layout": ch.pick(self.fingerprints + INTERESTING_INTS)} if ch.bool() else {
                            ch.pick(HEADER_KEYS): fuzz_value(ch)}
                    else:
                        entry["parts"] = [{"dtype": ch.pick(PART_DTYPE_NAMES), "shape": [ch.int(0, 40)]}
                                          for _ in range(ch.int(0, 4))]
            elif kind >= 7:  # a tensor entry twice, or none of it
                tensors = fields.get("tensors")
                if isinstance(tensors, list) and tensors and isinstance(tensors[0], dict):
                    i = ch.int(0, len(tensors) - 1)
                    first = sum(len(_parts_of(t)) for t in tensors[:i])
                    count = len(_parts_of(tensors[i]))
                    if kind == 7:  # a tensor entry twice, with its parts
                        tensors.append(_copy(tensors[i]))
                        parts.extend(parts[first : first + count])
                    else:  # a tensor entry left out, with its parts
                        del tensors[i], parts[first : first + count]
        try:
            payload = frame(fields, parts, np)
        except (OverflowError, TypeError, ValueError):  # a tree msgpack cannot write: sent as it was built
            payload = frame(msgpack.unpackb(msgpack.packb(header.model_dump(mode="python"), use_bin_type=True))
                            if header is not None else {}, [], np)
        for _ in range(ch.int(0, 3, "byte_mutations")):
            kind = ch.int(0, 4)
            if not payload:
                break
            at = ch.int(0, len(payload) - 1)
            if kind == 0:
                payload[at] ^= ch.int(1, 255)
            elif kind == 1:
                del payload[at:]
            elif kind == 2:
                payload[at:at] = ch.bytes(ch.int(1, 64))
            elif kind == 3:
                payload[0:4] = struct.pack("<I", ch.pick(INTERESTING_INTS) & 0xFFFFFFFF)
            else:
                del payload[at : at + ch.int(1, 64)]
        return payload

    # -- deliveries -------------------------------------------------------------------------------------------

    def deliver(self, ch, payload: bytearray, site: str) -> None:
        """Cut ``payload`` into chunks and deliver them, with whatever changes the input asks for."""
        from shared.chunking import SITE_HEADER, iter_chunks

        self.last_payload = (bytearray(payload), site)
        id_mode = ch.int(0, 3, "payload_id")
        if id_mode == 0:
            payload_id = f"p{self.payloads}-{self.tag}"
        elif id_mode == 1:  # the id of the payload before: an upload already arriving, or one handled
            payload_id = self.last_payload_id or "p"
        else:
            payload_id = fuzz_text(ch) if id_mode == 2 else "x" * 65
        self.last_payload_id = payload_id
        size = len(payload)
        chunk_mode = ch.int(0, 3, "chunking")
        if chunk_mode == 0:
            chunk_bytes = max(1, size)
        elif chunk_mode == 1:
            chunk_bytes = ch.int(1, 64, "chunk_bytes")
        else:
            chunk_bytes = ch.int(1, 4096) if chunk_mode == 2 else size // 3 + 1
        digest_mode = ch.int(0, 3, "digest")  # 0: the right one, 3: none
        digest = "0" * 64 if digest_mode == 1 else (fuzz_text(ch) or "?") if digest_mode == 2 else None
        pieces = []
        for info, body in iter_chunks([memoryview(payload)], payload_id, chunk_bytes, digest):
            headers = info.to_headers()
            if digest_mode == 3:
                headers.pop("fedq-digest", None)
            pieces.append([headers, [body]])
            if len(pieces) >= 12:
                break
        site_mode = ch.int(0, 4, "site_header")
        for headers, _ in pieces:
            if site_mode != 2:
                headers[SITE_HEADER] = {0: site, 1: site.encode(), 3: "site-2"}.get(site_mode)
        if site_mode == 4:
            value = fuzz_value(ch, wire=True)
            for headers, _ in pieces:
                headers[SITE_HEADER] = value
        user = ch.pick(USERS, "user")
        user = site if user == "own" else user
        order = ch.int(0, 3, "order")
        if order == 1:
            pieces.reverse()
        elif order == 2 and pieces:
            k = ch.int(0, len(pieces) - 1)
            pieces = pieces[k:] + pieces[:k]
        elif order == 3 and len(pieces) > 1:
            i, j = ch.int(0, len(pieces) - 1), ch.int(0, len(pieces) - 1)
            pieces[i], pieces[j] = pieces[j], pieces[i]
        users = [user] * len(pieces)
        for _ in range(ch.int(0, 3, "chunk_mutations")):
            if not pieces:
                break
            i = ch.int(0, len(pieces) - 1)
            headers, body = pieces[i]
            action = ch.int(0, 7)
            if action == 0:
                headers[ch.pick(CHUNK_KEYS)] = fuzz_value(ch, wire=True)
            elif action == 1:
                headers.pop(ch.pick(CHUNK_KEYS), None)
            elif action == 2:  # a value near the right one
                key = ch.pick(CHUNK_KEYS[1:5])
                headers[key] = headers.get(key, 0) + ch.int(-2, 2) if isinstance(headers.get(key), int) else 0
            elif action == 3:
                pieces.append([dict(headers), list(body)])
                users.append(users[i])
            elif action == 4:
                del pieces[i], users[i]
            elif action == 5:  # a body a byte short or long, or another
                joined = b"".join(body)
                how = ch.int(0, 2)
                pieces[i][1] = [joined[:-1] if how == 0 else joined + b"\0" if how == 1 else ch.bytes(ch.int(0, 64))]
            elif action == 6:
                users[i] = ch.pick(USERS)
            else:  # the body in fragments, as they arrive from the broker
                joined = b"".join(body)
                cut = ch.int(0, len(joined))
                pieces[i][1] = [joined[:cut], joined[cut:]]
        for (headers, body), sender in zip(pieces, users):
            self.add(headers, sender, body)

    def raw_delivery(self, ch) -> None:
        headers = None if ch.bool("no_headers") else {}
        if headers is not None:
            for _ in range(ch.int(0, 7)):
                headers[ch.pick(CHUNK_KEYS + ("x-death", "fedq-version"))] = fuzz_value(ch, wire=True)
        self.add(headers, ch.pick(USERS), [ch.bytes(ch.int(0, 512))])

    # -- the path and its checks ------------------------------------------------------------------------------

    def add(self, headers, user, body) -> None:
        from coordinator.uploads import Refusal, Upload

        self.tag += 1
        if self.verbose:
            print(f"deliver tag={self.tag} user={user!r} headers={headers!r} body={[len(b) for b in body]}",
                  file=sys.stderr)
        try:
            placed = self.uploads.add(self.tag, headers, user, body)
        except Exception as exc:  # noqa: BLE001 - exactly what the fuzzer looks for
            self.finding(signature("uploads", exc), f"Uploads.add raised {type(exc).__name__}: {exc}", exc)
        if isinstance(placed, Refusal):
            self.count("refused by uploads")
            if self.verbose:
                print(f"  refused by uploads: {placed.reason}", file=sys.stderr)
            if not isinstance(placed.reason, str) or not placed.reason:
                self.finding("refusal:no-reason", f"Uploads refused without a reason: {placed!r}")
        elif isinstance(placed, Upload):
            self.handle(placed)
        elif placed is not None:
            self.finding("uploads:result", f"Uploads.add returned {placed!r}")

    def handle(self, upload) -> None:
        """As ``Coordinator._handle``: the payload through the ingest stages, the buffer back to the pool."""
        from coordinator import ingest
        from coordinator.ingest import APPLIED, DROPPED, GREETED, REFUSED
        from shared.protocol import ProtocolError

        # The outcomes Ingest gives (a fifth, duplicate, came in with commit c82f65d).
        outcomes = {APPLIED, DROPPED, REFUSED, GREETED, getattr(ingest, "DUPLICATE", REFUSED)}

        failures = sum(self.runlog.stage_failures.values())
        try:
            try:
                verdict = self.ingest.take(upload.reassembly.payload(), upload.user_id, upload.first_chunk)
            except ProtocolError as exc:
                verdict = None
                if self.verbose:
                    print(f"  refused (digest): {exc}", file=sys.stderr)
                self.count("refused by digest")
            except Exception as exc:  # noqa: BLE001
                self.finding(signature("take", exc), f"Ingest.take raised {type(exc).__name__}: {exc}", exc)
        finally:
            self.buffers.give(upload.reassembly.storage)
        if self.gaps or sum(self.runlog.stage_failures.values()) != failures:
            gap = self.gaps[-1] if self.gaps else None
            stages = dict(self.runlog.stage_failures)
            self.finding(signature("stage", gap) if gap is not None else "stage:unknown",
                         f"an ingest stage failed ({stages}): {verdict.reason if verdict else ''}", gap)
        if verdict is None:
            return
        if self.verbose:
            print(f"  verdict: {verdict}", file=sys.stderr)
        self.count(verdict.outcome)
        if verdict.outcome not in outcomes:
            self.finding(f"verdict:{verdict.outcome}", f"a verdict of no known outcome: {verdict!r}")
        if verdict.outcome in (REFUSED, DROPPED) and (not isinstance(verdict.reason, str) or not verdict.reason):
            self.finding(f"verdict:{verdict.outcome}-without-reason", f"{verdict!r}")
        if verdict.outcome == APPLIED or verdict.new_version:
            self.check_finite(f"after a verdict {verdict.outcome} on update {verdict.update_id}")

    def flush(self, ch) -> None:
        offset = (0.0, 0.5, 1.0, 1e9)[ch.int(0, 3, "flush")]
        try:
            outcome = self.ingest.flush(time.monotonic() + offset)
        except Exception as exc:  # noqa: BLE001
            self.finding(signature("flush", exc), f"Ingest.flush raised {type(exc).__name__}: {exc}", exc)
        if outcome is not None:
            self.check_finite("after a deadline flush")

    def check_finite(self, when: str) -> None:
        bad = [name for name, tensor in self.state.params.items() if not bool(self.torch.isfinite(tensor).all())]
        if not bad:
            return
        if self.bounded:
            self.finding(f"non-finite:{self.config_name}",
                         f"the model holds NaN or infinity in {bad} {when} under {self.config_name}")
        self.diverged_unbounded[self.config_name] = self.diverged_unbounded.get(self.config_name, 0) + 1
        for tensor in self.state.params.values():  # the coordinator would stop here (ModelDiverged)
            tensor.zero_()

    def count(self, what: str) -> None:
        self.verdicts[what] = self.verdicts.get(what, 0) + 1

    def finding(self, sig: str, detail: str, exc: BaseException | None = None):
        record = {"signature": sig, "detail": detail[:2000], "config": self.config_name,
                  "trace": "".join(traceback.format_exception(exc))[-6000:] if exc is not None else None}
        if self.findings_file is not None:
            with open(self.findings_file, "a") as out:
                out.write(json.dumps(record) + "\n")
        if sig in self.known:
            self.known_hits += 1
            raise _Known(sig)
        raise Finding(f"{sig}: {detail}") from exc


def fuzz_text(ch) -> str:
    return ch.bytes(ch.int(0, 70, "text")).decode("utf-8", "replace")


def signature(where: str, exc: BaseException | None) -> str:
    """Where a finding comes from: the exception's type and the innermost frame in fedq's code."""
    if exc is None:
        return f"{where}:unknown"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(str(ROOT))
              and not f.filename.endswith("fuzz_ingest.py") and "-packages" not in f.filename]
    place = f"{Path(frames[-1].filename).relative_to(ROOT)}:{frames[-1].name}" if frames else "?"
    return f"{where}:{type(exc).__name__}@{place}"


# -- seeds ----------------------------------------------------------------------------------------------------

SEEDS = {
    "hello": {"op": 1},
    "fp32-update": {"op": 0},
    "int8-update": {"op": 0, "codec": 3, "value_pick": 1},
    "topk-update": {"op": 0, "codec": 4, "topk": 1, "values": 3},
    "topk-int8-update": {"op": 0, "codec": 5, "topk": 2, "model": 1},
    "fp16-update-large-model": {"op": 0, "codec": 1, "model": 1, "values": 1, "value_bytes": bytes(2424)},
    "multi-chunk-update": {"op": 0, "chunking": 1, "chunk_bytes": 64},
    "fedbuff-two-sites": {"config": 3, "ops": 3, "op": [1, 0, 0], "site": [0, 0, 1], "user": [0, 0, 0]},
    "fedbuff-topk-round": {"config": 6, "op": 10, "round": 3, "codec": [4, 5, 4], "values": 1,
                           "value_bytes": [bytes(range(60))] * 3},
    "trimmed-mean-round": {"config": 4, "op": 10, "round": 4, "value_pick": [0, 1, 4, 5]},
    "trimmed-mean-chunks-reversed": {"config": 4, "ops": 2, "op": [0, 0], "site": [0, 1], "chunking": [3, 3],
                                     "order": [1, 1]},
}


def write_seeds(federation: Federation, corpus: Path) -> int:
    """Write the seed inputs the corpus lacks (each checked to give the fuzzer's data provider the same
    choices); returns how many."""
    import atheris

    written = 0
    for name, answers in SEEDS.items():
        if (corpus / f"seed-{name}").exists():
            continue
        scripted = Scripted(answers)
        recorded_s = Recording(scripted)
        federation.run(recorded_s)
        data = scripted.data()
        recorded_f = Recording(Fuzzed(atheris.FuzzedDataProvider(data)))
        federation.run(recorded_f)
        if recorded_s.choices != recorded_f.choices:
            raise RuntimeError(f"seed {name} does not read back as written")
        (corpus / f"seed-{name}").write_bytes(data)
        written += 1
    return written


class Recording(Fuzzed):
    """Passes choices through, keeping them."""

    def __init__(self, inner):
        self.inner, self.choices = inner, []

    def int(self, lo, hi, label=""):
        value = self.inner.int(lo, hi, label)
        self.choices.append(value)
        return value

    def bool(self, label=""):
        value = self.inner.bool(label)
        self.choices.append(value)
        return value

    def bytes(self, n, label=""):
        value = self.inner.bytes(n, label)
        self.choices.append(value)
        return value


# -- the child: libFuzzer ------------------------------------------------------------------------------------


def child(workdir: Path, libfuzzer_args: list[str], known: list[str], corpus: Path | None) -> None:
    try:
        import atheris
    except ImportError:
        sys.exit("fuzz_ingest needs atheris: pip install atheris")
    # Third-party modules first, so that only fedq's own code is instrumented.
    import blake3  # noqa: F401
    import msgpack  # noqa: F401
    import numba  # noqa: F401
    import numpy  # noqa: F401
    import pydantic  # noqa: F401
    import torch

    # numba compiles these loops from their bytecode, which instrumentation would change.
    importlib.import_module("coordinator.kernels")

    torch.set_num_threads(1)
    logging.disable(logging.CRITICAL)
    with atheris.instrument_imports(include=["coordinator", "shared"], exclude=["coordinator.kernels"]):
        for module in INSTRUMENTED:
            importlib.import_module(module)

    workdir.mkdir(parents=True, exist_ok=True)
    federation = Federation(Path(tempfile.mkdtemp(prefix="fedq-fuzz-")))
    if corpus is not None and (written := write_seeds(federation, corpus)):
        print(f"fuzz_ingest: wrote {written} seed inputs to {corpus}", file=sys.stderr)
        federation.inputs = 0
    federation.known = set(known)
    federation.findings_file = workdir / "findings.jsonl"
    status = workdir / "status.json"
    last_write = [0.0]
    # libFuzzer ends the process itself at its time limit, so the count is written after every input
    # in the last seconds before it.
    limit = next((float(f.split("=", 1)[1]) for f in libfuzzer_args if f.startswith("-max_total_time=")), math.inf)
    closing = time.monotonic() + limit - 3.0
    runs = next((int(f.split("=", 1)[1]) for f in libfuzzer_args if f.startswith("-runs=")), None)
    last_runs = math.inf if runs is None else runs - 2000

    def write_status(final: bool = False) -> None:
        tmp = status.with_suffix(".tmp")
        tmp.write_text(json.dumps({"inputs": federation.inputs, "known_hits": federation.known_hits,
                                   "diverged_unbounded": federation.diverged_unbounded,
                                   "outcomes": federation.verdicts, "final": final}))
        tmp.replace(status)
        last_write[0] = time.monotonic()

    def target(data: bytes) -> None:
        try:
            federation.run(Fuzzed(atheris.FuzzedDataProvider(data)))
        except _Known:
            pass
        except Finding:
            write_status()
            raise
        except Exception as exc:  # the fuzzer's own building went wrong: shown as such, not as fedq's
            federation.findings_file.open("a").write(json.dumps({
                "signature": signature("harness", exc), "detail": f"{type(exc).__name__}: {exc}",
                "config": getattr(federation, "config_name", None),
                "trace": "".join(traceback.format_exception(exc))[-6000:]}) + "\n")
            write_status()
            raise
        now = time.monotonic()
        if now - last_write[0] > 1.0 or now > closing or federation.inputs >= last_runs:
            write_status()

    atheris.Setup([sys.argv[0], *libfuzzer_args], target)
    try:
        atheris.Fuzz()
    finally:
        write_status(final=True)


# -- the parent: time, restarts, the report --------------------------------------------------------------------

STATS = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+)")
CORP = re.compile(r" corp: (\d+)/")
EXEC_S = re.compile(r" exec/s: (\d+)")
ARTIFACT = re.compile(r"Test unit written to (\S+)")


def run_children(args) -> dict:
    workdir = WORK
    workdir.mkdir(parents=True, exist_ok=True)
    args.corpus.mkdir(parents=True, exist_ok=True)
    CRASHES.mkdir(parents=True, exist_ok=True)
    (workdir / "findings.jsonl").unlink(missing_ok=True)
    log_path = workdir / "libfuzzer.log"
    # The code fuzzed: the commit, and whether the working tree differed from it.
    git = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], check=False, cwd=ROOT,
                         capture_output=True, text=True)
    commit = git.stdout.strip() or None
    started = time.monotonic()
    deadline = started + args.seconds
    known: list[str] = []
    findings: list[dict] = []
    totals = {"inputs": 0, "known_hits": 0, "outcomes": {}, "diverged_unbounded": {}}
    last = {"cov": None, "ft": None, "corp": None, "exec_s": None, "executed_units": 0}
    children = 0
    with open(log_path, "w") as log_file:
        while True:
            left = deadline - time.monotonic()
            runs_left = None if args.runs is None else args.runs - totals["inputs"]
            if left < 1 or (runs_left is not None and runs_left <= 0):
                break
            children += 1
            (workdir / "status.json").unlink(missing_ok=True)
            (workdir / "known.json").write_text(json.dumps(known))
            flags = [f"-max_total_time={int(left)}", f"-rss_limit_mb={RSS_LIMIT_MB}", f"-max_len={MAX_LEN}",
                     f"-artifact_prefix={CRASHES}/", "-print_final_stats=1", "-timeout=60", "-print_pcs=0"]
            if runs_left is not None:
                flags.append(f"-runs={runs_left}")
            command = [sys.executable, str(Path(__file__).resolve()), "--child", str(workdir), "--", *flags,
                       str(args.corpus)]
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       errors="replace", cwd=ROOT)
            artifact, tail = None, []
            next_print = time.monotonic() + 30
            for line in process.stdout:
                log_file.write(line)
                tail = (tail + [line])[-60:]
                if match := STATS.match(line):
                    last.update(cov=int(match[3]), ft=int(match[4]))
                    if corp := CORP.search(line):
                        last["corp"] = int(corp[1])
                    if exec_s := EXEC_S.search(line):
                        last["exec_s"] = int(exec_s[1])
                elif line.startswith("stat::number_of_executed_units:"):
                    last["executed_units"] += int(line.split(":")[-1])
                elif match := ARTIFACT.search(line):
                    artifact = match[1]
                if time.monotonic() >= next_print:
                    next_print += 30
                    print(f"  {time.monotonic() - started:5.0f} s: cov {last['cov']} ft {last['ft']} "
                          f"corpus {last['corp']} exec/s {last['exec_s']}", flush=True)
            rc = process.wait()
            status = json.loads((workdir / "status.json").read_text()) if (workdir / "status.json").exists() else {}
            for key in ("inputs", "known_hits"):
                totals[key] += status.get(key, 0)
            for key in ("outcomes", "diverged_unbounded"):
                for what, n in status.get(key, {}).items():
                    totals[key][what] = totals[key].get(what, 0) + n
            if rc == 0:
                break
            records = [json.loads(line) for line in (workdir / "findings.jsonl").read_text().splitlines()] \
                if (workdir / "findings.jsonl").exists() else []
            new = [r for r in records if r["signature"] not in known]
            record = new[-1] if new else {"signature": f"libfuzzer-exit-{rc}", "detail": "".join(tail[-25:]),
                                          "trace": None, "config": None}
            known.append(record["signature"])
            findings.append({**record, "crash_file": artifact, "at_seconds": round(time.monotonic() - started, 1)})
            print(f"FINDING {record['signature']}: {record['detail'][:300]}\n  input: {artifact}", flush=True)
            if record["signature"].startswith("libfuzzer-exit") and artifact is None:
                break  # the child could not run: starting it again would fail the same way
    records = [json.loads(line) for line in (workdir / "findings.jsonl").read_text().splitlines()] \
        if (workdir / "findings.jsonl").exists() else []
    for finding in findings:
        finding["hits"] = sum(1 for r in records if r["signature"] == finding["signature"])
    return {
        "benchmark": "fuzz ingest",
        "command": " ".join(["python", "benchmarks/fuzz_ingest.py", *sys.argv[1:]]),
        "fedq_commit": commit,
        "seconds": round(time.monotonic() - started, 1),
        "inputs_executed": totals["inputs"],
        "libfuzzer_executed_units": last["executed_units"],
        "cov": last["cov"],
        "ft": last["ft"],
        # libFuzzer's corpus (the inputs it keeps for their coverage) and the files in the corpus folder.
        "corpus_size": last["corp"],
        "corpus_files": sum(1 for p in args.corpus.iterdir() if p.is_file()),
        "corpus": str(args.corpus),
        "exec_per_second": last["exec_s"],
        "fuzzer_processes": children,
        "findings": findings,
        "outcomes": totals["outcomes"],
        "diverged_unbounded": totals["diverged_unbounded"],
        "log": str(log_path),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        workdir = Path(argv[1])
        flags = argv[3:] if argv[2:3] == ["--"] else argv[2:]
        known = json.loads((workdir / "known.json").read_text()) if (workdir / "known.json").exists() else []
        positional = [a for a in flags if not a.startswith("-")]
        corpus = Path(positional[0]) if positional and Path(positional[0]).is_dir() else None
        child(workdir, flags, known, corpus)
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0, help="how long to fuzz (libFuzzer's -max_total_time)")
    parser.add_argument("--runs", type=int, default=None, help="stop after this many inputs")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--out", type=Path, default=RESULTS / "fuzz_ingest.json")
    parser.add_argument("--reproduce", type=Path, metavar="FILE",
                        help="run one input (a crash file) and show what it delivers and what became of it")
    args = parser.parse_args(argv)
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("fuzz_ingest needs atheris: pip install atheris", file=sys.stderr)
        return 2
    if args.reproduce is not None:
        env = {**os.environ, "FEDQ_FUZZ_VERBOSE": "1"}
        with tempfile.TemporaryDirectory(prefix="fedq-fuzz-") as workdir:
            return subprocess.call([sys.executable, str(Path(__file__).resolve()), "--child", workdir, "--",
                                    str(args.reproduce.resolve())], env=env, cwd=ROOT)
    WORK.mkdir(parents=True, exist_ok=True)
    with open(WORK / "lock", "w") as lock:
        try:  # the children's status and findings files are in one work folder
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"fuzz_ingest: another fuzz_ingest is running (it holds {WORK / 'lock'})", file=sys.stderr)
            return 2
        limits = f"{args.seconds:.0f} s" + (f" or {args.runs} inputs" if args.runs is not None else "")
        print(f"fuzz_ingest: {limits}, corpus {args.corpus}, crashes to {CRASHES}", flush=True)
        report = run_children(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"{report['seconds']} s, {report['inputs_executed']} inputs, cov {report['cov']}, ft {report['ft']}, "
          f"corpus {report['corpus_size']} ({report['corpus_files']} files), {len(report['findings'])} findings; "
          f"report in {args.out}")
    for finding in report["findings"]:
        print(f"  {finding['signature']} ({finding['hits']} hits): {finding['crash_file']}")
    return 1 if report["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())

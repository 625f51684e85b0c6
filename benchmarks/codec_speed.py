"""codec speed: encode plus decode of a 25M-parameter update, on one core, for every codec.

The update is framed as a real payload, copied once into one contiguous buffer (the copy the wire
makes: the receiver holds the payload in one preallocated buffer), and decoded from those bytes to
float32 tensors, as the coordinator does. Throughput counts dense fp32 input bytes (100 MB) per
second; medians of runs. For dense fp32 it also times the two sides of the wire path: the sender
(encode, cut into 4 MiB chunk bodies, digest) and the receiver (reassemble, verify, decode).

    python benchmarks/codec_speed.py

Writes benchmarks/results/codec_speed.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from shared.chunking import Reassembly, iter_chunks
from shared.codecs import CODECS, Layout, decode_tensors, encode_tensors, get_codec
from shared.protocol import PROTOCOL_VERSION, UpdateHeader, decode_payload, encode_payload, new_id, payload_size

RESULTS = Path(__file__).parent / "results"
TARGET_MB_S = 200.0
DENSE_TARGET_MB_S = 1000.0


def update_of(parameters: int) -> dict[str, torch.Tensor]:
    """A transformer-like mix of tensor sizes adding up to ``parameters`` values."""
    torch.manual_seed(0)
    width = 1024
    tensors, total, i = {}, 0, 0
    while total < parameters:
        n = min(width * width * 4, parameters - total)
        tensors[f"block{i}.mlp.weight"] = torch.randn(n) * 0.01
        total += n
        i += 1
    return tensors


def encoded(update: dict[str, torch.Tensor], codec_name: str) -> list[memoryview]:
    specs, parts = encode_tensors(update, get_codec(codec_name, topk_fraction=0.01))
    header = UpdateHeader(protocol=PROTOCOL_VERSION, update_id=new_id(), run_id=new_id(), site="bench",
                          base_version=0, num_samples=1, train_seconds=0.0, tensors=specs)
    return encode_payload(header, parts)


def decoded(payload: bytearray, layout: Layout) -> dict[str, torch.Tensor]:
    header, parts = decode_payload(payload)
    return decode_tensors(header.tensors, parts, layout)


def contiguous(buffers: list[memoryview]) -> bytearray:
    """The payload in one buffer, copied once, as a receiver holds it."""
    payload, offset = bytearray(payload_size(buffers)), 0
    for buffer in buffers:
        payload[offset : offset + len(buffer)] = buffer
        offset += len(buffer)
    return payload


def timed(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(codec_name: str, update: dict[str, torch.Tensor], repeats: int) -> dict:
    layout = Layout.of(update)
    size = payload_size(encoded(update, codec_name))
    seconds = timed(lambda: decoded(contiguous(encoded(update, codec_name)), layout), repeats)
    dense_mb = layout.total * 4 / 1e6
    return {"codec": codec_name, "median_seconds": seconds, "mb_per_s": dense_mb / seconds, "payload_bytes": size,
            "ratio_to_fp32": layout.total * 4 / size}


def measure_wire_sides(update: dict[str, torch.Tensor], repeats: int) -> dict:
    """Dense fp32 through each side of the wire path, chunking and digests included."""
    layout = Layout.of(update)
    chunks = list(iter_chunks(encoded(update, "fp32"), new_id()))

    def receive():
        reassembly = Reassembly(chunks[0][0])
        for info, body in chunks:
            reassembly.add(info, body)
        decoded(reassembly.payload(), layout)

    dense_mb = layout.total * 4 / 1e6
    sender = timed(lambda: list(iter_chunks(encoded(update, "fp32"), new_id())), repeats)
    receiver = timed(receive, repeats)
    return {"sender_mb_per_s": dense_mb / sender, "receiver_mb_per_s": dense_mb / receiver}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parameters", type=int, default=25_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    update = update_of(args.parameters)
    rows = [measure(name, update, args.repeats) for name in CODECS.names]
    wire = measure_wire_sides(update, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "codec_speed.json").write_text(json.dumps(
        {"benchmark": "codec speed", "parameters": args.parameters, "threads": 1, "repeats": args.repeats,
         "codecs": rows, "dense_fp32_wire": wire}, indent=1))
    print(f"{'codec':10s} {'MB/s':>8s} {'x smaller':>9s}")
    for r in rows:
        print(f"{r['codec']:10s} {r['mb_per_s']:8.0f} {r['ratio_to_fp32']:9.1f}")
    slowest = min(rows, key=lambda r: r["mb_per_s"])
    dense = next(r for r in rows if r["codec"] == "fp32")
    print(f"codec speed ({args.parameters:,} parameters, one thread): slowest is {slowest['codec']} at "
          f"{slowest['mb_per_s']:.0f} MB/s (target {TARGET_MB_S:.0f})")
    print(f"dense fp32 serialization (encode + one copy + decode): {dense['mb_per_s']:.0f} MB/s (target "
          f"{DENSE_TARGET_MB_S:.0f}); with chunking and the digest, sender {wire['sender_mb_per_s']:.0f} MB/s, "
          f"receiver {wire['receiver_mb_per_s']:.0f} MB/s")
    return 0 if slowest["mb_per_s"] >= TARGET_MB_S and dense["mb_per_s"] >= DENSE_TARGET_MB_S else 1


if __name__ == "__main__":
    sys.exit(main())

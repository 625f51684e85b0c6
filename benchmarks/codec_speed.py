"""codec speed: encode plus decode of a 25M-parameter update, on one core, for every codec.

The update is framed as a real payload and decoded from its bytes, as the coordinator does.
Throughput counts dense fp32 input bytes (100 MB) per second of encode + decode; medians of runs.

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

from shared.codecs import CODEC_NAMES, Layout, decode_tensors, encode_tensors, get_codec
from shared.protocol import PROTOCOL_VERSION, UpdateHeader, decode_payload, encode_payload, new_id

RESULTS = Path(__file__).parent / "results"
TARGET_MB_S = 200.0


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


def measure(codec_name: str, update: dict[str, torch.Tensor], repeats: int) -> dict:
    codec = get_codec(codec_name, topk_fraction=0.01)
    layout = Layout.of(update)
    times, size = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        specs, parts = encode_tensors(update, codec)
        header = UpdateHeader(protocol=PROTOCOL_VERSION, update_id=new_id(), run_id=new_id(), site="bench",
                              base_version=0, num_samples=1, train_seconds=0.0, tensors=specs)
        payload = bytearray(b"".join(encode_payload(header, parts)))
        decoded_header, decoded_parts = decode_payload(payload)
        decode_tensors(decoded_header.tensors, decoded_parts, layout)
        times.append(time.perf_counter() - start)
        size = len(payload)
    dense_mb = layout.total * 4 / 1e6
    seconds = statistics.median(times)
    return {"codec": codec_name, "median_seconds": seconds, "mb_per_s": dense_mb / seconds, "payload_bytes": size,
            "ratio_to_fp32": layout.total * 4 / size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parameters", type=int, default=25_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    update = update_of(args.parameters)
    rows = [measure(name, update, args.repeats) for name in CODEC_NAMES]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "codec_speed.json").write_text(json.dumps(
        {"benchmark": "codec speed", "parameters": args.parameters, "threads": 1, "repeats": args.repeats, "codecs": rows}, indent=1))
    print(f"{'codec':10s} {'MB/s':>8s} {'x smaller':>9s}")
    for r in rows:
        print(f"{r['codec']:10s} {r['mb_per_s']:8.0f} {r['ratio_to_fp32']:9.1f}")
    slowest = min(rows, key=lambda r: r["mb_per_s"])
    print(f"codec speed ({args.parameters:,} parameters, one thread): slowest is {slowest['codec']} at "
          f"{slowest['mb_per_s']:.0f} MB/s (target {TARGET_MB_S:.0f})")
    return 0 if slowest["mb_per_s"] >= TARGET_MB_S else 1


if __name__ == "__main__":
    sys.exit(main())

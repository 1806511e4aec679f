"""CPU throughput of the PyTorch quantizer path: rotation, tile encode, tile decode.

    PYTHONPATH=src python benchmarks/quantizer_throughput.py [--batch 256] [--repeats 5] [--json out.json]

One "tile" is one (K tile, V tile) pair of one KV head: G tokens x D channels of keys and of values.
Each call works on a batch of ``--batch`` such pairs, as the cache does when a prefill completes
many tiles at once. Figures are tiles per second (median over repeats, after a warm-up call), for
D = 64 and 128, G = 128, bfloat16 inputs (the usual cache dtype), KVarN (8 normalization
iterations) and, side by side in the same run, KIVI (no rotation, no normalization) to show what
the normalization costs.

* rotate: ``hadamard_transform`` of the K and V tiles (float32, as the cache does);
* encode: ``kvarn.codec.encode_tiles`` (normalization + RTN + packing + scale folding);
* decode: ``kvarn.codec.decode_tiles`` to float32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from kvarn.codec import decode_tiles, encode_tiles
from kvarn.config import KVarNConfig
from kvarn.method.hadamard import hadamard_transform


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, lazy init
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def realistic_tiles(batch: int, g: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tiles with the structure of real K/V: a few outlier key channels, heavy-tailed values."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, g, d, generator=gen)
    k[..., torch.randperm(d, generator=gen)[:4]] *= 12
    v = torch.distributions.StudentT(3.0).sample((batch, g, d))
    return k.to(torch.bfloat16), v.to(torch.bfloat16)


def measure(batch: int, head_dim: int, tile_size: int, preset: str, method: str, repeats: int) -> dict:
    config = KVarNConfig.from_preset(preset, method=method, tile_size=tile_size)
    k, v = realistic_tiles(batch, tile_size, head_dim, seed=head_dim)
    if config.rotate:
        k = hadamard_transform(k.float()).to(k.dtype)
        v = hadamard_transform(v.float()).to(v.dtype)
    encoded = encode_tiles(k, v, config)
    t_rotate = median_seconds(lambda: (hadamard_transform(k.float()), hadamard_transform(v.float())), repeats)
    t_encode = median_seconds(lambda: encode_tiles(k, v, config), repeats)
    t_decode = median_seconds(lambda: decode_tiles(encoded), repeats)
    return {
        "method": method,
        "preset": preset,
        "head_dim": head_dim,
        "tile_size": tile_size,
        "batch": batch,
        "rotate_tiles_per_s": batch / t_rotate if config.rotate else None,
        "encode_tiles_per_s": batch / t_encode,
        "decode_tiles_per_s": batch / t_decode,
        "encode_tokens_per_s": batch * tile_size / t_encode,
        "bytes_per_tile": encoded.nbytes() / batch,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=256, help="(tile, head) pairs per call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tile-size", type=int, default=128)
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--presets", default="k4v2,k2v2")
    ap.add_argument("--methods", default="kvarn,kivi")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="write the rows to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from rich.console import Console
    from rich.table import Table

    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, load average "
        f"{os.getloadavg()[0]:.1f} at start"
    )
    rows = []
    for head_dim in (int(x) for x in args.head_dims.split(",")):
        for preset in args.presets.split(","):
            for method in args.methods.split(","):
                rows.append(measure(args.batch, head_dim, args.tile_size, preset, method, args.repeats))

    table = Table(
        title=f"PyTorch quantizer path, tiles/s (batch {args.batch}, G {args.tile_size}); {machine}"
    )
    for col in ("method", "preset", "D", "rotate", "encode", "decode", "encode tokens/s", "bytes/tile"):
        table.add_column(col, justify="left" if col in ("method", "preset") else "right")
    for r in rows:
        table.add_row(
            r["method"],
            r["preset"],
            str(r["head_dim"]),
            f"{r['rotate_tiles_per_s']:,.0f}" if r["rotate_tiles_per_s"] else "-",
            f"{r['encode_tiles_per_s']:,.0f}",
            f"{r['decode_tiles_per_s']:,.0f}",
            f"{r['encode_tokens_per_s']:,.0f}",
            f"{r['bytes_per_tile']:,.0f}",
        )
    Console(width=160).print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

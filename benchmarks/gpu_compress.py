"""Tile compression throughput on the GPU: the fused Triton kernel vs the PyTorch codec.

    PYTHONPATH=src python3 benchmarks/gpu_compress.py [--tokens 32768] [--layers 32]

A 32k-token prefill of a Llama-3-8B-shaped model (32 layers x 8 KV heads, head_dim 128, bf16):
256 tiles of 128 tokens per layer and head, keys and values, KVarN K4V2 (8 normalization
iterations). Timed as one launch over every layer's tiles and as one launch per layer (how the
cache calls it), with ``triton.testing.do_bench`` medians. Target: <= 10 ms on an H100.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.testing

from kvarn.attention.triton import compress as tcompress
from kvarn.attention.triton.compress import compress_tiles
from kvarn.attention.triton.testing import random_kv
from kvarn.codec import encode_tiles
from kvarn.config import KVarNConfig

HKV, D, G = 8, 128, 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--sweep", action="store_true", help="also time num_warps 4/8/16")
    args = ap.parse_args()
    dev = torch.device("cuda")
    p = torch.cuda.get_device_properties(0)
    print(
        f"device {p.name}, {p.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}"
    )
    cfg = KVarNConfig.from_preset("k4v2")
    per_layer = HKV * args.tokens // G
    n = args.layers * per_layer
    gen = torch.Generator(device=dev).manual_seed(0)
    k, v = random_kv((n, G, D), torch.bfloat16, dev, gen)
    in_bytes = 2 * k.numel() * 2
    out = compress_tiles(k[:per_layer], v[:per_layer], cfg)
    launch = tcompress.LAST_LAUNCH[0]
    print(f"kernel: regs={launch.n_regs} spills={launch.n_spills} warps={launch.metadata.num_warps}")
    out_bytes = out.nbytes() * args.layers

    t_all = triton.testing.do_bench(
        lambda: compress_tiles(k, v, cfg), warmup=5, rep=200, return_mode="median"
    )

    def per_layer_calls():
        for i in range(args.layers):
            s = slice(i * per_layer, (i + 1) * per_layer)
            compress_tiles(k[s], v[s], cfg)

    t_layers = triton.testing.do_bench(per_layer_calls, warmup=2, rep=200, return_mode="median")
    ks, vs = k[:per_layer], v[:per_layer]
    t_torch_layer = triton.testing.do_bench(
        lambda: encode_tiles(ks, vs, cfg), warmup=2, rep=200, return_mode="median"
    )
    rows = [
        ("Triton, one launch for all layers", t_all),
        (f"Triton, {args.layers} launches (one per layer)", t_layers),
        (f"PyTorch encode_tiles, one layer x {args.layers} (extrapolated)", t_torch_layer * args.layers),
    ]
    if args.sweep:
        for nw in (4, 8, 16):
            t = triton.testing.do_bench(
                lambda nw=nw: compress_tiles(k, v, cfg, num_warps=nw), warmup=3, rep=150, return_mode="median"
            )
            rows.append((f"Triton, one launch, num_warps={nw}", t))
    print(
        f"{args.tokens} tokens x {args.layers} layers x {HKV} KV heads, D={D}, G={G}: {2 * n} tile encodes (K and V)"
    )
    print(f"bytes: {in_bytes / 1e9:.2f} GB read, {out_bytes / 1e9:.2f} GB written")
    print()
    print("| variant | time (ms) | tiles/s (K+V pairs) | effective GB/s (in+out) |")
    print("|---|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} | {n / ms * 1e3:.3g} | {(in_bytes + out_bytes) / ms / 1e6:.0f} |")


if __name__ == "__main__":
    main()

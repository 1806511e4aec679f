"""Decode attention on the GPU: KVarN K4V2 Triton kernels vs 16-bit SDPA vs dequantize-then-SDPA.

    PYTHONPATH=src python3 benchmarks/gpu_decode_attention.py [--contexts 4096 16384 32768 131072]
        [--batches 1 8 32] [--sweep] [--csv results.csv]

Kernels: ``warp`` (decode_warp.py, the dispatch's default) and ``tc`` (decode_tc.py, the previous
one). Llama-3-8B attention shapes (32 query heads, 8 KV heads, head_dim 128), bf16, one new token per
row. Each context is a sink tile (128 tokens, 16-bit) + quantized tiles + the new token; SDPA gets
the same number of tokens as a bf16 cache (``enable_gqa=True``).

Two times per method, both ``triton.testing.do_bench`` medians with the L2 flushed before each run:
* **GPU**: one call captured in a CUDA graph, the graph replayed (METHOD: many small launches are
  timed through graph replays). This is the kernels' own time, and what a decode step captured in a
  graph pays; the speedups and bandwidths are computed from it.
* **eager**: the Python call as is, launches included; where it exceeds the GPU time the host is
  the bottleneck (the wrapper's argument handling and Triton's launcher), not the kernel.
``host us/call`` times back-to-back eager calls on a tiny problem (GPU work negligible).

Bandwidth counts the bytes each method must read and write once: ours codes + metadata + 16-bit
sink + query/new token + output + the split-K workspace; SDPA the bf16 K and V + query + output.
The copy bandwidth is a measured device-to-device copy (read + write bytes). Storage holds random
codes with plausible metadata: timing does not depend on the values.

``--sweep`` times launch variants of the tc kernel (warps, registers cap, pipelining stages,
PTX unpack, second key operand, prefetch) x split counts at the two target points.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

from kvarn.attention.triton import decode_tc, decode_warp
from kvarn.attention.triton.copy_policy import graph_step_copies
from kvarn.attention.triton.testing import relative_error
from kvarn.codec import QuantizedKeys, QuantizedTiles, QuantizedValues, decode_tiles

HQ, HKV, D, G = 32, 8, 128, 128
KB, VB = 4, 2

# tc launch variants for --sweep (splits are swept separately: a run-time argument, no recompile).
VARIANTS = [
    dict(),  # defaults: three launches, words, subnormal code operands, 4 rows, 3 stages, cap 168
    dict(code_operands="fma"),  # session 2's code operands (one f16x2 fma per 2 codes)
    dict(num_stages=2),
    dict(maxnreg=128),  # 4 programs per SM
    dict(meta_ahead=0),
    dict(dense_chunk=64),
]


def bench(fn, reps_ms: int = 60) -> float:
    """Median milliseconds of ``fn()`` as called (eager)."""
    return triton.testing.do_bench(fn, warmup=10, rep=reps_ms, return_mode="median")


def bench_graph(fn, reps_ms: int = 60) -> float:
    """Median milliseconds of one replay of ``fn`` captured in a CUDA graph (the GPU's own time),
    warmed up and recorded as ``GraphDecoder`` records a decode step (``graph_step_copies``: the
    warp kernel's default launch copies tiles by TMA on sm_90)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), graph_step_copies():  # warm up (compiles) outside the capture
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), graph_step_copies():
        fn()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=reps_ms, return_mode="median")


def host_us_per_call(fn, calls: int = 300) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def copy_bandwidth() -> tuple[float, float]:
    """(device-to-device copy, bytes read + written per second; read-only reduction) in GB/s."""
    src = torch.empty(1024**3 // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    ms_copy = bench(lambda: dst.copy_(src))
    ms_read = bench(lambda: src.sum())
    return 2 * nbytes / ms_copy / 1e6, nbytes / ms_read / 1e6


def make_storage(batch: int, n_tiles: int, dev) -> dict:
    md = torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)

    def meta(*shape, lo=0.05, hi=0.2):
        return (torch.rand(*shape, generator=gen, device=dev) * (hi - lo) + lo).to(md)

    n = max(n_tiles, 1)
    s = dict(
        k_codes=torch.randint(
            0, 256, (batch, HKV, n, D, G * KB // 8), dtype=torch.uint8, device=dev, generator=gen
        ),
        k_scale=meta(batch, HKV, n, D),
        k_zero=-meta(batch, HKV, n, D, lo=0.5, hi=1.5),
        k_token_scale=meta(batch, HKV, n, G, lo=0.5, hi=2.0),
        v_codes=torch.randint(
            0, 256, (batch, HKV, n, G, D * VB // 8), dtype=torch.uint8, device=dev, generator=gen
        ),
        v_scale=meta(batch, HKV, n, G),
        v_zero=-meta(batch, HKV, n, G),
        v_channel_scale=meta(batch, HKV, n, D, lo=0.5, hi=2.0),
        n_tiles=torch.full((batch,), n_tiles, dtype=torch.int32, device=dev),
        sink_k=torch.randn(batch, HKV, G, D, device=dev, dtype=torch.bfloat16, generator=gen),
        sink_v=torch.randn(batch, HKV, G, D, device=dev, dtype=torch.bfloat16, generator=gen),
        sink_len=torch.full((batch,), G, dtype=torch.int32, device=dev),
        tail_k=torch.randn(batch, HKV, G, D, device=dev, dtype=torch.bfloat16, generator=gen),
        tail_v=torch.randn(batch, HKV, G, D, device=dev, dtype=torch.bfloat16, generator=gen),
        tail_len=torch.zeros(batch, dtype=torch.int32, device=dev),
        new_k=torch.randn(batch, HKV, 1, D, device=dev, dtype=torch.bfloat16, generator=gen),
        new_v=torch.randn(batch, HKV, 1, D, device=dev, dtype=torch.bfloat16, generator=gen),
        key_bits=KB,
        value_bits=VB,
        scaling=1.0 / math.sqrt(D),
    )
    return s


def ours_bytes(batch: int, n_tiles: int, splits: int) -> int:
    # codes + bf16 metadata: keys a, z [D] and r [G]; values a, z [G] and c [D]
    tile = D * G * KB // 8 + G * D * VB // 8 + 2 * (2 * D + G) + 2 * (2 * G + D)
    dense = 2 * G * D * 2 + 2 * D * 2  # sink K+V + new K+V (bf16)
    q_out = 2 * HQ * D * 2
    work = (splits + 1) * (HQ * D + 2 * HQ) * 4 * 2  # partials written then read
    return batch * (HKV * (n_tiles * tile + dense) + q_out + work)


def sdpa_bytes(batch: int, tokens: int) -> int:
    return batch * (HKV * tokens * D * 2 * 2 + 2 * HQ * D * 2)


def describe(compiled) -> str:
    """Registers per thread and spilled bytes of a compiled Triton launch."""
    try:
        return f"regs={compiled.n_regs} spills={compiled.n_spills} warps={compiled.metadata.num_warps}"
    except Exception:
        return "n/a"


def sweep(ctx: int, batch: int, q, st, splits0: int, variants: list[dict], split_counts) -> tuple[float, str]:
    """Time every launch variant at each split count (default: half, the default and twice it)."""
    best = (float("inf"), "")
    counts = split_counts or sorted({max(1, splits0 // 2), splits0, 2 * splits0})
    for variant in variants:
        for sp in counts:
            cfg = dict(variant, num_splits=sp)
            try:
                t = bench_graph(lambda cfg=cfg: decode_tc.quantized_decode_attention(q, **st, **cfg))
            except Exception as exc:  # a variant that does not compile is reported and skipped
                print(f"  sweep ctx={ctx} B={batch} {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
                break
            info = describe(decode_tc.LAST_LAUNCH[0])
            print(f"  sweep ctx={ctx} B={batch} {cfg}: {t * 1e3:.1f} us {info}", flush=True)
            if t < best[0]:
                best = (t, " ".join(f"{k}={v}" for k, v in cfg.items()))
    return best


def run_case(
    ctx: int, batch: int, copy_gbs: float, do_sweep: bool, variants=VARIANTS, split_counts=None
) -> dict:
    dev = torch.device("cuda")
    n_tiles = ctx // G - 1  # ctx = sink tile + n_tiles tiles; plus the new token
    tokens = ctx + 1
    st = make_storage(batch, n_tiles, dev)
    q = torch.randn(batch, HQ, 1, D, device=dev, dtype=torch.bfloat16)
    splits = decode_tc.default_num_splits(batch, HKV, dev)

    def tc():
        return decode_tc.quantized_decode_attention(q, **st)

    t_tc = bench_graph(tc)
    t_tc_eager = bench(tc)
    info = describe(decode_tc.LAST_LAUNCH[0])

    def warp():
        return decode_warp.quantized_decode_attention(q, **st)

    t_warp = bench_graph(warp)
    t_warp_eager = bench(warp)
    warp_info = describe(decode_warp.LAST_LAUNCH[0])
    # the per-lane cp.async copy (the default before session 8, and off sm_90), side by side
    t_warp_cp = bench_graph(lambda: decode_warp.quantized_decode_attention(q, **st, copy="cp.async"))
    warp_splits = decode_warp.default_num_splits(batch, HKV, 1, dev, decode_warp.PROGRAMS_PER_SM)
    warp_vs_tc = relative_error(warp(), tc())
    best = sweep(ctx, batch, q, st, splits, variants, split_counts) if do_sweep else (t_tc, "default")

    k16 = torch.randn(batch, HKV, tokens, D, device=dev, dtype=torch.bfloat16)
    v16 = torch.randn_like(k16)

    def sdpa():
        return F.scaled_dot_product_attention(q, k16, v16, enable_gqa=True)

    t_sdpa = bench_graph(sdpa)
    t_sdpa_eager = bench(sdpa)
    sdpa = k16 = v16 = None  # free the 16-bit cache before the dequantized copy
    torch.cuda.empty_cache()

    # Dequantize every tile (PyTorch), assemble the cache, then SDPA (eager: the baseline a user
    # without fused kernels would run).
    qt = QuantizedTiles(
        QuantizedKeys(st["k_codes"], st["k_scale"], st["k_zero"], st["k_token_scale"], KB),
        QuantizedValues(st["v_codes"], st["v_scale"], st["v_zero"], st["v_channel_scale"], VB),
    )

    def deq_sdpa():
        kt, vt = decode_tiles(qt, dtype=torch.bfloat16)
        k = torch.cat([st["sink_k"], kt.reshape(batch, HKV, -1, D), st["new_k"]], dim=2)
        v = torch.cat([st["sink_v"], vt.reshape(batch, HKV, -1, D), st["new_v"]], dim=2)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    try:
        t_deq = bench(deq_sdpa, reps_ms=30)
        # Sanity at full size: the kernel and dequantize-then-SDPA agree to bf16 rounding.
        agree = relative_error(tc(), deq_sdpa())
    except torch.OutOfMemoryError:
        t_deq, agree = float("nan"), float("nan")
    b_tc = ours_bytes(batch, n_tiles, splits)
    # the warp kernel's workspace holds 1 + 2 * G / 32 partials for the 16-bit segments
    b_warp = ours_bytes(
        batch, n_tiles, warp_splits + decode_warp.dense_programs(G, decode_warp.dense_chunk(D, G)) - 1
    )
    b_sdpa = sdpa_bytes(batch, tokens)
    return dict(
        context=ctx,
        batch=batch,
        warp_gpu_us=t_warp * 1e3,
        warp_eager_us=t_warp_eager * 1e3,
        warp_cpasync_gpu_us=t_warp_cp * 1e3,
        warp_speedup=t_sdpa / t_warp,
        warp_frac_copy=b_warp / t_warp / 1e6 / copy_gbs,
        warp_splits=warp_splits,
        warp_kernel=warp_info,
        warp_vs_tc=warp_vs_tc,
        tc_gpu_us=t_tc * 1e3,
        tc_eager_us=t_tc_eager * 1e3,
        tc_best_us=best[0] * 1e3,
        tc_best_cfg=best[1],
        sdpa_gpu_us=t_sdpa * 1e3,
        sdpa_eager_us=t_sdpa_eager * 1e3,
        deq_sdpa_eager_us=t_deq * 1e3,
        speedup_gpu=t_sdpa / t_tc,
        speedup_best=t_sdpa / best[0],
        speedup_eager=t_sdpa_eager / t_tc_eager,
        tc_gbs=b_tc / t_tc / 1e6,
        tc_frac_copy=b_tc / t_tc / 1e6 / copy_gbs,
        tc_best_frac_copy=b_tc / best[0] / 1e6 / copy_gbs,
        sdpa_frac_copy=b_sdpa / t_sdpa / 1e6 / copy_gbs,
        tc_mb=b_tc / 1e6,
        sdpa_mb=b_sdpa / 1e6,
        splits=splits,
        kernel=info,
        rel_diff_vs_dequant=agree,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--sweep", action="store_true", help="tune the tc kernel at the two target points")
    ap.add_argument(
        "--variants",
        default=None,
        help="JSON list of tc launch dicts for --sweep (default: VARIANTS), e.g. '[{}, {\"m_block\": 4}]'",
    )
    ap.add_argument(
        "--splits",
        default=None,
        help="--sweep split counts per target point, e.g. '32768x8=6,12,17;131072x1=50,132'",
    )
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()
    variants = json.loads(args.variants) if args.variants else VARIANTS
    split_counts = {}
    for part in (args.splits or "").split(";"):
        if part.strip():
            point, counts = part.split("=")
            c, b = point.split("x")
            split_counts[(int(c), int(b))] = [int(x) for x in counts.split(",")]
    p = torch.cuda.get_device_properties(0)
    copy_gbs, read_gbs = copy_bandwidth()
    print(
        f"device {p.name}, {p.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}"
    )
    print(
        f"measured copy bandwidth (read+write bytes): {copy_gbs:.0f} GB/s; read-only (sum): {read_gbs:.0f} GB/s"
    )
    tiny = make_storage(1, 1, torch.device("cuda"))
    q1 = torch.randn(1, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    k1 = torch.randn(1, HKV, 256, D, device="cuda", dtype=torch.bfloat16)
    host_tc = host_us_per_call(lambda: decode_tc.quantized_decode_attention(q1, **tiny))
    host_warp = host_us_per_call(lambda: decode_warp.quantized_decode_attention(q1, **tiny))
    host_warp_tma = host_us_per_call(lambda: decode_warp.quantized_decode_attention(q1, **tiny, copy="tma"))
    host_sdpa = host_us_per_call(lambda: F.scaled_dot_product_attention(q1, k1, k1, enable_gqa=True))
    print(
        f"host us/call (tiny problem, eager): warp {host_warp:.1f} (copy='tma': {host_warp_tma:.1f}), "
        f"tc {host_tc:.1f}, SDPA {host_sdpa:.1f}"
    )
    rows = []
    for ctx in args.contexts:
        for batch in args.batches:
            target = (ctx, batch) in ((32768, 8), (131072, 1))
            rows.append(
                run_case(
                    ctx, batch, copy_gbs, args.sweep and target, variants, split_counts.get((ctx, batch))
                )
            )
            torch.cuda.empty_cache()
            r = rows[-1]
            print(
                f"ctx {ctx:>6} B {batch:>2}: warp GPU {r['warp_gpu_us']:8.1f} us (eager {r['warp_eager_us']:8.1f}), "
                f"{100 * r['warp_frac_copy']:3.0f}% copy, {r['warp_speedup']:4.2f}x SDPA, {r['warp_kernel']} "
                f"splits {r['warp_splits']}, vs tc {r['warp_vs_tc']:.1e}; cp.async GPU {r['warp_cpasync_gpu_us']:.1f} us",
                flush=True,
            )
            print(
                f"               tc GPU {r['tc_gpu_us']:8.1f} us (eager {r['tc_eager_us']:8.1f}), "
                f"{100 * r['tc_frac_copy']:3.0f}% copy, {r['speedup_gpu']:4.2f}x SDPA (GPU {r['sdpa_gpu_us']:.1f}, "
                f"eager {r['sdpa_eager_us']:.1f}); best {r['tc_best_us']:.1f} us [{r['tc_best_cfg']}] "
                f"{r['kernel']} splits {r['splits']}; vs dequant {r['rel_diff_vs_dequant']:.1e}",
                flush=True,
            )
    print()
    print(
        f"host us/call (tiny problem, eager): warp {host_warp:.1f} (copy='tma': {host_warp_tma:.1f}), "
        f"tc {host_tc:.1f}, SDPA {host_sdpa:.1f}"
    )
    print(
        "| context | batch | K4V2 warp GPU (us) | speedup vs SDPA | warp % copy BW | warp cp.async GPU (us) "
        "| warp eager (us) "
        "| K4V2 tc GPU (us) | SDPA GPU (us) | tc speedup | best tc (us) | best speedup "
        "| tc % copy BW (best) | SDPA % copy BW | tc eager (us) | SDPA eager (us) | dequant+SDPA eager (us) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['context']} | {r['batch']} | {r['warp_gpu_us']:.1f} | {r['warp_speedup']:.2f}x | "
            f"{100 * r['warp_frac_copy']:.0f}% | {r['warp_cpasync_gpu_us']:.1f} | {r['warp_eager_us']:.1f} | "
            f"{r['tc_gpu_us']:.1f} | {r['sdpa_gpu_us']:.1f} | "
            f"{r['speedup_gpu']:.2f}x | {r['tc_best_us']:.1f} | {r['speedup_best']:.2f}x | "
            f"{100 * r['tc_frac_copy']:.0f}% ({100 * r['tc_best_frac_copy']:.0f}%) | {100 * r['sdpa_frac_copy']:.0f}% | "
            f"{r['tc_eager_us']:.1f} | {r['sdpa_eager_us']:.1f} | {r['deq_sdpa_eager_us']:.1f} |"
        )
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()

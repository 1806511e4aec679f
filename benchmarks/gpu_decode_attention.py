"""Decode attention on the GPU: KVarN K4V2 Triton kernels vs 16-bit SDPA vs dequantize-then-SDPA.

    PYTHONPATH=src python3 benchmarks/gpu_decode_attention.py [--contexts 4096 16384 32768 131072]
        [--batches 1 8 32] [--sweep] [--csv results.csv]

Kernels: ``tc`` (decode_tc.py, bit planes on tensor cores; also timed without the second key
operand, ``tc1``) and ``v3`` (decode.py, chunked). Llama-3-8B attention shapes (32 query heads, 8 KV heads, head_dim 128), bf16, one new token per
row. Each context is sink tile (128 tokens, 16-bit) + quantized tiles + no tail + the new token;
SDPA gets the same number of tokens as a bf16 cache (``enable_gqa=True``). Times are
``triton.testing.do_bench`` medians (L2 flushed before every run). Bandwidth counts the bytes each
method must read and write once: ours codes + metadata + 16-bit sink + query/new token + output
+ the split-K workspace; SDPA the bf16 K and V + query + output. The copy bandwidth is a measured
device-to-device copy (read + write bytes). Storage holds random codes with plausible metadata:
timing does not depend on the values (no data-dependent branches).
"""

from __future__ import annotations

import argparse
import csv
import math

import torch
import torch.nn.functional as F
import triton
import triton.testing

from kvarn.attention.triton import decode as tdecode
from kvarn.attention.triton import decode_tc as tdecode_tc
from kvarn.attention.triton.decode import default_num_splits, quantized_decode_attention
from kvarn.attention.triton.testing import relative_error
from kvarn.codec import QuantizedKeys, QuantizedTiles, QuantizedValues, decode_tiles

HQ, HKV, D, G = 32, 8, 128, 128
KB, VB = 4, 2


def describe(compiled) -> str:
    """Registers per thread and spilled bytes of a compiled Triton launch (no device time)."""
    try:
        return f"regs={compiled.n_regs} spills={compiled.n_spills} warps={compiled.metadata.num_warps}"
    except Exception:
        return "n/a"


def bench(fn, reps_ms: int = 60) -> float:
    """Median milliseconds."""
    return triton.testing.do_bench(fn, warmup=10, rep=reps_ms, return_mode="median")


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


def time_sdpa(q: torch.Tensor, batch: int, tokens: int, dev) -> float:
    k16 = torch.randn(batch, HKV, tokens, D, device=dev, dtype=torch.bfloat16)
    v16 = torch.randn_like(k16)
    return bench(lambda: F.scaled_dot_product_attention(q, k16, v16, enable_gqa=True))


def run_case(ctx: int, batch: int, copy_gbs: float, sweep: bool, sweep_v3: bool = False) -> list[dict]:
    dev = torch.device("cuda")
    n_tiles = ctx // G - 1  # ctx = sink tile + n_tiles tiles; plus the new token
    tokens = ctx + 1
    st = make_storage(batch, n_tiles, dev)
    q = torch.randn(batch, HQ, 1, D, device=dev, dtype=torch.bfloat16)
    rows = []
    splits = default_num_splits(batch, HKV, dev)

    def ours(**launch):
        return lambda: quantized_decode_attention(q, **st, **launch)

    def tc(**launch):
        return lambda: tdecode_tc.quantized_decode_attention(q, **st, **launch)

    t_tc = bench(tc())
    tc_info = describe(tdecode_tc.LAST_LAUNCH[0])
    t_tc1 = bench(tc(qa_split=False))
    tc_splits = tdecode_tc.default_num_splits(batch, HKV, dev)
    best_tc = (t_tc, "default")
    if sweep:
        for sp in sorted({max(1, tc_splits // 2), tc_splits, tc_splits * 2}):
            for nw, qs, pf, asm in (
                (4, True, False, False),
                (4, True, False, True),
                (4, True, True, True),
                (8, True, True, True),
                (4, False, False, True),
            ):
                cfg = dict(num_splits=sp, num_warps=nw, qa_split=qs, prefetch=pf, unpack_asm=asm)
                try:
                    t = bench(tc(**cfg))
                except Exception as exc:
                    print(f"  tc sweep {cfg}: {type(exc).__name__}")
                    continue
                print(f"  tc sweep ctx={ctx} B={batch} {cfg}: {t * 1e3:.1f} us", flush=True)
                if t < best_tc[0]:
                    best_tc = (t, " ".join(f"{k}={v}" for k, v in cfg.items()))
    t_ours = bench(ours())
    kernel_info = describe(tdecode.LAST_LAUNCH[0])
    # Sanity at full size: the two kernels agree (both are checked against the float64 twin by
    # scripts/gpu_check.py on small shapes).
    tc_vs_v3 = relative_error(tc()(), ours()())
    best = (t_ours, "default")
    if sweep_v3:  # v3 was swept in earlier runs (docs/gpu.md)
        for sp in sorted({splits, splits * 2}):
            for nw, tcx, ns in ((4, 32, 2), (8, 32, 2), (4, 64, 3), (8, 64, 2)):
                cfg = dict(num_splits=sp, num_warps=nw, token_chunk=tcx, num_stages=ns)
                try:
                    t = bench(ours(**cfg))
                except Exception as exc:  # a config that does not compile is just skipped
                    print(f"  sweep {cfg}: {type(exc).__name__}")
                    continue
                print(f"  sweep ctx={ctx} B={batch} {cfg}: {t * 1e3:.1f} us", flush=True)
                if t < best[0]:
                    best = (t, " ".join(f"{k}={v}" for k, v in cfg.items()))

    # 16-bit SDPA on a bf16 cache of the same tokens.
    t_sdpa = time_sdpa(q, batch, tokens, dev)
    torch.cuda.empty_cache()

    # Dequantize every tile (PyTorch), assemble the cache, then SDPA.
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
    except torch.OutOfMemoryError:
        t_deq = float("nan")
    b_ours = ours_bytes(batch, n_tiles, splits)
    b_tc = ours_bytes(batch, n_tiles, tc_splits)
    b_sdpa = sdpa_bytes(batch, tokens)
    rows.append(
        dict(
            context=ctx,
            batch=batch,
            tc_us=t_tc * 1e3,
            tc1_us=t_tc1 * 1e3,
            tc_best_us=best_tc[0] * 1e3,
            tc_best_cfg=best_tc[1],
            tc_speedup=t_sdpa / t_tc,
            tc_gbs=b_tc / t_tc / 1e6,
            tc_frac_copy=b_tc / t_tc / 1e6 / copy_gbs,
            tc1_frac_copy=b_tc / t_tc1 / 1e6 / copy_gbs,
            tc_splits=tc_splits,
            tc_kernel=tc_info,
            tc_vs_v3=tc_vs_v3,
            ours_us=t_ours * 1e3,
            best_us=best[0] * 1e3,
            best_cfg=best[1],
            sdpa_us=t_sdpa * 1e3,
            deq_sdpa_us=t_deq * 1e3,
            speedup=t_sdpa / t_ours,
            ours_gbs=b_ours / t_ours / 1e6,
            ours_frac_copy=b_ours / t_ours / 1e6 / copy_gbs,
            sdpa_gbs=b_sdpa / t_sdpa / 1e6,
            sdpa_frac_copy=b_sdpa / t_sdpa / 1e6 / copy_gbs,
            ours_mb=b_ours / 1e6,
            sdpa_mb=b_sdpa / 1e6,
            splits=splits,
            kernel=kernel_info,
        )
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--sweep", action="store_true", help="tune splits/warps/stages at the two target points")
    ap.add_argument("--sweep-v3", action="store_true", help="also tune the v3 kernel at the target points")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()
    p = torch.cuda.get_device_properties(0)
    copy_gbs, read_gbs = copy_bandwidth()
    print(
        f"device {p.name}, {p.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}"
    )
    print(
        f"measured copy bandwidth (read+write bytes): {copy_gbs:.0f} GB/s; read-only (sum): {read_gbs:.0f} GB/s"
    )
    rows = []
    for ctx in args.contexts:
        for batch in args.batches:
            target = (ctx, batch) in ((32768, 8), (131072, 1))
            rows += run_case(ctx, batch, copy_gbs, args.sweep and target, args.sweep_v3 and target)
            torch.cuda.empty_cache()
            r = rows[-1]
            print(
                f"ctx {ctx:>6} B {batch:>2}: tc {r['tc_us']:8.1f} us ({r['tc_gbs']:6.0f} GB/s, "
                f"{100 * r['tc_frac_copy']:3.0f}% copy, {r['tc_speedup']:4.2f}x sdpa)  tc1 {r['tc1_us']:8.1f} us  "
                f"best {r['tc_best_us']:.1f} us [{r['tc_best_cfg']}] {r['tc_kernel']} splits {r['tc_splits']} "
                f"rel diff vs v3 {r['tc_vs_v3']:.1e}",
                flush=True,
            )
            print(
                f"ctx {ctx:>6} B {batch:>2}: v3 {r['ours_us']:8.1f} us ({r['ours_gbs']:6.0f} GB/s, "
                f"{100 * r['ours_frac_copy']:3.0f}% copy)  sdpa {r['sdpa_us']:8.1f} us ({r['sdpa_gbs']:6.0f} GB/s)  "
                f"deq+sdpa {r['deq_sdpa_us']:9.1f} us  speedup {r['speedup']:4.2f}x  best {r['best_us']:.1f} us [{r['best_cfg']}] {r['kernel']}",
                flush=True,
            )
    print()
    print(
        "| context | batch | tc (us) | tc, one key operand (us) | v3 (us) | SDPA bf16 (us) | dequant+SDPA (us) "
        "| tc speedup vs SDPA | tc GB/s (% copy) | tc1 % copy | SDPA GB/s (% copy) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['context']} | {r['batch']} | {r['tc_us']:.1f} | {r['tc1_us']:.1f} | {r['ours_us']:.1f} | "
            f"{r['sdpa_us']:.1f} | {r['deq_sdpa_us']:.1f} | {r['tc_speedup']:.2f}x | "
            f"{r['tc_gbs']:.0f} ({100 * r['tc_frac_copy']:.0f}%) | {100 * r['tc1_frac_copy']:.0f}% | "
            f"{r['sdpa_gbs']:.0f} ({100 * r['sdpa_frac_copy']:.0f}%) |"
        )
    print()
    print(
        "| context | batch | K4V2 Triton (us) | SDPA bf16 (us) | dequant+SDPA (us) | speedup vs SDPA | ours GB/s (% copy) | SDPA GB/s (% copy) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['context']} | {r['batch']} | {r['ours_us']:.1f} | {r['sdpa_us']:.1f} | {r['deq_sdpa_us']:.1f} | "
            f"{r['speedup']:.2f}x | {r['ours_gbs']:.0f} ({100 * r['ours_frac_copy']:.0f}%) | "
            f"{r['sdpa_gbs']:.0f} ({100 * r['sdpa_frac_copy']:.0f}%) |"
        )
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()

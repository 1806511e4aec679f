"""GPU check and timing of the one-warp decode kernel (decode_warp) next to decode_tc and SDPA.

    PYTHONPATH=src python3 scripts/decode_warp_gpu.py [--variants JSON] [--points 32768x8 131072x1]
        [--no-check] [--graph-generate]

1. Correctness: random layer storages (outliers, odd per-row lengths, tile boundaries, GQA 1/4/8,
   multi-query, bf16 / float16, head_dim 64/128/256, K2/K4/K8 x V2/V4/V8) against the float64
   reference, the split-K workspace poisoned with NaN so unwritten partials show; and at full size
   against decode_tc.
2. Timing (CUDA-graph replays, L2 flushed): decode_warp launch variants vs decode_tc vs SDPA on a
   bf16 cache at the benchmark's points (Llama-3-8B heads, K4V2). Each variant is warmed up and
   recorded inside ``graph_step_copies()``, as GraphDecoder records a step: ``{}`` is the graph
   default (TMA, one stage, on sm_90); ``{"copy": "cp.async"}`` the eager default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_decode_attention as bench  # noqa: E402

from kvarn.attention.triton import decode_tc, decode_warp  # noqa: E402
from kvarn.attention.triton.copy_policy import graph_step_copies  # noqa: E402
from kvarn.attention.triton.reference import quantized_decode_attention_reference  # noqa: E402
from kvarn.attention.triton.testing import random_layer_storage, relative_error  # noqa: E402
from kvarn.config import KVarNConfig  # noqa: E402

bf, f16 = torch.bfloat16, torch.float16
CASES = [
    # dtype, D, G, group, batch, L, kb, vb, n_tiles cap, launch
    (bf, 128, 128, 4, 3, 1, 4, 2, 40, {}),
    (f16, 128, 128, 4, 3, 1, 4, 2, 40, {}),
    (bf, 128, 128, 4, 4, 1, 4, 2, 300, {}),
    (bf, 128, 128, 8, 3, 1, 4, 2, 40, {}),
    (bf, 128, 128, 1, 3, 1, 4, 2, 40, {}),
    (f16, 128, 128, 4, 3, 3, 4, 2, 40, {}),  # 12 rows: two row blocks of 8
    (bf, 128, 128, 4, 3, 4, 4, 2, 40, {"rows_per_program": 16}),
    (f16, 128, 128, 2, 3, 1, 2, 4, 40, {}),
    (bf, 128, 64, 4, 3, 1, 4, 4, 40, {}),
    (bf, 128, 32, 4, 3, 1, 8, 8, 40, {}),
    (f16, 64, 128, 8, 3, 2, 2, 4, 40, {}),
    (bf, 256, 128, 2, 2, 1, 4, 2, 20, {}),
    (f16, 256, 128, 4, 2, 1, 4, 4, 20, {}),
    (bf, 128, 128, 4, 3, 1, 4, 2, 40, {"stages": 3}),
    (bf, 128, 128, 4, 3, 1, 4, 2, 40, {"stages": 1}),
    (bf, 128, 128, 4, 3, 1, 4, 2, 40, {"num_splits": 1}),
    (f16, 128, 128, 4, 3, 1, 4, 2, 40, {"num_splits": 7}),
    (bf, 128, 128, 4, 3, 1, 4, 2, 40, {"column_halves": True}),  # session 8, not yet on a GPU
    (bf, 128, 128, 4, 3, 1, 4, 2, 40, {"column_halves": True, "copy": "tma"}),
]


def check(seed: int) -> int:
    failures = 0
    decode_tc.POISON_WORKSPACE = True
    for i, (dt, d, g, group, batch, nq, kb, vb, ncap, launch) in enumerate(CASES):
        cfg = KVarNConfig(key_bits=kb, value_bits=vb, tile_size=g)
        gen = torch.Generator().manual_seed(seed + i)
        n_tiles = [int(x) for x in torch.randint(0, ncap + 1, (batch,), generator=gen)]
        n_tiles[0] = ncap
        sink = [g, *[int(x) for x in torch.randint(0, g + 1, (batch - 1,), generator=gen)]]
        tail = [int(x) for x in torch.randint(0, g, (batch,), generator=gen)]
        kw = random_layer_storage(
            batch=batch, kv_heads=2, group=group, num_queries=nq, head_dim=d, config=cfg, n_tiles=n_tiles,
            sink_len=sink, tail_len=tail, capacity=ncap + 1, dtype=dt, device="cuda", seed=seed + i,
        )  # fmt: skip
        out = decode_warp.quantized_decode_attention(**kw, **launch)
        ref = quantized_decode_attention_reference(
            **{**kw, "query": kw["query"].double()}, compute_dtype=torch.float64
        )
        err = relative_error(out, ref)
        floor = relative_error(ref.to(out.dtype), ref)
        tc = decode_tc.quantized_decode_attention(**kw)
        err_tc = relative_error(tc, ref)
        ok = bool(torch.isfinite(out).all()) and err < (3.0 if dt == bf else 2.0) * floor + 1e-4
        failures += not ok
        print(
            f"{'PASS' if ok else 'FAIL'} {str(dt)[6:]} D{d} G{g} group{group} B{batch} L{nq} K{kb}V{vb} "
            f"tiles {n_tiles} {launch}: err {err:.3g} (tc {err_tc:.3g}, rounding {floor:.3g})",
            flush=True,
        )
    decode_tc.POISON_WORKSPACE = False
    return failures


def where_the_time_goes(q, st) -> str:
    """The default call with no packed tiles, with no 16-bit sink tokens (its 16-bit programs then
    exit at once), and with one of its two launches left out (the module-level launchers swapped
    for no-ops: benchmark only)."""
    empty = dict(st, n_tiles=torch.zeros_like(st["n_tiles"]))
    no_sink = dict(st, sink_len=torch.zeros_like(st["sink_len"]))
    parts = {
        "no tiles (n_tiles=0)": bench.bench_graph(lambda: decode_warp.quantized_decode_attention(q, **empty)),
        "no sink tokens (sink_len=0)": bench.bench_graph(
            lambda: decode_warp.quantized_decode_attention(q, **no_sink)
        ),
    }
    merge_launch, warp_launch = decode_tc._MERGE_LAUNCH, decode_warp._WARP_LAUNCH
    for name, module, attr in (("without the merge", decode_tc, "_MERGE_LAUNCH"),
                               ("without the kernel", decode_warp, "_WARP_LAUNCH")):  # fmt: skip
        setattr(module, attr, lambda *a, **k: None)
        try:
            parts[name] = bench.bench_graph(lambda: decode_warp.quantized_decode_attention(q, **st))
        finally:
            decode_tc._MERGE_LAUNCH, decode_warp._WARP_LAUNCH = merge_launch, warp_launch
    return ", ".join(f"{k} {v * 1e3:.1f}" for k, v in parts.items())


def graph_floor_us() -> str:
    """What a CUDA-graph replay of one and of two trivial kernels measures here: the part of every
    timed call (ours: kernel + merge; SDPA's) that no kernel change removes."""
    x = torch.zeros(16, device="cuda")
    one = bench.bench_graph(lambda: x.add_(1))
    two = bench.bench_graph(lambda: (x.add_(1), x.mul_(1)))
    return f"{one * 1e3:.1f} / {two * 1e3:.1f} us"


def time_point(
    ctx: int, batch: int, variants: list[dict], copy_gbs: float, breakdown=True, merge_channels=()
) -> None:
    dev = torch.device("cuda")
    n_tiles = ctx // bench.G - 1
    st = bench.make_storage(batch, n_tiles, dev)
    q = torch.randn(batch, bench.HQ, 1, bench.D, device=dev, dtype=torch.bfloat16)
    t_tc = bench.bench_graph(lambda: decode_tc.quantized_decode_attention(q, **st))
    ref = decode_tc.quantized_decode_attention(q, **st)
    k16 = torch.randn(batch, bench.HKV, ctx + 1, bench.D, device=dev, dtype=torch.bfloat16)
    v16 = torch.randn_like(k16)
    t_sdpa = bench.bench_graph(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k16, v16, enable_gqa=True)
    )
    k16 = v16 = None  # free the 16-bit cache (the graph above has run)
    splits_tc = decode_tc.default_num_splits(batch, bench.HKV, dev)
    print(
        f"ctx {ctx} B {batch}: SDPA {t_sdpa * 1e3:.1f} us; tc {t_tc * 1e3:.1f} us ({t_sdpa / t_tc:.2f}x, "
        f"{bench.ours_bytes(batch, n_tiles, splits_tc) / t_tc / 1e6 / copy_gbs:.0%} of copy)",
        flush=True,
    )
    for mc in merge_channels:
        from kvarn.attention.triton import split_k

        saved, split_k.MERGE_CHANNELS = split_k.MERGE_CHANNELS, mc
        try:
            t = bench.bench_graph(lambda: decode_warp.quantized_decode_attention(q, **st))
        finally:
            split_k.MERGE_CHANNELS = saved
        print(f"  warp default with MERGE_CHANNELS={mc}: {t * 1e3:.1f} us", flush=True)
    if breakdown:
        print("  warp default, us: " + where_the_time_goes(q, st), flush=True)
    for v in variants:
        try:
            t = bench.bench_graph(lambda v=v: decode_warp.quantized_decode_attention(q, **st, **v))
            with graph_step_copies():  # the launch bench_graph timed (its registers go in the log)
                out = decode_warp.quantized_decode_attention(q, **st, **v)
        except Exception as exc:  # noqa: BLE001 (report and go on)
            print(f"  warp {v}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        splits = v.get("num_splits") or decode_warp.default_num_splits(
            batch, bench.HKV, 1, dev, decode_warp.PROGRAMS_PER_SM
        )
        frac = bench.ours_bytes(batch, n_tiles, splits) / t / 1e6 / copy_gbs
        print(
            f"  warp {v}: {t * 1e3:.1f} us ({t_sdpa / t:.2f}x SDPA, {t_tc / t:.2f}x tc, {frac:.0%} of copy, "
            f"splits {splits}) {bench.describe(decode_warp.LAST_LAUNCH[0])}; vs tc {relative_error(out, ref):.2g}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="[{}]")
    ap.add_argument("--points", nargs="*", default=["32768x8", "131072x1"])
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument(
        "--merge-channels", type=int, nargs="*", default=[], help="also time these MERGE_CHANNELS"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--tile-size",
        type=int,
        default=None,
        help="time storage of this tile size (default: the benchmark's 128)",
    )
    ap.add_argument(
        "--graph-generate", action="store_true", help="also run gpu_end_to_end's graph_generation check"
    )
    args = ap.parse_args()
    p = torch.cuda.get_device_properties(0)
    if args.tile_size is not None:
        bench.G = args.tile_size  # make_storage, ours_bytes and the context -> tiles conversion read it
    copy_gbs, _ = bench.copy_bandwidth()
    print(f"device {p.name}, {p.multi_processor_count} SMs, copy {copy_gbs:.0f} GB/s", flush=True)
    if not args.no_breakdown:
        print(f"graph floor (replay of one / two tiny kernels): {graph_floor_us()}", flush=True)
    failures = 0 if args.no_check else check(args.seed)
    for point in args.points:
        c, b = point.split("x")
        time_point(
            int(c), int(b), json.loads(args.variants), copy_gbs, not args.no_breakdown, args.merge_channels
        )
    if args.graph_generate:
        import gpu_end_to_end

        try:
            print(
                "[graph generate]",
                gpu_end_to_end.check_graph_generate(torch.device("cuda"), "k4v2"),
                flush=True,
            )
        except Exception as exc:  # noqa: BLE001
            failures += 1
            print(f"[graph generate] FAIL {type(exc).__name__}: {exc}", flush=True)
    print(f"{failures} failure(s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

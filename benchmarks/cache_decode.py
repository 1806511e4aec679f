"""Decode speed and memory of KVarNCache vs transformers' DynamicCache and QuantizedCache.

For each context length and cache, a fresh worker process loads the model, prefills a prompt of
that length, then times greedy decode steps; the process's peak resident memory (ru_maxrss) is
measured per worker, so caches never share a peak. Rounds interleave the caches (dynamic, kvarn,
quantized, dynamic, ...) so that load from other processes hits them alike; the table reports
the median over rounds.

    python benchmarks/cache_decode.py                      # 1k, 4k, 8k; dynamic, kvarn, quanto
    python benchmarks/cache_decode.py --contexts 1024 --rounds 3 --threads 1
    python benchmarks/cache_decode.py --count-ops          # ops and host syncs per decode step

``--count-ops`` does not time anything: it counts, on CPU, what the CUDA code path of a decode step
dispatches (``kvarn.cache.profiling``: the Triton seams switched on for CPU tensors, each kernel
call replaced by its PyTorch twin and counted as one kernel): non-view torch ops, kernel calls,
host syncs and host-to-device uploads per layer and step (Llama-3-8B head shapes, batch 8, every
row at one tail offset and rows left-padded to different offsets), and per whole decode forward
of a small 4-layer model against DynamicCache + sdpa.

Columns: decode tokens/s (decode steps / their wall time), ratio to DynamicCache in the same
round, prefill seconds, peak RSS of the worker (over its whole life, prefill included), resident
memory after decoding (after malloc_trim: what the process holds with the cache), KV bytes held
after decoding (KVarN: real tensors incl. sink and
tail; QuantizedCache: quantized tensors + residual), and the KVarN tile bytes relative to 16-bit
for the same tokens (the "beyond sink and tail" figure).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CACHES = ("dynamic", "kvarn", "quanto")


def _kv_bytes_dense(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _kv_bytes_quantized(cache) -> int:
    total = 0
    for layer in cache.layers:
        for q in (layer._quantized_keys, layer._quantized_values):
            for name in ("_data", "_scale", "_shift"):
                t = getattr(q, name, None)
                if t is not None:
                    total += t.numel() * t.element_size()
        for t in (layer.keys, layer.values):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def current_rss_mb() -> float:
    """Resident memory now, after handing freed heap pages back to the OS (glibc malloc_trim)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/statm") as fh:
        resident_pages = int(fh.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args) -> dict:
    import torch
    from transformers import DynamicCache, QuantizedCache

    from kvarn.integrations.models import load_model
    from kvarn.integrations.transformers import cache_for

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model, _ = load_model(args.model)
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    vocab = model.config.vocab_size
    ids = torch.randint(100, vocab - 100, (1, args.context), generator=torch.Generator().manual_seed(0))

    if args.cache == "dynamic":
        model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
    elif args.cache == "kvarn":
        cache = cache_for(model, args.preset)
    elif args.cache in ("quanto", "hqq"):
        model.set_attn_implementation("sdpa")
        cache = QuantizedCache(
            backend=args.cache, config=model.config, nbits=4, q_group_size=64, residual_length=128
        )
    else:
        raise ValueError(args.cache)

    start = time.perf_counter()
    chunk = args.prefill_chunk or args.context
    for c0 in range(0, args.context, chunk):
        out = model(ids[:, c0 : c0 + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    prefill_s = time.perf_counter() - start
    token = out.logits[:, -1:].argmax(-1)
    steps = []
    for i in range(args.warmup + args.new_tokens):
        start = time.perf_counter()
        out = model(token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        if i >= args.warmup:
            steps.append(time.perf_counter() - start)
    result = {
        "context": args.context,
        "cache": args.cache,
        "threads": torch.get_num_threads(),
        "prefill_s": prefill_s,
        "decode_tok_s": len(steps) / sum(steps),
        "median_step_ms": 1e3 * statistics.median(steps),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**20,
        "rss_after_mb": current_rss_mb(),
        "baseline_rss_mb": baseline_rss / 2**20,
    }
    if args.cache == "dynamic":
        result["kv_mb"] = _kv_bytes_dense(cache) / 2**20
    elif args.cache == "kvarn":
        nb = cache.nbytes()
        result["kv_mb"] = nb.total / 2**20
        result["kv_allocated_mb"] = nb.allocated / 2**20
        tokens = sum(sum(layer._n_tiles) for layer in cache.kvarn_layers) * cache.quant.tile_size
        heads = cache.kvarn_layers[0].num_kv_heads
        dim = cache.kvarn_layers[0].head_dim
        result["tile_bytes_vs_16bit"] = nb.quantized / (tokens * heads * dim * 2 * 2) if tokens else None
        result["kv_vs_dynamic_16bit"] = nb.total / cache.dynamic_cache_nbytes(dtype=torch.float16)
    else:
        result["kv_mb"] = _kv_bytes_quantized(cache) / 2**20
    return result


def run_worker(context: int, cache: str, args) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", "--context", str(context), "--cache", cache]
    cmd += ["--new-tokens", str(args.new_tokens), "--warmup", str(args.warmup), "--preset", args.preset]
    cmd += ["--prefill-chunk", str(args.prefill_chunk)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        print(f"[{cache} @ {context}] failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _count_layer_steps(padded: bool, steps: int) -> list[tuple[bool, object]]:
    """Per decode step of one KVarN layer (Llama-3-8B heads, batch 8): (a tail filled, counter)."""
    import torch

    from kvarn.cache import KVarNLayer
    from kvarn.cache.profiling import counting, gpu_path_on_cpu
    from kvarn.config import KVarNConfig

    batch, hq, hkv, dim = 8, 32, 8, 128
    quant = KVarNConfig.parse("k4v2")
    g = quant.tile_size
    gen = torch.Generator().manual_seed(0)
    layer = KVarNLayer(quant, 0, hkv, dim)

    class Module:
        layer_idx = 0

    module = Module()

    def inputs(length):
        return [torch.randn(batch, h, length, dim, generator=gen).to(torch.bfloat16) for h in (hq, hkv, hkv)]

    prefill = 2 * g + 40
    valid = None
    if padded:
        valid = torch.ones(batch, prefill, dtype=torch.bool)
        for r in range(batch):
            valid[r, : 5 * r] = False
    out = []
    with gpu_path_on_cpu("twin"), torch.no_grad():
        q, k, v = inputs(prefill)
        layer.update(k, v)
        layer.attend(module, q, valid, dim**-0.5)
        for step in range(steps + 1):
            q, k, v = inputs(1)
            fills = any(t + 1 == g for t in layer._tail_len)
            with counting() as c:
                layer.update(k, v)
                layer.attend(module, q, None, dim**-0.5)
            if step:  # the first step builds the per-process rotation operands
                out.append((fills, c))
    return out


def _count_model_steps(kind: str, mask: bool, steps: int = 4) -> list:
    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    import kvarn
    from kvarn.cache.profiling import counting, gpu_path_on_cpu

    config = LlamaConfig(
        vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=128, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().to(torch.bfloat16)
    if kind == "dynamic":
        model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
    else:
        cache = kvarn.cache_for(model, "k4v2")
    batch, prefill = 2, 140
    ids = torch.randint(0, 512, (batch, prefill))
    att = torch.ones(batch, prefill, dtype=torch.long) if mask else None
    out = []
    with gpu_path_on_cpu("twin"), torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att, past_key_values=cache, logits_to_keep=1).logits
        for step in range(steps + 1):
            token = logits[:, -1:].argmax(-1)
            if mask:
                att = torch.cat([att, torch.ones(batch, 1, dtype=torch.long)], dim=1)
            with counting() as c:
                logits = model(
                    input_ids=token, attention_mask=att, past_key_values=cache, logits_to_keep=1
                ).logits
            if step:
                out.append(c)
    return out, config.num_hidden_layers


def count_ops() -> None:
    """Print the op / sync counts of the decode path (see the module docstring)."""
    import torch

    torch.set_num_threads(1)

    def span(values):
        lo, hi = min(values), max(values)
        return f"{lo}" if lo == hi else f"{lo}-{hi}"

    print(
        "Per KVarN layer and decode step (CUDA code path, kernels as twins; Llama-3-8B heads, batch 8, bf16):"
    )
    print()
    print("| rows | step | non-view ops | kernels | views | host syncs | uploads |")
    print("|---|---|---|---|---|---|---|")
    for padded in (False, True):
        steps = _count_layer_steps(padded, steps=130)
        for fills in (False, True):
            cs = [c for f, c in steps if f == fills]
            if not cs:
                continue
            print(
                f"| {'left-padded (8 offsets)' if padded else 'one tail offset'} | "
                f"{'a tail fills' if fills else 'plain'} ({len(cs)} steps) | "
                f"{span([sum(c.ops.values()) for c in cs])} | {span([sum(c.kernels.values()) for c in cs])} | "
                f"{span([c.views for c in cs])} | {span([len(c.syncs) for c in cs])} | "
                f"{span([c.uploads for c in cs])} |"
            )
    print()
    print("Per decode forward of a 4-layer model (GQA 4:1, head_dim 128, batch 2, bf16):")
    print()
    print("| cache | 2D attention_mask | non-view ops | kernels | host syncs | uploads |")
    print("|---|---|---|---|---|---|")
    for kind in ("dynamic", "kvarn"):
        for mask in (False, True):
            cs, _ = _count_model_steps(kind, mask)
            print(
                f"| {kind} | {'yes' if mask else 'no'} | {span([sum(c.ops.values()) for c in cs])} | "
                f"{span([sum(c.kernels.values()) for c in cs])} | {span([len(c.syncs) for c in cs])} | "
                f"{span([c.uploads for c in cs])} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--caches", nargs="+", default=list(CACHES), choices=[*CACHES, "hqq"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--preset", default="k4v2")
    parser.add_argument(
        "--prefill-chunk", type=int, default=0, help="prefill in calls of this many tokens (0: one call)"
    )
    parser.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--json", default=None, help="also write all results to this file")
    parser.add_argument("--count-ops", action="store_true", help="count ops and host syncs per decode step")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.count_ops:
        count_ops()
        return
    if args.worker:
        print(json.dumps(worker(args)))
        return

    from rich.console import Console
    from rich.table import Table

    results: list[dict] = []
    for rnd in range(args.rounds):
        for context in args.contexts:
            for cache in args.caches:
                res = run_worker(context, cache, args)
                if res is not None:
                    res["round"] = rnd
                    results.append(res)
                    print(json.dumps(res), file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)

    def median(context, cache, key):
        values = [
            r[key]
            for r in results
            if r["context"] == context and r["cache"] == cache and r.get(key) is not None
        ]
        return statistics.median(values) if values else None

    def ratio(context, cache):
        pairs = []
        for rnd in range(args.rounds):
            a = [r for r in results if (r["context"], r["cache"], r["round"]) == (context, cache, rnd)]
            d = [r for r in results if (r["context"], r["cache"], r["round"]) == (context, "dynamic", rnd)]
            if a and d:
                pairs.append(a[0]["decode_tok_s"] / d[0]["decode_tok_s"])
        return statistics.median(pairs) if pairs else None

    table = Table(
        title=f"Decode on {os.cpu_count()} CPU cores, threads={args.threads or 'default'}, {args.preset}"
    )
    for col in (
        "context",
        "cache",
        "decode tok/s",
        "x dynamic",
        "prefill s",
        "peak RSS MB",
        "RSS after MB",
        "KV MB",
        "tiles vs 16-bit",
    ):
        table.add_column(col, justify="right")

    def fmt(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    for context in args.contexts:
        for cache in args.caches:
            tok = median(context, cache, "decode_tok_s")
            if tok is None:
                table.add_row(str(context), cache, "failed", "", "", "", "", "", "")
                continue
            table.add_row(
                str(context),
                cache,
                fmt(tok),
                fmt(ratio(context, cache)),
                fmt(median(context, cache, "prefill_s"), ".1f"),
                fmt(median(context, cache, "peak_rss_mb"), ".0f"),
                fmt(median(context, cache, "rss_after_mb"), ".0f"),
                fmt(median(context, cache, "kv_mb"), ".1f"),
                fmt(median(context, cache, "tile_bytes_vs_16bit"), ".3f"),
            )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()

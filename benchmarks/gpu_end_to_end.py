"""End-to-end decode on the GPU: transformers' DynamicCache vs KVarNCache, random-weight Llama-3-8B.

    PYTHONPATH=src python3 benchmarks/gpu_end_to_end.py [--contexts 16384 32768] [--batch 8]
        [--steps 32] [--prefill-chunk 4096] [--capacity-check]

The model is Llama-3-8B's configuration built in code (32 layers, hidden 4096, 32 query / 8 KV
heads, head_dim 128, vocab 128256) with random bf16 weights: no download. For each context, both
caches get the same batch of random prompts (prefilled in chunks, logits only for the last
token), then ``--steps`` greedy decode steps are timed (CUDA-synchronized wall clock); tokens/s =
batch x steps / time. KVarNCache uses K4V2 with the "kvarn" attention implementation; whether its
Triton kernels are active is printed (``kvarn.attention.triton.dispatch``).

Capacity: bytes per cached token are measured from each cache after prefill (KVarNCache.nbytes
counts codes + metadata + sink + tail; DynamicCache its K/V tensors), and the tokens that fit are
free memory after the weights (minus a workspace reserve) over bytes per token. With
``--capacity-check`` the predicted KVarN batch at the largest context is prefilled for real.
Targets (issue 5): KVarNCache >= 1.3x DynamicCache tokens/s at 32k; >= 4x tokens that fit.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvarn
from kvarn.attention.triton.dispatch import enabled_for


def llama3_8b_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )


def build_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(llama3_8b_config(), torch_dtype=torch.bfloat16)
    for p in model.parameters():  # small random weights keep activations finite over 32 layers
        p.data.normal_(0.0, 0.02)
    return model.eval()


@torch.no_grad()
def prefill(model, cache, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Feed ids [B, T] in chunks; returns the last position's greedy next token [B, 1]."""
    logits = None
    for start in range(0, ids.shape[1], chunk):
        out = model(
            input_ids=ids[:, start : start + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1
        )
        logits = out.logits
    return logits[:, -1:].argmax(-1)


@torch.no_grad()
def decode_rate(model, cache, token: torch.Tensor, steps: int) -> float:
    """Greedy decode ``steps`` tokens; returns tokens/s over the batch."""
    out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)  # warm-up step
    token = out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    return token.shape[0] * steps / (time.perf_counter() - t0)


def cache_bytes(cache) -> int:
    if isinstance(cache, kvarn.KVarNCache):
        return cache.nbytes().total
    total = 0
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            total += (
                layer.keys.numel() * layer.keys.element_size()
                + layer.values.numel() * layer.values.element_size()
            )
    return total


def run(model, kind: str, batch: int, context: int, steps: int, chunk: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(context)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda", generator=gen)
    if kind == "dynamic":
        model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
    else:
        cache = kvarn.cache_for(model, "k4v2")
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    token = prefill(model, cache, ids, chunk)
    torch.cuda.synchronize()
    t_prefill = time.perf_counter() - t0
    rate = decode_rate(model, cache, token, steps)
    nbytes = cache_bytes(cache)
    stored = context + steps + 1
    result = dict(
        cache=kind,
        batch=batch,
        context=context,
        prefill_s=t_prefill,
        tok_per_s=rate,
        bytes_per_token=nbytes / (batch * stored),
        peak_gb=torch.cuda.max_memory_allocated() / 1e9,
    )
    del cache
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prefill-chunk", type=int, default=4096)
    ap.add_argument(
        "--reserve-gb", type=float, default=6.0, help="workspace kept free when estimating capacity"
    )
    ap.add_argument("--capacity-check", action="store_true")
    args = ap.parse_args()
    p = torch.cuda.get_device_properties(0)
    model = build_model()
    weights_gb = sum(t.numel() * t.element_size() for t in model.parameters()) / 1e9
    probe = torch.zeros(1, device="cuda", dtype=torch.bfloat16)
    print(f"device {p.name}; torch {torch.__version__}; weights {weights_gb:.1f} GB")
    print(f"kvarn Triton kernels active for CUDA tensors: {enabled_for(probe)}")
    rows = []
    for context in args.contexts:
        for kind in ("dynamic", "kvarn"):
            r = run(model, kind, args.batch, context, args.steps, args.prefill_chunk)
            rows.append(r)
            print(
                f"{kind:>8} B={r['batch']} ctx={context}: decode {r['tok_per_s']:.1f} tok/s, "
                f"{r['bytes_per_token']:.0f} B/token, prefill {r['prefill_s']:.1f} s, peak {r['peak_gb']:.1f} GB",
                flush=True,
            )
    free = torch.cuda.mem_get_info()[0] / 1e9 - args.reserve_gb
    print()
    print("| context | batch | DynamicCache tok/s | KVarNCache tok/s | ratio |")
    print("|---|---|---|---|---|")
    for context in args.contexts:
        d = next(r for r in rows if r["cache"] == "dynamic" and r["context"] == context)
        k = next(r for r in rows if r["cache"] == "kvarn" and r["context"] == context)
        print(
            f"| {context} | {args.batch} | {d['tok_per_s']:.1f} | {k['tok_per_s']:.1f} | {k['tok_per_s'] / d['tok_per_s']:.2f}x |"
        )
    last = args.contexts[-1]
    fits = {}
    for kind in ("dynamic", "kvarn"):
        bpt = next(r for r in rows if r["cache"] == kind and r["context"] == last)["bytes_per_token"]
        fits[kind] = int(free * 1e9 / bpt)
    print()
    print(f"free memory after weights minus {args.reserve_gb} GB reserve: {free:.1f} GB")
    for kind, tokens in fits.items():
        print(f"{kind:>8}: {tokens} tokens fit = batch {tokens // last} at context {last}")
    print(f"capacity ratio: {fits['kvarn'] / fits['dynamic']:.2f}x")
    if args.capacity_check:
        batch = max(1, fits["kvarn"] // last)
        r = run(model, "kvarn", batch, last, 4, args.prefill_chunk)
        print(f"capacity check: KVarNCache batch {batch} at context {last} ran, peak {r['peak_gb']:.1f} GB")


if __name__ == "__main__":
    main()

"""End-to-end decode on the GPU: transformers' DynamicCache vs KVarNCache, random-weight Llama-3-8B.

    PYTHONPATH=src python3 benchmarks/gpu_end_to_end.py            # the H100 run (~4-6 minutes)
    PYTHONPATH=src python3 benchmarks/gpu_end_to_end.py --tiny     # CPU smoke run (seconds)

Options: --batch 8 --contexts 16384 32768 --steps 128 --prefill-chunk 4096 --reserve-gb 3
--budget-s 420 --kinds dynamic kvarn graph static-graph --no-check --no-profile --no-capacity --quant k4v2.

The model is Llama-3-8B's configuration built in code (32 layers, hidden 4096, 32 query / 8 KV
heads, head_dim 128, vocab 128256) with random bf16 weights: no download. Phases, each printed as
it finishes (unbuffered), then one final table:

1. **check** (GPU): a 2-layer model with Llama-3 head shapes, a left-padded batch of 3 rows, 100
   teacher-forced decode steps crossing tile completions (rows completing alone and together):
   logits with the Triton kernels vs the PyTorch path (``KVARN_DISABLE_TRITON=1``) on the same
   device. A failure here makes the timings meaningless, so it comes first.
2. **decode speed** per context, same batch and prompt for both caches:
   DynamicCache (transformers' sdpa) prefilled in chunks of ``--prefill-chunk``; KVarNCache
   prefilled in ONE call (a prefill into an empty KVarN cache is transformers' sdpa prefill itself;
   the tokens are quantized as they are stored, in bounded windows; chunked prefill would attend
   over the quantized history with the PyTorch reference, which is far slower on a GPU). If the
   one call does not fit, the prompt rows are prefilled in fewer rows and replicated (printed).
   The prompt is about ``context - steps // 2`` tokens, so the timed steps are centred on the
   context; its length puts a tile completion inside the warm-up (compiles the compression kernel
   for the decode shapes), and the 128 timed steps hold exactly one more. Timed: ``--steps``
   greedy steps after 8 warm-up steps; ms/step
   from the wall clock around the loop (CUDA-synchronized) and "host ms/step", the time the host
   needed to enqueue them (close to the wall time = host-bound).
3. **profile**: one torch.profiler capture of 2 decode steps per cache at the largest context:
   GPU time per step split into attention kernels / matmuls / copies / the rest, top kernels.
4. **capacity**: (KVarNCache is given ``cache.reserve(length of the whole run)`` after its prefill:
   its tile store then holds exactly the tiles the run needs instead of growing by half when it
   fills.) Bytes per cached token from each cache (allocated bytes: spare tile capacity and
   sink/tail buffers included) -> the most rows that fit at the largest context, predicted as
   ``(free memory after the weights - reserve) / (context x bytes/token x (1 + 1/layers))`` (one
   layer's transient copy: DynamicCache's torch.cat, KVarN's tile-capacity growth); then
   verified: the cache is expanded to that many rows (rows replicated with
   ``batch_select_indices``: same bytes as distinct rows) and 4 decode steps run; the tok/s at
   that batch is printed too. The prefill of that many rows is not run (it would need a chunked
   or per-row prefill); the check is that the cache and a decode step fit.

Targets (issue 5): KVarNCache >= 1.3x DynamicCache tokens/s at 32k; >= 4x the tokens that fit.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
import traceback

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

import kvarn
from kvarn.attention.triton import dispatch
from kvarn.integrations.cuda_graph import GraphDecoder

T0 = time.perf_counter()
STATIC_SLACK = 1024  # StaticCache positions beyond the prompt (decode, warm-up, profile, capacity steps)


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def llama3_8b_config(tiny: bool = False) -> LlamaConfig:
    if tiny:  # same head layout (GQA 4:1), 2 layers, small widths
        return LlamaConfig(
            vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
            rope_theta=500000.0, tie_word_embeddings=False,
        )  # fmt: skip
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )  # fmt: skip


def build_model(config: LlamaConfig, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    for p in model.parameters():  # small random weights keep activations finite over 32 layers
        p.data.normal_(0.0, 0.02)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def new_cache(model, kind: str, quant: str, max_len: int = 0):
    if kind == "dynamic":
        model.set_attn_implementation("sdpa")
        return DynamicCache(config=model.config)
    if kind == "static":
        model.set_attn_implementation("sdpa")
        return StaticCache(config=model.config, max_cache_len=max_len)
    return kvarn.cache_for(model, quant)


@torch.no_grad()
def forward(model, cache, ids: torch.Tensor) -> torch.Tensor:
    """One forward call; returns the greedy next token ``[B, 1]`` (logits of the last position only)."""
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def prefill(model, kind: str, quant: str, ids: torch.Tensor, chunk: int, device) -> tuple:
    """Prefill ``ids [B, T]``; returns (cache, next token, note).

    DynamicCache / StaticCache: chunks of ``chunk`` tokens. KVarNCache: one call; on out-of-memory,
    the first ``rows`` prompt rows in one call (halving until it fits), then rows replicated to B.
    """
    batch = ids.shape[0]
    if kind in ("dynamic", "static", "static-graph"):
        cache = new_cache(model, kind.removesuffix("-graph"), quant, max_len=ids.shape[1] + STATIC_SLACK)
        for start in range(0, ids.shape[1], chunk):
            token = forward(model, cache, ids[:, start : start + chunk])
        return cache, token, ""
    rows = batch
    while True:
        cache = new_cache(model, kind, quant)
        try:
            token = forward(model, cache, ids[:rows])
            break
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
            if not is_oom(exc) or rows == 1:
                raise
            del cache
            free_memory(device)
            rows //= 2
    note = ""
    if rows < batch:
        index = torch.arange(batch, device=device) % rows
        cache.batch_select_indices(index)
        token = token[index]
        note = f"one-call prefill did not fit; {rows} rows prefilled and replicated to {batch}"
    return cache, token, note


WARMUP_STEPS = 8


@torch.no_grad()
def time_decode(step, token: torch.Tensor, steps: int, device, rounds: int = 1) -> dict:
    """Greedy decode through ``step(token) -> next token [B, 1]``: WARMUP_STEPS untimed (compiles,
    records), then ``rounds`` timed windows of ``steps`` steps; tok/s is the median window's.

    With ``steps`` = one tile (128) each timed window holds exactly one tile completion, so the
    mean step time carries the compression cost amortized as in a long decode. Step boundaries
    are also recorded as CUDA events (no sync inside the loop): their median is the typical step
    and a far larger max shows a one-off stall (e.g. a compile). Several windows show how much the
    host-bound eager loop moves from one window to the next.
    """
    for _ in range(WARMUP_STEPS):
        token = step(token)
    sync(device)
    cuda = device.type == "cuda"
    windows = []
    for _ in range(rounds):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)] if cuda else []
        t0 = time.perf_counter()
        for i in range(steps):
            if cuda:
                events[i].record()
            token = step(token)
        if cuda:
            events[steps].record()
        t_host = time.perf_counter() - t0
        sync(device)
        wall = time.perf_counter() - t0
        per_step = (
            [events[i].elapsed_time(events[i + 1]) for i in range(steps)] if cuda else [1e3 * wall / steps]
        )
        per_step.sort()
        windows.append(
            {
                "tok_s": token.shape[0] * steps / wall,
                "ms_step": 1e3 * wall / steps,
                "median_ms_step": per_step[len(per_step) // 2],
                "max_ms_step": per_step[-1],
                "host_ms_step": 1e3 * t_host / steps,
            }
        )
    windows.sort(key=lambda w: w["tok_s"])
    result = dict(windows[len(windows) // 2])
    result["tok_s_windows"] = [w["tok_s"] for w in windows]
    result["token"] = token
    return result


def eager_step(model, cache):
    return lambda token: forward(model, cache, token)


def static_graph_step(model, cache, token: torch.Tensor, position: int):
    """transformers' StaticCache (16-bit, preallocated, sdpa) with its decode step recorded once
    as a CUDA graph: the 16-bit baseline without host overhead (what a compiled static-cache
    generate approaches). Rows hold ``position`` tokens each (no padding)."""
    batch, device = token.shape[0], token.device
    ids = token.clone()
    pos = torch.full((batch, 1), position, dtype=torch.long, device=device)
    cache_pos = torch.full((1,), position, dtype=torch.long, device=device)

    @torch.no_grad()  # without it autograd keeps every layer's repeat_kv copy alive (H200: out of memory)
    def device_step():
        out = model(
            input_ids=ids, position_ids=pos, cache_position=cache_pos, past_key_values=cache, logits_to_keep=1
        )
        chosen = out.logits[:, -1:].argmax(-1)
        ids.copy_(chosen)
        pos.add_(1)
        cache_pos.add_(1)
        return chosen

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the recording (two real steps)
        device_step()
        device_step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chosen = device_step()

    def step(_token):
        graph.replay()
        return chosen.clone()

    return step


def graph_step(model, cache, token: torch.Tensor):
    """Decode steps replayed from a CUDA graph (kvarn.integrations.cuda_graph) over ``cache``."""
    decoder = GraphDecoder(model, cache)
    decoder.resume(token)
    return lambda _token: decoder.step().unsqueeze(1)


@contextlib.contextmanager
def decode_kernel(name: str | None):
    """Force one Triton decode kernel (KVARN_DECODE_KERNEL) inside; None keeps the default order."""
    saved = os.environ.get("KVARN_DECODE_KERNEL")
    if name:
        os.environ["KVARN_DECODE_KERNEL"] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("KVARN_DECODE_KERNEL", None)
        else:
            os.environ["KVARN_DECODE_KERNEL"] = saved


def cache_nbytes(cache) -> tuple[int, int]:
    """(valid bytes, allocated bytes) of a cache's tensors."""
    if isinstance(cache, kvarn.KVarNCache):
        nb = cache.nbytes()
        return nb.total, nb.allocated
    total = 0
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            total += layer.keys.numel() * layer.keys.element_size()
            total += layer.values.numel() * layer.values.element_size()
    return total, total


def kernel_category(name: str) -> str:
    low = name.lower()
    if "compress" in low:
        return "compress"
    if any(
        s in low for s in ("decode", "merge", "_program", "flash", "fmha", "attention", "sdpa", "efficient")
    ):
        return "attention"
    if any(s in low for s in ("gemm", "nvjet", "cutlass", "xmma", "gemv", "splitk", "dot_kernel")):
        return "matmul"
    if any(s in low for s in ("cat", "copy", "memcpy", "memset", "fill")):
        return "copy/cat"
    return "other"


@torch.no_grad()
def profile_steps(model, cache, token: torch.Tensor, steps: int = 2, top: int = 12) -> list[str]:
    """Per-step GPU time by kernel category and the top kernels (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            token = forward(model, cache, token)
        torch.cuda.synchronize()
    kernels: dict[str, tuple[float, int]] = {}
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", None)
        if t is None:
            t = getattr(evt, "self_cuda_time_total", 0.0)
        if t and evt.device_type == torch.autograd.DeviceType.CUDA:
            kernels[evt.key] = (t, evt.count)
    total = sum(t for t, _ in kernels.values()) or 1.0
    split: dict[str, float] = {}
    for name, (t, _) in kernels.items():
        split[kernel_category(name)] = split.get(kernel_category(name), 0.0) + t
    lines = [
        f"GPU time per step {total / steps / 1e3:.2f} ms: "
        + ", ".join(f"{k} {v / steps / 1e3:.2f} ms ({100 * v / total:.0f}%)" for k, v in sorted(split.items(), key=lambda kv: -kv[1])),
        f"kernel launches per step: {sum(c for _, c in kernels.values()) / steps:.0f}",
    ]  # fmt: skip
    for name, (t, count) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(
            f"  {t / steps / 1e3:8.3f} ms/step  x{count / steps:5.0f}  [{kernel_category(name)}] {name[:90]}"
        )
    return lines


@torch.no_grad()
def check_kernels_in_cache(device, quant: str) -> str:
    """Logits of a small model (Llama-3 head shapes) with the Triton kernels vs the PyTorch path."""
    config = LlamaConfig(
        vocab_size=2048, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=128, max_position_embeddings=4096,
        tie_word_embeddings=False, pad_token_id=0,
    )  # fmt: skip
    model = build_model(config, device, torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(1)
    batch, prompt, steps = 3, 330, 100  # row 1 left-padded by 40: rows at two tail offsets
    ids = torch.randint(1, 2048, (batch, prompt + steps), device=device, generator=gen)
    mask = torch.ones(batch, prompt + steps, dtype=torch.long, device=device)
    mask[1, :40] = 0

    def run(model, disable: bool) -> tuple[list[torch.Tensor], list]:
        saved = os.environ.get("KVARN_DISABLE_TRITON")
        os.environ["KVARN_DISABLE_TRITON"] = "1" if disable else "0"
        try:
            cache = kvarn.cache_for(model, quant)
            logits = []
            for t in range(prompt, prompt + steps + 1):
                start = 0 if t == prompt else t - 1
                out = model(
                    input_ids=ids[:, start:t],
                    attention_mask=mask[:, :t],
                    past_key_values=cache,
                    logits_to_keep=1,
                )
                logits.append(out.logits[:, -1].float())
            tiles = [layer._n_tiles for layer in cache.kvarn_layers]
            return logits, tiles
        finally:
            if saved is None:
                os.environ.pop("KVARN_DISABLE_TRITON", None)
            else:
                os.environ["KVARN_DISABLE_TRITON"] = saved

    triton_logits, tiles = run(model, False)
    torch_logits, tiles_ref = run(model, True)
    worst = max(
        float((a - b).abs().max() / b.abs().max()) for a, b in zip(triton_logits, torch_logits, strict=True)
    )
    verdict = "OK" if worst < 5e-2 and tiles == tiles_ref else "MISMATCH"
    return f"{verdict}: max relative logit difference {worst:.2e} over {steps + 1} steps; tiles per row {tiles[0]}"


def graph_check_setup(device):
    """The graph checks' small model (Llama-3 head shapes, 2 layers, bf16) and left-padded prompts:
    rows at three tail offsets, so tiles complete at different steps."""
    config = LlamaConfig(
        vocab_size=2048, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=128, max_position_embeddings=4096,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=None, initializer_range=0.1,
    )  # fmt: skip
    model = build_model(config, device, torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(2)
    ids = torch.randint(1, 2048, (3, 330), device=device, generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    mask[2, :97] = 0
    return model, ids, mask


def check_graph_decoding(device, quant: str) -> str:
    """Greedy tokens of a small model (Llama-3 head shapes, left-padded batch): decode steps
    replayed from a CUDA graph vs ``model.generate`` over a KVarNCache (same kernels, eager)."""
    model, ids, mask = graph_check_setup(device)
    (batch, prompt), new = ids.shape, 300
    with torch.no_grad():
        expected = model.generate(
            ids, attention_mask=mask, past_key_values=kvarn.cache_for(model, quant), max_new_tokens=new,
            do_sample=False,
        )  # fmt: skip
        decoder = GraphDecoder(model, kvarn.cache_for(model, quant))
        got = decoder.generate(ids, mask, max_new_tokens=new)
    same = float((got[:, prompt:] == expected[:, prompt:]).float().mean())
    first = (got != expected).any(dim=0).nonzero()
    where = f"; first difference at new token {int(first[0]) - prompt}" if len(first) else ""
    verdict = "OK" if same == 1.0 and decoder.stats.recordings >= 1 else "MISMATCH"
    return (
        f"{verdict}: {same:.1%} of {new} greedy tokens x {batch} rows equal to model.generate{where}; "
        f"{decoder.stats.recordings} recording(s), {decoder.stats.replays} replays, {decoder.stats.eager_steps} eager"
    )


def check_graph_sampling(device, quant: str) -> str:
    """Sampled decoding from CUDA-graph replays (the model and prompts of check_graph_decoding):
    ``top_k=1`` equals greedy exactly; at temperature 1, top_p 0.9 the same seed gives the same
    tokens and another seed other tokens; and the graph run's tokens equal those of the eager twin
    (``capture=False``, same seed), which draws fresh numbers at every step: a replay that reused
    the recording's random numbers would part from it. Raises on failure."""
    model, ids, mask = graph_check_setup(device)
    (batch, prompt), new = ids.shape, 200

    def run(capture=None, **options):
        decoder = GraphDecoder(model, kvarn.cache_for(model, quant), capture=capture)
        with torch.no_grad():
            tokens = decoder.generate(ids, mask, max_new_tokens=new, **options)
        stats = decoder.stats
        if capture is None and (stats.recordings < 1 or stats.replays < 1):
            raise AssertionError(f"expected a recording and replays, got {stats}")
        return tokens[:, prompt:], stats

    def seeded(seed: int):
        return torch.Generator(device=device).manual_seed(seed)

    def differ(a, b) -> str:
        return f"{int((a != b).sum())} of {a.numel()} tokens differ"

    greedy, _ = run()
    top1, _ = run(do_sample=True, top_k=1, temperature=0.7, generator=seeded(0))
    if not torch.equal(top1, greedy):
        raise AssertionError(f"top_k=1 sampling vs greedy: {differ(top1, greedy)}")
    options = dict(do_sample=True, temperature=1.0, top_p=0.9)
    first, stats = run(**options, generator=seeded(1))
    again, _ = run(**options, generator=seeded(1))
    other, _ = run(**options, generator=seeded(2))
    eager, _ = run(capture=False, **options, generator=seeded(1))
    if not torch.equal(first, again):
        raise AssertionError(f"same seed, two graph runs: {differ(first, again)}")
    if torch.equal(first, other) or torch.equal(first, greedy):
        raise AssertionError("another seed (or greedy) gave the same tokens as seed 1")
    if not torch.equal(first, eager):
        raise AssertionError(
            f"graph replays vs the eager twin with the same seed: {differ(first, eager)} (replays reusing "
            "the recording's random numbers, or logits that differ between graph and eager steps)"
        )
    torch.cuda.manual_seed(3)  # generator=None: the default CUDA generator, registered by capture
    default, _ = run(**options)
    torch.cuda.manual_seed(3)
    if not torch.equal(default, run(**options)[0]):
        raise AssertionError("default generator: same torch.cuda.manual_seed, different tokens")
    return (
        f"OK: top_k=1 == greedy ({new} tokens x {batch} rows); top_p 0.9: same seed same tokens, equal to "
        f"the eager twin's; another seed: {differ(first, other)}; {stats.recordings} recording(s), "
        f"{stats.replays} replays, {stats.eager_steps} eager"
    )


def check_graph_generate(device, quant: str) -> str:
    """``model.generate`` inside ``kvarn.graph_generation`` (the model and prompts of
    check_graph_decoding): the graph path is taken (a recording, replays) and its greedy tokens
    equal the unpatched ``model.generate``'s; an option outside the graph path (repetition_penalty)
    falls back and names it. Raises on failure."""
    model, ids, mask = graph_check_setup(device)
    new = 300

    def generate(**options):
        with torch.no_grad():
            return model.generate(
                ids, attention_mask=mask, past_key_values=kvarn.cache_for(model, quant), max_new_tokens=new,
                **options,
            )  # fmt: skip

    expected = generate(do_sample=False)
    with kvarn.graph_generation(model, on_cpu=device.type == "cpu"):  # CPU: the eager twin (smoke test)
        got = generate(do_sample=False)
        path = kvarn.last_generate_path(model)
        recorded = path.stats is not None and (path.stats.recordings >= 1 or device.type == "cpu")
        if not path.use_graph or not recorded or path.stats.replays < 1:
            raise AssertionError(f"the graph path was not taken: {path}")
        if not torch.equal(got, expected):
            raise AssertionError(
                f"graph_generation vs model.generate: {int((got != expected).sum())} tokens differ"
            )
        generate(do_sample=False, repetition_penalty=1.1)
        fallback = kvarn.last_generate_path(model)
        if fallback.use_graph or "repetition_penalty" not in fallback.reason:
            raise AssertionError(f"repetition_penalty should fall back and be named: {fallback}")
    return (
        f"OK: {new} greedy tokens x {ids.shape[0]} rows equal to model.generate's; "
        f"{path.stats.recordings} recording(s), {path.stats.replays} replays; fallback: {fallback.reason}"
    )


def predicted_rows(free_bytes: float, context: int, bytes_per_token: float, layers: int) -> int:
    return int(free_bytes // (context * bytes_per_token * (1 + 1 / layers)))


@torch.no_grad()
def verify_rows(model, cache, token, rows: int, device, steps: int = 4) -> str:
    """Expand ``cache`` to ``rows`` rows (replicas) and run decode steps; returns a status line."""
    batch = token.shape[0]
    index = torch.arange(rows, device=device) % batch
    try:
        cache.batch_select_indices(index)
        token = token[index]
        free_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        r = time_decode(eager_step(model, cache), token, steps, device)
        peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
        return f"fits: {rows} rows decode at {r['tok_s']:.1f} tok/s ({r['ms_step']:.1f} ms/step), peak {peak:.1f} GB"
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        return f"OUT OF MEMORY at {rows} rows"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--prefill-chunk", type=int, default=4096)
    ap.add_argument("--quant", default="k4v2")
    ap.add_argument(
        "--reserve-gb", type=float, default=3.0, help="memory kept free in the capacity prediction"
    )
    ap.add_argument(
        "--budget-s", type=float, default=420.0, help="skip optional phases after this many seconds"
    )
    ap.add_argument(
        "--kernels",
        default="",
        help="comma-separated decode kernels to time on the same KVarN cache (e.g. tc,chunked); "
        "default: kvarn's own choice (KVARN_DECODE_KERNEL or the GPU-checked order)",
    )
    ap.add_argument(
        "--rounds", type=int, default=None, help="timed windows of --steps per cache (median reported; GPU 3)"
    )
    ap.add_argument(
        "--graph",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time KVarNCache with decode steps replayed from a CUDA graph (GraphDecoder)",
    )
    ap.add_argument(
        "--static-graph",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --graph, also time StaticCache with its decode step replayed from a CUDA graph (GPU)",
    )
    ap.add_argument(
        "--kinds",
        nargs="+",
        default=None,
        choices=["dynamic", "static", "kvarn", "graph", "static-graph"],
        help="run only these caches (default: all that the other options allow)",
    )
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--no-capacity", action="store_true")
    ap.add_argument(
        "--static",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time transformers' StaticCache at the largest context (no per-step copy of the cache)",
    )
    ap.add_argument(
        "--tiny", action="store_true", help="2-layer model on CPU (or GPU), small contexts: smoke test"
    )
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and device.type != "cuda":
        sys.exit("needs a CUDA device (use --tiny for the CPU smoke run)")
    contexts = args.contexts or ([300, 460] if args.tiny else [16384, 32768])
    batch = args.batch or (2 if args.tiny else 8)
    steps = args.steps or (8 if args.tiny else 128)
    rounds = args.rounds or (1 if args.tiny else 3)
    dtype = torch.bfloat16
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()] or [None]

    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        import triton

        log(
            f"device {p.name}, {p.total_memory / 1e9:.1f} GB; torch {torch.__version__}, triton {triton.__version__}"
        )
    else:
        log(f"device cpu; torch {torch.__version__}")
    probe = torch.zeros(1, device=device)
    log(
        f"kvarn Triton kernels active: {dispatch.enabled_for(probe)}; decode kernel order "
        f"{dispatch.decode_kernel_order()}; quant {args.quant}"
    )
    results: dict = {"rows": [], "check": None, "profile": {}, "capacity": {}}

    if device.type == "cuda" and not args.no_check:
        checks = []
        for kernel in kernels:
            with decode_kernel(kernel):
                try:
                    checks.append(f"[{kernel or 'default'}] {check_kernels_in_cache(device, args.quant)}")
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
                    checks.append(f"[{kernel or 'default'}] FAILED (traceback above)")
            free_memory(device)
            log(f"check (Triton vs PyTorch inside the cache): {checks[-1]}")
        graph_checks = [
            ("graph", check_graph_decoding, "CUDA-graph decode vs model.generate"),
            ("graph sampling", check_graph_sampling, "CUDA-graph sampled decode: seeds, top_k=1 == greedy"),
            ("graph generate", check_graph_generate, "model.generate inside kvarn.graph_generation"),
        ]
        for tag, check, what in graph_checks if args.graph else []:
            try:
                checks.append(f"[{tag}] {check(device, args.quant)}")
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                checks.append(f"[{tag}] FAILED (traceback above)")
            free_memory(device)
            log(f"check ({what}): {checks[-1]}")
        results["check"] = "; ".join(checks)

    config = llama3_8b_config(args.tiny)
    model = build_model(config, device, dtype)
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    layers = config.num_hidden_layers
    log(f"model built: {weights / 1e9:.2f} GB of bf16 weights, {layers} layers")
    free_memory(device)
    free_after_weights = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 80e9 - weights
    budget_left = lambda: args.budget_s - (time.perf_counter() - T0)  # noqa: E731

    for context in contexts:
        # The first tile completion falls inside the warm-up (stored length reaches a multiple of
        # the tile four steps in), so the compression kernel is compiled before timing starts.
        prompt = max(256, (context - steps // 2) // 256 * 256 - 4)
        gen = torch.Generator(device=device).manual_seed(context)
        ids = torch.randint(0, config.vocab_size, (batch, prompt), device=device, generator=gen)
        last = context == contexts[-1]
        kinds = ["dynamic", "kvarn"] + (["graph"] if args.graph else [])
        if last and args.static and budget_left() > 150:
            kinds.insert(1, "static")
        if last and args.graph and args.static_graph and device.type == "cuda":
            # First, while the device memory is clean: the 16-bit StaticCache of the whole run is
            # the largest single allocation of the script.
            kinds.insert(0, "static-graph")
        if args.kinds:
            kinds = [k for k in kinds if k in args.kinds]

        def run_kind(kind: str, context: int, ids: torch.Tensor, last: bool) -> None:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            cache, token, note = prefill(model, kind, args.quant, ids, args.prefill_chunk, device)
            sync(device)
            t_prefill = time.perf_counter() - t0
            if kind in (
                "kvarn",
                "graph",
            ):  # the whole run's length known up front, as generate's caller knows it
                cache.reserve(ids.shape[1] + len(kernels) * (WARMUP_STEPS + rounds * steps) + 16)
            variants = kernels if kind == "kvarn" else [None]
            best = None
            for kernel in variants:
                if cache is None:  # the previous kernel failed mid-forward: fresh prefill
                    free_memory(device)
                    cache, token, note = prefill(model, kind, args.quant, ids, args.prefill_chunk, device)
                try:
                    with decode_kernel(kernel):
                        if kind == "graph":
                            step = graph_step(model, cache, token)
                        elif kind == "static-graph":
                            step = static_graph_step(model, cache, token, ids.shape[1])
                        else:
                            step = eager_step(model, cache)
                        r = time_decode(step, token, steps, device, rounds)
                except Exception:  # noqa: BLE001 - e.g. a decode kernel that does not compile
                    traceback.print_exc()
                    log(f"{kind} with decode kernel {kernel} FAILED at context {context} (traceback above)")
                    cache = None
                    continue
                token = r["token"]
                valid, allocated = cache_nbytes(cache)
                stored = batch * cache.get_seq_length()
                row = {
                    "cache": kind,
                    "kernel": kernel
                    or (",".join(dispatch.decode_kernel_order()) if kind in ("kvarn", "graph") else ""),
                    "context": context,
                    "batch": batch,
                    "prefill_s": t_prefill,
                    "tok_s": r["tok_s"],
                    "tok_s_windows": r["tok_s_windows"],
                    "ms_step": r["ms_step"],
                    "host_ms_step": r["host_ms_step"],
                    "median_ms_step": r["median_ms_step"],
                    "max_ms_step": r["max_ms_step"],
                    "bytes_per_token": valid / stored,
                    "allocated_per_token": allocated / stored,
                    "peak_gb": torch.cuda.max_memory_allocated() / 1e9
                    if device.type == "cuda"
                    else float("nan"),
                    "note": note,
                }
                results["rows"].append(row)
                log(
                    f"{kind:>7} {row['kernel']:>3} B={batch} ctx={context}: {r['tok_s']:.1f} tok/s, "
                    f"{r['ms_step']:.2f} ms/step (host {r['host_ms_step']:.2f}; median {r['median_ms_step']:.2f}, "
                    f"max {r['max_ms_step']:.2f}), prefill {t_prefill:.1f} s, "
                    f"{row['bytes_per_token']:.0f} B/token ({row['allocated_per_token']:.0f} allocated), "
                    f"peak {row['peak_gb']:.1f} GB {note}"
                )
                if best is None or r["tok_s"] > best[1]["tok_s"]:
                    best = (kernel, r, row)
            if best is None:
                return
            kernel, r, row = best  # profile and capacity with the fastest decode kernel
            if cache is None:  # the last kernel failed: a usable cache for the profile and capacity
                free_memory(device)
                cache, token, note = prefill(model, kind, args.quant, ids, args.prefill_chunk, device)
            if (
                last
                and not kind.endswith("graph")
                and device.type == "cuda"
                and not args.no_profile
                and budget_left() > 60
            ):
                with decode_kernel(kernel):
                    results["profile"][kind] = profile_steps(model, cache, token)
                for line in results["profile"][kind]:
                    log(f"profile {kind}: {line}")
            if last and kind in ("dynamic", "kvarn") and not args.no_capacity and budget_left() > 45:
                rows = predicted_rows(
                    free_after_weights - args.reserve_gb * 1e9, context, row["allocated_per_token"], layers
                )
                if args.tiny:
                    rows = min(rows, 2 * batch)  # exercise the code, not the memory
                with decode_kernel(kernel):
                    status = verify_rows(model, cache, token, rows, device)
                    # Out of memory at the prediction: step down (a few tries) to what really fits.
                    for fewer in range(rows - 1, max(0, rows - 4), -1):
                        if not status.startswith("OUT OF MEMORY"):
                            break
                        log(f"capacity {kind}: {status}; trying {fewer}")
                        rows = fewer
                        token = token[:1].expand(batch, 1).contiguous()
                        try:  # the cache may be left uneven by the OOM mid-step: report, not crash
                            status = verify_rows(model, cache, token, rows, device)
                        except Exception as exc:  # noqa: BLE001
                            status = f"retry failed ({type(exc).__name__}: {str(exc)[:80]})"
                            break
                results["capacity"][kind] = {"rows": rows, "tokens": rows * context, "status": status}
                log(f"capacity {kind}: predicted {rows} rows x {context} = {rows * context} tokens; {status}")
            del cache, token, r
            free_memory(device)

        for kind in kinds:
            try:
                run_kind(kind, context, ids, last)
            except Exception:  # noqa: BLE001 - one failed phase must not lose the others
                traceback.print_exc()
                log(f"{kind} at context {context} FAILED (traceback above)")
            free_memory(device)  # after the except block: the traceback no longer holds the cache

    print_table(results, contexts, batch, free_after_weights, args.reserve_gb, weights)
    return results


def print_table(
    results: dict, contexts, batch: int, free_after_weights: float, reserve_gb: float, weights: int
):
    rows = results["rows"]
    print()
    print(f"## Decode speed (batch {batch}, bf16, random-weight Llama-3-8B config)")
    print()
    print("| context | DynamicCache tok/s | KVarNCache tok/s (decode kernel) | ratio | ms/step Dyn / KVarN | host ms/step Dyn / KVarN | prefill s Dyn / KVarN |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for context in contexts:
        d = next((r for r in rows if r["cache"] == "dynamic" and r["context"] == context), None)
        for k in (r for r in rows if r["cache"] in ("kvarn", "graph") and r["context"] == context):
            label = f"{k['tok_s']:.1f} ({'CUDA graph, ' if k['cache'] == 'graph' else ''}{k['kernel']})"
            if d is None:
                print(f"| {context} | failed | {label} | - | - / {k['ms_step']:.2f} | - | - |")
                continue
            print(
                f"| {context} | {d['tok_s']:.1f} | {label} | **{k['tok_s'] / d['tok_s']:.2f}x** | "
                f"{d['ms_step']:.2f} / {k['ms_step']:.2f} | {d['host_ms_step']:.2f} / {k['host_ms_step']:.2f} | "
                f"{d['prefill_s']:.1f} / {k['prefill_s']:.1f} |"
            )
    print()
    print("tok/s of each timed window (the median is in the table):")
    for r in rows:
        windows = ", ".join(f"{t:.1f}" for t in r["tok_s_windows"])
        print(f"  {r['cache']:>7} ctx {r['context']}: {windows}")
    last = contexts[-1]
    d = next((r for r in rows if r["cache"] == "dynamic" and r["context"] == last), None)
    k = max(
        (r for r in rows if r["cache"] == "kvarn" and r["context"] == last),
        key=lambda r: r["tok_s"],
        default=None,
    )
    static_graph = next((r for r in rows if r["cache"] == "static-graph" and r["context"] == last), None)
    graphed = next((r for r in rows if r["cache"] == "graph" and r["context"] == last), None)
    if static_graph and graphed:
        print()
        print(
            f"CUDA graphs on both sides at {last}: StaticCache (16-bit, sdpa) {static_graph['tok_s']:.1f} tok/s, "
            f"{static_graph['ms_step']:.2f} ms/step; KVarNCache {graphed['tok_s']:.1f} tok/s, "
            f"{graphed['ms_step']:.2f} ms/step: **{graphed['tok_s'] / static_graph['tok_s']:.2f}x**"
        )
    if d is None or k is None:
        print(f"(no complete DynamicCache/KVarNCache pair at {last}: see the log above)")
        return
    static = next((r for r in rows if r["cache"] == "static" and r["context"] == last), None)
    if static:
        print()
        print(
            f"StaticCache (16-bit, preallocated, no per-step copy; sdpa) at {last}: {static['tok_s']:.1f} tok/s, "
            f"{static['ms_step']:.2f} ms/step (host {static['host_ms_step']:.2f}); "
            f"KVarNCache / StaticCache = **{k['tok_s'] / static['tok_s']:.2f}x**"
        )
    print()
    print(
        f"## Capacity at {last} tokens (weights {weights / 1e9:.1f} GB; free after weights "
        f"{free_after_weights / 1e9:.1f} GB, {reserve_gb} GB reserve)"
    )
    print()
    print("| cache | B/token valid | B/token allocated | predicted rows | predicted tokens | verified |")
    print("|---|---|---|---|---|---|")
    cap = results["capacity"]
    for kind, r in (("dynamic", d), ("kvarn", k)):
        c = cap.get(kind)
        rows_s = f"{c['rows']}" if c else "-"
        tokens_s = f"{c['tokens']}" if c else "-"
        print(
            f"| {kind} | {r['bytes_per_token']:.0f} | {r['allocated_per_token']:.0f} | {rows_s} | {tokens_s} | "
            f"{c['status'] if c else 'not run'} |"
        )
    if "dynamic" in cap and "kvarn" in cap and cap["dynamic"]["tokens"]:
        print()
        print(
            f"capacity ratio (predicted tokens): **{cap['kvarn']['tokens'] / cap['dynamic']['tokens']:.2f}x**"
        )
    print(
        f"bytes ratio (allocated B/token): {d['allocated_per_token'] / k['allocated_per_token']:.2f}x; "
        f"targets: >= 1.3x tok/s at 32k, >= 4x tokens"
    )
    if results["check"]:
        print(f"check: {results['check']}")
    for kind, lines in results["profile"].items():
        print()
        print(f"profile {kind} (ctx {last}, batch {batch}):")
        for line in lines:
            print(line)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()

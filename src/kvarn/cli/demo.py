"""``kvarn demo``: the same prompts generated with the 16-bit DynamicCache and with KVarNCache.

Loads the default model (SmolLM2-135M-Instruct, converted once from its GGUF file) or ``--model``,
runs the prompts through the chat template as one left-padded batch, generates greedily with
transformers' DynamicCache (sdpa attention) and with KVarNCache (kvarn attention), and prints both
outputs side by side with the greedy token agreement, the KV bytes of each cache and tokens/s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import typer

DEFAULT_PROMPTS = (
    "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces.",
    "Explain in a few sentences why the sky is blue.",
    "Give three tips for writing clean, readable code.",
)


@dataclass
class Run:
    """One batched greedy generation."""

    label: str
    tokens: list[list[int]]  # generated tokens per prompt, up to and including EOS
    seconds: float
    kv_bytes: int

    @property
    def tokens_per_second(self) -> float:
        return sum(len(t) for t in self.tokens) / self.seconds


def _strip(row: list[int], stop_ids: set[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in stop_ids:
            return row[: i + 1]
    return row


def agreement(reference: list[int], other: list[int]) -> tuple[float, int | None]:
    """Share of the reference's positions where ``other`` has the same token, and the first
    position where they differ (None if identical)."""
    first = next((i for i, (a, b) in enumerate(zip(reference, other, strict=False)) if a != b), None)
    if first is None and len(reference) != len(other):
        first = min(len(reference), len(other))
    if not reference:
        return 1.0, first
    same = sum(a == b for a, b in zip(reference, other, strict=False))
    return same / len(reference), first


def _prompt_texts(tokenizer, prompts: list[str]) -> list[str]:
    if getattr(tokenizer, "chat_template", None):
        return [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    return list(prompts)


def _generate(model, inputs, cache, max_new_tokens: int, stop_ids: set[int], label: str, kv_bytes) -> Run:
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    generated = out[:, inputs["input_ids"].shape[1] :].tolist()
    return Run(label, [_strip(row, stop_ids) for row in generated], seconds, kv_bytes(cache))


def run_demo(
    model_path: str | None,
    spec: str,
    tile_size: int,
    max_new_tokens: int,
    prompts: list[str],
    console,
) -> tuple[Run, Run]:
    import torch
    from transformers import DynamicCache

    from kvarn.config import KVarNConfig
    from kvarn.integrations.models import load_model
    from kvarn.integrations.transformers import cache_for

    quant = KVarNConfig.parse(spec, tile_size=tile_size)
    with console.status("loading the model (the first run converts the GGUF file once)..."):
        model, tokenizer = load_model(model_path)
    config = model.config
    console.print(
        f"[bold]{config.model_type}[/] {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
        f"{config.num_hidden_layers} layers, {config.num_key_value_heads} KV heads of dim "
        f"{getattr(config, 'head_dim', None) or config.hidden_size // config.num_attention_heads}, "
        f"{model.dtype}, {torch.get_num_threads()} CPU threads"
    )
    inputs = tokenizer(_prompt_texts(tokenizer, prompts), return_tensors="pt", padding=True)
    stop_ids = {i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}
    gen_eos = model.generation_config.eos_token_id
    stop_ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])

    def dense_bytes(cache) -> int:
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))

    # Warm up both paths once (first-call overheads would otherwise count against the first run).
    warm = {k: v[:1] for k, v in inputs.items()}
    model.set_attn_implementation("sdpa")
    _generate(model, warm, DynamicCache(config=config), 2, stop_ids, "", dense_bytes)
    _generate(model, warm, cache_for(model, quant), 2, stop_ids, "", lambda c: c.nbytes().total)

    with console.status(f"generating {max_new_tokens} tokens x {len(prompts)} prompts with DynamicCache..."):
        model.set_attn_implementation("sdpa")
        dense = _generate(
            model,
            inputs,
            DynamicCache(config=config),
            max_new_tokens,
            stop_ids,
            "16-bit DynamicCache",
            dense_bytes,
        )
    with console.status(f"generating with KVarNCache {quant.name}..."):
        cache = cache_for(model, quant)
        kvarn_run = _generate(
            model, inputs, cache, max_new_tokens, stop_ids, f"KVarNCache {quant.name}", lambda c: 0
        )
    nb = cache.nbytes()
    kvarn_run.kv_bytes = nb.total
    _report(console, tokenizer, prompts, dense, kvarn_run, cache, nb, model.dtype)
    return dense, kvarn_run


def _report(console, tokenizer, prompts, dense: Run, kvarn_run: Run, cache, nb, model_dtype) -> None:
    from rich.panel import Panel
    from rich.table import Table

    for i, prompt in enumerate(prompts):
        share, first = agreement(dense.tokens[i], kvarn_run.tokens[i])
        table = Table(show_lines=False, expand=True)
        table.add_column(dense.label, ratio=1)
        table.add_column(kvarn_run.label, ratio=1)
        table.add_row(
            tokenizer.decode(dense.tokens[i], skip_special_tokens=True).strip(),
            tokenizer.decode(kvarn_run.tokens[i], skip_special_tokens=True).strip(),
        )
        where = "identical" if first is None else f"first difference at generated token {first}"
        console.print(
            Panel(
                table,
                title=f"[bold]prompt {i + 1}[/]: {prompt}",
                subtitle=f"greedy agreement {share:.0%} ({where})",
            )
        )

    total_ref = sum(len(t) for t in dense.tokens)
    same = sum(agreement(r, o)[0] * len(r) for r, o in zip(dense.tokens, kvarn_run.tokens, strict=True))
    dtype_name = str(model_dtype).replace("torch.", "")
    summary = Table(title="summary")
    for col in ("cache", "KV bytes", "vs DynamicCache", "tokens/s", "greedy agreement"):
        summary.add_column(col, justify="right")
    summary.add_row(
        f"{dense.label} ({dtype_name})",
        f"{dense.kv_bytes / 2**20:.2f} MiB",
        "1.00x",
        f"{dense.tokens_per_second:.1f}",
        "reference",
    )
    summary.add_row(
        kvarn_run.label,
        f"{nb.total / 2**20:.2f} MiB",
        f"{nb.total / max(dense.kv_bytes, 1):.2f}x",
        f"{kvarn_run.tokens_per_second:.1f}",
        f"{same / max(total_ref, 1):.0%}",
    )
    console.print(summary)
    layer = cache.kvarn_layers[0]
    stored = sum(layer.stored_lengths())
    quantized = sum(layer._n_tiles) * layer.tile_size
    sixteen_bit_tiles = quantized * layer.num_kv_heads * layer.head_dim * 2 * 2 * len(cache.kvarn_layers)
    console.print(
        f"KVarN bytes: codes {nb.codes / 2**20:.2f} MiB + metadata {nb.metadata / 2**20:.2f} MiB for the "
        f"{quantized} of {stored} stored tokens (per layer, all rows) in completed tiles: "
        f"{nb.quantized / max(sixteen_bit_tiles, 1):.3f}x their 16-bit size. The first tile of each row "
        f"(attention sinks, {nb.sink / 2**20:.2f} MiB) and the partial last tile ({nb.tail / 2**20:.2f} MiB) "
        f"stay in the model dtype ({dtype_name}), so short generations compress little; the saving grows "
        "with the context (benchmarks/cache_decode.py)."
    )


def _auto_threads() -> int | None:
    """One torch thread when other processes already keep the cores busy (two OpenMP threads then
    wait on each other and every step gets several times slower), else torch's default (None)."""
    import os

    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    return 1 if cores > 1 and load > cores - 1 else None


def register(app: typer.Typer) -> None:
    """Add ``kvarn demo`` to the ``kvarn`` command."""

    @app.command("demo")
    def demo(
        model: str = typer.Option(
            None,
            "--model",
            help="model path: .gguf file or transformers directory (default: SmolLM2-135M-Instruct)",
        ),
        preset: str = typer.Option("k4v2", "--preset", help="bits preset: k4v2, k4v4, k3v2, k2v2, k8v8"),
        method: str = typer.Option(
            "kvarn", "--method", help="tile method: kvarn, kivi, hadamard_rtn, varn_norot"
        ),
        tile_size: int = typer.Option(
            64, "--tile-size", help="tokens per tile (32, 64, 128); 64 so short demos quantize"
        ),
        max_new_tokens: int = typer.Option(
            128, "--max-new-tokens", min=1, help="tokens to generate per prompt"
        ),
        prompt: list[str] = typer.Option(
            None, "--prompt", help="a prompt (repeatable); default: 3 short prompts"
        ),
        threads: int = typer.Option(
            0, "--threads", min=0, help="torch CPU threads (0: auto, 1 when the cores are already busy)"
        ),
    ) -> None:
        """Generate with the 16-bit DynamicCache and with KVarNCache; compare outputs, bytes and speed."""
        import torch
        from rich.console import Console

        from kvarn.config import ConfigError, KVarNConfig

        spec = f"{method}:{preset}"
        try:
            quant = KVarNConfig.parse(spec, tile_size=tile_size)
        except ConfigError as err:
            raise typer.BadParameter(str(err)) from err
        if quant.family != "tile":
            raise typer.BadParameter(
                f"method {method!r} is not a tile method; KVarNCache stores kvarn, kivi, hadamard_rtn, varn_norot"
            )
        threads = threads or _auto_threads()
        if threads:
            torch.set_num_threads(threads)
        run_demo(
            model,
            spec,
            tile_size,
            max_new_tokens,
            list(prompt) if prompt else list(DEFAULT_PROMPTS),
            Console(),
        )

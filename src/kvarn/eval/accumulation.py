"""The paper's error-accumulation study: per-layer attention-output error against a 16-bit shadow.

Protocol (teacher-forced pseudo-decode): the text enters the model in chunks of one tile (G tokens),
each chunk attending to the cache of everything before it, as tokens would during decoding. At
every layer and chunk the attention output (before ``o_proj``) of a quantized cache is compared with
the 16-bit model's output at the same layer and positions, in two regimes:

* **static**: a 16-bit run. At each layer the attention is computed a second time over the
  quantized version of the 16-bit cache (a :class:`SimulatedQuantizedCache` shadow fed the same
  16-bit keys/values), the error is recorded, and the 16-bit output is passed on. A layer's error
  never reaches later layers or later cache entries: this is the quantizer's own error.
* **accumulated**: a run of the model with the quantized cache. The quantized output flows into
  later layers and into the keys/values that later tokens write into the cache. Its outputs are
  compared with the pure 16-bit run's outputs at the same layer and positions.

Errors are element-weighted: mean absolute error = sum |o_q - o| / n and relative error
= sum |o_q - o| / sum |o|, summed over heads, channels, positions (and layers or chunks when
aggregated). Layer 0 sees identical inputs in both regimes, so its errors agree exactly.

All runs advance in lockstep chunk by chunk (one 16-bit run with every static shadow, then one
accumulated run per method), so only the current chunk's 16-bit outputs are kept in memory; each
method holds two dense caches (shadow and accumulated run).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from kvarn.config import KVarNConfig
from kvarn.eval import plots
from kvarn.eval.common import (
    LoadedModel,
    check_context,
    chunk_bounds,
    chunk_size,
    progress,
    run_settings,
)
from kvarn.eval.corpus import corpus_tokens
from kvarn.eval.hf_quantized import reject_in_accumulation
from kvarn.eval.io import Figure, SuiteResult, Table
from kvarn.eval.recording import recording, sdpa
from kvarn.eval.simulated_cache import SimulatedQuantizedCache

REGIMES = ("static", "accumulated")
# The paper's figure: K2V2 KIVI against K2V2 KVarN.
PAPER_PAIR = ("kvarn:k2v2", "kivi:k2v2")


class ErrorSums:
    """Element-weighted error sums per (layer, chunk): sum |diff|, sum |reference|, element count."""

    def __init__(self, layers: int, chunks: int):
        self.abs_err = np.zeros((layers, chunks))
        self.ref_abs = np.zeros((layers, chunks))
        self.count = np.zeros((layers, chunks))

    def add(self, layer: int, chunk: int, output: torch.Tensor, reference: torch.Tensor) -> None:
        diff = (output.double() - reference.double()).abs()
        self.abs_err[layer, chunk] += float(diff.sum())
        self.ref_abs[layer, chunk] += float(reference.double().abs().sum())
        self.count[layer, chunk] += reference.numel()

    @staticmethod
    def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)

    def by_chunk(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean abs, relative) per chunk, aggregated over layers."""
        return (
            self._ratio(self.abs_err.sum(0), self.count.sum(0)),
            self._ratio(self.abs_err.sum(0), self.ref_abs.sum(0)),
        )

    def by_layer(self) -> tuple[np.ndarray, np.ndarray]:
        return (
            self._ratio(self.abs_err.sum(1), self.count.sum(1)),
            self._ratio(self.abs_err.sum(1), self.ref_abs.sum(1)),
        )

    def total(self) -> tuple[float, float]:
        return (
            float(self.abs_err.sum() / max(self.count.sum(), 1)),
            float(self.abs_err.sum() / self.ref_abs.sum()) if self.ref_abs.sum() > 0 else float("nan"),
        )

    def to_json(self) -> dict:
        return {
            "abs_err": self.abs_err.tolist(),
            "ref_abs": self.ref_abs.tolist(),
            "count": self.count.tolist(),
        }


class _StaticHook:
    """16-bit run: keeps the 16-bit outputs of the chunk, and measures each method's shadow-cache attention."""

    def __init__(self, methods: list[KVarNConfig], sums: dict[str, ErrorSums]):
        self.shadows = {c.name: SimulatedQuantizedCache(c) for c in methods}
        self.sums = sums
        self.chunk = 0
        self.reference: dict[int, torch.Tensor] = {}

    def __call__(self, module, query, key, value, mask, output, kwargs):
        layer, q_len = module.layer_idx, query.shape[2]
        self.reference[layer] = output
        for name, shadow in self.shadows.items():
            keys, values = shadow.update(key[:, :, -q_len:], value[:, :, -q_len:], layer)
            self.sums[name].add(layer, self.chunk, sdpa(module, query, keys, values, mask, kwargs), output)
        return output  # the 16-bit output goes on: errors cannot propagate


class _AccumulatedHook:
    """Quantized run: compares each layer's (quantized, propagated) output with the 16-bit run's."""

    def __init__(self, sums: ErrorSums, reference: dict[int, torch.Tensor]):
        self.sums = sums
        self.reference = reference
        self.chunk = 0

    def __call__(self, module, query, key, value, mask, output, kwargs):
        self.sums.add(module.layer_idx, self.chunk, output, self.reference[module.layer_idx])
        return output


def cache_bytes(loaded: LoadedModel, methods: list[KVarNConfig], tokens: int) -> int:
    """Dense float memory the run's caches need: 16-bit run + two caches per method."""
    d = loaded.describe()
    per_cache = (
        d["layers"]
        * d["kv_heads"]
        * d["head_dim"]
        * tokens
        * 2
        * next(loaded.model.parameters()).element_size()
    )
    return per_cache * (1 + 2 * len(methods))


@torch.no_grad()
def measure(
    loaded: LoadedModel, input_ids: torch.Tensor, methods: list[KVarNConfig]
) -> tuple[dict[str, dict[str, ErrorSums]], list[int]]:
    """Error sums ``{regime: {method: ErrorSums}}`` and the chunk end positions."""
    model = loaded.model
    n_tokens = input_ids.shape[1]
    input_ids = input_ids.to(loaded.device)
    chunk = chunk_size(methods)
    bounds = list(chunk_bounds(0, n_tokens, chunk))
    layers = model.config.num_hidden_layers
    sums = {regime: {c.name: ErrorSums(layers, len(bounds)) for c in methods} for regime in REGIMES}
    static = _StaticHook(methods, sums["static"])
    reference_cache = DynamicCache()
    runs = {
        c.name: (SimulatedQuantizedCache(c), _AccumulatedHook(sums["accumulated"][c.name], static.reference))
        for c in methods
    }
    for index, (start, end) in enumerate(progress(bounds, desc="accumulation chunks", unit="chunk")):
        ids = input_ids[:, start:end]
        static.chunk = index
        static.reference.clear()
        with recording(model, static):
            model(input_ids=ids, past_key_values=reference_cache, use_cache=True, logits_to_keep=1)
        for cache, hook in runs.values():
            hook.chunk = index
            with recording(model, hook):
                model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return sums, [end for _, end in bounds]


def _checkpoints(ends: list[int]) -> list[int]:
    """Chunk indices at powers of two of the context (and the last chunk), for the Markdown table."""
    picks, target = [], ends[0]
    for i, end in enumerate(ends):
        if end >= target:
            picks.append(i)
            while target <= end:
                target *= 2
    if picks[-1] != len(ends) - 1:
        picks.append(len(ends) - 1)
    return picks


def _value(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def run_accumulation(
    loaded: LoadedModel,
    methods: list[KVarNConfig],
    num_tokens: int,
    out_dir: str | Path,
    corpus: str = "stdlib-code",
    seed: int = 0,
) -> SuiteResult:
    reject_in_accumulation(methods)
    check_context(num_tokens, loaded.window, "accumulation")
    started = time.time()
    text = corpus_tokens(loaded.tokenizer, num_tokens, corpus)
    sums, ends = measure(loaded, text.input_ids, methods)
    names = [c.name for c in methods]

    summary_rows, context_rows, layer_rows, checkpoint_rows = [], [], [], []
    picks = _checkpoints(ends)
    for name in names:
        s_abs, s_rel = sums["static"][name].total()
        a_abs, a_rel = sums["accumulated"][name].total()
        ratio = a_rel / s_rel if s_rel > 0 else None
        summary_rows.append([name, _value(s_abs), _value(s_rel), _value(a_abs), _value(a_rel), _value(ratio)])
        for regime in REGIMES:
            c_abs, c_rel = sums[regime][name].by_chunk()
            for i, end in enumerate(ends):
                context_rows.append([name, regime, end, _value(c_abs[i]), _value(c_rel[i])])
            checkpoint_rows.append([name, regime, *[_value(c_rel[i]) for i in picks]])
            l_abs, l_rel = sums[regime][name].by_layer()
            for layer in range(len(l_abs)):
                layer_rows.append([name, regime, layer, _value(l_abs[layer]), _value(l_rel[layer])])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = make_figures(sums, ends, names, out)
    settings = run_settings(
        loaded,
        methods,
        seed,
        started,
        tokens=num_tokens,
        chunk_tokens=chunk_size(methods),
        quantize_timing="decode (a tile is quantized when the chunk after it enters)",
        error_on="attention output before o_proj, every layer, element-weighted",
        text=text.describe(),
    )
    tables = [
        Table(
            "summary",
            "Attention-output error over all layers and positions",
            [
                "method",
                "static mean abs",
                "static relative",
                "accumulated mean abs",
                "accumulated relative",
                "accumulated / static",
            ],
            summary_rows,
            note="Relative = sum |o_q - o| / sum |o| (element-weighted). Static: errors cannot propagate; "
            "accumulated: the quantized output flows into later layers and cache entries.",
        ),
        Table(
            "checkpoints",
            "Relative error (all layers) of the chunk ending at each context length",
            ["method", "regime", *[str(ends[i]) for i in picks]],
            checkpoint_rows,
        ),
        _breakdown_table("context", "Error per chunk (all layers)", context_rows),
        _breakdown_table("layer", "Error per layer (all chunks)", layer_rows),
    ]
    data = {
        "chunk_ends": ends,
        "sums": {regime: {name: sums[regime][name].to_json() for name in names} for regime in REGIMES},
    }
    return SuiteResult("accumulation", settings, tables, figures, data)


def _breakdown_table(axis: str, title: str, rows: list[list]) -> Table:
    """Error of every (method, regime) along one axis (context or layer): long, so CSV and JSON only."""
    return Table(
        f"by_{axis}", title, ["method", "regime", axis, "mean abs", "relative"], rows, markdown=False
    )


def replot(result: SuiteResult, out: Path) -> list[Figure]:
    """Redraw the figures of a saved result (its JSON holds every error sum)."""
    sums = {}
    for regime, per_method in result.data["sums"].items():
        sums[regime] = {}
        for name, raw in per_method.items():
            s = ErrorSums(0, 0)
            s.abs_err, s.ref_abs, s.count = (
                np.array(raw[k], dtype=float) for k in ("abs_err", "ref_abs", "count")
            )
            sums[regime][name] = s
    names = [m["name"] for m in result.settings["methods"]]
    return make_figures(sums, result.data["chunk_ends"], names, Path(out))


def make_figures(sums, ends: list[int], names: list[str], out: Path) -> list[Figure]:
    """The paper's pair (K2V2 KVarN vs KIVI), then every method by context and by layer, one row per preset."""
    quantized = [n for n in names if n != "none"]
    figures = []

    def by_context(selected, regime):
        return {name: (ends, [_value(v) for v in sums[regime][name].by_chunk()[1]]) for name in selected}

    def by_layer(selected, regime):
        series = {}
        for name in selected:
            rel = sums[regime][name].by_layer()[1]
            series[name] = (list(range(len(rel))), [_value(v) for v in rel])
        return series

    pair = [n for n in PAPER_PAIR if n in names]
    if len(pair) == 2:
        plots.line_grid(
            out / "accumulation_kvarn_vs_kivi_k2v2.png",
            [[(regime, by_context(pair, regime)) for regime in REGIMES]],
            "context length (tokens)",
            "relative attention-output error",
            logy=True,
            suptitle="K2V2: KVarN vs KIVI, static vs accumulated",
        )
        figures.append(
            Figure("accumulation_kvarn_vs_kivi_k2v2.png", "K2V2 KVarN vs KIVI (the paper's figure)")
        )
    if quantized:
        groups = plots.group_by_preset(quantized)
        for key, fn, xlabel, caption in (
            (
                "context",
                by_context,
                "context length (tokens)",
                "Relative error vs context length, all layers",
            ),
            ("layer", by_layer, "layer", "Relative error per layer, all positions"),
        ):
            grid = [
                [(f"{regime} {preset}".strip(), fn(members, regime)) for regime in REGIMES]
                for preset, members in groups.items()
            ]
            plots.line_grid(out / f"accumulation_by_{key}.png", grid, xlabel, "relative attention-output error",
                            logy=True)  # fmt: skip
            figures.append(Figure(f"accumulation_by_{key}.png", caption))
    return figures

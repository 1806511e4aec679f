"""Perplexity and next-token KL to the 16-bit model, in decode mode and prefill mode.

* **decode**: the whole text enters the cache in tile-sized chunks, teacher-forced, as tokens
  would during generation; each tile is quantized once when the next chunk arrives
  (:class:`SimulatedQuantizedCache`). Quantization errors of a chunk reach the keys/values of later
  chunks, so they can accumulate.
* **prefill**: the first ``context`` tokens are prefilled in 16 bits in one pass, the cache is then
  quantized once (``kvarn.fake_quant.fake_quantize``: sink and partial tail kept), and the
  continuation is scored in tile-sized chunks through the same simulated cache (its own tiles are
  quantized as they complete). The context's keys/values carry no propagated error: this is how
  prefill-style evaluations see a quantized cache.

Both modes score the same continuation (tokens ``context .. N-1``); decode mode also reports all
positions. Reported: perplexity, ΔPPL against the 16-bit run of the same mode, mean
KL(16-bit || quantized) of the next-token distributions, top-1 agreement, all per position bucket.
The 16-bit reference is a plain ``DynamicCache`` run with the same chunking, so method ``none``
gives exactly ΔPPL = 0 and KL = 0.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from kvarn.eval import plots
from kvarn.eval.common import (
    EvalInputError,
    EvalMethod,
    LoadedModel,
    check_context,
    chunk_bounds,
    chunk_size,
    forward_chunk,
    forward_method,
    new_cache,
    prefilled_cache,
    progress,
    run_settings,
)
from kvarn.eval.corpus import corpus_tokens
from kvarn.eval.io import Figure, SuiteResult, Table
from kvarn.eval.simulated_cache import exact_layers

MODES = ("decode", "prefill")


class Scores:
    """Per-prediction arrays over predicted-token positions 1..N-1 (index = position of the predicted token)."""

    def __init__(self, n_tokens: int):
        self.nll = np.full(n_tokens, np.nan)
        self.kl = np.full(n_tokens, np.nan)
        self.agree = np.full(n_tokens, np.nan)


def score(
    ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nll, KL(ref || this), top-1 agreement with ref) per row; logits ``[n, vocab]`` float32."""
    ref_lp = torch.log_softmax(ref_logits, dim=-1)
    lp = torch.log_softmax(logits, dim=-1)
    nll = -lp.gather(-1, targets[:, None])[:, 0]
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1)
    agree = (ref_logits.argmax(-1) == logits.argmax(-1)).double()
    return nll.double().cpu().numpy(), kl.double().cpu().numpy(), agree.cpu().numpy()


@torch.no_grad()
def run_mode(
    model, input_ids: torch.Tensor, methods: list[EvalMethod], mode: str, context: int
) -> tuple[Scores, dict[str, Scores]]:
    """Reference and per-method scores for one mode. ``context`` is the prefill length (prefill mode)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is unknown; allowed: {list(MODES)}")
    n_tokens = input_ids.shape[1]
    input_ids = input_ids.to(model.device)
    chunk = chunk_size(methods)
    reference, per_method = Scores(n_tokens), {c.name: Scores(n_tokens) for c in methods}
    ref_cache = DynamicCache()
    start = 0
    if mode == "prefill":
        # One 16-bit pass over the context; its last position predicts token `context` (same for every method).
        last = model(
            input_ids=input_ids[:, :context], past_key_values=ref_cache, use_cache=True, logits_to_keep=1
        )
        last_logits = last.logits[0].float()
        prefilled = exact_layers(ref_cache)
        caches = {c.name: prefilled_cache(c, prefilled, model.config) for c in methods}
        target = input_ids[0, context : context + 1]
        nll, _, _ = score(last_logits, last_logits, target)
        reference.nll[context] = nll[0]
        for scores in per_method.values():
            scores.nll[context], scores.kl[context], scores.agree[context] = nll[0], 0.0, 1.0
        start = context
    else:
        caches = {c.name: new_cache(c, model.config) for c in methods}
    for s, e in progress(list(chunk_bounds(start, n_tokens, chunk)), desc=f"perplexity {mode}", unit="chunk"):
        ids = input_ids[:, s:e]
        targets = input_ids[0, s + 1 : e + 1]
        m = targets.shape[0]  # the last chunk has one prediction fewer
        ref_logits = forward_chunk(model, ids, ref_cache)[:m]
        ref_nll, _, _ = score(ref_logits, ref_logits, targets)
        reference.nll[s + 1 : s + 1 + m] = ref_nll
        for config in methods:
            logits = forward_method(config, model, ids, caches[config.name])[:m]
            scores = per_method[config.name]
            nll, kl, agree = score(ref_logits, logits, targets)
            scores.nll[s + 1 : s + 1 + m], scores.kl[s + 1 : s + 1 + m], scores.agree[s + 1 : s + 1 + m] = (
                nll,
                kl,
                agree,
            )
    return reference, per_method


def _ppl(nll: np.ndarray) -> float:
    return float(math.exp(np.mean(nll))) if nll.size else float("nan")


def _summary(reference: Scores, scores: Scores, lo: int, hi: int) -> tuple[float, float, float, float]:
    """(ppl, ΔPPL, mean KL, top-1 agreement) over predicted positions [lo, hi)."""
    ref_ppl = _ppl(reference.nll[lo:hi])
    ppl = _ppl(scores.nll[lo:hi])
    return ppl, ppl - ref_ppl, float(np.mean(scores.kl[lo:hi])), float(np.mean(scores.agree[lo:hi]))


def bucket_edges(start: int, end: int, width: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + width, end)) for lo in range(start, end, width)]


def default_context(num_tokens: int, chunk: int) -> int:
    """Prefill half of the text (a whole number of chunks)."""
    return max(chunk, (num_tokens // 2) // chunk * chunk)


def run_perplexity(
    loaded: LoadedModel,
    methods: list[EvalMethod],
    num_tokens: int,
    out_dir: str | Path,
    modes: tuple[str, ...] = MODES,
    context: int | None = None,
    bucket_tokens: int | None = None,
    corpus: str = "stdlib-code",
    seed: int = 0,
) -> SuiteResult:
    check_context(num_tokens, loaded.window, "perplexity")
    chunk = chunk_size(methods)
    for mode in modes:
        if mode not in MODES:
            raise EvalInputError(f"mode {mode!r} is unknown; allowed: {list(MODES)}")
    context = default_context(num_tokens, chunk) if context is None else context
    if not 0 < context < num_tokens - 1:
        raise EvalInputError(f"--context {context} must be between 1 and --max-tokens - 2 ({num_tokens - 2})")
    bucket_tokens = bucket_tokens or max(chunk, (num_tokens // 8) // chunk * chunk)
    started = time.time()
    text = corpus_tokens(loaded.tokenizer, num_tokens, corpus)
    names = [c.name for c in methods]

    results: dict[str, tuple[Scores, dict[str, Scores]]] = {}
    for mode in modes:
        results[mode] = run_mode(loaded.model, text.input_ids, methods, mode, context)

    summary_rows, bucket_rows = [], []
    ranges = []
    if "decode" in modes:
        ranges.append(("decode", "all", 1, num_tokens))
        ranges.append(("decode", "continuation", context, num_tokens))
    if "prefill" in modes:
        ranges.append(("prefill", "continuation", context, num_tokens))
    for mode, label, lo, hi in ranges:
        reference, per_method = results[mode]
        ref_ppl = _ppl(reference.nll[lo:hi])
        summary_rows.append(["16-bit", mode, f"{label} [{lo}, {hi})", ref_ppl, 0.0, 0.0, 1.0])
        for name in names:
            summary_rows.append(
                [name, mode, f"{label} [{lo}, {hi})", *_summary(reference, per_method[name], lo, hi)]
            )
    for mode in modes:
        reference, per_method = results[mode]
        lo = context if mode == "prefill" else 1
        for b_lo, b_hi in bucket_edges(lo, num_tokens, bucket_tokens):
            for name in names:
                bucket_rows.append(
                    [name, mode, b_lo, b_hi, *_summary(reference, per_method[name], b_lo, b_hi)]
                )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"ref_nll_" + mode: results[mode][0].nll for mode in modes}
    for mode in modes:
        for i, name in enumerate(names):
            for field in ("nll", "kl", "agree"):
                arrays[f"{mode}_{field}_{i}"] = getattr(results[mode][1][name], field)
    np.savez_compressed(out / "perplexity_positions.npz", method_names=np.array(names), **arrays)
    figures = make_figures(bucket_rows, summary_rows, names, modes, out)
    settings = run_settings(
        loaded,
        methods,
        seed,
        started,
        tokens=num_tokens,
        modes=list(modes),
        prefill_context=context,
        chunk_tokens=chunk,
        bucket_tokens=bucket_tokens,
        quantize_timing="decode (a tile is quantized when the chunk after it enters)",
        text=text.describe(),
    )
    columns = ["ppl", "ΔPPL", "mean KL", "top-1 agreement"]
    tables = [
        Table(
            "summary",
            "Perplexity, ΔPPL and KL(16-bit || quantized)",
            ["method", "mode", "scored predictions", *columns],
            summary_rows,
            note="ΔPPL and KL are against the 16-bit run of the same mode (same chunking). Decode and prefill "
            "rows on the same continuation are directly comparable.",
        ),
        Table(
            "by_bucket",
            "Per position bucket (position of the predicted token)",
            ["method", "mode", "from", "to", *columns],
            bucket_rows,
            markdown=len(bucket_rows) <= 120,
        ),
    ]
    data = {
        "arrays": "perplexity_positions.npz (per-prediction nll / kl / agreement; index = token position)"
    }
    return SuiteResult("perplexity", settings, tables, figures, data)


def replot(result: SuiteResult, out: Path) -> list[Figure]:
    """Redraw the figures of a saved result from its tables."""
    names = [m["name"] for m in result.settings["methods"]]
    return make_figures(
        result.table("by_bucket").rows,
        result.table("summary").rows,
        names,
        result.settings["modes"],
        Path(out),
    )


def make_figures(bucket_rows, summary_rows, names, modes, out: Path) -> list[Figure]:
    quantized = [n for n in names if n != "none"]
    figures = []
    if not quantized:
        return figures
    grid = []
    for preset, members in plots.group_by_preset(quantized).items():
        row = []
        for mode in modes:
            series = {}
            for name in members:
                rows = [r for r in bucket_rows if r[0] == name and r[1] == mode]
                series[name] = ([(r[2] + r[3]) / 2 for r in rows], [r[6] for r in rows])
            row.append((f"{mode} mode {preset}".strip(), series))
        grid.append(row)
    plots.line_grid(
        out / "perplexity_kl_by_position.png",
        grid,
        "position of the predicted token",
        "mean KL to 16-bit",
        logy=True,
    )
    figures.append(
        Figure("perplexity_kl_by_position.png", "Mean KL(16-bit || quantized) per position bucket")
    )
    groups, series = [], {name: [] for name in quantized}
    for row in summary_rows:
        if row[0] == "16-bit":
            key = f"{row[1]} {row[2].split(' ')[0]}"
            if key not in groups:
                groups.append(key)
    for group in groups:
        mode, label = group.split(" ")
        for name in quantized:
            match = [r for r in summary_rows if r[0] == name and r[1] == mode and r[2].startswith(label)]
            series[name].append(match[0][4] if match else None)
    plots.grouped_bars(out / "perplexity_delta.png", groups, series, "ΔPPL vs 16-bit", "ΔPPL by mode")
    figures.append(Figure("perplexity_delta.png", "ΔPPL against the 16-bit run, decode vs prefill mode"))
    return figures

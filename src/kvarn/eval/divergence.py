"""Free-running greedy generation: when does a quantized cache first change the tokens?

Each prompt is a real piece of standard-library code that ends right after a ``def ...:`` line
(:func:`kvarn.eval.corpus.code_prompts`). The 16-bit model and the model with each method's
:class:`SimulatedQuantizedCache` continue it greedily, side by side as rows of one batch
(:func:`kvarn.eval.common.generate_with_reference`); the prompt is prefilled once in 16 bits (its
tiles are quantized when decoding starts) and then tokens enter one by one.

Reported per method: the first step at which the tokens differ from 16-bit decoding (a generation
that never differs counts as its full length, and is also counted as identical), and the token
agreement = matching positions / the longer generation's length (after a divergence the texts
usually drift apart, so agreement falls).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from kvarn.eval import plots
from kvarn.eval.common import (
    EvalMethod,
    LoadedModel,
    check_context,
    generate_with_reference,
    progress,
    run_settings,
)
from kvarn.eval.corpus import code_prompts
from kvarn.eval.io import Figure, SuiteResult, Table


def first_divergence(reference: list[int], other: list[int]) -> int | None:
    """Index of the first differing token; None if the sequences are identical."""
    for i, (a, b) in enumerate(zip(reference, other, strict=False)):
        if a != b:
            return i
    return None if len(reference) == len(other) else min(len(reference), len(other))


def agreement(reference: list[int], other: list[int]) -> float:
    """Matching positions / the longer sequence's length (1.0 for two empty sequences)."""
    longest = max(len(reference), len(other))
    if longest == 0:
        return 1.0
    return sum(a == b for a, b in zip(reference, other, strict=False)) / longest


def run_divergence(
    loaded: LoadedModel,
    methods: list[EvalMethod],
    max_new_tokens: int,
    out_dir: str | Path,
    num_prompts: int = 8,
    prompt_tokens: int = 1024,
    seed: int = 0,
    rows_per_batch: int = 16,
) -> SuiteResult:
    check_context(prompt_tokens + max_new_tokens, loaded.window, "divergence (prompt + generated tokens)")
    started = time.time()
    tokenizer = loaded.tokenizer
    prompts = code_prompts(tokenizer, num_prompts, prompt_tokens)
    names = [c.name for c in methods]
    per_prompt_rows, generations = [], []
    steps: dict[str, list[int]] = {n: [] for n in names}
    agreements: dict[str, list[float]] = {n: [] for n in names}
    identical: dict[str, int] = {n: 0 for n in names}
    survival_lengths: dict[str, list[tuple[int | None, int]]] = {n: [] for n in names}
    for prompt in progress(prompts, desc="divergence prompts", unit="prompt"):
        # Row 0 is the 16-bit reference (method none), decoded in the same batch as the methods.
        reference, *others = generate_with_reference(
            loaded, prompt.input_ids, methods, max_new_tokens, rows_per_batch=rows_per_batch
        )
        record = {"source": prompt.source, "def": prompt.text_tail, "16-bit": tokenizer.decode(reference)}
        for config, tokens in zip(methods, others, strict=True):
            step = first_divergence(reference, tokens)
            agree = agreement(reference, tokens)
            if step is None:
                identical[config.name] += 1
            steps[config.name].append(len(reference) if step is None else step)
            agreements[config.name].append(agree)
            survival_lengths[config.name].append((step, max(len(reference), len(tokens))))
            per_prompt_rows.append([prompt.source, config.name, len(reference), len(tokens), step, agree])
            record[config.name] = tokenizer.decode(tokens)
        generations.append(record)

    summary_rows = [
        [
            name,
            len(prompts),
            identical[name],
            statistics.mean(steps[name]),
            statistics.median(steps[name]),
            min(steps[name]),
            statistics.mean(agreements[name]),
        ]
        for name in names
    ]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = make_figures(survival_lengths, max_new_tokens, out)
    settings = run_settings(
        loaded,
        methods,
        seed,
        started,
        prompts=len(prompts),
        prompt_tokens=prompt_tokens,
        max_new_tokens=max_new_tokens,
        decoding="greedy, stops at eos; the 16-bit reference and every method decode side by side in one batch",
        quantize_timing="decode (prompt tiles quantized when decoding starts; later tiles as the next token enters)",
    )
    tables = [
        Table(
            "summary",
            "First divergence from 16-bit greedy decoding",
            [
                "method",
                "prompts",
                "identical",
                "mean first divergence",
                "median",
                "min",
                "mean token agreement",
            ],
            summary_rows,
            note="First divergence = index of the first generated token that differs (a generation that never "
            "differs counts as its full length). Agreement = matching positions / longer generation.",
        ),
        Table(
            "per_prompt",
            "Per prompt",
            ["prompt", "method", "16-bit tokens", "tokens", "first divergence", "agreement"],
            per_prompt_rows,
            markdown=len(per_prompt_rows) <= 60,
        ),
    ]
    return SuiteResult("divergence", settings, tables, figures, {"generations": generations})


def replot(result: SuiteResult, out: Path) -> list[Figure]:
    """Redraw the figures of a saved result from its per-prompt table."""
    survival: dict[str, list[tuple[int | None, int]]] = {}
    for _, name, ref_len, length, step, _ in result.table("per_prompt").rows:
        survival.setdefault(name, []).append((step, max(ref_len, length)))
    return make_figures(survival, result.settings["max_new_tokens"], Path(out))


def make_figures(survival_lengths, max_new_tokens: int, out: Path) -> list[Figure]:
    """Fraction of prompts whose generation still equals the 16-bit one after t steps."""
    series = {}
    for name, pairs in survival_lengths.items():
        if name == "none" or not pairs:
            continue
        xs = list(range(max_new_tokens + 1))
        ys = [sum(1 for step, _ in pairs if step is None or step >= t) / len(pairs) for t in xs]
        series[name] = (xs, ys)
    if not series:
        return []
    panels = [
        (f"greedy decoding {preset}".strip(), {name: series[name] for name in members})
        for preset, members in plots.group_by_preset(list(series)).items()
    ]
    plots.line_grid(
        out / "divergence_survival.png", [panels], "generated tokens", "fraction still identical to 16-bit",
        legend="panel",
    )  # fmt: skip
    return [Figure("divergence_survival.png", "Fraction of prompts whose tokens still match 16-bit decoding")]

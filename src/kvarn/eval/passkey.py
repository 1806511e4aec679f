"""Synthetic passkey retrieval: a 5-digit number hidden in filler text, at several depths and lengths.

The prompt (the usual passkey format of Mohtashami & Jaggi, 2023) is an instruction, repeated filler
sentences with ``The pass key is NNNNN. Remember it. NNNNN is the pass key.`` inserted at a given
depth (fraction of the filler before it), and ``What is the pass key? The pass key is``. The model
continues greedily for a few tokens; a trial passes when the first number in the continuation is
the key. The prompt is prefilled once in 16 bits (its tiles are quantized when decoding starts, as
a compact cache would store them) and the answer is decoded token by token, the 16-bit reference
and every method side by side as rows of one batch.

Lengths are total prompt lengths in tokens (prompt + answer budget must fit the window); keys come
from ``random.Random(seed)``, one per (length, depth, trial).
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import torch

from kvarn.eval import plots
from kvarn.eval.common import (
    EvalInputError,
    EvalMethod,
    LoadedModel,
    check_context,
    generate_with_reference,
    progress,
    run_settings,
)
from kvarn.eval.io import Figure, SuiteResult, Table

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = 8
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def filler(sentences: int, offset: int = 0) -> str:
    """``sentences`` filler sentences, cycling through ``FILLER_SENTENCES`` from ``offset``."""
    n = len(FILLER_SENTENCES)
    return "".join(FILLER_SENTENCES[(offset + i) % n] + " " for i in range(sentences))


def build_prompt(tokenizer, length: int, depth: float, key: int) -> torch.Tensor:
    """Token ids ``[1, n]`` with n <= length - ANSWER_TOKENS, short of it by less than one filler sentence."""
    budget = length - ANSWER_TOKENS

    def encode(sentences: int) -> list[int]:
        before = round(sentences * depth)
        text = (
            INSTRUCTION
            + filler(before)
            + NEEDLE.format(key=key)
            + filler(sentences - before, offset=before)
            + QUESTION
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    per_sentence = max(1.0, len(tokenizer(filler(50), add_special_tokens=False)["input_ids"]) / 50)
    fixed = len(encode(0))
    if fixed > budget:
        raise EvalInputError(f"passkey length {length} is too short for the prompt itself ({fixed} tokens)")
    sentences = int((budget - fixed) / per_sentence)
    ids = encode(sentences)
    while len(ids) > budget and sentences > 0:  # token counts of joined text are not exactly additive
        sentences -= 1
        ids = encode(sentences)
    while True:  # and fill up to the budget
        longer = encode(sentences + 1)
        if len(longer) > budget:
            break
        sentences, ids = sentences + 1, longer
    return torch.tensor([ids], dtype=torch.long)


def first_number(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group(0)) if match else None


def default_lengths(max_length: int) -> list[int]:
    """1k, 2k, 4k, ... up to ``max_length`` (which is always included)."""
    lengths, length = [], 1024
    while length < max_length:
        lengths.append(length)
        length *= 2
    lengths.append(max_length)
    return lengths


def run_passkey(
    loaded: LoadedModel,
    methods: list[EvalMethod],
    lengths: list[int],
    out_dir: str | Path,
    depths: tuple[float, ...] = DEFAULT_DEPTHS,
    trials: int = 1,
    seed: int = 0,
    rows_per_batch: int = 16,
) -> SuiteResult:
    for length in lengths:
        check_context(length, loaded.window, f"passkey length {length}")
        if length <= ANSWER_TOKENS + 16:
            raise EvalInputError(f"passkey length {length} is too short")
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise EvalInputError(f"passkey depths must be in [0, 1], got {list(depths)}")
    if trials < 1:
        raise EvalInputError(f"--trials must be >= 1, got {trials}")
    started = time.time()
    tokenizer = loaded.tokenizer
    rng = random.Random(seed)
    labels = ["16-bit", *[c.name for c in methods]]
    cases = [
        (length, depth, rng.randint(10000, 99999))
        for length in lengths
        for depth in depths
        for _ in range(trials)
    ]
    # Every prompt is built (tokenized) before any model call: a length too short fails here.
    prompts = [build_prompt(tokenizer, length, depth, key) for length, depth, key in cases]
    hits = {(label, length): 0 for label in labels for length in lengths}
    counts = {length: 0 for length in lengths}
    trial_rows = []
    trials_and_prompts = list(zip(cases, prompts, strict=True))
    for (length, depth, key), ids in progress(trials_and_prompts, desc="passkey trials", unit="trial"):
        counts[length] += 1
        rows = generate_with_reference(loaded, ids, methods, ANSWER_TOKENS, rows_per_batch=rows_per_batch)
        for label, tokens in zip(labels, rows, strict=True):
            answer = tokenizer.decode(tokens)
            correct = first_number(answer) == key
            hits[(label, length)] += correct
            trial_rows.append([label, length, int(ids.shape[1]), depth, key, answer.strip(), correct])

    accuracy_rows = [
        [label, *[hits[(label, length)] / counts[length] for length in lengths]] for label in labels
    ]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = make_figures(accuracy_rows, lengths, out)
    settings = run_settings(
        loaded,
        methods,
        seed,
        started,
        lengths=lengths,
        depths=list(depths),
        trials_per_depth=trials,
        answer_tokens=ANSWER_TOKENS,
        decoding="greedy",
    )
    tables = [
        Table(
            "accuracy",
            "Passkey accuracy per prompt length",
            ["method", *[str(length) for length in lengths]],
            accuracy_rows,
            note=f"{len(depths) * trials} trials per length (depths {list(depths)}).",
        ),
        Table(
            "trials",
            "Every trial",
            ["method", "length", "prompt tokens", "depth", "key", "answer", "correct"],
            trial_rows,
            markdown=len(trial_rows) <= 60,
        ),
    ]
    return SuiteResult("passkey", settings, tables, figures)


def replot(result: SuiteResult, out: Path) -> list[Figure]:
    return make_figures(result.table("accuracy").rows, result.settings["lengths"], Path(out))


def make_figures(accuracy_rows, lengths: list[int], out: Path) -> list[Figure]:
    labels = [row[0] for row in accuracy_rows]
    accuracy = {row[0]: (lengths, row[1:]) for row in accuracy_rows}
    groups = plots.group_by_preset([label for label in labels if label != "16-bit"])
    panels = [
        (
            f"passkey retrieval {preset}".strip(),
            {"16-bit": accuracy["16-bit"], **{m: accuracy[m] for m in members}},
        )
        for preset, members in groups.items()
    ]
    plots.line_grid(out / "passkey.png", [panels], "prompt length (tokens)", "accuracy", legend="panel")
    return [Figure("passkey.png", "Passkey accuracy vs prompt length")]

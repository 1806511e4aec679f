"""``kvarn eval <suite>``: the evaluation suites as commands (see docs/eval.md).

Every command checks its inputs (methods, model path, lengths against the model's window) before
it loads weights or starts a long loop, and exits with status 2 and a one-line message on bad input.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

DEFAULT_METHODS = "none,kvarn:k4v2,kivi:k4v2,kvarn:k2v2,kivi:k2v2"
ACCUMULATION_METHODS = "kvarn:k2v2,kivi:k2v2,kvarn:k4v2,kivi:k4v2"

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="transformers model directory or .gguf file; default: the embedded SmolLM2-135M-Instruct",
        show_default=False,
    ),
]
MaxTokensOpt = Annotated[
    int | None,
    typer.Option("--max-tokens", help="suite-specific length (see each command)", show_default=False),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="random seed (passkey keys; torch)")]
OutOpt = Annotated[
    Path | None, typer.Option("--out", help="result folder (default: kvarn-eval/<suite>)", show_default=False)
]
QuickOpt = Annotated[bool, typer.Option("--quick", help="small sizes: a smoke test in seconds to minutes")]
NoSinkOpt = Annotated[
    bool, typer.Option("--no-sink", help="quantize the first tile too (default: keep it 16-bit)")
]
TileOpt = Annotated[
    int | None,
    typer.Option("--tile-size", help="override every method's tile size (32, 64, 128)", show_default=False),
]
CorpusOpt = Annotated[str, typer.Option("--corpus", help="stdlib-code or stdlib-docs (see docs/eval.md)")]
RowsOpt = Annotated[int, typer.Option("--batch-rows", help="methods decoded side by side per batch")]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="torch device for the model (cpu, cuda, cuda:1, ...)")
]


MethodsOpt = Annotated[
    str,
    typer.Option(
        "--methods",
        help="comma-separated METHOD[:PRESET] (e.g. none,kvarn:k4v2,kivi:k2v2,fp8_e4m3; all:k4v2 = every kvarn "
        "method; hf_quanto:k4v4 / hf_quanto:k2v2 = transformers' QuantizedCache with optimum-quanto)",
    ),
]


def _error(message: str) -> typer.Exit:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=2)


def _run(suite: str, out: Path | None, work: Callable[[Path], object]) -> None:
    """Run a suite, turning input errors into a clean exit, then write and summarize the results."""
    from kvarn.config import ConfigError
    from kvarn.eval.common import EvalInputError
    from kvarn.eval.corpus import CorpusError
    from kvarn.eval.io import write_result

    out_dir = Path(out) if out is not None else Path("kvarn-eval") / suite
    started = time.time()
    try:
        result = work(out_dir)
    except (EvalInputError, ConfigError, CorpusError) as exc:
        raise _error(str(exc)) from None
    written = write_result(result, out_dir)
    _print_summary(result, written, time.time() - started)


def _print_summary(result, written: list[Path], seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    from kvarn.eval.io import format_cell

    console = Console()
    table = result.tables[0]
    rich_table = RichTable(title=f"{result.suite}: {table.title}")
    for column in table.columns:
        rich_table.add_column(column)
    for row in table.rows:
        rich_table.add_row(*[format_cell(v) for v in row])
    console.print(rich_table)
    console.print(
        f"wrote {len(written) + len(result.figures)} files to {written[0].parent} in {seconds:.0f} s"
    )


def _prepare(
    model: str | None,
    methods: str,
    no_sink: bool,
    tile_size: int | None,
    needed: int | None,
    check_methods: Callable[[list], None] | None = None,
):
    """Checks that need no weights: methods (and the suite's ``check_methods``), model path, and the
    length against the model's window."""
    from kvarn.eval.common import check_context, check_model_path, parse_methods, peek_window

    configs = parse_methods(methods, keep_sink_tile=not no_sink, tile_size=tile_size)
    if check_methods is not None:
        check_methods(configs)
    check_model_path(model)
    if needed is not None:
        check_context(needed, peek_window(model), "this run")
    return configs


def register(app: typer.Typer) -> None:
    """Add the ``eval`` command group to the ``kvarn`` app."""
    eval_app = typer.Typer(
        name="eval",
        help="Evaluation suites: accumulation, perplexity, divergence, humaneval, passkey, report.",
        no_args_is_help=True,
    )

    @eval_app.command("accumulation")
    def accumulation(
        model: ModelOpt = None,
        methods: MethodsOpt = ACCUMULATION_METHODS,
        max_tokens: MaxTokensOpt = None,
        seed: SeedOpt = 0,
        device: DeviceOpt = "cpu",
        out: OutOpt = None,
        quick: QuickOpt = False,
        no_sink: NoSinkOpt = False,
        tile_size: TileOpt = None,
        corpus: CorpusOpt = "stdlib-code",
    ) -> None:
        """Per-layer attention-output error vs a 16-bit shadow, static and accumulated (--max-tokens: text length, default 4096)."""
        n = max_tokens or (512 if quick else 4096)

        def work(out_dir: Path):
            from kvarn.eval.accumulation import run_accumulation
            from kvarn.eval.common import check_positive, load_model_for_eval, seed_everything
            from kvarn.eval.hf_quantized import reject_in_accumulation

            configs = _prepare(model, methods, no_sink, tile_size, n, reject_in_accumulation)
            check_positive(n, "--max-tokens", 2)
            seed_everything(seed)
            return run_accumulation(
                load_model_for_eval(model, device=device), configs, n, out_dir, corpus=corpus, seed=seed
            )

        _run("accumulation", out, work)

    @eval_app.command("perplexity")
    def perplexity(
        model: ModelOpt = None,
        methods: MethodsOpt = DEFAULT_METHODS,
        max_tokens: MaxTokensOpt = None,
        seed: SeedOpt = 0,
        device: DeviceOpt = "cpu",
        out: OutOpt = None,
        quick: QuickOpt = False,
        no_sink: NoSinkOpt = False,
        tile_size: TileOpt = None,
        corpus: CorpusOpt = "stdlib-code",
        mode: Annotated[str, typer.Option("--mode", help="decode, prefill or both")] = "both",
        context: Annotated[
            int | None,
            typer.Option("--context", help="prefill length (default: half the text)", show_default=False),
        ] = None,
        bucket: Annotated[
            int | None,
            typer.Option("--bucket", help="position bucket width (default: text / 8)", show_default=False),
        ] = None,
    ) -> None:
        """Perplexity, ΔPPL and KL to 16-bit in decode and prefill mode (--max-tokens: text length, default 8192)."""
        n = max_tokens or (512 if quick else 8192)

        def work(out_dir: Path):
            from kvarn.eval.common import EvalInputError, check_positive, load_model_for_eval, seed_everything
            from kvarn.eval.perplexity import MODES, run_perplexity

            modes = MODES if mode == "both" else (mode,)
            if any(m not in MODES for m in modes):
                raise EvalInputError(f"--mode {mode!r} is unknown; allowed: decode, prefill, both")
            configs = _prepare(model, methods, no_sink, tile_size, n)
            check_positive(n, "--max-tokens", 4)
            seed_everything(seed)
            return run_perplexity(
                load_model_for_eval(model, device=device), configs, n, out_dir, modes=modes, context=context,
                bucket_tokens=bucket, corpus=corpus, seed=seed,
            )  # fmt: skip

        _run("perplexity", out, work)

    @eval_app.command("divergence")
    def divergence(
        model: ModelOpt = None,
        methods: MethodsOpt = DEFAULT_METHODS,
        max_tokens: MaxTokensOpt = None,
        seed: SeedOpt = 0,
        device: DeviceOpt = "cpu",
        out: OutOpt = None,
        quick: QuickOpt = False,
        no_sink: NoSinkOpt = False,
        tile_size: TileOpt = None,
        prompts: Annotated[
            int | None, typer.Option("--prompts", help="number of prompts (default 8)")
        ] = None,
        prompt_tokens: Annotated[
            int | None,
            typer.Option("--prompt-tokens", help="prompt length (default 1024)", show_default=False),
        ] = None,
        batch_rows: RowsOpt = 16,
    ) -> None:
        """First divergence from 16-bit greedy decoding (--max-tokens: generated tokens, default 256)."""
        n = max_tokens or (32 if quick else 256)
        n_prompts = prompts or (2 if quick else 8)
        p_tokens = prompt_tokens or (256 if quick else 1024)

        def work(out_dir: Path):
            from kvarn.eval.common import check_positive, load_model_for_eval, seed_everything
            from kvarn.eval.divergence import run_divergence

            configs = _prepare(model, methods, no_sink, tile_size, p_tokens + n)
            for value, name in ((n, "--max-tokens"), (n_prompts, "--prompts"), (p_tokens, "--prompt-tokens")):
                check_positive(value, name)
            seed_everything(seed)
            return run_divergence(
                load_model_for_eval(model, device=device), configs, n, out_dir, num_prompts=n_prompts, prompt_tokens=p_tokens,
                seed=seed, rows_per_batch=batch_rows,
            )  # fmt: skip

        _run("divergence", out, work)

    @eval_app.command("humaneval")
    def humaneval(
        model: ModelOpt = None,
        methods: MethodsOpt = DEFAULT_METHODS,
        max_tokens: MaxTokensOpt = None,
        seed: SeedOpt = 0,
        device: DeviceOpt = "cpu",
        out: OutOpt = None,
        quick: QuickOpt = False,
        no_sink: NoSinkOpt = False,
        tile_size: TileOpt = None,
        limit: Annotated[int | None, typer.Option("--limit", help="first N problems only")] = None,
        timeout: Annotated[float, typer.Option("--timeout", help="seconds per program")] = 10.0,
        memory_mb: Annotated[int, typer.Option("--memory-mb", help="address-space limit per program")] = 1024,
        prompt_style: Annotated[
            str,
            typer.Option(
                "--prompt-style",
                help="completion, chat, or auto (chat when the tokenizer has a chat template)",
            ),
        ] = "auto",
        batch_rows: RowsOpt = 16,
        workers: Annotated[
            int,
            typer.Option(
                "--workers",
                help="processes generating completions in parallel, each with its own copy of the model on "
                "--device (a launch-bound GPU run gains several times; same results)",
            ),
        ] = 1,
        sandbox_workers: Annotated[
            int | None,
            typer.Option(
                "--sandbox-workers",
                help="programs executed at a time (default: half the CPU cores, at least 2)",
                show_default=False,
            ),
        ] = None,
    ) -> None:
        """HumanEval pass@1 and agreement with 16-bit; programs run sandboxed (--max-tokens: per completion, default 384)."""
        n = max_tokens or (64 if quick else 384)
        n_problems = limit or (4 if quick else None)

        def work(out_dir: Path):
            from kvarn.eval.common import EvalInputError, check_positive, load_model_for_eval, seed_everything
            from kvarn.eval.humaneval import PROMPT_STYLES, load_problems, run_humaneval
            from kvarn.eval.parallel import check_workers
            from kvarn.eval.sandbox import Sandbox

            configs = _prepare(model, methods, no_sink, tile_size, n + 1)
            check_positive(n, "--max-tokens")
            load_problems(n_problems)  # the package and --limit, before the model loads
            if prompt_style not in PROMPT_STYLES:
                raise EvalInputError(
                    f"--prompt-style {prompt_style!r} is unknown; allowed: {list(PROMPT_STYLES)}"
                )
            check_workers(workers)
            runners = sandbox_workers if sandbox_workers is not None else max(2, (os.cpu_count() or 2) // 2)
            check_positive(runners, "--sandbox-workers")
            sandbox = Sandbox(timeout=timeout, memory_mb=memory_mb, workers=runners)
            seed_everything(seed)
            return run_humaneval(
                load_model_for_eval(model, device=device), configs, n, out_dir, limit=n_problems, sandbox=sandbox, seed=seed,
                rows_per_batch=batch_rows, prompt_style=prompt_style, workers=workers,
            )  # fmt: skip

        _run("humaneval", out, work)

    @eval_app.command("passkey")
    def passkey(
        model: ModelOpt = None,
        methods: MethodsOpt = DEFAULT_METHODS,
        max_tokens: MaxTokensOpt = None,
        seed: SeedOpt = 0,
        device: DeviceOpt = "cpu",
        out: OutOpt = None,
        quick: QuickOpt = False,
        no_sink: NoSinkOpt = False,
        tile_size: TileOpt = None,
        lengths: Annotated[
            str | None,
            typer.Option(
                "--lengths",
                help="comma-separated prompt lengths (default 1024, 2048, ... up to --max-tokens)",
            ),
        ] = None,
        depths: Annotated[int, typer.Option("--depths", help="needle depths per length, evenly spread")] = 5,
        trials: Annotated[int, typer.Option("--trials", help="keys per depth")] = 1,
        batch_rows: RowsOpt = 16,
    ) -> None:
        """Passkey retrieval accuracy per prompt length (--max-tokens: longest prompt, default: the window)."""

        def work(out_dir: Path):
            from kvarn.eval.common import (
                EvalInputError,
                check_positive,
                load_model_for_eval,
                peek_window,
                seed_everything,
            )
            from kvarn.eval.passkey import default_lengths, run_passkey

            if lengths:
                try:
                    chosen = [int(x) for x in lengths.split(",") if x.strip()]
                except ValueError:
                    raise EvalInputError(f"--lengths {lengths!r} must be comma-separated integers") from None
            else:
                top = max_tokens or (512 if quick else None)
                if top is None:
                    _prepare(model, methods, no_sink, tile_size, None)
                    top = peek_window(model)
                chosen = [512, top] if quick and top > 512 else default_lengths(top) if top > 1024 else [top]
            configs = _prepare(model, methods, no_sink, tile_size, max(chosen) if chosen else None)
            check_positive(depths, "--depths")
            n_depths = 2 if quick and depths == 5 else depths
            spread = tuple((i + 0.5) / n_depths for i in range(n_depths))
            seed_everything(seed)
            return run_passkey(
                load_model_for_eval(model, device=device), configs, chosen, out_dir, depths=spread, trials=trials, seed=seed,
                rows_per_batch=batch_rows,
            )  # fmt: skip

        _run("passkey", out, work)

    @eval_app.command("report")
    def report(
        results: Annotated[
            list[Path], typer.Argument(help="result folders (searched recursively) or JSON files")
        ],
        out: Annotated[Path, typer.Option("--out", help="report folder")] = Path("kvarn-eval/report"),
        title: Annotated[str, typer.Option("--title")] = "kvarn evaluation",
        redraw: Annotated[
            bool,
            typer.Option("--redraw", help="redraw the plots from the saved numbers instead of copying them"),
        ] = False,
    ) -> None:
        """Collect result folders into report.md and report.html with every table and plot."""
        from kvarn.eval.common import EvalInputError
        from kvarn.eval.report import write_report

        try:
            written = write_report(results, out, title, redraw=redraw)
        except EvalInputError as exc:
            raise _error(str(exc)) from None
        typer.echo(f"wrote {', '.join(str(p) for p in written)}")

    app.add_typer(eval_app, name="eval")

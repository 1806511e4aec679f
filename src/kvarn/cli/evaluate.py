"""``kvarn eval <suite>``: the evaluation suites as commands (see docs/eval.md).

Every command checks its inputs (methods, model path, lengths against the model's window) before
it loads weights or starts a long loop, and exits with status 2 and a one-line message on bad input.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class SuiteOptions:
    """The options every suite command takes (docs/eval.md, "Shared options")."""

    model: str | None
    methods: str
    max_tokens: int | None
    seed: int
    device: str
    out: Path | None
    quick: bool
    no_sink: bool
    tile_size: int | None

    def length(self, quick: int | None, full: int | None) -> int | None:
        """``--max-tokens`` if given, else the suite's ``--quick`` or full default."""
        if self.max_tokens is not None:
            return self.max_tokens
        return quick if self.quick else full

    def prepare(self, needed: int | None, check_methods: Callable[[list], None] | None = None) -> list:
        """Checks that need no weights: methods (and the suite's ``check_methods``), model path, and
        the length ``needed`` against the model's window. Returns the parsed methods."""
        from kvarn.eval.common import check_context, check_model_path, parse_methods, peek_window

        configs = parse_methods(self.methods, keep_sink_tile=not self.no_sink, tile_size=self.tile_size)
        if check_methods is not None:
            check_methods(configs)
        check_model_path(self.model)
        if needed is not None:
            check_context(needed, peek_window(self.model), "this run")
        return configs

    def load(self):
        """Seed, then load the model (after every input check)."""
        from kvarn.eval.common import load_model_for_eval, seed_everything

        seed_everything(self.seed)
        return load_model_for_eval(self.model, device=self.device)


def _shared_parameters(default_methods: str) -> list[inspect.Parameter]:
    def option(name: str, annotation, default) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

    return [
        option("model", ModelOpt, None),
        option("methods", MethodsOpt, default_methods),
        option("max_tokens", MaxTokensOpt, None),
        option("seed", SeedOpt, 0),
        option("device", DeviceOpt, "cpu"),
        option("out", OutOpt, None),
        option("quick", QuickOpt, False),
        option("no_sink", NoSinkOpt, False),
        option("tile_size", TileOpt, None),
    ]


def _suite_command(app: typer.Typer, name: str, default_methods: str = DEFAULT_METHODS):
    """Register ``suite(options, out_dir, **own_options) -> SuiteResult`` as ``kvarn eval NAME``.

    The command takes the shared options (:class:`SuiteOptions`) followed by the suite's own; input
    errors raised by ``suite`` end the command with status 2, and its result is written to ``--out``.
    """

    def decorate(suite: Callable) -> Callable:
        shared = _shared_parameters(default_methods)
        own = list(inspect.signature(suite, eval_str=True).parameters.values())[2:]

        def command(**kwargs) -> None:
            options = SuiteOptions(**{p.name: kwargs.pop(p.name) for p in shared})
            _run(name, options.out, lambda out_dir: suite(options, out_dir, **kwargs))

        # typer reads the options from the signature; the suite's own annotations are already evaluated.
        command.__signature__ = inspect.Signature([*shared, *(p.replace(kind=p.KEYWORD_ONLY) for p in own)])
        command.__doc__, command.__name__ = suite.__doc__, suite.__name__
        app.command(name)(command)
        return suite

    return decorate


def register(app: typer.Typer) -> None:
    """Add the ``eval`` command group to the ``kvarn`` app."""
    eval_app = typer.Typer(
        name="eval",
        help="Evaluation suites: accumulation, perplexity, divergence, humaneval, passkey, report.",
        no_args_is_help=True,
    )

    @_suite_command(eval_app, "accumulation", ACCUMULATION_METHODS)
    def accumulation(options: SuiteOptions, out_dir: Path, corpus: CorpusOpt = "stdlib-code"):
        """Per-layer attention-output error vs a 16-bit shadow, static and accumulated (--max-tokens: text length, default 4096)."""
        from kvarn.eval.accumulation import run_accumulation
        from kvarn.eval.common import check_positive
        from kvarn.eval.hf_quantized import reject_in_accumulation

        n = options.length(512, 4096)
        check_positive(n, "--max-tokens", 2)
        configs = options.prepare(n, reject_in_accumulation)
        return run_accumulation(options.load(), configs, n, out_dir, corpus=corpus, seed=options.seed)

    @_suite_command(eval_app, "perplexity")
    def perplexity(
        options: SuiteOptions,
        out_dir: Path,
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
    ):
        """Perplexity, ΔPPL and KL to 16-bit in decode and prefill mode (--max-tokens: text length, default 8192)."""
        from kvarn.eval.common import EvalInputError, check_positive
        from kvarn.eval.perplexity import MODES, run_perplexity

        n = options.length(512, 8192)
        modes = MODES if mode == "both" else (mode,)
        if any(m not in MODES for m in modes):
            raise EvalInputError(f"--mode {mode!r} is unknown; allowed: decode, prefill, both")
        check_positive(n, "--max-tokens", 4)
        configs = options.prepare(n)
        return run_perplexity(
            options.load(), configs, n, out_dir, modes=modes, context=context, bucket_tokens=bucket, corpus=corpus,
            seed=options.seed,
        )  # fmt: skip

    @_suite_command(eval_app, "divergence")
    def divergence(
        options: SuiteOptions,
        out_dir: Path,
        prompts: Annotated[
            int | None, typer.Option("--prompts", help="number of prompts (default 8)")
        ] = None,
        prompt_tokens: Annotated[
            int | None,
            typer.Option("--prompt-tokens", help="prompt length (default 1024)", show_default=False),
        ] = None,
        batch_rows: RowsOpt = 16,
    ):
        """First divergence from 16-bit greedy decoding (--max-tokens: generated tokens, default 256)."""
        from kvarn.eval.common import check_positive
        from kvarn.eval.divergence import run_divergence

        n = options.length(32, 256)
        n_prompts = prompts if prompts is not None else 2 if options.quick else 8
        p_tokens = prompt_tokens if prompt_tokens is not None else 256 if options.quick else 1024
        for value, name in ((n, "--max-tokens"), (n_prompts, "--prompts"), (p_tokens, "--prompt-tokens")):
            check_positive(value, name)
        configs = options.prepare(p_tokens + n)
        return run_divergence(
            options.load(), configs, n, out_dir, num_prompts=n_prompts, prompt_tokens=p_tokens, seed=options.seed,
            rows_per_batch=batch_rows,
        )  # fmt: skip

    @_suite_command(eval_app, "humaneval")
    def humaneval(
        options: SuiteOptions,
        out_dir: Path,
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
    ):
        """HumanEval pass@1 and agreement with 16-bit; programs run sandboxed (--max-tokens: per completion, default 384)."""
        from kvarn.eval.common import EvalInputError, check_positive
        from kvarn.eval.humaneval import PROMPT_STYLES, load_problems, run_humaneval
        from kvarn.eval.parallel import check_workers
        from kvarn.eval.sandbox import Sandbox

        n = options.length(64, 384)
        n_problems = limit if limit is not None else 4 if options.quick else None
        check_positive(n, "--max-tokens")
        configs = options.prepare(n + 1)
        load_problems(n_problems)  # the package and --limit, before the model loads
        if prompt_style not in PROMPT_STYLES:
            raise EvalInputError(
                f"--prompt-style {prompt_style!r} is unknown; allowed: {list(PROMPT_STYLES)}"
            )
        check_workers(workers)
        runners = sandbox_workers if sandbox_workers is not None else max(2, (os.cpu_count() or 2) // 2)
        check_positive(runners, "--sandbox-workers")
        sandbox = Sandbox(timeout=timeout, memory_mb=memory_mb, workers=runners)
        return run_humaneval(
            options.load(), configs, n, out_dir, limit=n_problems, sandbox=sandbox, seed=options.seed,
            rows_per_batch=batch_rows, prompt_style=prompt_style, workers=workers,
        )  # fmt: skip

    @_suite_command(eval_app, "passkey")
    def passkey(
        options: SuiteOptions,
        out_dir: Path,
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
    ):
        """Passkey retrieval accuracy per prompt length (--max-tokens: longest prompt, default: the window)."""
        from kvarn.eval.common import EvalInputError, check_positive, peek_window
        from kvarn.eval.passkey import default_lengths, run_passkey

        if lengths:
            try:
                chosen = [int(x) for x in lengths.split(",") if x.strip()]
            except ValueError:
                raise EvalInputError(f"--lengths {lengths!r} must be comma-separated integers") from None
        else:
            top = options.length(512, None)
            if top is None:
                options.prepare(None)
                top = peek_window(options.model)
            chosen = (
                [512, top] if options.quick and top > 512 else default_lengths(top) if top > 1024 else [top]
            )
        configs = options.prepare(max(chosen) if chosen else None)
        check_positive(depths, "--depths")
        n_depths = 2 if options.quick and depths == 5 else depths
        spread = tuple((i + 0.5) / n_depths for i in range(n_depths))
        return run_passkey(
            options.load(), configs, chosen, out_dir, depths=spread, trials=trials, seed=options.seed,
            rows_per_batch=batch_rows,
        )  # fmt: skip

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

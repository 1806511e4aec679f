"""Entry point of the ``kvarn`` command: each subcommand lives in its own module with ``register(app)``."""

from __future__ import annotations

import importlib
import importlib.util

import typer

app = typer.Typer(
    name="kvarn",
    help="KVarN KV-cache quantization: demo, quantizer report, evaluation suites.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root() -> None:
    """KVarN KV-cache quantization for transformers models."""


# demo: the main job (generate with the compact cache); report: quantizer errors on real K/V;
# evaluate: `kvarn eval <suite>`.
SUBCOMMAND_MODULES = ("kvarn.cli.demo", "kvarn.cli.report", "kvarn.cli.evaluate")

for _name in SUBCOMMAND_MODULES:
    if importlib.util.find_spec(_name) is not None:
        importlib.import_module(_name).register(app)


@app.command()
def info() -> None:
    """Print versions, presets and methods."""
    import torch
    from rich.console import Console
    from rich.table import Table

    import kvarn
    from kvarn.config import METHODS, PRESETS, KVarNConfig

    console = Console()
    console.print(
        f"kvarn {kvarn.__version__}, torch {torch.__version__}, cuda available: {torch.cuda.is_available()}"
    )
    table = Table(title="presets (bytes per token per KV head at head_dim 64 / 128, tile 128)")
    for col in ("preset", "key bits", "value bits", "D=64", "D=128", "vs 16-bit (D=128)"):
        table.add_column(col)
    for name, fields in PRESETS.items():
        cfg = KVarNConfig.from_preset(name)
        b64, b128 = cfg.bytes_per_token_per_head(64), cfg.bytes_per_token_per_head(128)
        table.add_row(
            name,
            str(fields["key_bits"]),
            str(fields["value_bits"]),
            f"{b64:g}",
            f"{b128:g}",
            f"{512 / b128:.2f}x smaller",
        )
    console.print(table)
    console.print("methods: " + ", ".join(METHODS))


if __name__ == "__main__":
    app()

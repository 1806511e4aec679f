"""A Typer app holding one ``kvarn`` subcommand module, for CLI tests through ``CliRunner``."""

from __future__ import annotations

from collections.abc import Callable

import typer


def subcommand_app(register: Callable[[typer.Typer], None]) -> typer.Typer:
    """An app with the commands ``register(app)`` adds. The root callback keeps them subcommands
    (``app ["eval", ...]``), as in the real ``kvarn`` command."""
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test app."""

    register(app)
    return app

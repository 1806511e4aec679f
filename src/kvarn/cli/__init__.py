"""The ``kvarn`` command line (typer + rich)."""

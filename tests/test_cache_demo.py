"""``kvarn demo`` on a tiny random model saved to disk (no download), through a local Typer app."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from kvarn.cli.demo import agreement, register
from kvarn.integrations.models import save_tiny_model
from tests.cli_support import subcommand_app
from tests.test_cache_common import one_torch_thread  # noqa: F401  (autouse fixture: one torch thread)


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    return subcommand_app(register)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), "llama", head_dim=32, num_hidden_layers=2)


def test_demo_runs_and_reports(app, tiny_dir):
    result = CliRunner().invoke(
        app,
        [
            "demo",
            "--model",
            str(tiny_dir),
            "--max-new-tokens",
            "70",
            "--tile-size",
            "32",
            "--prompt",
            "hello world, this is a prompt",
            "--prompt",
            "abc",
            "--threads",
            "1",
        ],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "16-bit DynamicCache" in out and "KVarNCache kvarn:k4v2/g32" in out
    assert "greedy agreement" in out and "prompt 2" in out
    assert "tokens/s" in out and "MiB" in out and "vs DynamicCache" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "k9v9"], "preset"),
        (["--method", "fp8_e4m3"], "tile method"),
        (["--tile-size", "48"], "tile_size"),
    ],
)
def test_demo_rejects_bad_options(app, tiny_dir, args, message):
    result = CliRunner().invoke(app, ["demo", "--model", str(tiny_dir), *args], terminal_width=200)
    assert result.exit_code != 0
    assert message in result.output


def test_agreement():
    assert agreement([1, 2, 3, 4], [1, 2, 3, 4]) == (1.0, None)
    assert agreement([1, 2, 3, 4], [1, 2, 9, 4]) == (0.75, 2)
    assert agreement([1, 2, 3, 4], [1, 2]) == (0.5, 2)
    assert agreement([], []) == (1.0, None)

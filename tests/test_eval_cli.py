"""``kvarn eval`` end to end on a tiny random-weight Llama: --quick runs, well-formed outputs, bad input."""

from __future__ import annotations

import csv
import json
import math
import time

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from kvarn.cli.evaluate import register
from tests.cli_support import subcommand_app
from tests.test_eval_support import TINY_WINDOW, tiny_model_dir  # noqa: F401  (fixture)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    return subcommand_app(register)


def invoke(app, args):
    result = CliRunner().invoke(app, ["eval", *map(str, args)])
    return result


def check_outputs(out, suite: str) -> dict:
    """JSON parses, CSVs have headers and rows of the right width, the Markdown has a table, PNGs are PNGs."""
    data = json.loads((out / f"{suite}.json").read_text())
    assert data["suite"] == suite and data["format"] == "kvarn-eval/1"
    assert data["settings"]["environment"]["torch"]
    for i, table in enumerate(data["tables"]):
        name = f"{suite}.csv" if i == 0 else f"{suite}_{table['key']}.csv"
        with (out / name).open() as handle:
            rows = list(csv.reader(handle))
        assert rows[0] == table["columns"] and len(rows) == len(table["rows"]) + 1 >= 2
        assert all(len(row) == len(table["columns"]) for row in rows)
    markdown = (out / f"{suite}.md").read_text()
    assert markdown.startswith(f"# kvarn eval {suite}") and "|---|" in markdown
    assert data["figures"], "every suite draws at least one plot"
    for figure in data["figures"]:
        png = (out / figure["file"]).read_bytes()
        assert png.startswith(PNG_MAGIC) and 2_000 < len(png) < 400_000
        assert f"({figure['file']})" in markdown
    return data


def rows_by(table: dict, *keys: str) -> dict:
    index = [table["columns"].index(k) for k in keys]
    return {
        tuple(row[i] for i in index): dict(zip(table["columns"], row, strict=True)) for row in table["rows"]
    }


@pytest.fixture(scope="module")
def runs(app, tiny_model_dir, tmp_path_factory):  # noqa: F811
    """Every suite once, --quick, on the tiny model (tile size 32 so that several tiles get quantized)."""
    root = tmp_path_factory.mktemp("eval_runs")
    common = ["--model", tiny_model_dir, "--quick", "--tile-size", "32"]
    commands = {
        "accumulation": ["--methods", "none,kvarn:k2v2,kivi:k2v2,per_token_rtn:k2v2", "--max-tokens", "256"],
        "perplexity": [
            "--methods",
            "none,kvarn:k2v2,kivi:k4v2,fp8_e4m3,hf_quanto:k2v2",
            "--max-tokens",
            "320",
        ],
        "divergence": [
            "--methods",
            "none,kvarn:k2v2,kivi:k2v2,hf_quanto:k2v2",
            "--prompt-tokens",
            "96",
            "--max-tokens",
            "24",
        ],
        "humaneval": ["--methods", "none,kivi:k2v2,hf_quanto:k4v4", "--limit", "2", "--max-tokens", "24"],
        "passkey": ["--methods", "kvarn:k2v2,hf_quanto:k2v2", "--lengths", "200,400", "--depths", "2"],
    }
    outputs, seconds = {}, {}
    for suite, args in commands.items():
        out = root / suite
        started = time.time()
        result = invoke(app, [suite, *common, *args, "--out", out])
        seconds[suite] = time.time() - started
        assert result.exit_code == 0, f"{suite}: {result.output}\n{result.exception!r}"
        outputs[suite] = out
    return outputs


@pytest.mark.parametrize("suite", ["accumulation", "perplexity", "divergence", "humaneval", "passkey"])
def test_quick_run_writes_well_formed_results(runs, suite):
    check_outputs(runs[suite], suite)


def test_accumulated_error_is_not_below_static_and_none_is_exact(runs):
    data = json.loads((runs["accumulation"] / "accumulation.json").read_text())
    summary = rows_by(data["tables"][0], "method")
    for (name,), row in summary.items():
        if name.startswith("none"):
            assert row["static mean abs"] == 0 and row["accumulated mean abs"] == 0
            continue
        assert row["static relative"] > 0
        assert row["accumulated relative"] >= row["static relative"], name
        assert row["accumulated mean abs"] >= row["static mean abs"], name
        # Layer 0 sees the same inputs in both regimes: identical error.
        sums = data["data"]["sums"]
        assert np.array_equal(sums["static"][name]["abs_err"][0], sums["accumulated"][name]["abs_err"][0])


def test_none_gives_zero_delta_ppl_and_zero_kl(runs):
    data = json.loads((runs["perplexity"] / "perplexity.json").read_text())
    summary = data["tables"][0]
    for row in summary["rows"]:
        record = dict(zip(summary["columns"], row, strict=True))
        if record["method"].startswith("none"):
            assert record["ΔPPL"] == 0.0 and record["mean KL"] == 0.0 and record["top-1 agreement"] == 1.0
        elif record["method"] != "16-bit":
            assert record["mean KL"] > 0 and math.isfinite(record["ppl"])
    assert {row[1] for row in summary["rows"]} == {"decode", "prefill"}
    arrays = np.load(runs["perplexity"] / "perplexity_positions.npz")
    assert list(arrays["method_names"])[0].startswith("none")
    assert np.nansum(arrays["decode_kl_0"]) == 0


def test_none_decodes_exactly_like_16_bit(runs):
    data = json.loads((runs["divergence"] / "divergence.json").read_text())
    summary = rows_by(data["tables"][0], "method")
    none = next(row for (name,), row in summary.items() if name.startswith("none"))
    assert none["identical"] == none["prompts"] and none["mean token agreement"] == 1.0
    he = json.loads((runs["humaneval"] / "humaneval.json").read_text())
    he_rows = rows_by(he["tables"][0], "method")
    assert next(r for (n,), r in he_rows.items() if n.startswith("none"))["agreement with 16-bit"] == 1.0
    assert he["settings"]["sandbox"]["timeout_s"] == 10.0
    passkey = json.loads((runs["passkey"] / "passkey.json").read_text())
    assert passkey["tables"][0]["columns"] == ["method", "200", "400"]


@pytest.mark.parametrize("redraw", [False, True])
def test_report_collects_every_suite(app, runs, tmp_path, redraw):
    out = tmp_path / "report"
    result = invoke(app, ["report", *runs.values(), "--out", out, *(["--redraw"] if redraw else [])])
    assert result.exit_code == 0, result.output
    markdown = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for suite in runs:
        assert f"kvarn eval {suite}" in markdown and f"<h2>{suite}</h2>" in html
    images = sorted((out / "figures").rglob("*.png"))
    assert len(images) >= 5
    for image in images:
        relative = image.relative_to(out).as_posix()
        assert f"({relative})" in markdown and f'src="{relative}"' in html
        assert image.read_bytes().startswith(PNG_MAGIC)
    if redraw:  # redrawn from the JSON: the same figures the runs drew
        for suite, folder in runs.items():
            drawn = {p.name for p in folder.glob("*.png")}
            assert drawn == {p.name for p in (out / "figures").glob(f"*-{suite}/*.png")}


@pytest.fixture
def no_model_loading(monkeypatch):
    """Bad input must be caught before the model loads: loading fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr("kvarn.eval.common.load_model_for_eval", forbidden)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["perplexity", "--methods", "kvarn:k4v2,bogus"], "method 'bogus'"),
        (["accumulation", "--methods", "kvarn:k9v9"], "preset 'k9v9'"),
        (["divergence", "--methods", ""], "--methods is empty"),
        (["passkey", "--methods", "all:k7v1"], "preset 'k7v1'"),
        (["humaneval", "--model", "/nonexistent/model/dir"], "does not exist"),
        (["perplexity", "--max-tokens", str(TINY_WINDOW + 1)], "window"),
        (["accumulation", "--max-tokens", str(TINY_WINDOW * 4)], "max_position_embeddings"),
        (["divergence", "--prompt-tokens", str(TINY_WINDOW), "--max-tokens", "8"], "window"),
        (["passkey", "--lengths", f"512,{TINY_WINDOW + 8}"], "window"),
        (["humaneval", "--max-tokens", str(TINY_WINDOW)], "window"),
        (["perplexity", "--mode", "sideways"], "--mode 'sideways'"),
        (["passkey", "--lengths", "12,x"], "comma-separated integers"),
        (["accumulation", "--tile-size", "48"], "tile_size=48"),
        (["humaneval", "--prompt-style", "poem"], "--prompt-style 'poem'"),
        (["accumulation", "--methods", "kvarn:k2v2,hf_quanto:k2v2"], "cannot run hf_quanto:k2v2"),
        (["perplexity", "--methods", "hf_quanto:k4v2"], "hf_quanto:k4v4, hf_quanto:k2v2"),
        (["humaneval", "--limit", "0"], "--limit must be >= 1"),
        (["humaneval", "--workers", "0"], "--workers must be an integer >= 1"),
        (["divergence", "--prompts", "0"], "--prompts must be >= 1"),
        (["perplexity", "--max-tokens", "0"], "--max-tokens must be >= 4"),
    ],
)
def test_bad_input_fails_fast_with_a_clear_message(app, tiny_model_dir, no_model_loading, args, message):  # noqa: F811
    if "--model" not in args:
        args = [*args, "--model", tiny_model_dir]
    started = time.time()
    result = invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output.replace("\n", " ")
    assert time.time() - started < 20


def test_report_without_results_is_an_error(app, tmp_path):
    result = invoke(app, ["report", tmp_path, "--out", tmp_path / "r"])
    assert result.exit_code == 2 and "no kvarn eval results" in result.output

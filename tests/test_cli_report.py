"""`kvarn report`: error metrics against slow float64 twins, the sink-tile reuse, and the CLI end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from kvarn import KVarNConfig, fake_quantize
from kvarn.cli import report
from kvarn.cli.report import CapturedAttention, QuantizerErrors, attention_output, report_configs
from kvarn.integrations.models import save_tiny_model
from tests.cli_support import subcommand_app

TILE_METHODS = ("kvarn", "kivi", "hadamard_rtn", "varn_norot")


def naive_attention(q, k, v, scaling):
    """float64, explicit GQA head mapping (query head h uses KV head h // group), explicit causal mask."""
    q, k, v = q.double(), k.double(), v.double()
    hq, t, _ = q.shape
    group = hq // k.shape[0]
    out = torch.empty_like(q)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for h in range(hq):
        scores = (q[h] @ k[h // group].T) * scaling
        out[h] = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v[h // group]
    return out


def random_capture(layers=2, hq=6, hkv=2, t=80, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(layers, hq, t, d, generator=g)
    k = torch.randn(layers, hkv, t, d, generator=g) * 2
    v = torch.randn(layers, hkv, t, d, generator=g)
    k[:, :, :, 3] *= 20  # an outlier channel, as real keys have
    k[:, :, 0] *= 8  # a huge (sink-like) first token
    v[:, 1, t // 2] *= 30  # a huge value token
    return CapturedAttention(q.to(dtype), k.to(dtype), v.to(dtype), scalings=[d**-0.5, 0.3][:layers])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", [1, 37, 80])
def test_attention_output_matches_naive_gqa(dtype, t):
    cap = random_capture(t=t, dtype=dtype, seed=t)
    for q, k, v, s in zip(cap.queries, cap.keys, cap.values, cap.scalings, strict=True):
        torch.testing.assert_close(
            attention_output(q, k, v, s).double(), naive_attention(q, k, v, s), atol=2e-5, rtol=2e-5
        )


@pytest.mark.parametrize("method", [*TILE_METHODS, "per_token_rtn", "fp8_e4m3"])
@pytest.mark.parametrize("t", [64, 75])  # whole tiles, and a partial tail
def test_sink_kept_reuse_equals_fake_quantize(method, t):
    cap = random_capture(t=t, seed=3)
    errors = QuantizerErrors(cap)
    config = KVarNConfig.from_preset("k2v2", method=method, tile_size=32)
    errors.measure(config.replace(keep_sink_tile=False), "k2v2")  # the sink-kept row reuses this one
    k_fast, v_fast = errors.reconstruct(config)
    k_ref, v_ref = fake_quantize(cap.keys, cap.values, config)
    assert torch.equal(k_fast, k_ref) and torch.equal(v_fast, v_ref)


@pytest.mark.parametrize("method", ["kvarn", "kivi", "fp8_e4m3", "none"])
@pytest.mark.parametrize("keep_sink", [True, False])
def test_measure_matches_slow_float64_twin(method, keep_sink):
    cap = random_capture(t=75, seed=7)
    config = KVarNConfig.from_preset("k4v2", method=method, tile_size=32, keep_sink_tile=keep_sink)
    row = QuantizerErrors(cap).measure(config, "k4v2")
    k_hat, v_hat = fake_quantize(cap.keys, cap.values, config)
    num = den = 0.0
    per_layer = []
    for i, s in enumerate(cap.scalings):
        ref = naive_attention(cap.queries[i], cap.keys[i], cap.values[i], s)
        out = naive_attention(cap.queries[i], k_hat[i], v_hat[i], s)
        e, r = float((out - ref).pow(2).sum()), float(ref.pow(2).sum())
        per_layer.append(math.sqrt(e / r))
        num, den = num + e, den + r
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
    assert row.key_error == pytest.approx(rel(k_hat, cap.keys), rel=1e-9)
    assert row.value_error == pytest.approx(rel(v_hat, cap.values), rel=1e-9)
    assert row.attention_error == pytest.approx(math.sqrt(num / den), rel=1e-4, abs=1e-7)
    assert row.attention_error_per_layer == pytest.approx(per_layer, rel=1e-4, abs=1e-7)
    assert row.bytes_per_token_per_head == config.bytes_per_token_per_head(16)
    if method == "none":
        assert row.key_error == row.value_error == row.attention_error == 0.0
    else:
        assert row.attention_error > 0


def test_report_configs_collapse_fp8_and_none():
    configs = report_configs(
        ["kvarn", "fp8_e4m3", "none"], ["k4v2", "k2v2"], [True, False], ["bfloat16", "float32"], 128
    )
    names = [(c.method, p, c.keep_sink_tile, c.metadata_dtype) for c, p in configs]
    assert len(names) == len(set(names))
    assert sum(c.method == "kvarn" for c, _ in configs) == 2 * 2 * 2
    assert sum(c.method == "fp8_e4m3" for c, _ in configs) == 2 * 2  # sink x metadata, no bits
    assert [p for c, p in configs if c.method == "none"] == ["-"]


def _app():
    return subcommand_app(report.register)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", architecture="llama")


def test_cli_report_on_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "report.json"
    args = [
        "report",
        "--model",
        str(tiny_model_dir),
        "--tokens",
        "100",
        "--tile-size",
        "32",
        "--sink",
        "both",
    ]
    runner = CliRunner(env={"COLUMNS": "200"})  # rich sizes tables from COLUMNS
    result = runner.invoke(_app(), [*args, "--json", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "attn-out err" in result.output and "hadamard_rtn" in result.output
    data = json.loads(out.read_text())
    assert data["tokens"] == 100 and data["layers"] == 2 and data["kv_heads"] == 2 and data["head_dim"] == 16
    rows = data["rows"]
    assert {row["method"] for row in rows} == set(report.DEFAULT_METHODS)
    for row in rows:
        for key in ("key_error", "value_error", "attention_error", "bytes_per_token_per_head"):
            assert math.isfinite(row[key]), row
    none = [row for row in rows if row["method"] == "none"]
    assert len(none) == 1 and none[0]["attention_error"] == 0.0 and none[0]["key_error"] == 0.0
    assert none[0]["bytes_per_token_per_head"] == 64  # 2 bytes x 16 channels x (K + V)
    kvarn_rows = [row for row in rows if row["method"] == "kvarn"]
    assert len(kvarn_rows) == 6 and all(row["attention_error"] > 0 for row in kvarn_rows)
    # K2V2 is stored in fewer bytes than K4V4, and is less accurate on the same data.
    by = {(row["preset"], row["keep_sink_tile"]): row for row in kvarn_rows}
    assert by[("k2v2", True)]["bytes_per_token_per_head"] < by[("k4v4", True)]["bytes_per_token_per_head"]
    assert by[("k2v2", True)]["key_error"] > by[("k4v4", True)]["key_error"]


def test_cli_report_bad_options_and_missing_model(tiny_model_dir, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(_app(), ["report", "--model", str(tiny_model_dir), "--methods", "kvarn,zip"])
    assert bad.exit_code != 0 and "zip" in bad.output and "--methods" in bad.output
    missing = runner.invoke(_app(), ["report", "--model", str(tmp_path / "nope"), "--no-progress"])
    assert missing.exit_code == 1 and "nope" in missing.output
    short = runner.invoke(
        _app(), ["report", "--model", str(tiny_model_dir), "--tokens", "64", "--no-progress"]
    )
    assert short.exit_code == 1 and "too short" in short.output

"""benchmarks/gpu_end_to_end.py in its --tiny smoke mode (CPU): every phase runs and the table is
well formed, so the one GPU call of the real run does not fail on a typo."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_end_to_end.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_end_to_end", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_prints_the_tables(capsys):
    bench = _load()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = bench.main(["--tiny", "--contexts", "200", "290", "--steps", "4", "--prefill-chunk", "128"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "## Decode speed" in out and "## Capacity at 290 tokens" in out and "StaticCache" in out
    rows = results["rows"]
    expected = {(c, n) for c in ("dynamic", "kvarn", "graph") for n in (200, 290)} | {("static", 290)}
    assert {(r["cache"], r["context"]) for r in rows} == expected
    for r in rows:
        assert r["tok_s"] > 0 and r["host_ms_step"] <= r["ms_step"] * 1.01
    dyn = next(r for r in rows if r["cache"] == "dynamic" and r["context"] == 290)
    kv = next(r for r in rows if r["cache"] == "kvarn" and r["context"] == 290)
    # 2 layers x 2 KV heads x dim 32 x 2 (K, V) x 2 bytes; KVarN holds tiles + 16-bit sink/tail
    assert dyn["bytes_per_token"] == 2 * 2 * 32 * 2 * 2
    assert kv["bytes_per_token"] < dyn["bytes_per_token"]
    for kind in ("dynamic", "kvarn"):
        assert results["capacity"][kind]["status"].startswith("fits: 4 rows")


def test_kernel_categories():
    bench = _load()
    assert bench.kernel_category("_decode_tc_kernel") == "attention"
    assert bench.kernel_category("_compress_kernel") == "compress"
    assert bench.kernel_category("nvjet_tst_128x64_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert (
        bench.kernel_category("void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>")
        == "copy/cat"
    )
    assert bench.kernel_category("pytorch_flash::flash_fwd_splitkv_kernel<...>") == "attention"
    assert bench.predicted_rows(10e9, 1000, 1000.0, 4) == 8000  # 10e9 / (1000 x 1000 x 1.25)


def test_graph_generate_check_runs_on_cpu():
    """The benchmark's model.generate-through-GraphDecoder check, through the eager twin on CPU:
    it must pass here so that the GPU run's check phase fails only on a real GPU difference."""
    bench = _load()
    line = bench.check_graph_generate(torch.device("cpu"), "k4v2")
    assert line.startswith("OK: 300 greedy tokens x 3 rows") and "repetition_penalty" in line

"""The cache's CUDA decode path, exercised on CPU: no host syncs, few ops, the kernel contract.

``kvarn.cache.profiling.gpu_path_on_cpu`` makes the Triton seams report "enabled" for CPU tensors
and runs each kernel call either as its PyTorch twin (counted as one kernel) or as the real Triton
kernel wrapper under the interpreter. ``OpCounter`` counts the aten ops, host syncs and
host-to-device uploads the cache dispatches around the kernels.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvarn
from kvarn.cache import KVarNLayer
from kvarn.cache import layer as layer_module
from kvarn.cache.profiling import counting, gpu_path_on_cpu
from kvarn.config import KVarNConfig
from tests.test_cache_common import one_torch_thread, plain_attention, random_kv, tiny_model  # noqa: F401

HQ, HKV, DIM, TILE = 8, 2, 64, 32
# Ceilings on non-view ops per layer and decode step, kernels excluded (measured: 8 with every row
# at one tail offset, 10 with rows at different offsets; 19 / 23 when tails fill). Generous on
# purpose: the guard is against per-step work growing back, not against one more op.
PLAIN_STEP_OPS = 14
COMPLETING_STEP_OPS = 32


class FakeAttention:
    layer_idx = 0


def _inputs(gen, batch, length, dtype):
    return (
        random_kv((batch, HQ, length, DIM), dtype, outliers=False, generator=gen),
        random_kv((batch, HKV, length, DIM), dtype, generator=gen),
        random_kv((batch, HKV, length, DIM), dtype, generator=gen),
    )


def _decode_counts(quant: str, dtype, padded_rows: int, steps: int = 2 * TILE + 3, batch: int = 3):
    """Prefill (row r left-padded by 7*r when ``padded_rows``), one warm-up step, then ``steps``
    counted decode steps; returns [(tail offsets before, counter)] and the layer."""
    gen = torch.Generator().manual_seed(0)
    layer = KVarNLayer(KVarNConfig.parse(quant, tile_size=TILE), 0, HKV, DIM)
    module = FakeAttention()
    prefill = 2 * TILE + 9
    valid = None
    if padded_rows:
        valid = torch.ones(batch, prefill, dtype=torch.bool)
        for r in range(1, min(batch, padded_rows + 1)):
            valid[r, : 7 * r] = False
    results = []
    with gpu_path_on_cpu("twin"):
        q, k, v = _inputs(gen, batch, prefill, dtype)
        layer.update(k, v)
        layer.attend(module, q, valid, DIM**-0.5)
        for step in range(steps + 1):
            q, k, v = _inputs(gen, batch, 1, dtype)
            before = list(layer._tail_len)
            with counting() as counter:
                layer.update(k, v)
                layer.attend(module, q, None, DIM**-0.5)
            if step:  # step 0 builds per-process rotation operands once
                results.append((before, counter))
    return results, layer


@pytest.mark.parametrize("quant", ["k4v2", "kivi:k2v2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("padded_rows", [0, 2])
def test_decode_steps_never_sync_and_stay_small(quant, dtype, padded_rows):
    results, layer = _decode_counts(quant, dtype, padded_rows)
    completing = 0
    for before, c in results:
        assert c.syncs == [], f"host sync on the decode path: {c.syncs}"
        assert c.uploads == 0, "a tensor was built from host data on the decode path"
        assert c.kernels["decode_attention"] == 1
        fills = sum(1 for t in before if t + 1 == TILE)
        if fills:
            completing += 1
            assert c.kernels["compress_tiles"] >= 1
            assert sum(c.ops.values()) <= COMPLETING_STEP_OPS, dict(c.ops)
        else:
            assert c.kernels["compress_tiles"] == 0
            assert sum(c.ops.values()) <= PLAIN_STEP_OPS, dict(c.ops)
    assert completing >= 2  # the steps crossed tile boundaries (every row, or row by row)
    offsets = {t for t in layer._tail_len}
    assert (len(offsets) > 1) == bool(padded_rows)  # padded rows really sit at other offsets


def test_decode_step_is_the_path_taken(monkeypatch):
    """Full sinks and all-real tokens take the decode step; filling a sink takes the general
    commit (which may synchronize): the counting test above is about the right path."""
    calls = {"decode": 0, "general": 0}
    decode, general = KVarNLayer._decode_step, KVarNLayer._commit

    def counting_decode(self, *a, **k):
        calls["decode"] += 1
        return decode(self, *a, **k)

    def counting_general(self, *a, **k):
        calls["general"] += 1
        return general(self, *a, **k)

    monkeypatch.setattr(KVarNLayer, "_decode_step", counting_decode)
    monkeypatch.setattr(KVarNLayer, "_commit", counting_general)
    results, _ = _decode_counts("k4v2", torch.float32, padded_rows=2, steps=4)
    assert calls == {"decode": 5, "general": 1}
    gen = torch.Generator().manual_seed(1)
    layer, module = KVarNLayer(KVarNConfig.parse("k4v2", tile_size=TILE), 0, HKV, DIM), FakeAttention()
    for length in (5, 1, 1):  # the sink is not full yet: general commits
        q, k, v = _inputs(gen, 2, length, torch.float32)
        layer.update(k, v)
        layer.attend(module, q, None, DIM**-0.5)
    assert calls == {"decode": 5, "general": 4}


def _model_decode_counts(kind: str, mask: bool, steps: int = 6):
    model = tiny_model("llama", torch.bfloat16)
    if kind == "dynamic":
        model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
    else:
        cache = kvarn.cache_for(model, "k4v2", tile_size=TILE)
    batch, prefill = 2, TILE + 5
    ids = torch.randint(2, 200, (batch, prefill), generator=torch.Generator().manual_seed(0))
    att = torch.ones(batch, prefill, dtype=torch.long) if mask else None
    counters = []
    with gpu_path_on_cpu("twin"), torch.no_grad():
        out = model(input_ids=ids, attention_mask=att, past_key_values=cache, logits_to_keep=1)
        for step in range(steps + 1):
            token = out.logits[:, -1:].argmax(-1)
            if mask:
                att = torch.cat([att, torch.ones(batch, 1, dtype=torch.long)], dim=1)
            with counting() as counter:
                out = model(input_ids=token, attention_mask=att, past_key_values=cache, logits_to_keep=1)
            if step:
                counters.append(counter)
    return counters


@pytest.mark.parametrize("mask", [False, True])
def test_model_decode_forward_syncs_no_more_than_sdpa(mask):
    """A whole decode forward (2 layers): without a 2D mask no sync at all; with one, the single
    host read of the mask function per forward (transformers' sdpa path reads it once too)."""
    kvarn_counts = _model_decode_counts("kvarn", mask)
    dynamic_counts = _model_decode_counts("dynamic", mask)
    for c, d in zip(kvarn_counts, dynamic_counts, strict=True):
        assert c.uploads == 0
        assert len(c.syncs) == (1 if mask else 0), c.syncs
        assert len(c.syncs) <= max(1, len(d.syncs))


@pytest.mark.parametrize("kernel", ["chunked", "tc"])
def test_gpu_path_through_the_triton_kernels(kernel, monkeypatch):
    """The real kernel wrappers (interpreter) behind the cache: decode steps with rows at different
    offsets, each row completing its tile alone (row 0 at step 2, row 1 at step 7): the output equals float64 attention
    over what the cache stores (materialize) plus the new token, to float16 rounding; the codes
    equal the PyTorch codec's on the same tokens."""
    from kvarn.attention.triton import interpreting

    if not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest without CUDA)")
    monkeypatch.setenv("KVARN_DECODE_KERNEL", kernel)
    dtype, batch, dim, g = torch.float16, 2, 32, 32
    gen = torch.Generator().manual_seed(3)
    quant = KVarNConfig.parse("k4v2", tile_size=g)
    gpu, cpu = KVarNLayer(quant, 0, HKV, dim), KVarNLayer(quant, 0, HKV, dim)
    module = FakeAttention()
    prefill = 2 * g - 2  # row 0: sink + 30-token tail; row 1 (padded by 5): sink + 25
    valid = torch.ones(batch, prefill, dtype=torch.bool)
    valid[1, :5] = False
    worst = 0.0
    for step, length in enumerate([prefill] + [1] * 9):
        q = random_kv((batch, 4, length, dim), dtype, outliers=False, generator=gen)
        k = random_kv((batch, HKV, length, dim), dtype, generator=gen)
        v = random_kv((batch, HKV, length, dim), dtype, generator=gen)
        call_valid = valid if step == 0 else None
        if step:
            hist_k, hist_v = gpu.materialize()
            lengths = gpu.stored_lengths()
        with gpu_path_on_cpu("interpreter"):
            gpu.update(k, v)
            got = gpu.attend(module, q, call_valid, dim**-0.5)
        cpu.update(k, v)
        cpu.attend(module, q, call_valid, dim**-0.5)
        if not step:
            continue
        for b in range(batch):
            n = lengths[b]
            keys = torch.cat([hist_k[b, :, hist_k.shape[2] - n :], k[b]], dim=1)
            values = torch.cat([hist_v[b, :, hist_v.shape[2] - n :], v[b]], dim=1)
            allowed = torch.ones(1, n + 1, dtype=torch.bool)
            want = plain_attention(q[b], keys, values, allowed, dim**-0.5)  # [Hq, 1, D]
            err = (got[b].transpose(0, 1).double() - want).abs().max() / want.abs().max()
            worst = max(worst, float(err))
    assert worst < 4e-3  # float16 output rounding plus float16 stored history
    assert gpu._n_tiles == cpu._n_tiles == [1, 1] and gpu._tail_len == cpu._tail_len
    for name, tensor in gpu.store.tensors().items():
        ref = cpu.store.tensors()[name]
        for b, n in enumerate(gpu._n_tiles):
            if name.endswith("codes"):
                assert torch.equal(tensor[b, :, :n], ref[b, :, :n]), name
            else:
                torch.testing.assert_close(tensor[b, :, :n], ref[b, :, :n], rtol=1e-2, atol=1e-3)


def test_long_prefill_is_stored_in_bounded_windows(monkeypatch):
    """A prefill longer than the commit window stores exactly what small calls store, and the tail
    buffer never grows beyond a window plus two tiles (no 16-bit copy of the whole call)."""
    gen = torch.Generator().manual_seed(5)
    batch, length = 2, 7 * TILE + 11
    q, k, v = _inputs(gen, batch, length, torch.bfloat16)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, :13] = False
    quant = KVarNConfig.parse("k4v2", tile_size=TILE)

    def fill(window_pairs):
        monkeypatch.setattr(layer_module, "COMMIT_WINDOW_PAIRS", window_pairs)
        layer = KVarNLayer(quant, 0, HKV, DIM)
        peak = [0]
        reserve = layer._reserve_tail

        def recording_reserve(tokens):
            reserve(tokens)
            peak[0] = max(peak[0], layer._tail.shape[3])

        layer._reserve_tail = recording_reserve
        layer.update(k, v)
        layer.attend(FakeAttention(), q, valid, DIM**-0.5)
        return layer, peak[0]

    whole, whole_peak = fill(1 << 30)
    windowed, windowed_peak = fill(2 * TILE * batch * HKV)  # windows of 2 tiles
    assert whole_peak >= length - TILE and windowed_peak <= 4 * TILE
    assert whole._n_tiles == windowed._n_tiles and whole._tail_len == windowed._tail_len
    assert whole._sink_len == windowed._sink_len
    for name, tensor in whole.store.tensors().items():
        for b, n in enumerate(whole._n_tiles):
            assert torch.equal(tensor[b, :, :n], windowed.store.tensors()[name][b, :, :n]), name
    for b, t in enumerate(whole._tail_len):
        assert torch.equal(whole._tail[:, b, :, :t], windowed._tail[:, b, :, :t])
    assert torch.equal(whole._sink, windowed._sink)
    assert torch.equal(whole._counters, windowed._counters)


def test_counter_sees_every_kind_of_sync():
    """The guard above can fail: each way of reading device data on the host is detected."""
    x = torch.arange(6.0)
    probes = {
        "item": lambda: x.sum().item(),
        "bool": lambda: bool(x.any()),
        "int": lambda: int(x[2]),
        "tolist": lambda: x.tolist(),
        "nonzero": lambda: x.nonzero(),
        "mask index": lambda: x[x > 2],
        "repeat_interleave": lambda: torch.arange(2).repeat_interleave(torch.tensor([1, 2])),
        "numpy": lambda: x.numpy(),
    }
    for name, probe in probes.items():
        with counting() as c:
            probe()
        assert c.syncs, name
    with counting() as c:
        torch.tensor([1, 2, 3])
    assert c.uploads == 1 and not c.syncs
    with counting() as c:
        y = x[1:4].view(3, 1).transpose(0, 1)
        y + 1
        with c.paused():
            x.tolist()
    assert c.views == 3 and dict(c.ops) == {"add": 1} and not c.syncs

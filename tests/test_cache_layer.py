"""KVarNLayer without a model: attention equals plain attention over materialize() + new tokens,
storage equals kvarn.fake_quantize, padding/crop/beam edits, byte accounting, bad input."""

from __future__ import annotations

import pytest
import torch

from kvarn.cache import CacheUsageError, KVarNLayer
from kvarn.codec import tile_nbytes
from kvarn.config import PRESETS, KVarNConfig
from kvarn.fake_quant import fake_quantize
from tests.test_cache_common import (
    one_torch_thread,  # noqa: F401  (autouse fixture: one torch thread)
    plain_attention,
    random_kv,
)

HQ, HKV, DIM, TILE = 4, 2, 64, 32
# Call lengths crossing tile boundaries mid-prefill (45, 20) and mid-decode (the 1-token call that
# brings row 0 to 96 tokens completes a tile); row 1 is left-padded by 6 in the first call.
CALLS = (45, 20, 1, 1, 1, 27, 1, 1, 3)
PAD_ROW1 = 6


class FakeAttention:
    """Stands in for a transformers attention module (the layer only keeps a weak reference)."""

    layer_idx = 0


def run_call(layer, module, q, k, v, valid=None, scaling=DIM**-0.5):
    layer.update(k, v)
    return layer.attend(module, q, valid, scaling).transpose(1, 2)  # [B, Hq, L, D]


def outlier_kv(batch, length, gen, dtype=torch.float32):
    """Keys, then values, ``[batch, HKV, length, DIM]`` with real K/V's outliers (``random_kv``)."""
    return (
        random_kv((batch, HKV, length, DIM), dtype, generator=gen),
        random_kv((batch, HKV, length, DIM), dtype, generator=gen),
    )


def randn_kv(batch, length, dtype=torch.float32, heads=HKV):
    """Plain normal keys and values ``[batch, heads, length, DIM]`` (no outliers: for storage and error tests)."""
    return (
        torch.randn(batch, heads, length, DIM, dtype=dtype),
        torch.randn(batch, heads, length, DIM, dtype=dtype),
    )


def store_call(layer, batch, length, valid=None, module=None):
    """One call of zero queries over ``randn_kv`` tokens, for tests of what the layer stores."""
    module = module or FakeAttention()
    return run_call(layer, module, torch.zeros(batch, HQ, length, DIM), *randn_kv(batch, length), valid)


def expected_call(layer, q, k, v, valid, scaling=DIM**-0.5):
    """Plain float64 attention over the layer's materialized history + this call's real tokens."""
    batch, _, length, _ = q.shape
    if layer.is_initialized:
        hist_k, hist_v = layer.materialize()
        lengths = layer.stored_lengths()
    else:
        hist_k = hist_v = torch.zeros(batch, HKV, 0, DIM)
        lengths = [0] * batch
    out = []
    for b in range(batch):
        real = valid[b] if valid is not None else torch.ones(length, dtype=torch.bool)
        n_hist = lengths[b]
        keys = torch.cat([hist_k[b, :, hist_k.shape[2] - n_hist :].double(), k[b][:, real].double()], dim=1)
        values = torch.cat([hist_v[b, :, hist_v.shape[2] - n_hist :].double(), v[b][:, real].double()], dim=1)
        allowed = torch.zeros(length, keys.shape[1], dtype=torch.bool)
        allowed[:, :n_hist] = True
        pos = torch.cumsum(real.long(), 0) - 1
        for i in range(length):
            allowed[i, n_hist + pos[: i + 1][real[: i + 1]]] = True
        out.append((plain_attention(q[b], keys, values, allowed, scaling), real))
    return out


TOL = {torch.float64: 1e-9, torch.float32: 3e-5, torch.bfloat16: 4e-2}


def check_sequence(quant, dtype, calls=CALLS, pad_row1=PAD_ROW1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layer = KVarNLayer(quant, 0, HKV, DIM)
    module = FakeAttention()
    for step, length in enumerate(calls):
        q = random_kv((2, HQ, length, DIM), dtype, outliers=False, generator=gen)
        k, v = outlier_kv(2, length, gen, dtype)
        valid = None
        if step == 0 and pad_row1:
            valid = torch.ones(2, length, dtype=torch.bool)
            valid[1, :pad_row1] = False
        want = expected_call(layer, q, k, v, valid)
        got = run_call(layer, module, q, k, v, valid)
        assert got.dtype == dtype
        for b, (w, real) in enumerate(want):
            scale = float(w[:, real].abs().max())
            torch.testing.assert_close(
                got[b][:, real].double(), w[:, real], rtol=TOL[dtype], atol=TOL[dtype] * scale
            )
    total = sum(calls)
    assert layer.stored_lengths() == [total, total - pad_row1]
    assert layer.get_seq_length() == total
    return layer


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_attention_equals_plain_attention_over_materialize_float64(preset):
    layer = check_sequence(KVarNConfig.from_preset(preset, tile_size=TILE), torch.float64)
    assert layer._n_tiles == [(sum(CALLS) - TILE) // TILE, (sum(CALLS) - PAD_ROW1 - TILE) // TILE]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["kvarn", "kivi", "hadamard_rtn", "varn_norot"])
def test_attention_equals_plain_attention_over_materialize(method, dtype):
    check_sequence(KVarNConfig.parse(f"{method}:k4v2", tile_size=TILE), dtype, seed=1)


def test_attention_without_sink_and_other_tile_size():
    quant = KVarNConfig.from_preset("k4v2", tile_size=64, keep_sink_tile=False)
    layer = check_sequence(quant, torch.float64, calls=(70, 1, 57, 1, 2), seed=2)
    assert layer._sink_len == [0, 0]
    assert layer._n_tiles == [2, 1]


def test_no_padding_prefill_is_exactly_the_16bit_prefill():
    """An empty cache and no padding: the output is torch sdpa over the call's own K/V, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    q = random_kv((1, HQ, 70, DIM), generator=gen)
    k, v = outlier_kv(1, 70, gen)
    layer = KVarNLayer(KVarNConfig.from_preset("k2v2", tile_size=TILE), 0, HKV, DIM)
    got = run_call(layer, FakeAttention(), q, k, v)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True, scale=DIM**-0.5
    )
    assert torch.equal(got, want)


def feed(layer, keys, values, chunks, module=None):
    module = module or FakeAttention()
    start = 0
    for n in chunks:
        sl = slice(start, start + n)
        run_call(
            layer,
            module,
            torch.zeros(keys.shape[0], HQ, n, DIM, dtype=keys.dtype),
            keys[:, :, sl],
            values[:, :, sl],
        )
        start += n
    assert start == keys.shape[2]


@pytest.mark.parametrize("method", ["kivi", "varn_norot", "kvarn"])
def test_storage_matches_fake_quantize_for_any_chunking(method):
    quant = KVarNConfig.parse(f"{method}:k4v2", tile_size=TILE)
    gen = torch.Generator().manual_seed(4)
    keys, values = outlier_kv(2, 103, gen)
    want_k, want_v = fake_quantize(keys, values, quant)
    stores = []
    for chunks in ([103], [37, 1, 65], [31, 2, 1, 1, 68], [1] * 40 + [63]):
        layer = KVarNLayer(quant, 0, HKV, DIM)
        feed(layer, keys, values, chunks)
        got_k, got_v = layer.materialize()
        if quant.rotate:
            # The cache rotates with the (equal) dense Hadamard matrix, fake_quantize with the
            # butterfly: rounding differs by ~1e-7, which can flip a code at a rounding boundary.
            for got, want in ((got_k, want_k), (got_v, want_v)):
                close = torch.isclose(got, want, rtol=1e-4, atol=1e-4)
                assert close.float().mean() > 0.995
        else:
            torch.testing.assert_close(got_k, want_k, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got_v, want_v, rtol=1e-6, atol=1e-6)
        stores.append(layer)
    # every chunking stores bit-identical tiles: each tile is quantized once from the same tokens
    first = stores[0].store.tensors()
    for other in stores[1:]:
        for name, tensor in other.store.tensors().items():
            n = stores[0]._n_tiles[0]
            assert torch.equal(tensor[:, :, :n], first[name][:, :, :n]), name
        assert torch.equal(other.tail_k, stores[0].tail_k)
        assert torch.equal(other.sink_v, stores[0].sink_v)


def test_left_padded_row_is_stored_as_if_alone():
    quant = KVarNConfig.from_preset("k4v2", tile_size=TILE)
    gen = torch.Generator().manual_seed(5)
    keys, values = outlier_kv(2, 80, gen)
    pad = 11
    batched = KVarNLayer(quant, 0, HKV, DIM)
    valid = torch.ones(2, 80, dtype=torch.bool)
    valid[1, :pad] = False
    module = FakeAttention()
    run_call(batched, module, torch.zeros(2, HQ, 80, DIM), keys, values, valid)
    nxt_k, nxt_v = outlier_kv(2, 30, gen)
    run_call(batched, module, torch.zeros(2, HQ, 30, DIM), nxt_k, nxt_v)

    alone = KVarNLayer(quant, 0, HKV, DIM)
    run_call(alone, module, torch.zeros(1, HQ, 80 - pad, DIM), keys[1:, :, pad:], values[1:, :, pad:])
    run_call(alone, module, torch.zeros(1, HQ, 30, DIM), nxt_k[1:], nxt_v[1:])
    assert batched.stored_lengths()[1] == alone.stored_lengths()[0] == 80 - pad + 30
    n = alone._n_tiles[0]
    assert batched._n_tiles[1] == n and n >= 1
    for name, tensor in alone.store.tensors().items():
        assert torch.equal(batched.store.tensors()[name][1:, :, :n], tensor[:, :, :n]), name
    t = alone._tail_len[0]
    assert torch.equal(batched.tail_k[1:, :, :t], alone.tail_k[:, :, :t])
    assert torch.equal(batched.sink_k[1:], alone.sink_k)


def test_crop_returns_to_the_prefix_and_keeps_working():
    quant = KVarNConfig.from_preset("k4v2", tile_size=TILE)
    gen = torch.Generator().manual_seed(6)
    keys, values = outlier_kv(2, 100, gen)
    layer = KVarNLayer(quant, 0, HKV, DIM)
    module = FakeAttention()
    feed(layer, keys, values, [90, 1, 1, 8], module)
    full_k, full_v = layer.materialize()
    layer.crop(-7)  # 100 -> 93: back into the tile 64..95, which returns to the tail
    assert layer.get_seq_length() == 93 and layer._n_tiles == [1, 1] and layer._tail_len == [29, 29]
    k, v = layer.materialize()
    torch.testing.assert_close(k, full_k[:, :, :93], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v, full_v[:, :, :93], rtol=1e-6, atol=1e-6)
    layer.crop(80)  # legacy form: keep 80 positions
    assert layer.get_seq_length() == 80
    torch.testing.assert_close(layer.materialize()[0], full_k[:, :, :80], rtol=1e-6, atol=1e-6)
    layer.crop(-60)  # into the 16-bit sink
    assert layer._sink_len == [20, 20] and layer._n_tiles == [0, 0]
    torch.testing.assert_close(layer.materialize()[1], full_v[:, :, :20], rtol=0, atol=0)
    layer.crop(0)
    assert layer.get_seq_length() == 20
    # keeps attending exactly afterwards
    q = random_kv((2, HQ, 50, DIM), outliers=False, generator=gen)
    k_new, v_new = outlier_kv(2, 50, gen)
    want = expected_call(layer, q, k_new, v_new, None)
    got = run_call(layer, module, q, k_new, v_new)
    for b in range(2):
        torch.testing.assert_close(
            got[b].double(), want[b][0], rtol=1e-4, atol=1e-4 * float(want[b][0].abs().max())
        )


def test_crop_refuses_to_remove_padding():
    layer = KVarNLayer(KVarNConfig.from_preset("k4v2", tile_size=TILE), 0, HKV, DIM)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :4] = False
    store_call(layer, 2, 10, valid)
    with pytest.raises(CacheUsageError, match="padding"):
        layer.crop(-8)


def test_beam_reorder_select_and_repeat():
    quant = KVarNConfig.from_preset("k4v2", tile_size=TILE)
    gen = torch.Generator().manual_seed(7)
    keys, values = outlier_kv(3, 70, gen)
    layer = KVarNLayer(quant, 0, HKV, DIM)
    module = FakeAttention()
    feed(layer, keys, values, [70], module)
    full_k, full_v = layer.materialize()
    layer.reorder_cache(torch.tensor([2, 0, 0]))
    torch.testing.assert_close(layer.materialize()[0], full_k[[2, 0, 0]])
    layer.batch_select_indices(torch.tensor([True, False, True]))
    torch.testing.assert_close(layer.materialize()[1], full_v[[2, 0]])
    layer.batch_repeat_interleave(2)
    assert layer.batch == 4
    torch.testing.assert_close(layer.materialize()[0], full_k[[2, 2, 0, 0]])
    # the edited layer keeps accepting tokens for the new batch size
    feed(layer, *randn_kv(4, 40), [40], module)
    assert layer.stored_lengths() == [110] * 4


@pytest.mark.parametrize("preset", ["k4v2", "k2v2", "k8v8"])
def test_nbytes_matches_stored_tensors(preset):
    quant = KVarNConfig.from_preset(preset, tile_size=TILE)
    layer = KVarNLayer(quant, 0, HKV, DIM)
    valid = torch.ones(2, 100, dtype=torch.bool)
    valid[0, :3] = False
    store_call(layer, 2, 100, valid)
    nb = layer.nbytes()
    # count the bytes of the valid slots directly from the tensors
    codes = metadata = 0
    for b, n in enumerate(layer._n_tiles):
        for name, tensor in layer.store.tensors().items():
            part = tensor[b, :, :n]
            size = part.numel() * part.element_size()
            if name.endswith("codes"):
                codes += size
            else:
                metadata += size
    assert nb["codes"] == codes and nb["metadata"] == metadata
    assert nb["codes"] + nb["metadata"] == sum(layer._n_tiles) * HKV * tile_nbytes(quant, DIM)
    per_token = 2 * HKV * DIM * 4
    assert nb["sink"] == sum(layer._sink_len) * per_token == (TILE + TILE) * per_token
    assert nb["tail"] == sum(layer._tail_len) * per_token
    allocated = sum(t.numel() * t.element_size() for t in layer.store.tensors().values())
    allocated += 4 * layer.sink_k.numel() * 4
    assert nb["allocated"] == allocated


def test_bad_inputs_raise_clear_errors():
    quant = KVarNConfig.from_preset("k4v2", tile_size=TILE)
    layer = KVarNLayer(quant, 0, HKV, DIM)
    module = FakeAttention()
    store_call(layer, 1, 3, module=module)
    with pytest.raises(CacheUsageError, match="dtype changed"):
        layer.update(*randn_kv(1, 1, torch.float64))
    with pytest.raises(CacheUsageError, match="batch size changed"):
        layer.update(*randn_kv(2, 1))
    with pytest.raises(CacheUsageError, match="another model config"):
        layer.update(*randn_kv(1, 1, heads=3))
    with pytest.raises(CacheUsageError, match="another model"):
        store_call(layer, 1, 1, module=FakeAttention())  # not the module of the first call
    layer.update(*randn_kv(1, 1))
    with pytest.raises(CacheUsageError, match="never attended"):
        layer.update(*randn_kv(1, 1))
    with pytest.raises(CacheUsageError, match="without a preceding update"):
        layer.attend(module, torch.zeros(1, HQ, 1, DIM), None, 1.0)
    layer.reset()
    assert not layer.is_initialized and layer.get_seq_length() == 0
    store_call(layer, 2, 3)
    assert layer.stored_lengths() == [3, 3]


@pytest.mark.parametrize("when", ["before", "after"])
def test_reserve_preallocates_exactly_and_changes_nothing_else(when):
    """reserve(tokens) sizes the tile store to exactly the tiles of a row of that length (sink
    kept), before the first update or after it; decoding up to that length never grows it, and
    attention and storage equal an unreserved layer's."""
    quant = KVarNConfig.parse("k4v2", tile_size=TILE)
    total = sum(CALLS) + 10 * TILE  # room for a longer decode than this test runs
    want_tiles = (total - TILE) // TILE
    reserved = KVarNLayer(quant, 0, HKV, DIM)
    plain = KVarNLayer(quant, 0, HKV, DIM)
    if when == "before":
        reserved.reserve(total)
    gen = torch.Generator().manual_seed(5)
    module = FakeAttention()
    for step, length in enumerate(CALLS):
        q = random_kv((2, HQ, length, DIM), torch.float32, outliers=False, generator=gen)
        k, v = outlier_kv(2, length, gen)
        if step == 1 and when == "after":
            reserved.reserve(total)
        if reserved.store is not None and (when == "before" or step >= 1):
            assert reserved.store.capacity == want_tiles
        torch.testing.assert_close(run_call(reserved, module, q, k, v), run_call(plain, module, q, k, v))
    assert reserved.store.capacity == want_tiles
    assert plain.store.capacity < want_tiles  # unreserved: grown only as far as needed so far
    for a, b in zip(reserved.materialize(), plain.materialize(), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="token count"):
        reserved.reserve(-1)

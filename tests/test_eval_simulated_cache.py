"""The evaluation cache against its obviously-correct twin: ``fake_quantize`` over the whole sequence."""

from __future__ import annotations

import pytest
import torch

from kvarn.config import METHODS, KVarNConfig
from kvarn.eval.simulated_cache import SimulatedQuantizedCache, SimulatedQuantizedLayer
from kvarn.fake_quant import fake_quantize

ALL_METHODS = sorted(METHODS)


def random_kv(batch: int, heads: int, tokens: int, dim: int, dtype: torch.dtype, seed: int):
    """Keys/values with heavy outlier channels and tokens (what real K caches look like)."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, heads, tokens, dim, generator=gen)
    v = torch.randn(batch, heads, tokens, dim, generator=gen)
    k[..., 3] *= 20.0  # outlier channel
    if tokens > 5:
        v[:, :, 5] *= 15.0  # outlier token
    return k.to(dtype), v.to(dtype)


def feed(layer: SimulatedQuantizedLayer, k: torch.Tensor, v: torch.Tensor, steps: list[int]):
    """Append k/v in pieces of the given sizes; returns what the last update handed to attention."""
    out, pos = None, 0
    for n in steps:
        out = layer.update(k[:, :, pos : pos + n], v[:, :, pos : pos + n])
        pos += n
    assert pos == k.shape[2]
    return out


def pieces(total: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    out, left = [], total
    while left:
        n = min(left, int(torch.randint(1, 80, (1,), generator=gen)))
        out.append(n)
        left -= n
    return out


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("keep_sink", [True, False])
def test_tile_by_tile_equals_fake_quantize_of_the_whole_sequence(method, keep_sink):
    config = KVarNConfig.parse(method, tile_size=32, keep_sink_tile=keep_sink)
    k, v = random_kv(2, 3, 171, 64, torch.float32, seed=len(method) + keep_sink)
    layer = SimulatedQuantizedLayer(config)
    feed(layer, k, v, pieces(171, seed=7))
    layer.quantize_completed_tiles()  # "decode" timing defers the last completed tile to the next update
    k_ref, v_ref = fake_quantize(k, v, config)
    torch.testing.assert_close(layer.keys, k_ref, rtol=0, atol=0)
    torch.testing.assert_close(layer.values, v_ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["kvarn", "kivi", "per_token_rtn", "fp8_e4m3"])
def test_dtypes_and_odd_head_dim(dtype, method):
    config = KVarNConfig.parse(method, tile_size=32)
    k, v = random_kv(1, 2, 100, 48, dtype, seed=3)  # head_dim 48: not a power of two
    layer = SimulatedQuantizedLayer(config)
    feed(layer, k, v, [33, 1, 30, 36])
    layer.quantize_completed_tiles()
    k_ref, v_ref = fake_quantize(k, v, config)
    assert layer.keys.dtype == dtype
    torch.testing.assert_close(layer.keys, k_ref, rtol=0, atol=0)
    torch.testing.assert_close(layer.values, v_ref, rtol=0, atol=0)


def test_decode_timing_shows_the_filling_chunk_its_own_tile_in_16_bits():
    config = KVarNConfig.parse("kivi:k2v2", tile_size=32, keep_sink_tile=False)
    k, v = random_kv(1, 2, 64, 32, torch.float32, seed=1)
    layer = SimulatedQuantizedLayer(config, timing="decode")
    keys, _ = layer.update(k[:, :, :32], v[:, :, :32])
    torch.testing.assert_close(keys, k[:, :, :32], rtol=0, atol=0)  # the filling chunk reads exact keys
    keys, _ = layer.update(k[:, :, 32:33], v[:, :, 32:33])
    k_ref, _ = fake_quantize(k[:, :, :33], v[:, :, :33], config)
    torch.testing.assert_close(keys, k_ref, rtol=0, atol=0)  # the next token reads the tile quantized
    assert not torch.equal(keys[:, :, :32], k[:, :, :32])


def test_eager_timing_quantizes_before_attention():
    config = KVarNConfig.parse("kivi:k2v2", tile_size=32, keep_sink_tile=False)
    k, v = random_kv(1, 2, 32, 32, torch.float32, seed=2)
    layer = SimulatedQuantizedLayer(config, timing="eager")
    keys, values = layer.update(k, v)
    k_ref, v_ref = fake_quantize(k, v, config)
    torch.testing.assert_close(keys, k_ref, rtol=0, atol=0)
    torch.testing.assert_close(values, v_ref, rtol=0, atol=0)


def test_tensors_handed_to_attention_are_never_mutated():
    config = KVarNConfig.parse("kvarn:k2v2", tile_size=32)
    k, v = random_kv(1, 2, 96, 32, torch.float32, seed=4)
    layer = SimulatedQuantizedLayer(config)
    first_keys, _ = layer.update(k[:, :, :64], v[:, :, :64])
    snapshot = first_keys.clone()
    layer.update(k[:, :, 64:], v[:, :, 64:])  # quantizes tile 1 in the layer's tensors
    assert torch.equal(first_keys, snapshot)


def test_none_is_the_identity():
    config = KVarNConfig(method="none", tile_size=32)
    k, v = random_kv(1, 3, 130, 64, torch.float32, seed=5)
    layer = SimulatedQuantizedLayer(config)
    feed(layer, k, v, [64, 66])
    layer.quantize_completed_tiles()
    assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)


def test_per_row_configs_equal_separate_single_config_layers():
    configs = [KVarNConfig.parse(m, tile_size=32) for m in ("none", "kvarn:k2v2", "kivi:k4v2", "fp8_e4m3")]
    k, v = random_kv(1, 2, 150, 64, torch.float32, seed=6)
    batch_layer = SimulatedQuantizedLayer(configs)
    rows = len(configs)
    feed(batch_layer, k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1), [40, 40, 70])
    batch_layer.quantize_completed_tiles()
    for b, config in enumerate(configs):
        single = SimulatedQuantizedLayer(config)
        feed(single, k, v, [40, 40, 70])
        single.quantize_completed_tiles()
        torch.testing.assert_close(batch_layer.keys[b : b + 1], single.keys, rtol=0, atol=0)
        torch.testing.assert_close(batch_layer.values[b : b + 1], single.values, rtol=0, atol=0)


def test_per_row_configs_must_match_the_batch():
    layer = SimulatedQuantizedLayer([KVarNConfig(), KVarNConfig(method="kivi")])
    k, v = random_kv(3, 1, 8, 32, torch.float32, seed=0)
    with pytest.raises(ValueError, match="2 per-row configs but the batch has 3 rows"):
        layer.update(k, v)


def test_from_prefill_quantizes_like_fake_quantize_and_continues_tile_by_tile():
    config = KVarNConfig.parse("kvarn:k4v2", tile_size=32)
    k, v = random_kv(1, 2, 200, 64, torch.float32, seed=8)
    cache = SimulatedQuantizedCache.from_prefill([(k[:, :, :100], v[:, :, :100])], config)
    k_ref, v_ref = fake_quantize(k[:, :, :100], v[:, :, :100], config)
    torch.testing.assert_close(cache.layers[0].keys, k_ref, rtol=0, atol=0)
    cache.update(k[:, :, 100:], v[:, :, 100:], 0)
    cache.layers[0].quantize_completed_tiles()
    k_all, v_all = fake_quantize(k, v, config)
    torch.testing.assert_close(cache.layers[0].keys, k_all, rtol=0, atol=0)
    torch.testing.assert_close(cache.layers[0].values, v_all, rtol=0, atol=0)
    assert cache.quantized_token_count() == 192 - 32


def test_cache_reports_its_length_to_the_model():
    config = KVarNConfig.parse("kivi:k2v2", tile_size=32)
    cache = SimulatedQuantizedCache(config)
    k, v = random_kv(1, 2, 40, 32, torch.float32, seed=9)
    for layer in range(3):
        cache.update(k, v, layer)
    assert cache.get_seq_length() == 40 and len(cache.layers) == 3
    assert "kivi:k2v2/g32" in repr(cache)

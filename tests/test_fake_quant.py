"""fake_quantize: what the cache holds, as dense tensors, for every method."""

from __future__ import annotations

import pytest
import torch

from kvarn import METHODS, KVarNConfig, fake_quantize, fake_quantize_tiles
from kvarn.codec import decode_tiles, encode_tiles
from kvarn.method.hadamard import hadamard_transform


def _kv(b=2, h=3, t=150, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, t, d, generator=g) * 2
    k[..., 3] += 15  # an outlier channel, as real keys have
    v = torch.randn(b, h, t, d, generator=g)
    return k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sink_and_tail_are_kept_and_the_rest_quantized(method, dtype):
    cfg = KVarNConfig(tile_size=32, method=method)
    k, v = _kv(t=32 * 4 + 7, dtype=dtype)
    k_hat, v_hat = fake_quantize(k, v, cfg)
    assert k_hat.dtype == dtype and k_hat.shape == k.shape
    assert torch.equal(k_hat[:, :, :32], k[:, :, :32]) and torch.equal(v_hat[:, :, :32], v[:, :, :32])
    assert torch.equal(k_hat[:, :, 128:], k[:, :, 128:]) and torch.equal(v_hat[:, :, 128:], v[:, :, 128:])
    mid_k, mid_v = fake_quantize_tiles(k[:, :, 32:128], v[:, :, 32:128], cfg)
    assert torch.equal(k_hat[:, :, 32:128], mid_k) and torch.equal(v_hat[:, :, 32:128], mid_v)
    err = (k_hat.float() - k.float()).norm() / k.float().norm()
    assert (err == 0) == (method == "none")
    assert err < 0.3


def test_sink_off_quantizes_the_first_tile():
    k, v = _kv(t=64)
    k_hat, _ = fake_quantize(k, v, KVarNConfig(tile_size=32, keep_sink_tile=False))
    assert not torch.equal(k_hat[:, :, :32], k[:, :, :32])


def test_tile_method_equals_rotate_encode_decode_unrotate():
    k, v = _kv(b=1, h=2, t=64)
    cfg = KVarNConfig(tile_size=32, keep_sink_tile=False)
    k_hat, v_hat = fake_quantize(k, v, cfg)
    kr = hadamard_transform(k).reshape(1, 2, 2, 32, 64)
    vr = hadamard_transform(v).reshape(1, 2, 2, 32, 64)
    dk, dv = decode_tiles(encode_tiles(kr, vr, cfg))
    torch.testing.assert_close(k_hat, hadamard_transform(dk.reshape(1, 2, 64, 64)))
    torch.testing.assert_close(v_hat, hadamard_transform(dv.reshape(1, 2, 64, 64)))


def test_kvarn_beats_kivi_on_keys_with_outlier_tokens():
    # Wrong token scales are what the method fixes: a few tokens 30x larger than the rest.
    k, v = _kv(b=1, h=4, t=512, d=128, seed=5)
    k[:, :, ::37] *= 30
    errs = {}
    for m in ("kvarn", "kivi"):
        k_hat, _ = fake_quantize(k, v, KVarNConfig(method=m, key_bits=2, value_bits=2, keep_sink_tile=False))
        errs[m] = float((k_hat - k).norm() / k.norm())
    assert errs["kvarn"] < errs["kivi"], errs


def test_short_sequences_are_untouched_and_bad_tiles_refused():
    k, v = _kv(t=31)
    k_hat, v_hat = fake_quantize(k, v, KVarNConfig(tile_size=32, keep_sink_tile=False))
    assert torch.equal(k_hat, k) and torch.equal(v_hat, v)
    with pytest.raises(ValueError, match="multiple of tile_size"):
        fake_quantize_tiles(k, v, KVarNConfig(tile_size=32))
    k_hat, _ = fake_quantize(k, v, "kivi:k2v2")  # spec strings are accepted
    assert torch.equal(k_hat, k)

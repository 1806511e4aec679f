"""Bad input gets a clear error naming the problem, or an exact documented result."""

from __future__ import annotations

import pytest
import torch

from kvarn import ConfigError, KVarNConfig, decode_tiles, encode_tiles, fake_quantize
from kvarn.method.hadamard import hadamard_transform
from kvarn.method.packing import pack_codes, unpack_codes

CFG = KVarNConfig(tile_size=32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_in_a_tile_is_rejected(bad):
    k = torch.randn(2, 32, 64)
    k[1, 3, 5] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        encode_tiles(k, torch.randn(2, 32, 64), CFG)
    with pytest.raises(ValueError, match="NaN/Inf"):
        fake_quantize(torch.randn(1, 1, 64, 64), k.reshape(1, 1, 64, 64), CFG)


@pytest.mark.parametrize("method", ["kvarn", "kivi", "hadamard_rtn", "varn_norot"])
@pytest.mark.parametrize("metadata", ["float32", "bfloat16"])
def test_zero_and_constant_tiles_reconstruct_exactly(method, metadata):
    cfg = KVarNConfig(tile_size=32, method=method, metadata_dtype=metadata)
    zeros = torch.zeros(1, 32, 64)
    k_hat, v_hat = decode_tiles(encode_tiles(zeros, zeros, cfg))
    assert torch.equal(k_hat, zeros) and torch.equal(v_hat, zeros)
    const = torch.full((1, 32, 64), 0.75)  # exactly representable: scales collapse to powers of e
    k_hat, v_hat = decode_tiles(encode_tiles(const, const, cfg))
    assert torch.isfinite(k_hat).all() and torch.isfinite(v_hat).all()
    tol = 1e-6 if metadata == "float32" else 2**-7  # documented: exact up to metadata rounding
    torch.testing.assert_close(k_hat, const, rtol=tol, atol=0)
    torch.testing.assert_close(v_hat, const, rtol=tol, atol=0)


def test_constant_rows_and_columns_stay_finite_and_exact_in_rtn():
    k = torch.randn(3, 32, 64)
    k[0, :, 7] = 2.5  # a constant key channel
    k[1, 4, :] = -1.0  # a constant value/key token
    k[2] = 0.0
    cfg = KVarNConfig(tile_size=32, method="kivi", metadata_dtype="float32")
    k_hat, v_hat = decode_tiles(encode_tiles(k, k, cfg))
    assert torch.isfinite(k_hat).all() and torch.isfinite(v_hat).all()
    assert torch.equal(k_hat[0, :, 7], k[0, :, 7])  # constant key row (channel) is exact
    assert torch.equal(v_hat[1, 4, :], k[1, 4, :])  # constant value row (token) is exact
    k_hat, v_hat = decode_tiles(encode_tiles(k, k, KVarNConfig(tile_size=32)))
    assert torch.isfinite(k_hat).all() and torch.isfinite(v_hat).all()


def test_empty_batch_gives_empty_result():
    q = encode_tiles(torch.zeros(0, 32, 64), torch.zeros(0, 32, 64), CFG)
    k, v = decode_tiles(q)
    assert k.shape == (0, 32, 64) and v.shape == (0, 32, 64) and q.nbytes() == 0
    k, v = fake_quantize(torch.zeros(1, 2, 0, 64), torch.zeros(1, 2, 0, 64), CFG)
    assert k.shape == (1, 2, 0, 64)


def test_wrong_shapes_and_dtypes_are_named():
    with pytest.raises(ValueError, match="tile_size is 32"):
        encode_tiles(torch.randn(2, 16, 64), torch.randn(2, 16, 64), CFG)
    with pytest.raises(ValueError, match="differ in shape"):
        encode_tiles(torch.randn(2, 32, 64), torch.randn(3, 32, 64), CFG)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        encode_tiles(torch.ones(2, 32, 64, dtype=torch.long), torch.ones(2, 32, 64, dtype=torch.long), CFG)
    with pytest.raises(ValueError, match="4 dims"):
        fake_quantize(torch.randn(2, 64, 64), torch.randn(2, 64, 64), CFG)
    with pytest.raises(ValueError, match="must share"):
        fake_quantize(torch.randn(1, 2, 64, 64), torch.randn(1, 2, 65, 64), CFG)
    with pytest.raises(TypeError, match="share a dtype"):
        fake_quantize(torch.randn(1, 2, 64, 64), torch.randn(1, 2, 64, 64).half(), CFG)
    with pytest.raises(TypeError, match="uint8"):
        pack_codes(torch.zeros(8, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="multiple of"):
        pack_codes(torch.zeros(6, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="expected 9"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, 9)
    with pytest.raises(TypeError, match="floating-point"):
        hadamard_transform(torch.ones(4, dtype=torch.int32))


def test_unsupported_head_dim_is_named():
    with pytest.raises(ValueError, match="head_dim=60"):
        encode_tiles(torch.randn(1, 32, 60), torch.randn(1, 32, 60), CFG)
    with pytest.raises(ValueError, match="head_dim=60"):
        fake_quantize(torch.randn(1, 1, 64, 60), torch.randn(1, 1, 64, 60), CFG)


def test_non_tile_methods_are_refused_by_the_codec():
    with pytest.raises(ValueError, match="not a tile method"):
        encode_tiles(
            torch.randn(1, 32, 64), torch.randn(1, 32, 64), KVarNConfig(tile_size=32, method="fp8_e4m3")
        )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"key_bits": 5}, "key_bits"),
        ({"value_bits": 1}, "value_bits"),
        ({"tile_size": 100}, "tile_size"),
        ({"iterations": -1}, "iterations"),
        ({"method": "quarot"}, "method"),
        ({"metadata_dtype": "int8"}, "metadata_dtype"),
        ({"keep_sink_tile": "yes"}, "keep_sink_tile"),
    ],
)
def test_invalid_config_names_the_field_and_allowed_values(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        KVarNConfig(**kwargs)


def test_config_parsing_and_presets():
    assert KVarNConfig.parse("kivi:k2v2") == KVarNConfig(method="kivi", key_bits=2, value_bits=2)
    assert KVarNConfig.parse("k4v4") == KVarNConfig(key_bits=4, value_bits=4)
    assert KVarNConfig.parse("hadamard_rtn").key_bits == 4
    assert KVarNConfig.parse("kvarn:k3v2").name == "kvarn:k3v2"
    assert KVarNConfig(keep_sink_tile=False, tile_size=64).name == "kvarn:k4v2/g64+nosink"
    with pytest.raises(ConfigError, match="preset 'k5v5'"):
        KVarNConfig.parse("kvarn:k5v5")
    with pytest.raises(ConfigError, match="allowed"):
        KVarNConfig.parse("turbo:k4v2")

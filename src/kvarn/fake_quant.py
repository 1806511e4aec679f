"""Simulate the compact cache as dense tensors: the one-line research API.

``fake_quantize(keys, values, config)`` returns what a KVarN cache holding these tokens would give
back, in the original frame and dtype: the sink tile and the partial last tile unchanged, every
other complete tile quantized once with the configured method.
"""

from __future__ import annotations

import torch

from kvarn.codec import decode_tiles, encode_tiles
from kvarn.config import KVarNConfig
from kvarn.method.hadamard import hadamard_transform
from kvarn.method.pertoken import fp8_e4m3_per_token, per_token_rtn
from kvarn.validation import check_finite, check_float_tensor, check_head_dim


def _check_kv(keys: torch.Tensor, values: torch.Tensor) -> None:
    check_float_tensor("keys", keys, ndim=4)
    check_float_tensor("values", values, ndim=4)
    if keys.shape != values.shape:
        raise ValueError(
            f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must share "
            "[batch, kv_heads, tokens, head_dim]"
        )
    if keys.dtype != values.dtype:
        raise TypeError(f"keys ({keys.dtype}) and values ({values.dtype}) must share a dtype")
    check_head_dim("keys", keys.shape[-1])
    check_finite("keys", keys)
    check_finite("values", values)


def fake_quantize_tiles(
    keys: torch.Tensor, values: torch.Tensor, config: KVarNConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize-dequantize every tile of ``[B, H, T, D]`` keys/values (T a multiple of G).

    No sink or tail handling: every tile is quantized. Original frame and dtype.
    """
    _check_kv(keys, values)
    b, h, t, d = keys.shape
    g = config.tile_size
    if t % g:
        raise ValueError(
            f"fake_quantize_tiles needs whole tiles: {t} tokens is not a multiple of tile_size={g}"
        )
    family = config.family
    if family == "none" or t == 0:
        return keys.clone(), values.clone()
    if family == "token":
        k = per_token_rtn(keys, config.key_bits, config.metadata_dtype)
        v = per_token_rtn(values, config.value_bits, config.metadata_dtype)
        return k.to(keys.dtype), v.to(values.dtype)
    if family == "fp8":
        k = fp8_e4m3_per_token(keys, config.metadata_dtype)
        v = fp8_e4m3_per_token(values, config.metadata_dtype)
        return k.to(keys.dtype), v.to(values.dtype)
    # Tile methods: rotate, tile, encode + decode, un-rotate. The cache rotates in float64 and
    # stores rotated tokens in the model dtype; doing the same here makes the quantizer see the
    # very same values (a float32 rotation differs in the last bit and flips codes at ties).
    k, v = keys, values
    if config.rotate:
        k = hadamard_transform(keys.double()).to(keys.dtype)
        v = hadamard_transform(values.double()).to(values.dtype)
    k_hat, v_hat = decode_tiles(
        encode_tiles(k.reshape(b, h, t // g, g, d), v.reshape(b, h, t // g, g, d), config)
    )
    k_hat, v_hat = k_hat.reshape(b, h, t, d), v_hat.reshape(b, h, t, d)
    if config.rotate:
        k_hat, v_hat = hadamard_transform(k_hat), hadamard_transform(v_hat)
    return k_hat.to(keys.dtype), v_hat.to(values.dtype)


def quantized_span(num_tokens: int, config: KVarNConfig) -> tuple[int, int]:
    """Token range ``[start, end)`` that the cache holds quantized for a sequence of this length."""
    g = config.tile_size
    end = (num_tokens // g) * g
    start = g if config.keep_sink_tile else 0
    return (start, end) if end > start and config.family != "none" else (0, 0)


def fake_quantize(
    keys: torch.Tensor, values: torch.Tensor, config: KVarNConfig | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the cache holds for ``[batch, kv_heads, tokens, head_dim]`` keys and values.

    The first tile (attention sinks) is kept when ``config.keep_sink_tile``, the partial last tile
    is kept, every other complete tile is quantized once. Returns new tensors in the original frame
    and dtype. ``config`` may be a :class:`KVarNConfig` or a spec string such as ``"kivi:k2v2"``.
    """
    config = KVarNConfig.parse(config) if config is not None else KVarNConfig()
    _check_kv(keys, values)
    start, end = quantized_span(keys.shape[2], config)
    k_out, v_out = keys.clone(), values.clone()
    if end > start:
        k_q, v_q = fake_quantize_tiles(keys[:, :, start:end], values[:, :, start:end], config)
        k_out[:, :, start:end] = k_q
        v_out[:, :, start:end] = v_q
    return k_out, v_out

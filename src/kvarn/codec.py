"""Tile codec: batches of K and V tiles <-> packed codes plus folded metadata (SPEC steps 2-5).

Tiles come token-major, ``[..., G, D]``, already in the cache frame (the codec never rotates:
the cache rotates tokens once when they enter). Any number of leading batch dims; tiles never
influence each other.

Keys are quantized per channel over the G tokens of a tile (the tile is transposed to [D, G]);
values per token over the D channels ([G, D]). With normalization scales s_row, s_col and the
per-row RTN (lo, step) of the normalized tile, the folded metadata is

    keys:   a[d] = s_row[d] * step[d], z[d] = s_row[d] * lo[d], r[t] = s_col[t]
            K~[t, d] = (code[d, t] * a[d] + z[d]) * r[t]
    values: a[t] = s_row[t] * step[t], z[t] = s_row[t] * lo[t], c[d] = s_col[d]
            V~[t, d] = (code[t, d] * a[t] + z[t]) * c[d]
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from kvarn.config import KVarNConfig
from kvarn.method.normalize import variance_normalize
from kvarn.method.packing import pack_codes, packed_size, unpack_codes
from kvarn.method.rtn import quantize_rows
from kvarn.validation import check_finite, check_float_tensor, check_head_dim


@dataclass
class QuantizedKeys:
    """Key tiles: codes ``[..., D, G*bits/8]`` packed along tokens; a, z ``[..., D]``; r ``[..., G]``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    token_scale: torch.Tensor
    bits: int

    @property
    def head_dim(self) -> int:
        return self.codes.shape[-2]

    @property
    def tile_size(self) -> int:
        return self.token_scale.shape[-1]


@dataclass
class QuantizedValues:
    """Value tiles: codes ``[..., G, D*bits/8]`` packed along channels; a, z ``[..., G]``; c ``[..., D]``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    channel_scale: torch.Tensor
    bits: int

    @property
    def head_dim(self) -> int:
        return self.channel_scale.shape[-1]

    @property
    def tile_size(self) -> int:
        return self.codes.shape[-2]


def _tensors(part) -> dict[str, torch.Tensor]:
    return {f.name: getattr(part, f.name) for f in fields(part) if f.name != "bits"}


def _map(part, fn):
    return type(part)(**{k: fn(v) for k, v in _tensors(part).items()}, bits=part.bits)


@dataclass
class QuantizedTiles:
    """A batch of quantized (K tile, V tile) pairs sharing leading dims."""

    keys: QuantizedKeys
    values: QuantizedValues

    @property
    def batch_shape(self) -> torch.Size:
        return self.keys.codes.shape[:-2]

    def nbytes(self) -> int:
        """Bytes of every stored tensor (codes and metadata, keys and values)."""
        return sum(
            t.numel() * t.element_size() for p in (self.keys, self.values) for t in _tensors(p).values()
        )

    def map(self, fn) -> QuantizedTiles:
        """Apply ``fn`` to every tensor (e.g. ``lambda t: t[idx]`` or ``.to(device)``)."""
        return QuantizedTiles(_map(self.keys, fn), _map(self.values, fn))

    def to(self, device) -> QuantizedTiles:
        return self.map(lambda t: t.to(device))


def tile_nbytes(config: KVarNConfig, head_dim: int) -> int:
    """Bytes one (K tile, V tile) pair of one KV head takes in storage, per ``config``.

    For the per-token and fp8 baselines this is G tokens' worth; for ``none`` 16-bit K and V.
    """
    g, d = config.tile_size, head_dim
    m = torch.empty((), dtype=config.metadata_dtype).element_size()
    family = config.family
    if family == "tile":
        keys = packed_size(g, config.key_bits) * d + 2 * d * m + g * m
        values = packed_size(d, config.value_bits) * g + 2 * g * m + d * m
        return keys + values
    if family == "token":
        return g * (packed_size(d, config.key_bits) + packed_size(d, config.value_bits) + 4 * m)
    if family == "fp8":
        return g * 2 * (d + m)
    return g * 2 * d * 2


def check_tiles(name: str, tiles: torch.Tensor, config: KVarNConfig) -> None:
    check_float_tensor(name, tiles)
    if tiles.ndim < 2:
        raise ValueError(f"{name} must be tiles [..., G, D], got shape {tuple(tiles.shape)}")
    g, d = tiles.shape[-2:]
    if g != config.tile_size:
        raise ValueError(f"{name} has {g} tokens per tile, config.tile_size is {config.tile_size}")
    check_head_dim(name, d)
    check_finite(name, tiles)


def _encode_rows_over_cols(x: torch.Tensor, bits: int, config: KVarNConfig):
    """Normalize (optionally) and RTN tiles x [N, R, C] per row; returns codes, a, z, col scale."""
    if config.normalize and x.shape[0]:
        s_row, s_col = variance_normalize(x, config.iterations)
        b = x / s_col.unsqueeze(-2) / s_row.unsqueeze(-1)
    else:
        s_row = x.new_ones(x.shape[:-1])
        s_col = x.new_ones(x.shape[:-2] + x.shape[-1:])
        b = x
    codes, lo, step = quantize_rows(b, bits)
    md = config.metadata_dtype
    return codes, (s_row * step).to(md), (s_row * lo).to(md), s_col.to(md)


def encode_keys(k_tiles: torch.Tensor, config: KVarNConfig) -> QuantizedKeys:
    check_tiles("key tiles", k_tiles, config)
    lead = k_tiles.shape[:-2]
    g, d = k_tiles.shape[-2:]
    x = k_tiles.float().reshape(-1, g, d).transpose(-1, -2)  # [N, D, G]: rows are channels
    codes, a, z, r = _encode_rows_over_cols(x, config.key_bits, config)
    return QuantizedKeys(
        codes=pack_codes(codes, config.key_bits).reshape(*lead, d, packed_size(g, config.key_bits)),
        scale=a.reshape(*lead, d),
        zero=z.reshape(*lead, d),
        token_scale=r.reshape(*lead, g),
        bits=config.key_bits,
    )


def encode_values(v_tiles: torch.Tensor, config: KVarNConfig) -> QuantizedValues:
    check_tiles("value tiles", v_tiles, config)
    lead = v_tiles.shape[:-2]
    g, d = v_tiles.shape[-2:]
    x = v_tiles.float().reshape(-1, g, d)  # [N, G, D]: rows are tokens
    codes, a, z, c = _encode_rows_over_cols(x, config.value_bits, config)
    return QuantizedValues(
        codes=pack_codes(codes, config.value_bits).reshape(*lead, g, packed_size(d, config.value_bits)),
        scale=a.reshape(*lead, g),
        zero=z.reshape(*lead, g),
        channel_scale=c.reshape(*lead, d),
        bits=config.value_bits,
    )


def decode_keys(q: QuantizedKeys, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruct key tiles token-major ``[..., G, D]`` in the cache frame."""
    codes = unpack_codes(q.codes, q.bits).float()  # [..., D, G]
    k = (
        codes * q.scale.float().unsqueeze(-1) + q.zero.float().unsqueeze(-1)
    ) * q.token_scale.float().unsqueeze(-2)
    return k.transpose(-1, -2).to(dtype)


def decode_values(q: QuantizedValues, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruct value tiles ``[..., G, D]`` in the cache frame."""
    codes = unpack_codes(q.codes, q.bits).float()  # [..., G, D]
    v = (
        codes * q.scale.float().unsqueeze(-1) + q.zero.float().unsqueeze(-1)
    ) * q.channel_scale.float().unsqueeze(-2)
    return v.to(dtype)


def encode_tiles(k_tiles: torch.Tensor, v_tiles: torch.Tensor, config: KVarNConfig) -> QuantizedTiles:
    """Quantize matching batches of key and value tiles ``[..., G, D]`` (cache frame)."""
    if config.family != "tile":
        raise ValueError(
            f"method {config.method!r} is not a tile method; the codec stores kvarn, kivi, hadamard_rtn "
            "and varn_norot (use kvarn.fake_quantize for the others)"
        )
    if k_tiles.shape != v_tiles.shape:
        raise ValueError(
            f"key tiles {tuple(k_tiles.shape)} and value tiles {tuple(v_tiles.shape)} differ in shape"
        )
    return QuantizedTiles(encode_keys(k_tiles, config), encode_values(v_tiles, config))


def decode_tiles(q: QuantizedTiles, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruct ``(keys, values)`` tiles ``[..., G, D]`` in the cache frame."""
    return decode_keys(q.keys, dtype), decode_values(q.values, dtype)

"""Random layer storage for checking and benchmarking the decode kernels (tests, GPU scripts).

Builds every tensor of the layer storage contract (docs/layerstore: codes, folded metadata,
n_tiles, sink, tail) from random keys/values with outliers, quantized by a real encoder, plus a
query and this call's new tokens. Slots past each row's valid length are poisoned (NaN metadata,
NaN 16-bit tokens) so a kernel that reads them produces NaN instead of a plausible number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from kvarn.codec import QuantizedTiles, encode_tiles
from kvarn.config import KVarNConfig


def random_kv(
    shape: Sequence[int], dtype, device, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with a few large-offset outlier channels and values with a few loud tokens."""
    k = torch.randn(*shape, generator=generator, device=device)
    v = torch.randn(*shape, generator=generator, device=device)
    d = shape[-1]
    ch = torch.randperm(d, generator=generator, device=device)[: max(1, d // 32)]
    k[..., ch] = k[..., ch] * 8.0 + 4.0
    loud = torch.rand(*shape[:-1], generator=generator, device=device) < 0.02
    v = torch.where(loud[..., None], v * 10.0, v)
    return k.to(dtype), v.to(dtype)


def random_layer_storage(
    *,
    batch: int,
    kv_heads: int,
    group: int,
    num_queries: int,
    head_dim: int,
    config: KVarNConfig,
    n_tiles: Sequence[int],
    sink_len: Sequence[int],
    tail_len: Sequence[int],
    capacity: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    encoder: Callable[[torch.Tensor, torch.Tensor, KVarNConfig], QuantizedTiles] = encode_tiles,
) -> dict:
    """Keyword arguments for ``quantized_decode_attention`` (everything but nothing else)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(torch.randint(0, 2**62, ()).item()) if seed is None else seed)
    g, d = config.tile_size, head_dim
    ncap = max(max(n_tiles, default=0), 1) if capacity is None else capacity
    if ncap < max(n_tiles, default=0):
        raise ValueError(f"capacity {ncap} is smaller than the largest n_tiles {max(n_tiles)}")
    k, v = random_kv((batch, kv_heads, ncap, g, d), dtype, device, gen)
    q = encoder(k, v, config)
    # Poison the capacity slots past each row's n_tiles: garbage codes, NaN metadata.
    for b, n in enumerate(n_tiles):
        for part in (q.keys, q.values):
            part.codes[b, :, n:] = torch.randint(
                0, 256, part.codes[b, :, n:].shape, generator=gen, device=device
            ).to(torch.uint8)
            for t in (
                part.scale,
                part.zero,
                getattr(part, "token_scale", None),
                getattr(part, "channel_scale", None),
            ):
                if t is not None:
                    t[b, :, n:] = float("nan")

    sink_k, sink_v = random_kv((batch, kv_heads, g, d), dtype, device, gen)
    tail_k, tail_v = random_kv((batch, kv_heads, g, d), dtype, device, gen)
    for b in range(batch):
        for t, n in (
            (sink_k, sink_len[b]),
            (sink_v, sink_len[b]),
            (tail_k, tail_len[b]),
            (tail_v, tail_len[b]),
        ):
            t[b, :, n:] = float("nan")
    new_k, new_v = random_kv((batch, kv_heads, num_queries, d), dtype, device, gen)
    query = torch.randn(batch, kv_heads * group, num_queries, d, generator=gen, device=device).to(dtype)

    def lengths(x: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(x), dtype=torch.int32, device=device)

    return dict(
        query=query,
        k_codes=q.keys.codes,
        k_scale=q.keys.scale,
        k_zero=q.keys.zero,
        k_token_scale=q.keys.token_scale,
        v_codes=q.values.codes,
        v_scale=q.values.scale,
        v_zero=q.values.zero,
        v_channel_scale=q.values.channel_scale,
        n_tiles=lengths(n_tiles),
        sink_k=sink_k,
        sink_v=sink_v,
        sink_len=lengths(sink_len),
        tail_k=tail_k,
        tail_v=tail_v,
        tail_len=lengths(tail_len),
        new_k=new_k,
        new_v=new_v,
        key_bits=config.key_bits,
        value_bits=config.value_bits,
        scaling=1.0 / math.sqrt(d),
    )


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf."""
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return math.inf
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300))

"""Plain PyTorch twin of the Triton decode attention: the obviously-correct version for tests.

Dequantizes each row's tiles with ``kvarn.codec.decode_tiles``, concatenates that row's tokens in
storage order (sink, tiles, tail, new tokens), and runs an ordinary softmax attention in float32
(or float64), row by row. Slow on purpose: no folding, no splitting, no online softmax.
"""

from __future__ import annotations

import torch

from kvarn.codec import QuantizedKeys, QuantizedTiles, QuantizedValues, decode_tiles


def quantized_decode_attention_reference(
    query, k_codes, k_scale, k_zero, k_token_scale, v_codes, v_scale, v_zero, v_channel_scale,
    n_tiles, sink_k, sink_v, sink_len, tail_k, tail_v, tail_len, new_k, new_v,
    key_bits, value_bits, scaling, *, compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # fmt: skip
    """Same signature and result as ``kvarn.attention.triton.decode_tc.quantized_decode_attention``."""
    bsz, hq, nq, hd = query.shape
    hkv = k_codes.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    group = hq // hkv
    out = torch.empty_like(query)
    for b in range(bsz):
        n, ns, nt = int(n_tiles[b]), int(sink_len[b]), int(tail_len[b])
        tiles = QuantizedTiles(
            QuantizedKeys(k_codes[b, :, :n], k_scale[b, :, :n], k_zero[b, :, :n], k_token_scale[b, :, :n], key_bits),
            QuantizedValues(v_codes[b, :, :n], v_scale[b, :, :n], v_zero[b, :, :n], v_channel_scale[b, :, :n], value_bits),
        )  # fmt: skip
        kt, vt = decode_tiles(tiles, dtype=compute_dtype)  # [Hkv, n, G, D]
        keys = torch.cat(
            [sink_k[b, :, :ns].to(compute_dtype), kt.reshape(hkv, -1, hd), tail_k[b, :, :nt].to(compute_dtype),
             new_k[b].to(compute_dtype)], dim=1,
        )  # fmt: skip
        values = torch.cat(
            [sink_v[b, :, :ns].to(compute_dtype), vt.reshape(hkv, -1, hd), tail_v[b, :, :nt].to(compute_dtype),
             new_v[b].to(compute_dtype)], dim=1,
        )  # fmt: skip
        keys = keys.repeat_interleave(group, dim=0)  # [Hq, T, D]: query head h uses KV head h // group
        values = values.repeat_interleave(group, dim=0)
        scores = torch.einsum("hld,htd->hlt", query[b].to(compute_dtype), keys) * scaling
        total = keys.shape[1]
        past = total - nq
        # Every stored token is visible; new token j is visible to new query i iff j <= i.
        visible = (
            torch.arange(total, device=query.device)[None, :]
            <= past + torch.arange(nq, device=query.device)[:, None]
        )
        scores = scores.masked_fill(~visible, float("-inf"))
        out[b] = torch.einsum("hlt,htd->hld", torch.softmax(scores, dim=-1), values).to(query.dtype)
    return out

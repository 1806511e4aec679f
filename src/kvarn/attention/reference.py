"""PyTorch attention over one KVarN cache layer: sink + packed tiles + tail + this call's new tokens.

Storage follows docs/layerstore.md (``[B, Hkv, ...]`` tensors, per-row valid counts). Everything is
in the cache frame (rotated iff the method rotates); the caller rotates the query and un-rotates the
output.

How it stays exact and bounded in memory:

* Queries are regrouped per KV head, ``[B, Hq, L, D] -> [B, Hkv, group * L, D]``, so every tile is
  unpacked once per KV head and shared by the query heads of its GQA group (never expanded).
* Completed tiles are never dequantized: the scales factor out of the dot products (SPEC), so only
  the integer codes are converted, one chunk of tiles at a time:
  ``s[t] = r[t] * (sum_d (q[d] a[d]) code[d, t] + sum_d q[d] z[d])`` and
  ``o[d] = c[d] * (sum_t (p[t] a[t]) code[t, d] + sum_t p[t] z[t])``.
* Segments (dense sink/tail/new tokens, chunks of tiles) are merged with an online softmax
  (running max, running sum, rescaled accumulator), so extra memory depends on the chunk sizes,
  not on the context length. Long calls (prefill) are additionally cut into query blocks.
* The softmax runs in float32 (float64 when the query is float64, for tests).

Masks: stored tokens of row ``b`` are valid below ``sink_len[b]``, ``n_tiles[b]`` and
``tail_len[b]``; new token ``j`` is seen by new query ``i`` iff ``j <= i`` and ``new_valid[b, j]``.
A padding query (``new_valid[b, i]`` False) always sees itself, so its (unused) output is finite.
"""

from __future__ import annotations

import functools

import torch

from kvarn.attention.unpack import code_planes
from kvarn.codec import QuantizedKeys, QuantizedTiles, QuantizedValues

# The running max starts at a finite floor, so a segment whose scores are all -inf (masked)
# contributes exp(-inf - floor) = 0 instead of NaN.
_NEG_FLOOR = -1.0e30

DEFAULT_CHUNK_TOKENS = 4096  # tokens of packed history converted at once (bounds extra memory)
DEFAULT_QUERY_CHUNK = 256  # new tokens per query block in long calls
DEFAULT_KEY_CHUNK = 1024  # new tokens per key block in long calls
# Elements of one [B, Hkv, M, tokens] score-sized temporary: with many queries per block (prefill
# into a non-empty cache) fewer tiles are converted at once, so the temporaries stay ~16 MB.
SCORE_BUDGET = 1 << 22


class _OnlineSoftmax:
    """Running (max, sum, weighted sum) of softmax over key segments, per query row.

    The first segment initializes the state directly (no rescaling of an empty state).
    """

    def __init__(self) -> None:
        self.m = self.l = self.acc = None

    def _merge(self, seg_max: torch.Tensor, p: torch.Tensor, p_sum: torch.Tensor, weighted) -> None:
        if self.m is None:
            self.m, self.l, self.acc = seg_max, p_sum, weighted
            return
        m_new = torch.maximum(self.m, seg_max)
        alpha = torch.exp(self.m - m_new)
        beta = torch.exp(seg_max - m_new)  # p was computed against seg_max
        self.l = self.l * alpha + p_sum * beta
        self.acc = self.acc * alpha.unsqueeze(-1) + weighted * beta.unsqueeze(-1)
        self.m = m_new

    def add(self, scores: torch.Tensor, values: torch.Tensor) -> None:
        """Dense segment: scores ``[B, H, M, N]`` (-inf where masked), values ``[B, H, N, D]``."""
        seg_max = scores.amax(dim=-1).clamp_min(_NEG_FLOOR)
        p = torch.exp(scores - seg_max.unsqueeze(-1))
        self._merge(seg_max, p, p.sum(dim=-1), p @ values)

    def add_tiles(self, scores: torch.Tensor, weighted_values) -> None:
        """Tile segment: scores ``[B, H, C, M, G]``; ``weighted_values(p)`` -> ``[B, H, M, D]``."""
        seg_max = scores.amax(dim=(2, 4)).clamp_min(_NEG_FLOOR)
        p = torch.exp(scores - seg_max[:, :, None, :, None])
        self._merge(seg_max, p, p.sum(dim=(2, 4)), weighted_values(p))

    def result(self) -> torch.Tensor:
        return self.acc / self.l.unsqueeze(-1)


@functools.lru_cache(maxsize=64)
def _positions(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device)


def _stored_dense_mask(sink_len: torch.Tensor, tail_len: torch.Tensor, tile: int, extra: int) -> torch.Tensor:
    """``[B, 1, 1, 2G + extra]`` validity of [sink | tail | ``extra`` always-visible slots]."""
    pos = _positions(2 * tile + extra, sink_len.device)[None, :]
    sink = sink_len.to(torch.long)[:, None]
    tail = tail_len.to(torch.long)[:, None] + tile
    valid = (pos < sink) | ((pos >= tile) & (pos < tail)) | (pos >= 2 * tile)
    return valid[:, None, None, :]


def _new_token_mask(
    new_valid: torch.Tensor | None, batch: int, q0: int, q1: int, k0: int, k1: int, group: int, device
) -> torch.Tensor:
    """Causal + padding mask ``[B, 1, group * (q1 - q0), k1 - k0]`` of new queries over new keys."""
    qi = torch.arange(q0, q1, device=device)[:, None]
    kj = torch.arange(k0, k1, device=device)[None, :]
    allowed = (kj <= qi).expand(batch, -1, -1)
    if new_valid is not None:
        allowed = allowed & new_valid[:, None, k0:k1]
    allowed = allowed | (kj == qi)  # a padding query sees itself: finite, ignored output
    lq = q1 - q0
    return allowed[:, None, None].expand(batch, 1, group, lq, k1 - k0).reshape(batch, 1, group * lq, k1 - k0)


def _prefix_mask(length: torch.Tensor, size: int, m: int) -> torch.Tensor:
    """``[B, 1, M, size]`` mask of the first ``length[b]`` slots of a dense buffer."""
    valid = torch.arange(size, device=length.device)[None, :] < length[:, None].to(torch.long)
    return valid[:, None, None, :].expand(-1, 1, m, -1)


def _to_natural(planes_out: torch.Tensor) -> torch.Tensor:
    """``[B, H, C, k, M, m]`` plane-major results -> ``[B, H, C, M, k * m]`` (index ``i * k + j``)."""
    b, h, c, k, m_rows, m = planes_out.shape
    return planes_out.permute(0, 1, 2, 4, 5, 3).reshape(b, h, c, m_rows, m * k)


def _attend_tiles(
    state: _OnlineSoftmax,
    q: torch.Tensor,
    tiles: QuantizedTiles,
    n_tiles: torch.Tensor,
    c0: int,
    c1: int,
    all_valid: bool,
) -> None:
    """Merge tiles ``c0 .. c1-1`` of every row into ``state`` (scales folded into q and p).

    ``tiles`` holds the whole ``[B, Hkv, Ncap, ...]`` store; only slots ``c0 .. c1-1`` are read.
    The codes are contracted one bit-plane at a time (``code_planes``); only the small results
    (scores ``[M, G]`` and outputs ``[M, D]`` per tile) are interleaved back to natural order.
    """
    cdt = q.dtype
    keys, values = tiles.keys, tiles.values
    qe = q.unsqueeze(2)  # [B, H, 1, M, D]
    planes = code_planes(keys.codes[:, :, c0:c1], keys.bits, cdt)  # [B, H, C, k, D, G/k]
    qa = qe * keys.scale[:, :, c0:c1].to(cdt).unsqueeze(-2)  # [B, H, C, M, D]
    scores = _to_natural(qa.unsqueeze(3) @ planes)  # [B, H, C, M, G]
    qz = keys.zero[:, :, c0:c1].to(cdt) @ q.transpose(-1, -2)  # [B, H, C, M]: sum_d q[d] z[d]
    r = keys.token_scale[:, :, c0:c1].to(cdt).unsqueeze(-2)  # [B, H, C, 1, G]
    scores = (scores + qz.unsqueeze(-1)) * r
    if not all_valid:  # some row has fewer than c1 tiles: mask its empty slots
        tile_ids = torch.arange(c0, c1, device=q.device)
        valid = tile_ids[None, :] < n_tiles[:, None].to(torch.long)  # [B, C]
        scores = scores.masked_fill(~valid[:, None, :, None, None], float("-inf"))

    def weighted_values(p: torch.Tensor) -> torch.Tensor:
        vplanes = code_planes(values.codes[:, :, c0:c1], values.bits, cdt)  # [B, H, C, k, G, D/k]
        pa = p * values.scale[:, :, c0:c1].to(cdt).unsqueeze(-2)  # [B, H, C, M, G]
        out = _to_natural(pa.unsqueeze(3) @ vplanes)  # [B, H, C, M, D]
        vz = values.zero[:, :, c0:c1].to(cdt).unsqueeze(-1)  # [B, H, C, G, 1]
        vc = values.channel_scale[:, :, c0:c1].to(cdt).unsqueeze(-2)  # [B, H, C, 1, D]
        return ((out + p @ vz) * vc).sum(dim=2)

    state.add_tiles(scores, weighted_values)


def quantized_attention_reference(
    query: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    k_token_scale: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    v_channel_scale: torch.Tensor,
    n_tiles: torch.Tensor,
    sink_k: torch.Tensor,
    sink_v: torch.Tensor,
    sink_len: torch.Tensor,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    tail_len: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    key_bits: int,
    value_bits: int,
    scaling: float,
    *,
    new_valid: torch.Tensor | None = None,
    max_tiles: int | None = None,
    min_tiles: int | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    key_chunk: int = DEFAULT_KEY_CHUNK,
) -> torch.Tensor:
    """Attention of ``query [B, Hq, L, D]`` over stored + new tokens; returns ``[B, Hq, L, D]``.

    Shapes and meanings are those of ``kvarn.attention.decode.quantized_decode_attention``. Extras:
    ``new_valid [B, L]`` (bool, False = padding token, neither stored nor attended; None = all real),
    ``max_tiles`` / ``min_tiles`` (host-side bounds of ``n_tiles``: avoid a device sync, and skip
    the tile mask where every row is full), chunk sizes.
    """
    batch, hq, length, dim = query.shape
    hkv = new_k.shape[1]
    if hq % hkv:
        raise ValueError(f"query has {hq} heads, not a multiple of the {hkv} KV heads")
    group = hq // hkv
    tile = sink_k.shape[2]
    cdt = torch.float64 if query.dtype == torch.float64 else torch.float32
    if max_tiles is None:
        max_tiles = int(n_tiles.max()) if n_tiles.numel() else 0
    if min_tiles is None:
        min_tiles = 0
    tiles = QuantizedTiles(
        QuantizedKeys(k_codes, k_scale, k_zero, k_token_scale, key_bits),
        QuantizedValues(v_codes, v_scale, v_zero, v_channel_scale, value_bits),
    )
    tiles_per_chunk = max(1, chunk_tokens // tile)
    out = torch.empty_like(query) if length > query_chunk else None

    for q0 in range(0, length, query_chunk):
        q1 = min(length, q0 + query_chunk)
        lq = q1 - q0
        m = group * lq
        q = (query[:, :, q0:q1].to(cdt) * scaling).reshape(batch, hkv, m, dim)
        state = _OnlineSoftmax()
        per_chunk = max(1, min(tiles_per_chunk, SCORE_BUDGET // (batch * hkv * m * tile)))

        # Dense segment: sink and tail buffers plus the first block of new keys, in one product.
        k1 = min(q1, key_chunk)
        keys = torch.cat((sink_k, tail_k, new_k[:, :, :k1]), dim=2).to(cdt)
        values = torch.cat((sink_v, tail_v, new_v[:, :, :k1]), dim=2).to(cdt)
        if length == 1 and new_valid is None:  # decode: the one new token is always visible
            mask = _stored_dense_mask(sink_len, tail_len, tile, 1)
        else:
            mask = torch.cat(
                (
                    _prefix_mask(sink_len, tile, m),
                    _prefix_mask(tail_len, tile, m),
                    _new_token_mask(new_valid, batch, q0, q1, 0, k1, group, query.device),
                ),
                dim=-1,
            )
        state.add((q @ keys.transpose(-1, -2)).masked_fill(~mask, float("-inf")), values)
        for k0 in range(k1, q1, key_chunk):
            k_end = min(q1, k0 + key_chunk)
            mask = _new_token_mask(new_valid, batch, q0, q1, k0, k_end, group, query.device)
            scores = q @ new_k[:, :, k0:k_end].to(cdt).transpose(-1, -2)
            state.add(scores.masked_fill(~mask, float("-inf")), new_v[:, :, k0:k_end].to(cdt))

        for c0 in range(0, max_tiles, per_chunk):
            c1 = min(max_tiles, c0 + per_chunk)
            _attend_tiles(state, q, tiles, n_tiles, c0, c1, all_valid=c1 <= min_tiles)
        res = state.result().reshape(batch, hq, lq, dim).to(query.dtype)  # m = g * lq + l
        if lq == length:
            return res
        out[:, :, q0:q1] = res
    return out

"""Tile compression kernel v2: the same result as v1 (``compress.py``) with fewer instructions.

Why a second kernel: v1 spends most of its time on reductions, not arithmetic. Its tile layout
spreads each token over 16 lanes, every standard deviation is a two-pass reduction (mean, then
squared deviations), and the cross-warp reductions (shared memory + barriers) come 13-14 times per
iteration. v2 changes how the work is laid out and counted, not what is computed:

* **Layout by construction.** The tile ``[G, D]`` is loaded as a 5-D tensor
  ``[CG, RG, RI, C2, VEC]`` (token ``rg * RI + ri``, channel ``c2 * CG * VEC + cg * VEC + ci``).
  Triton's coalescing gives the contiguous axis ``VEC`` (16 bytes) to each thread, then lanes to
  the other axes in increasing index order (CG, then RG, which also takes the warps); ``RI`` and
  ``C2`` are left inside the thread. For G = D = 128, bf16, 4 warps and CG = 8 each thread holds 8
  consecutive tokens x 16 channels: a per-token reduction crosses 8 lanes (3 shuffle rounds), a
  per-channel one 4 lanes and the 4 warps. (The axis order relies on that tie-breaking of
  equal-contiguity axes; another order changes speed, not results.)
* **One-pass shifted moments.** Each standard deviation comes from ``sum d`` and ``sum d^2`` of
  ``d = x * s - K`` in one sweep (one FMA, one add, one FMA per element) and one tuple reduction,
  instead of two dependent reductions. ``K`` is the row's mean of the raw tile times the mean of
  the scale vector: close to the row's actual mean, so the subtraction ``sum d^2 - (sum d)^2 / n``
  does not cancel (keys with large per-channel offsets stay exact to float32 rounding).
* **Log2 domain.** Scales are kept as log2 multipliers (``nu = -u / ln 2``); ``log(clamp(std))`` is
  ``clamp(0.5 * log2(var))`` (no square root; log2 on the MUFU unit), and the max/min ratio of the
  imbalance score is ``2^(max - min)`` of the log2 standard deviations the step computes anyway.
* **Two cross-warp reductions per iteration**: the per-channel moments, and one 3-tuple over the
  per-token vector (max and min of log2 std for the score, and the sum of the next token scales
  for the next shift). Everything else stays inside a warp.

Semantics are SPEC step 3 as in v1 (all iterations, identity competes, ties to the later
iteration, clamps and clips, unbiased std, float32) with v1's shortcut (a row's std does not
depend on the row's own scale). Codes match the codec except at rounding ties, metadata within
float32 rounding; ``tests/triton_kernels/test_triton_compress.py`` runs every kernel against the
codec. docs/gpu_compress.md has the instruction counts.
No rotation here: ``compress_tiles(..., rotate=True)`` uses v1.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from kvarn.attention.triton.compress import _pack_store
from kvarn.method.normalize import IMBALANCE_FLOOR, LOG_SCALE_MAX, LOG_SCALE_MIN, STD_MAX, STD_MIN
from kvarn.method.rtn import STEP_FLOOR

# SPEC constants in the log2 domain: log(clamp(std, a, b)) = clamp(log2(std), log2 a, log2 b) * ln 2.
_H_MIN = tl.constexpr(math.log2(STD_MIN))
_H_MAX = tl.constexpr(math.log2(STD_MAX))
_L_MIN = tl.constexpr(LOG_SCALE_MIN / math.log(2.0))
_L_MAX = tl.constexpr(LOG_SCALE_MAX / math.log(2.0))
_H_FLOOR = tl.constexpr(math.log2(IMBALANCE_FLOOR))
_STEP_FLOOR = tl.constexpr(STEP_FLOOR)
# v + 1.5 * 2**23 puts round-half-even(v) in the low mantissa bits for 0 <= v < 2**22.
_ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _add2(a1, b1, a2, b2):
    return a1 + a2, b1 + b2


@triton.jit
def _max_min_add(a1, b1, c1, a2, b2, c2):
    return tl.maximum(a1, a2), tl.minimum(b1, b2), c1 + c2


@triton.jit
def _min_max(a1, b1, a2, b2):
    return tl.minimum(a1, a2), tl.maximum(b1, b2)


# Tiles are 5-D [CG, RG, RI, C2, VEC] (see tile_layout); token vectors are [RG, RI], channel vectors
# [CG, C2, VEC]. Reductions go through the in-thread axes first so that shuffles see fewer values.
# COMPILED (a GPU build, not the interpreter): reductions reduce two or three tensors in one
# tl.reduce, so a cross-warp reduction costs one shared-memory round trip instead of two or three,
# and log2 is the hardware approximation (MUFU.LG2, ~2^-22 relative) instead of a ~25-instruction
# libdevice polynomial. The interpreter runs a custom combine function element by element in
# Python and has no libdevice, so there each tensor gets its own tl.sum / tl.max / tl.min and
# log2 is tl.log2: the same arithmetic up to float32 rounding.
@triton.jit
def _pair(a, b, axis: tl.constexpr, MINMAX: tl.constexpr, COMPILED: tl.constexpr):
    """Reduce a and b along axis: (sum a, sum b), or (min a, max b) with MINMAX."""
    if MINMAX:
        if COMPILED:
            return tl.reduce((a, b), axis, _min_max)
        else:
            return tl.min(a, axis), tl.max(b, axis)
    else:
        if COMPILED:
            return tl.reduce((a, b), axis, _add2)
        else:
            return tl.sum(a, axis), tl.sum(b, axis)


@triton.jit
def _max_min_sum(h, g, s, axis: tl.constexpr, COMPILED: tl.constexpr):
    if COMPILED:
        return tl.reduce((h, g, s), axis, _max_min_add)
    else:
        return tl.max(h, axis), tl.min(g, axis), tl.sum(s, axis)


@triton.jit
def _over_channels(a, b, MINMAX: tl.constexpr, COMPILED: tl.constexpr):
    """Reduce two tiles over channels (VEC, C2 in-thread, then CG across lanes) -> token vectors."""
    a, b = _pair(a, b, 4, MINMAX, COMPILED)
    a, b = _pair(a, b, 3, MINMAX, COMPILED)
    return _pair(a, b, 0, MINMAX, COMPILED)


@triton.jit
def _over_tokens(a, b, MINMAX: tl.constexpr, COMPILED: tl.constexpr):
    """Reduce two tiles over tokens (RI in-thread, then RG across lanes and warps) -> channel vectors."""
    a, b = _pair(a, b, 2, MINMAX, COMPILED)
    return _pair(a, b, 1, MINMAX, COMPILED)


@triton.jit
def _token_bcast(v):
    """Token vector [RG, RI] -> [1, RG, RI, 1, 1] (expansions in the reverse order of the sums, so
    each one restores the layout its reduction sliced away: no layout conversion)."""
    return tl.expand_dims(tl.expand_dims(tl.expand_dims(v, 0), 3), 4)


@triton.jit
def _channel_bcast(v):
    """Channel vector [CG, C2, VEC] -> [CG, 1, 1, C2, VEC] (RG back first, then RI)."""
    return tl.expand_dims(tl.expand_dims(v, 1), 2)


@triton.jit
def _token_stats(h, s, COMPILED: tl.constexpr):
    """(max h, min h, sum s) over a token vector."""
    a, b, c = _max_min_sum(h, h, s, 1, COMPILED)
    return _max_min_sum(a, b, c, 0, COMPILED)


@triton.jit
def _channel_stats(h, s, COMPILED: tl.constexpr):
    """(max h, min h, sum s) over a channel vector."""
    a, b, c = _max_min_sum(h, h, s, 2, COMPILED)
    a, b, c = _max_min_sum(a, b, c, 1, COMPILED)
    return _max_min_sum(a, b, c, 0, COMPILED)


@triton.jit
def _log2(x, COMPILED: tl.constexpr):
    if COMPILED:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _sub_exact(a, b, COMPILED: tl.constexpr):
    """a - b rounded on its own. A plain subtraction lets ptxas fuse the multiply that produced a
    into an FMA (b - lo with b = y * s becomes fma(y, s, -lo)): for the row minimum that leaves
    the product's rounding error instead of 0, which the RTN scale 1 / step (1e10 for a constant
    row) turns into a wrong code. The reference subtracts rounded values."""
    if COMPILED:
        return libdevice.sub_rn(a, b)
    else:
        return a - b


@triton.jit
def _half_log2_var(s1, s2, n: tl.constexpr, HALF_LOG2_N1: tl.constexpr, COMPILED: tl.constexpr):
    """log2 of the unbiased std of n values from the moments (sum d, sum d^2) of their shifted
    values: 0.5 * log2(s2 - s1^2 / n) - 0.5 * log2(n - 1). |.| guards rounding below zero (the
    std is then ~0 and the clamps take over), as 0 gives -inf."""
    return _log2(tl.abs(s2 - s1 * (s1 * (1.0 / n))), COMPILED) * 0.5 - HALF_LOG2_N1


@triton.jit
def _token_log_std(x, chan_mult, token_shift, D: tl.constexpr, HL_D: tl.constexpr, COMPILED: tl.constexpr):
    """log2 std of each token over channels of x * chan_mult (shift: near each token's mean)."""
    d = x * _channel_bcast(chan_mult) - _token_bcast(token_shift)
    s1, s2 = _over_channels(d, d * d, False, COMPILED)
    return _half_log2_var(s1, s2, D, HL_D, COMPILED)


@triton.jit
def _channel_log_std(x, token_mult, chan_shift, G: tl.constexpr, HL_G: tl.constexpr, COMPILED: tl.constexpr):
    """log2 std of each channel over tokens of x * token_mult."""
    d = x * _token_bcast(token_mult) - _channel_bcast(chan_shift)
    s1, s2 = _over_tokens(d, d * d, False, COMPILED)
    return _half_log2_var(s1, s2, G, HL_G, COMPILED)


@triton.jit
def _step(nu, h):
    """SPEC step u <- clip(u + log(clamp(std))) on nu = -u / ln 2 (the multiplier is 2^nu, so
    exp2 needs no negation); h = log2 of the current std."""
    h = tl.minimum(tl.maximum(h, _H_MIN), _H_MAX)
    return tl.minimum(tl.maximum(nu - h, -_L_MAX), -_L_MIN)


@triton.jit
def _ratio(hmax, hmin):
    """max std / max(min std, 1e-8) from log2 stds."""
    return tl.exp2(hmax - tl.maximum(hmin, _H_FLOOR))


@triton.jit
def _normalize(
    x, mt, mc, IS_KEY: tl.constexpr, ITERS: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    HL_G: tl.constexpr, HL_D: tl.constexpr, COMPILED: tl.constexpr,
):  # fmt: skip
    """Best normalization of the tile x as log2 multipliers (B = X * 2^nt * 2^nc; the SPEC scales
    are 2^-nt per token [RG, RI] and 2^-nc per channel [CG, C2, VEC]).

    SPEC's first step of an iteration (its "column step") scales tokens for keys (a key tile is
    [D, G]) and channels for values; the second step the other axis. ``mt``/``mc`` are the raw
    token/channel means, the shifts' base.
    """
    one_t = tl.full(mt.shape, 1.0, tl.float32)
    one_c = tl.full(mc.shape, 1.0, tl.float32)
    nt = tl.zeros(mt.shape, tl.float32)
    nc = tl.zeros(mc.shape, tl.float32)
    ht = _token_log_std(x, one_c, mt, D, HL_D, COMPILED)  # log2 std of each token, identity state
    hc = _channel_log_std(x, one_t, mc, G, HL_G, COMPILED)
    # The first step's multipliers are computed one step ahead so that their sum (the next
    # shift's factor) rides on the reduction that the score needs anyway.
    if IS_KEY:
        nt_next = _step(nt, ht)
        st = tl.exp2(nt_next)
        tmax, tmin, ssum = _token_stats(ht, st, COMPILED)
        cmax, cmin, _unused = _channel_stats(hc, one_c, COMPILED)
    else:
        nc_next = _step(nc, hc)
        sc = tl.exp2(nc_next)
        cmax, cmin, ssum = _channel_stats(hc, sc, COMPILED)
        tmax, tmin, _unused = _token_stats(ht, one_t, COMPILED)
    best = _ratio(tmax, tmin) + _ratio(cmax, cmin)
    best_nt = nt
    best_nc = nc
    for _ in range(ITERS):
        if IS_KEY:
            # column step (tokens) taken one step ahead: nt_next, st = 2^nt_next, ssum = sum(st)
            nt = nt_next
            hc_pre = _channel_log_std(x, st, mc * (ssum / G), G, HL_G, COMPILED)  # before channel scaling
            nc = _step(nc, hc_pre + nc)  # row step (channels)
            hc = hc_pre + nc
            sc = tl.exp2(nc)
            cmax, cmin, csum = _channel_stats(hc, sc, COMPILED)
            ht = _token_log_std(x, sc, mt * (csum / D), D, HL_D, COMPILED) + nt
            nt_next = _step(nt, ht)
            st = tl.exp2(nt_next)
            tmax, tmin, ssum = _token_stats(ht, st, COMPILED)
        else:
            nc = nc_next
            ht_pre = _token_log_std(x, sc, mt * (ssum / D), D, HL_D, COMPILED)  # before token scaling
            nt = _step(nt, ht_pre + nt)  # row step (tokens)
            ht = ht_pre + nt
            st = tl.exp2(nt)
            tmax, tmin, tsum = _token_stats(ht, st, COMPILED)
            hc = _channel_log_std(x, st, mc * (tsum / G), G, HL_G, COMPILED) + nc
            nc_next = _step(nc, hc)
            sc = tl.exp2(nc_next)
            cmax, cmin, ssum = _channel_stats(hc, sc, COMPILED)
        score = _ratio(tmax, tmin) + _ratio(cmax, cmin)
        keep = score <= best  # ties go to the later iteration
        best = tl.where(keep, score, best)
        best_nt = tl.where(keep, nt, best_nt)
        best_nc = tl.where(keep, nc, best_nc)
    return best_nt, best_nc


@triton.jit
def _compress_tile_v2(
    x_ptr, x_stride_n, x_stride_t, codes_ptr, a_ptr, z_ptr, s_ptr, n,
    IS_KEY: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, ITERS: tl.constexpr,
    NORMALIZE: tl.constexpr, C2: tl.constexpr, RI: tl.constexpr, RG: tl.constexpr, CG: tl.constexpr,
    VEC: tl.constexpr, HL_G: tl.constexpr, HL_D: tl.constexpr, COMPILED: tl.constexpr,
):  # fmt: skip
    n64 = n.to(tl.int64)
    cg = tl.arange(0, CG)[:, None, None, None, None]
    rg = tl.arange(0, RG)[None, :, None, None, None]
    ri = tl.arange(0, RI)[None, None, :, None, None]
    c2 = tl.arange(0, C2)[None, None, None, :, None]
    ci = tl.arange(0, VEC)[None, None, None, None, :]
    tok = rg * RI + ri
    chan = c2 * (CG * VEC) + cg * VEC + ci
    x = tl.load(x_ptr + n64 * x_stride_n + tok * x_stride_t + chan).to(tl.float32)
    # token and channel indices in the vectors' own shapes, for the metadata stores
    tok_v = tl.arange(0, RG)[:, None] * RI + tl.arange(0, RI)[None, :]  # [RG, RI]
    chan_v = (
        tl.arange(0, CG)[:, None, None] * VEC
        + tl.arange(0, C2)[None, :, None] * (CG * VEC)
        + tl.arange(0, VEC)[None, None, :]
    )  # [CG, C2, VEC]
    if NORMALIZE:
        mt = tl.sum(tl.sum(tl.sum(x, 4), 3), 0) / D  # raw token means
        mc = tl.sum(tl.sum(x, 2), 1) / G  # raw channel means
        nt, nc = _normalize(x, mt, mc, IS_KEY, ITERS, G, D, HL_G, HL_D, COMPILED)
        st = tl.exp2(nt)
        sc = tl.exp2(nc)
        # B = X / s_col / s_row, column scale first (SPEC columns: tokens for keys, channels for values)
        if IS_KEY:
            b = x * _token_bcast(st) * _channel_bcast(sc)
        else:
            b = x * _channel_bcast(sc) * _token_bcast(st)
        out_t = tl.exp2(-nt)
        out_c = tl.exp2(-nc)
    else:
        b = x
        out_t = tl.full([RG, RI], 1.0, tl.float32)
        out_c = tl.full([CG, C2, VEC], 1.0, tl.float32)
    QMAX: tl.constexpr = (1 << BITS) - 1
    md = a_ptr.dtype.element_ty
    if IS_KEY:
        # RTN per channel over the tile's tokens; a, z per channel, r per token.
        lo, hi = _over_tokens(b, b, True, COMPILED)
        step = tl.maximum((hi - lo) / QMAX, _STEP_FLOOR)
        v = _sub_exact(b, _channel_bcast(lo), COMPILED) * _channel_bcast(1.0 / step)
        tl.store(a_ptr + n64 * D + chan_v, (out_c * step).to(md))
        tl.store(z_ptr + n64 * D + chan_v, (out_c * lo).to(md))
        tl.store(s_ptr + n64 * G + tok_v, out_t.to(md))
    else:
        lo, hi = _over_channels(b, b, True, COMPILED)
        step = tl.maximum((hi - lo) / QMAX, _STEP_FLOOR)
        v = _sub_exact(b, _token_bcast(lo), COMPILED) * _token_bcast(1.0 / step)
        tl.store(a_ptr + n64 * G + tok_v, (out_t * step).to(md))
        tl.store(z_ptr + n64 * G + tok_v, (out_t * lo).to(md))
        tl.store(s_ptr + n64 * D + chan_v, out_c.to(md))
    # 0 <= v <= QMAX up to rounding (b >= lo exactly, and (hi - lo) / step = QMAX to a few ulp), so
    # the reference's clamp is a no-op and is left out; the magic add rounds half to even like
    # torch.round, and the mask keeps NaN (non-finite input) inside the code range.
    codes = (v + _ROUND_MAGIC).to(tl.int32, bitcast=True) & QMAX
    codes = tl.reshape(tl.permute(codes, (1, 2, 3, 0, 4)), [G, D])  # [RG, RI, C2, CG, VEC]
    if IS_KEY:
        ROW: tl.constexpr = G * BITS // 8
        _pack_store(codes, codes_ptr + n64 * (D * ROW), ROW, 0, BITS, G, D)
    else:
        ROW: tl.constexpr = D * BITS // 8
        _pack_store(codes, codes_ptr + n64 * (G * ROW), ROW, 1, BITS, G, D)


@triton.jit
def _compress_kernel_v2(
    k_ptr, k_stride_n, k_stride_t, v_ptr, v_stride_n, v_stride_t,
    kc_ptr, ka_ptr, kz_ptr, kr_ptr, vc_ptr, va_ptr, vz_ptr, vs_ptr,
    KB: tl.constexpr, VB: tl.constexpr, G: tl.constexpr, D: tl.constexpr, ITERS: tl.constexpr,
    NORMALIZE: tl.constexpr, C2: tl.constexpr, RI: tl.constexpr, RG: tl.constexpr,
    CG: tl.constexpr, VEC: tl.constexpr, HL_G: tl.constexpr, HL_D: tl.constexpr, COMPILED: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    if tl.program_id(1) == 0:
        _compress_tile_v2(
            k_ptr, k_stride_n, k_stride_t, kc_ptr, ka_ptr, kz_ptr, kr_ptr, n,
            True, KB, G, D, ITERS, NORMALIZE, C2, RI, RG, CG, VEC, HL_G, HL_D, COMPILED,
        )  # fmt: skip
    else:
        _compress_tile_v2(
            v_ptr, v_stride_n, v_stride_t, vc_ptr, va_ptr, vz_ptr, vs_ptr, n,
            False, VB, G, D, ITERS, NORMALIZE, C2, RI, RG, CG, VEC, HL_G, HL_D, COMPILED,
        )  # fmt: skip


def tile_layout(g: int, d: int, dtype: torch.dtype, num_warps: int, lanes_per_token: int) -> dict:
    """Split of the tile [G, D] into the kernel's 5-D view for this launch.

    ``lanes_per_token`` lanes share a token (CG), the other ``32 / CG`` lanes and all warps split
    the tokens; each thread holds ``RI`` consecutive tokens x ``C2 * VEC`` channels.
    """
    vec = min(16 // torch.empty((), dtype=dtype).element_size(), d)
    cg = min(lanes_per_token, d // vec)
    rows_per_warp = 32 // cg
    warps = max(1, min(num_warps, g // rows_per_warp))
    rg = rows_per_warp * warps
    if rg > g:
        raise ValueError(f"tile of {g} tokens is too small for {cg} lanes per token")
    return {
        "C2": d // (cg * vec), "RI": g // rg, "RG": rg, "CG": cg, "VEC": vec, "num_warps": warps,
        "HL_G": 0.5 * math.log2(g - 1), "HL_D": 0.5 * math.log2(d - 1),
    }  # fmt: skip

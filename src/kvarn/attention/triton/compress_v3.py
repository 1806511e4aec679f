"""Tile compression kernel v3 (Gluon): the normalization with fewer instructions and hand-chosen layouts.

Same result and contract as v1 (``compress.py``: SPEC step 3 in float32, codes identical to
``kvarn.codec.encode_tiles`` except at rounding ties, metadata within float32 rounding), computed
with less arithmetic:

* **One-pass shifted moments.** Each standard deviation comes from ``sum d`` and ``sum d^2`` of
  ``d = x * s - K`` in one sweep (one FMA, one add, one FMA per element) and one reduction, instead
  of two dependent reductions. ``K`` is the row's mean of the raw tile times the mean of the scale
  vector: close to the row's actual mean, so ``sum d^2 - (sum d)^2 / n`` does not cancel (keys with
  large per-channel offsets stay exact to float32 rounding).
* **Log2 domain.** Scales are kept as log2 multipliers (``nu = -u / ln 2``, multiplier ``2^nu``);
  ``log(clamp(std))`` is ``clamp(0.5 * log2(var))`` (no square root; log2 on the MUFU unit), and the
  max/min ratio of the imbalance score is ``2^(max - min)`` of the log2 stds the step computes anyway.
* **v1's shortcut**: a row's std does not depend on the row's own scale, so each iteration is one
  sweep over ``X * column multipliers`` and one over ``X * row multipliers``.
* **No code clamp**: ``0 <= (b - lo) / step <= QMAX`` up to a few ulps, so the reference's clamp is a
  no-op; the magic-number rounding and a mask keep non-finite input in range.

and with explicit layouts (Gluon: Triton with explicit layouts), which lets it

* **transpose instead of butterfly**: each thread first sums its own slice of a row (in
  registers), then one layout conversion (through shared memory, ``stmatrix``/``ldmatrix`` where
  possible) hands every row's partial sums to a single thread, which adds them up. The per-token
  and per-channel results come out *compact*: one value per thread (G = D = 128, 4 warps);
* **do the vector math once**: steps, logs, exps, clamps, the score's max/min and the best-state
  bookkeeping run on the compact vectors (no replicated copies);
* **broadcast once**: the new multipliers go back to the tile layout with one conversion.

The tile view is the 5-D ``[RG, RI, C2, CG, VEC]`` (token ``rg * RI + ri``, channel
``c2 * CG * VEC + cg * VEC + ci``; each thread holds RI consecutive tokens x C2 * VEC channels;
``tile_layout``), as an explicit ``BlockedLayout``. Compact token vectors are ``[RG, RI]`` in
``Slice(2, LT)``, compact channel vectors ``[C2, CG, VEC]`` in ``Slice(0, LC)``; ``TB`` and ``CB``
are the layouts that broadcast them over the tile. Packing reshapes the codes so that the codes of
one byte meet in one thread and reduces them there.

Testing: layouts never change values in Gluon (``convert_layout`` only moves data), so under
``TRITON_INTERPRET=1`` this module binds ``gl`` to ``gluon_interp`` (layout arguments dropped,
``convert_layout`` the identity) and ``jit`` to ``triton.jit``, and the interpreter runs this very
source; ``tests/triton_kernels/test_triton_compress.py`` compares it with the codec. The layouts
themselves are exercised only by a GPU build (``benchmarks/compress_sass.py`` compiles it offline;
``benchmarks/gpu_compress.py`` checks it against the codec on the GPU before timing it).
docs/gpu_compress.md has the instruction counts and timings.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvarn.attention.triton import interpreting
from kvarn.method.normalize import IMBALANCE_FLOOR, LOG_SCALE_MAX, LOG_SCALE_MIN, STD_MAX, STD_MIN
from kvarn.method.rtn import STEP_FLOOR

if interpreting():
    from kvarn.attention.triton import gluon_interp as gl

    jit = triton.jit
else:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.language.extra.cuda import libdevice

    jit = gluon.jit
from triton.experimental.gluon.language import BlockedLayout

# Parameters are annotated ``tl.constexpr`` (Gluon accepts it too): the interpreter recognizes
# constexpr parameters by the annotation string "tl.constexpr" or "constexpr", not "gl.constexpr".

_H_MIN = gl.constexpr(math.log2(STD_MIN))
_H_MAX = gl.constexpr(math.log2(STD_MAX))
_L_MIN = gl.constexpr(LOG_SCALE_MIN / math.log(2.0))
_L_MAX = gl.constexpr(LOG_SCALE_MAX / math.log(2.0))
_H_FLOOR = gl.constexpr(math.log2(IMBALANCE_FLOOR))
_STEP_FLOOR = gl.constexpr(STEP_FLOOR)
_ROUND_MAGIC = gl.constexpr(12582912.0)  # v + 1.5 * 2**23: round half to even into the low bits


@jit
def _add2(a1, b1, a2, b2):
    return a1 + a2, b1 + b2


@jit
def _min_max(a1, b1, a2, b2):
    return gl.minimum(a1, a2), gl.maximum(b1, b2)


@jit
def _max_min_add(a1, b1, c1, a2, b2, c2):
    return gl.maximum(a1, a2), gl.minimum(b1, b2), c1 + c2


@jit
def _pair(a, b, axis: tl.constexpr, MINMAX: tl.constexpr, COMPILED: tl.constexpr):
    """(sum a, sum b) or, with MINMAX, (min a, max b) along axis; one fused reduction on a GPU (the
    interpreter runs custom combine functions element by element in Python)."""
    if MINMAX:
        if COMPILED:
            return gl.reduce((a, b), axis, _min_max)
        else:
            return gl.min(a, axis), gl.max(b, axis)
    else:
        if COMPILED:
            return gl.reduce((a, b), axis, _add2)
        else:
            return gl.sum(a, axis), gl.sum(b, axis)


@jit
def _max_min_sum(h, g, s, axis: tl.constexpr, COMPILED: tl.constexpr):
    if COMPILED:
        return gl.reduce((h, g, s), axis, _max_min_add)
    else:
        return gl.max(h, axis), gl.min(g, axis), gl.sum(s, axis)


@jit
def _token_bcast(v):
    """Token vector [RG, RI] in TB -> [RG, RI, 1, 1, 1] in the tile layout."""
    return gl.expand_dims(gl.expand_dims(gl.expand_dims(v, 2), 3), 4)


@jit
def _channel_bcast(v):
    """Channel vector [C2, CG, VEC] in CB -> [1, 1, C2, CG, VEC]."""
    return gl.expand_dims(gl.expand_dims(v, 0), 1)


@jit
def _to_tokens(a, b, MINMAX: tl.constexpr, LT: tl.constexpr, COMPILED: tl.constexpr):
    """Reduce two tiles over channels -> two compact token vectors [RG, RI] (layout Slice(2, LT)).

    The channels a thread holds (VEC, C2) are reduced in registers; the conversion to LT then
    gives each thread all CG partial sums of its token(s), reduced in registers again."""
    a, b = _pair(a, b, 4, MINMAX, COMPILED)
    a, b = _pair(a, b, 2, MINMAX, COMPILED)  # [RG, RI, CG]
    a = gl.convert_layout(a, LT)
    b = gl.convert_layout(b, LT)
    return _pair(a, b, 2, MINMAX, COMPILED)


@jit
def _to_channels(a, b, MINMAX: tl.constexpr, LC: tl.constexpr, COMPILED: tl.constexpr):
    """Reduce two tiles over tokens -> two compact channel vectors [C2, CG, VEC] (Slice(0, LC))."""
    a, b = _pair(a, b, 1, MINMAX, COMPILED)  # [RG, C2, CG, VEC]: the thread's RI tokens
    a = gl.convert_layout(a, LC)
    b = gl.convert_layout(b, LC)
    return _pair(a, b, 0, MINMAX, COMPILED)


@jit
def _sum_to_tokens(a, LT: tl.constexpr):
    """Sum a tile over channels -> compact token vector (in registers, transpose, in registers)."""
    a = gl.sum(gl.sum(a, 4), 2)
    return gl.sum(gl.convert_layout(a, LT), 2)


@jit
def _sum_to_channels(a, LC: tl.constexpr):
    """Sum a tile over tokens -> compact channel vector."""
    return gl.sum(gl.convert_layout(gl.sum(a, 1), LC), 0)


@jit
def _moments_to_tokens(d, LT: tl.constexpr, LT2: tl.constexpr, TREE: tl.constexpr = False):
    """(sum d, sum d^2) over channels -> compact token vectors. The two sums travel as one
    [.., 2] tensor, so the transpose is one shared-memory round trip (one pair of barriers).
    TREE: add the partials after the transpose pairwise (log2 CG levels of independent adds)
    instead of in one chain (CG - 1 dependent adds): a shorter serial phase, same count."""
    p = gl.join(d, d * d)  # [RG, RI, C2, CG, VEC, 2]
    p = gl.sum(gl.sum(p, 4), 2)  # in registers -> [RG, RI, CG, 2]
    p = gl.convert_layout(p, LT2)  # all CG partials of a token in one thread
    TC: tl.constexpr = gl.SliceLayout(2, LT)
    if TREE:
        RG: tl.constexpr = p.shape[0]
        RI: tl.constexpr = p.shape[1]
        CG: tl.constexpr = p.shape[2]
        for i in gl.static_range(8):
            if (CG >> i) > 1:
                p = gl.sum(gl.reshape(p, [RG, RI, 2, CG >> (i + 1), 2]), 2)
        p = gl.reshape(p, [RG, RI, 2])
        s1, s2 = gl.split(p)
        return gl.convert_layout(s1, TC), gl.convert_layout(s2, TC)
    else:
        s1, s2 = gl.split(gl.sum(p, 2))
        return gl.convert_layout(s1, TC, assert_trivial=True), gl.convert_layout(s2, TC, assert_trivial=True)


@jit
def _moments_to_channels(d, LC: tl.constexpr, LC2: tl.constexpr, TREE: tl.constexpr = False):
    """(sum d, sum d^2) over tokens -> compact channel vectors (TREE: as in _moments_to_tokens)."""
    p = gl.join(d, d * d)
    p = gl.sum(p, 1)  # the thread's RI tokens -> [RG, C2, CG, VEC, 2]
    p = gl.convert_layout(p, LC2)  # all RG partials of a channel in one thread
    CC: tl.constexpr = gl.SliceLayout(0, LC)
    if TREE:
        RG: tl.constexpr = p.shape[0]
        C2: tl.constexpr = p.shape[1]
        CG: tl.constexpr = p.shape[2]
        VEC: tl.constexpr = p.shape[3]
        for i in gl.static_range(8):
            if (RG >> i) > 1:
                p = gl.sum(gl.reshape(p, [2, RG >> (i + 1), C2, CG, VEC, 2]), 0)
        p = gl.reshape(p, [C2, CG, VEC, 2])
        s1, s2 = gl.split(p)
        return gl.convert_layout(s1, CC), gl.convert_layout(s2, CC)
    else:
        s1, s2 = gl.split(gl.sum(p, 0))
        return gl.convert_layout(s1, CC, assert_trivial=True), gl.convert_layout(s2, CC, assert_trivial=True)


@jit
def _token_stats(h, s, COMPILED: tl.constexpr):
    """(max h, min h, sum s) over a compact token vector."""
    a, b, c = _max_min_sum(h, h, s, 1, COMPILED)
    return _max_min_sum(a, b, c, 0, COMPILED)


@jit
def _broadcast_channel_stats(h, s, CB: tl.constexpr, CB2: tl.constexpr, COMPILED: tl.constexpr):
    """Broadcast compact channel vectors h and s to every thread that needs them (CB), and reduce
    (max h, min h, sum s) there: in the broadcast layout each warp holds all D channels, so the
    reduction needs no other warp (no shared memory, no barrier). h and s travel as one pair, so
    this is one conversion. Returns (s broadcast, max h, min h, sum s)."""
    p = gl.convert_layout(gl.join(h, s), CB2)
    hb, sb = gl.split(p)
    hb = gl.convert_layout(hb, CB, assert_trivial=True)
    sb = gl.convert_layout(sb, CB, assert_trivial=True)
    a, b, c = _max_min_sum(hb, hb, sb, 2, COMPILED)
    a, b, c = _max_min_sum(a, b, c, 0, COMPILED)
    a, b, c = _max_min_sum(a, b, c, 0, COMPILED)
    return sb, a, b, c


@jit
def _channel_stats(h, s, COMPILED: tl.constexpr):
    """(max h, min h, sum s) over a compact channel vector; VEC and C2 first (lanes), CG last
    (lanes and warps: one cross-warp step)."""
    a, b, c = _max_min_sum(h, h, s, 2, COMPILED)
    a, b, c = _max_min_sum(a, b, c, 0, COMPILED)
    return _max_min_sum(a, b, c, 0, COMPILED)


@jit
def _log2(x, COMPILED: tl.constexpr):
    """log2 on the MUFU unit (~2^-22 relative) on a GPU, instead of the precise polynomial."""
    if COMPILED:
        return libdevice.fast_log2f(x)
    else:
        return gl.log2(x)


@jit
def _sub_exact(a, b, COMPILED: tl.constexpr):
    """a - b rounded on its own. A plain subtraction lets ptxas fuse the multiply that produced a
    into an FMA (b - lo with b = y * s becomes fma(y, s, -lo)): for the row minimum that leaves
    the product's rounding error instead of 0, which the RTN scale 1 / step (1e10 for a constant
    row) turns into a wrong code. The reference subtracts rounded values."""
    if COMPILED:
        return libdevice.sub_rn(a, b)
    else:
        return a - b


@jit
def _f32(x, OPAQUE: tl.constexpr, COMPILED: tl.constexpr, zero=0):
    """The tile as float32. With OPAQUE (``half_tile``: the tile stays in its 16-bit input dtype in
    registers, half the registers) each call widens through an asm statement that takes ``zero``,
    an int32 that is 0 but that the compilers cannot prove constant (pass one derived from a value
    that changes every iteration), so neither LLVM nor ptxas can hoist the widening out of the
    normalization loop and keep a float32 copy of the tile: every sweep widens its elements again
    (one instruction each)."""
    if OPAQUE and COMPILED and x.dtype != gl.float32:
        # two elements per 32-bit register (pack=2), so the 16-bit tile stays packed in registers
        if x.dtype == gl.bfloat16:
            return gl.inline_asm_elementwise(
                "{ .reg .b32 s, m; add.u32 s, $3, 16; or.b32 m, $3, 0xffff0000; shl.b32 $0, $2, s; and.b32 $1, $2, m; }",
                "=r,=r,r,r,r", [x, zero], dtype=gl.float32, is_pure=False, pack=2,
            )  # fmt: skip
        else:
            return gl.inline_asm_elementwise(
                "{ .reg .b16 lo, hi; .reg .b32 y; xor.b32 y, $2, $3; mov.b32 {lo, hi}, y; cvt.f32.f16 $0, lo; "
                "cvt.f32.f16 $1, hi; }",
                "=r,=r,r,r,r", [x, zero], dtype=gl.float32, is_pure=False, pack=2,
            )  # fmt: skip
    else:
        return x.to(gl.float32)


@jit
def _opaque_zero(v):
    """0 as int32, computed from the float v (> 0 or NaN) so that compilers cannot fold it: its
    sign bit."""
    return (v.to(gl.uint32, bitcast=True) >> 31).to(gl.int32)


@jit
def _half_log2_var(s1, s2, n: tl.constexpr, HALF_LOG2_N1: tl.constexpr, COMPILED: tl.constexpr):
    """log2 of the unbiased std from (sum d, sum d^2) of n shifted values (shifted one-pass moments, module docstring)."""
    return _log2(gl.abs(s2 - s1 * (s1 * (1.0 / n))), COMPILED) * 0.5 - HALF_LOG2_N1


@jit
def _centered_log_std(x, mt_b, mc_b, LT: tl.constexpr, LC: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                      HL_G: tl.constexpr, HL_D: tl.constexpr, COMPILED: tl.constexpr, OPAQUE: tl.constexpr):  # fmt: skip
    """log2 std of each token and of each channel of the raw tile (the identity state): the
    reference's two-pass form, sum of squared deviations from the exact mean."""
    d = _f32(x, OPAQUE, COMPILED) - _token_bcast(mt_b)
    ht = _log2(_sum_to_tokens(d * d, LT), COMPILED) * 0.5 - HL_D
    d = _f32(x, OPAQUE, COMPILED) - _channel_bcast(mc_b)
    hc = _log2(_sum_to_channels(d * d, LC), COMPILED) * 0.5 - HL_G
    return ht, hc


@jit
def _step(nu, h):
    """SPEC step on nu = -u / ln 2 (multiplier 2^nu); h = log2 of the current std."""
    h = gl.minimum(gl.maximum(h, _H_MIN), _H_MAX)
    return gl.minimum(gl.maximum(nu - h, -_L_MAX), -_L_MIN)


@jit
def _ratio(hmax, hmin):
    return gl.exp2(hmax - gl.maximum(hmin, _H_FLOOR))


@jit
def _token_log_std(x, chan_mult_b, token_shift_b, LT: tl.constexpr, LT2: tl.constexpr, D: tl.constexpr,
                   HL_D: tl.constexpr, COMPILED: tl.constexpr, OPAQUE: tl.constexpr, zero=0,
                   TREE: tl.constexpr = False):  # fmt: skip
    """Compact log2 std of each token over channels of x * chan_mult (broadcast operands)."""
    d = _f32(x, OPAQUE, COMPILED, zero) * _channel_bcast(chan_mult_b) - _token_bcast(token_shift_b)
    s1, s2 = _moments_to_tokens(d, LT, LT2, TREE)
    return _half_log2_var(s1, s2, D, HL_D, COMPILED)


@jit
def _channel_log_std(x, token_mult_b, chan_shift_b, LC: tl.constexpr, LC2: tl.constexpr, G: tl.constexpr,
                     HL_G: tl.constexpr, COMPILED: tl.constexpr, OPAQUE: tl.constexpr, zero=0,
                     TREE: tl.constexpr = False):  # fmt: skip
    d = _f32(x, OPAQUE, COMPILED, zero) * _token_bcast(token_mult_b) - _channel_bcast(chan_shift_b)
    s1, s2 = _moments_to_channels(d, LC, LC2, TREE)
    return _half_log2_var(s1, s2, G, HL_G, COMPILED)


@jit
def _normalize(
    x, mt_b, mc_b, IS_KEY: tl.constexpr, ITERS: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    HL_G: tl.constexpr, HL_D: tl.constexpr, LT: tl.constexpr, LC: tl.constexpr, LT2: tl.constexpr,
    LC2: tl.constexpr, TB: tl.constexpr, CB: tl.constexpr, CB2: tl.constexpr, RG: tl.constexpr, RI: tl.constexpr, C2: tl.constexpr, CG: tl.constexpr,
    VEC: tl.constexpr, COMPILED: tl.constexpr, OPAQUE: tl.constexpr, TREE: tl.constexpr = False,
):  # fmt: skip
    """SPEC step 3 on compact vectors: best log2 multipliers (nt [RG, RI] in
    Slice(2, LT), nc [C2, CG, VEC] in Slice(0, LC)); mt_b/mc_b are the raw means, broadcast."""
    TC: tl.constexpr = gl.SliceLayout(2, LT)
    CC: tl.constexpr = gl.SliceLayout(0, LC)
    one_t = gl.full([RG, RI], 1.0, gl.float32, layout=TC)
    one_c = gl.full([C2, CG, VEC], 1.0, gl.float32, layout=CC)
    nt = gl.zeros([RG, RI], gl.float32, layout=TC)
    nc = gl.zeros([C2, CG, VEC], gl.float32, layout=CC)
    ht, hc = _centered_log_std(x, mt_b, mc_b, LT, LC, G, D, HL_G, HL_D, COMPILED, OPAQUE)  # identity state
    # the first step is taken one step ahead so that the sum of its multipliers (the next shift's
    # factor) rides on the reduction the score needs anyway
    if IS_KEY:
        nt_next = _step(nt, ht)
        st = gl.exp2(nt_next)
        tmax, tmin, ssum = _token_stats(ht, st, COMPILED)
        cmax, cmin, _unused = _channel_stats(hc, one_c, COMPILED)
        st_b = gl.convert_layout(st, TB)
    else:
        nc_next = _step(nc, hc)
        sc_b, cmax, cmin, ssum = _broadcast_channel_stats(hc, gl.exp2(nc_next), CB, CB2, COMPILED)
        tmax, tmin, _unused = _token_stats(ht, one_t, COMPILED)
    best = _ratio(tmax, tmin) + _ratio(cmax, cmin)
    best_nt = nt
    best_nc = nc
    for _ in range(ITERS):
        if IS_KEY:
            nt = nt_next  # column step (tokens), taken above
            hc_pre = _channel_log_std(
                x, st_b, mc_b * (ssum / G), LC, LC2, G, HL_G, COMPILED, OPAQUE, _opaque_zero(ssum), TREE
            )
            nc = _step(nc, hc_pre + nc)  # row step (channels)
            hc = hc_pre + nc
            sc_b, cmax, cmin, csum = _broadcast_channel_stats(hc, gl.exp2(nc), CB, CB2, COMPILED)
            ht = (
                _token_log_std(
                    x, sc_b, mt_b * (csum / D), LT, LT2, D, HL_D, COMPILED, OPAQUE, _opaque_zero(csum), TREE
                )
                + nt
            )
            nt_next = _step(nt, ht)
            st = gl.exp2(nt_next)
            tmax, tmin, ssum = _token_stats(ht, st, COMPILED)
            st_b = gl.convert_layout(st, TB)
        else:
            nc = nc_next  # column step (channels), taken above
            ht_pre = _token_log_std(
                x, sc_b, mt_b * (ssum / D), LT, LT2, D, HL_D, COMPILED, OPAQUE, _opaque_zero(ssum), TREE
            )
            nt = _step(nt, ht_pre + nt)  # row step (tokens)
            ht = ht_pre + nt
            st = gl.exp2(nt)
            tmax, tmin, tsum = _token_stats(ht, st, COMPILED)
            st_b = gl.convert_layout(st, TB)
            hc = (
                _channel_log_std(
                    x, st_b, mc_b * (tsum / G), LC, LC2, G, HL_G, COMPILED, OPAQUE, _opaque_zero(tsum), TREE
                )
                + nc
            )
            nc_next = _step(nc, hc)
            sc_b, cmax, cmin, ssum = _broadcast_channel_stats(hc, gl.exp2(nc_next), CB, CB2, COMPILED)
        score = _ratio(tmax, tmin) + _ratio(cmax, cmin)
        keep = score <= best  # ties go to the later iteration
        best = gl.where(keep, score, best)
        best_nt = gl.where(keep, nt, best_nt)
        best_nc = gl.where(keep, nc, best_nc)
    return best_nt, best_nc


@jit
def _pack_store(codes, base, AXIS: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                RG: tl.constexpr, RI: tl.constexpr, C2: tl.constexpr, CG: tl.constexpr, VEC: tl.constexpr,
                L5: tl.constexpr, KS: tl.constexpr):  # fmt: skip
    """Pack codes [RG, RI, C2, CG, VEC] (token rg * RI + ri, channel c2 * CG * VEC + cg * VEC + ci)
    along tokens (AXIS 1, keys: codes [D, G * bits / 8]) or channels (AXIS 4, values: [G, D * bits / 8])
    and store them.

    The codes of one byte (PER of them; 8 codes in 3 bytes for 3 bits) are reshaped onto their own
    axis and summed after shifting each into place, in registers when they are in one thread.
    Values are stored from there: a warp's lanes cover consecutive bytes of a few token rows. Key
    bytes of one thread belong to 16 different channel rows, 64 B apart, so the packed keys are
    first moved (one small shared-memory round trip) to ``KS``, which gives consecutive byte groups
    of a channel row to consecutive lanes: a warp then writes whole rows instead of touching 32
    sectors per store instruction."""
    if BITS == 3:
        PER: tl.constexpr = 8
        BYTES: tl.constexpr = 3
    else:
        PER: tl.constexpr = 8 // BITS
        BYTES: tl.constexpr = 1
    TB: tl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, L5)))
    CB: tl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, L5))
    tok = _token_bcast(_token_index(RG, RI, TB))
    chan = _channel_bcast(_channel_index(C2, CG, VEC, CB))
    if AXIS == 1:  # tokens (RG, RI) -> (G / PER, PER): in registers when PER <= RI
        ROW: tl.constexpr = G * BITS // 8
        word = codes << ((tok % PER) * BITS)
        word = gl.sum(gl.reshape(word, [G // PER, PER, C2, CG, VEC]), 1)
        word = gl.convert_layout(word, KS)
        grp = gl.arange(0, G // PER, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, KS))))
        grp = gl.expand_dims(gl.expand_dims(gl.expand_dims(grp, 1), 2), 3)
        off = _channel_bcast_to(_channel_index(C2, CG, VEC, gl.SliceLayout(0, KS))) * ROW + grp * BYTES
    else:  # channels (C2, CG, VEC) -> (D / PER, PER): in registers when PER <= VEC
        ROW: tl.constexpr = D * BITS // 8
        word = codes << ((chan % PER) * BITS)
        off = tok * ROW + (chan // PER) * BYTES
        word = gl.sum(gl.reshape(word, [RG, RI, D // PER, PER]), 3)
        off = gl.min(gl.reshape(off, [RG, RI, D // PER, PER]), 3)  # the group's first byte
    if BITS == 3:
        gl.store(base + off, (word & 255).to(gl.uint8))
        gl.store(base + off + 1, ((word >> 8) & 255).to(gl.uint8))
        gl.store(base + off + 2, ((word >> 16) & 255).to(gl.uint8))
    else:
        gl.store(base + off, word.to(gl.uint8))


@jit
def _token_index(RG: tl.constexpr, RI: tl.constexpr, layout: tl.constexpr):
    """Token index rg * RI + ri of a [RG, RI] vector in ``layout``."""
    rg = gl.arange(0, RG, layout=gl.SliceLayout(1, layout))
    ri = gl.arange(0, RI, layout=gl.SliceLayout(0, layout))
    return gl.expand_dims(rg, 1) * RI + gl.expand_dims(ri, 0)


@jit
def _channel_index(C2: tl.constexpr, CG: tl.constexpr, VEC: tl.constexpr, layout: tl.constexpr):
    """Channel index c2 * CG * VEC + cg * VEC + ci of a [C2, CG, VEC] vector in ``layout``."""
    c2 = gl.arange(0, C2, layout=gl.SliceLayout(1, gl.SliceLayout(2, layout)))
    cg = gl.arange(0, CG, layout=gl.SliceLayout(0, gl.SliceLayout(2, layout)))
    ci = gl.arange(0, VEC, layout=gl.SliceLayout(0, gl.SliceLayout(1, layout)))
    return (
        gl.expand_dims(gl.expand_dims(c2, 1), 2) * (CG * VEC)
        + gl.expand_dims(gl.expand_dims(cg, 0), 2) * VEC
        + gl.expand_dims(gl.expand_dims(ci, 0), 1)
    )


@jit
def _channel_bcast_to(v):
    """Channel vector [C2, CG, VEC] in Slice(0, KS) -> [1, C2, CG, VEC] (the packed keys' shape)."""
    return gl.expand_dims(v, 0)


@jit
def _compress_tile_v3(
    x_ptr, x_stride_n, x_stride_t, codes_ptr, a_ptr, z_ptr, s_ptr, n,
    IS_KEY: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, ITERS: tl.constexpr,
    NORMALIZE: tl.constexpr, RG: tl.constexpr, RI: tl.constexpr, C2: tl.constexpr, CG: tl.constexpr,
    VEC: tl.constexpr, HL_G: tl.constexpr, HL_D: tl.constexpr, L5: tl.constexpr, LT: tl.constexpr,
    LC: tl.constexpr, LT2: tl.constexpr, LC2: tl.constexpr, L6: tl.constexpr, KS: tl.constexpr,
    COMPILED: tl.constexpr, HALF_TILE: tl.constexpr, FOLD: tl.constexpr, TREE: tl.constexpr,
):  # fmt: skip
    """Encode one tile. HALF_TILE: keep the tile in registers in its 16-bit input dtype and widen
    it in every sweep (see _f32). FOLD: round the column-scaled tile y with the row scale folded
    into the code multiplier (see below) instead of materializing B = y * row scale. TREE: add
    the partial moments after each transpose pairwise (see _moments_to_tokens)."""
    TB: tl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, L5)))  # [RG, RI]
    CB: tl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, L5))  # [C2, CG, VEC]
    CB2: tl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, L6))  # [C2, CG, VEC, 2]: CB with a pair axis
    TC: tl.constexpr = gl.SliceLayout(2, LT)
    CC: tl.constexpr = gl.SliceLayout(0, LC)
    n64 = n.to(gl.int64)
    # token / channel index of each element of a vector, in the broadcast and compact layouts
    tok_b = _token_index(RG, RI, TB)
    tok_c = _token_index(RG, RI, TC)
    ch_b = _channel_index(C2, CG, VEC, CB)
    ch_c = _channel_index(C2, CG, VEC, CC)
    tok = _token_bcast(tok_b)
    ch = _channel_bcast(ch_b)
    x = gl.load(x_ptr + n64 * x_stride_n + tok * x_stride_t + ch)
    if not HALF_TILE:
        x = x.to(gl.float32)
    if NORMALIZE:
        mt_b = gl.convert_layout(
            _sum_to_tokens(_f32(x, HALF_TILE, COMPILED), LT) / D, TB
        )  # raw means: shifts' base
        mc_b = gl.convert_layout(_sum_to_channels(_f32(x, HALF_TILE, COMPILED), LC) / G, CB)
        nt, nc = _normalize(
            x, mt_b, mc_b, IS_KEY, ITERS, G, D, HL_G, HL_D, LT, LC, LT2, LC2, TB, CB, CB2, RG, RI, C2, CG, VEC,
            COMPILED, HALF_TILE, TREE,
        )  # fmt: skip
        st_b = gl.convert_layout(gl.exp2(nt), TB)
        sc_b = gl.convert_layout(gl.exp2(nc), CB)
        # B = X / s_col / s_row, column scale first (SPEC columns: tokens for keys, channels for values)
        if IS_KEY:
            y = _f32(x, HALF_TILE, COMPILED) * _token_bcast(st_b)
            row_s = gl.exp2(nc)
            if not FOLD:
                y = y * _channel_bcast(sc_b)
        else:
            y = _f32(x, HALF_TILE, COMPILED) * _channel_bcast(sc_b)
            row_s = gl.exp2(nt)
            if not FOLD:
                y = y * _token_bcast(st_b)
        out_t = gl.exp2(-nt)
        out_c = gl.exp2(-nc)
    else:
        y = _f32(x, HALF_TILE, COMPILED)
        row_s = 1.0
        out_t = gl.full([RG, RI], 1.0, gl.float32, layout=TC)
        out_c = gl.full([C2, CG, VEC], 1.0, gl.float32, layout=CC)
    # Without FOLD y is B. With FOLD, B = y * row_s (row_s > 0 per RTN row) is never formed:
    # rounding is monotone, so min B = round(min y * row_s) exactly (and max), lo/hi/step are
    # bit-identical, and the codes are (y - min y) * (row_s / step) instead of (B - lo) / step:
    # a few ulps apart, i.e. different only at rounding ties. A row whose B values all round to one
    # value (hi == lo) gets multiplier 0: codes 0 like the reference's, whatever y's ulps say.
    QMAX: tl.constexpr = (1 << BITS) - 1
    md = a_ptr.dtype.element_ty
    if IS_KEY:
        # RTN per channel over the tile's tokens; a, z per channel, r per token.
        lo_y, hi_y = _to_channels(y, y, True, LC, COMPILED)
        lo, step, inv = _rtn_row_params(lo_y, hi_y, row_s, QMAX, FOLD and NORMALIZE)
        gl.store(a_ptr + n64 * D + ch_c, (out_c * step).to(md))
        gl.store(z_ptr + n64 * D + ch_c, (out_c * lo).to(md))
        gl.store(s_ptr + n64 * G + tok_c, out_t.to(md))
        lo_b = gl.convert_layout(lo_y, CB)
        inv_b = gl.convert_layout(inv, CB)
        v = _sub_exact(y, _channel_bcast(lo_b), COMPILED) * _channel_bcast(inv_b)
    else:
        lo_y, hi_y = _to_tokens(y, y, True, LT, COMPILED)
        lo, step, inv = _rtn_row_params(lo_y, hi_y, row_s, QMAX, FOLD and NORMALIZE)
        gl.store(a_ptr + n64 * G + tok_c, (out_t * step).to(md))
        gl.store(z_ptr + n64 * G + tok_c, (out_t * lo).to(md))
        gl.store(s_ptr + n64 * D + ch_c, out_c.to(md))
        lo_b = gl.convert_layout(lo_y, TB)
        inv_b = gl.convert_layout(inv, TB)
        v = _sub_exact(y, _token_bcast(lo_b), COMPILED) * _token_bcast(inv_b)
    # 0 <= v <= QMAX up to rounding, so the reference's clamp is a no-op (module docstring); the
    # magic-number rounding leaves code + 0x4B400000 in the bits. With FOLD and 2, 4 or 8 bits the
    # code is not masked: packing shifts codes by at most 6 bits and stores only the low byte, which
    # the magic's high bits (22 and up) never reach; 3-bit codes span 3 bytes and keep the mask.
    codes = (v + _ROUND_MAGIC).to(gl.int32, bitcast=True)
    if not FOLD or BITS == 3:
        codes = codes & QMAX
    if IS_KEY:
        _pack_store(codes, codes_ptr + n64 * (D * G * BITS // 8), 1, BITS, G, D, RG, RI, C2, CG, VEC, L5, KS)
    else:
        _pack_store(codes, codes_ptr + n64 * (G * D * BITS // 8), 4, BITS, G, D, RG, RI, C2, CG, VEC, L5, KS)


@jit
def _rtn_row_params(lo_y, hi_y, row_s, QMAX: tl.constexpr, FOLD: tl.constexpr):
    """(lo, step, code multiplier) of each RTN row from the min/max of y over the row. Without FOLD
    y is B itself: lo = min, step from the range, multiplier 1 / step. With FOLD, B = y * row_s
    (row_s > 0): lo and hi are min/max y times row_s (exactly min/max B: rounding is monotone) and
    the multiplier row_s / step applies to y - min y; 0 where hi == lo (a row of one B value)."""
    if FOLD:
        lo = lo_y * row_s
        hi = hi_y * row_s
        step = gl.maximum((hi - lo) / QMAX, _STEP_FLOOR)
        return lo, step, gl.where(hi > lo, row_s / step, 0.0)
    else:
        step = gl.maximum((hi_y - lo_y) / QMAX, _STEP_FLOOR)
        return lo_y, step, 1.0 / step


@jit
def _prefetch_tile_l2(x_ptr, x_stride_n, x_stride_t, n, n_tiles, G: tl.constexpr, LINES: tl.constexpr,
                      LINE_ELEMS: tl.constexpr, LP: tl.constexpr):  # fmt: skip
    """Ask L2 for tile n (if n < n_tiles): one ``prefetch.global.L2`` per 128-byte line of each
    token row (LINES lines of LINE_ELEMS elements per row); no registers held, no wait. GPU only."""
    i = gl.arange(0, G * LINES, layout=LP)
    n = gl.minimum(n, n_tiles - 1)  # the last program's last tile: prefetch something harmless
    ptr = x_ptr + n.to(gl.int64) * x_stride_n + (i // LINES) * x_stride_t + (i % LINES) * LINE_ELEMS
    gl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptr], dtype=gl.int32, is_pure=False, pack=1
    )


@jit
def _compress_kernel_v3(
    k_ptr, k_stride_n, k_stride_t, v_ptr, v_stride_n, v_stride_t,
    kc_ptr, ka_ptr, kz_ptr, kr_ptr, vc_ptr, va_ptr, vz_ptr, vs_ptr, n_tiles, n_programs,
    KB: tl.constexpr, VB: tl.constexpr, G: tl.constexpr, D: tl.constexpr, ITERS: tl.constexpr,
    NORMALIZE: tl.constexpr, RG: tl.constexpr, RI: tl.constexpr, C2: tl.constexpr, CG: tl.constexpr,
    VEC: tl.constexpr, HL_G: tl.constexpr, HL_D: tl.constexpr, L5: tl.constexpr, LT: tl.constexpr,
    LC: tl.constexpr, LT2: tl.constexpr, LC2: tl.constexpr, L6: tl.constexpr, KS: tl.constexpr,
    COMPILED: tl.constexpr, HALF_TILE: tl.constexpr = False, FOLD: tl.constexpr = False, TREE: tl.constexpr = False,
    PERSISTENT: tl.constexpr = False, PREFETCH: tl.constexpr = False,
    LINES: tl.constexpr = 1, LINE_ELEMS: tl.constexpr = 64, LP: tl.constexpr = None,
):  # fmt: skip
    """Program (p, 0) encodes key tiles, (p, 1) value tiles: tile p (grid (n_tiles, 2)) or, with
    PERSISTENT, tiles p, p + P, p + 2P, ... (grid (P, 2)). PREFETCH (persistent, compiled only)
    asks L2 for the program's next tile before encoding the current one, so that its load finds
    it there instead of waiting for HBM."""
    if PERSISTENT:
        # a while loop: Triton's interpreter cannot take runtime scalars as range() bounds
        n = gl.program_id(0)
        while n < n_tiles:
            if gl.program_id(1) == 0:
                if PREFETCH:
                    _prefetch_tile_l2(k_ptr, k_stride_n, k_stride_t, n + n_programs, n_tiles, G, LINES,
                                      LINE_ELEMS, LP)  # fmt: skip
                _compress_tile_v3(
                    k_ptr, k_stride_n, k_stride_t, kc_ptr, ka_ptr, kz_ptr, kr_ptr, n, True, KB, G, D, ITERS,
                    NORMALIZE, RG, RI, C2, CG, VEC, HL_G, HL_D, L5, LT, LC, LT2, LC2, L6, KS, COMPILED, HALF_TILE, FOLD, TREE,
                )  # fmt: skip
            else:
                if PREFETCH:
                    _prefetch_tile_l2(v_ptr, v_stride_n, v_stride_t, n + n_programs, n_tiles, G, LINES,
                                      LINE_ELEMS, LP)  # fmt: skip
                _compress_tile_v3(
                    v_ptr, v_stride_n, v_stride_t, vc_ptr, va_ptr, vz_ptr, vs_ptr, n, False, VB, G, D, ITERS,
                    NORMALIZE, RG, RI, C2, CG, VEC, HL_G, HL_D, L5, LT, LC, LT2, LC2, L6, KS, COMPILED, HALF_TILE, FOLD, TREE,
                )  # fmt: skip
            n += n_programs  # n_programs: the grid's axis 0
    else:
        n = gl.program_id(0)
        if gl.program_id(1) == 0:
            _compress_tile_v3(
                k_ptr, k_stride_n, k_stride_t, kc_ptr, ka_ptr, kz_ptr, kr_ptr, n, True, KB, G, D, ITERS,
                NORMALIZE, RG, RI, C2, CG, VEC, HL_G, HL_D, L5, LT, LC, LT2, LC2, L6, KS, COMPILED, HALF_TILE, FOLD, TREE,
            )  # fmt: skip
        else:
            _compress_tile_v3(
                v_ptr, v_stride_n, v_stride_t, vc_ptr, va_ptr, vz_ptr, vs_ptr, n, False, VB, G, D, ITERS,
                NORMALIZE, RG, RI, C2, CG, VEC, HL_G, HL_D, L5, LT, LC, LT2, LC2, L6, KS, COMPILED, HALF_TILE, FOLD, TREE,
            )  # fmt: skip


def _blocked(
    shape: list[int],
    lane_dims: list[int],
    warp_dims: list[int],
    num_warps: int,
    order: list[int] | None = None,
) -> BlockedLayout:
    """A blocked layout over ``shape`` that gives the 32 lanes, then the warps, to the listed dims
    in turn (as many as each dim can take); the rest of each dim stays in the thread's registers.
    Lanes or warps left over (a small tensor) go to the last listed dim as replicas."""
    rank = len(shape)
    rest, tpw, wpc = list(shape), [1] * rank, [1] * rank
    left = 32
    for dim in lane_dims:
        take = min(left, rest[dim])
        tpw[dim], rest[dim], left = take, rest[dim] // take, left // take
    tpw[lane_dims[-1]] *= left
    left = num_warps
    for dim in warp_dims:
        take = min(left, rest[dim])
        wpc[dim], rest[dim], left = take, rest[dim] // take, left // take
    wpc[warp_dims[-1]] *= left
    return BlockedLayout(rest, tpw, wpc, order or list(range(rank - 1, -1, -1)))


def tile_layout(g: int, d: int, dtype: torch.dtype, num_warps: int, lanes_per_token: int) -> dict:
    """Split of the tile [G, D] into the kernel's 5-D view for this launch.

    ``lanes_per_token`` lanes share a token (CG), the other ``32 / CG`` lanes and all warps split
    the tokens; each thread holds ``RI`` consecutive tokens x ``C2 * VEC`` channels (VEC: 16 bytes
    of the input dtype). ``HL_G``, ``HL_D``: half log2 of the unbiased std's divisors.
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


def kernel_config(
    g: int, d: int, dtype: torch.dtype, num_warps: int = 4, lanes_per_token: int = 8, key_bits: int = 4
) -> dict:
    """Layouts and sizes of one launch (constexpr arguments of ``_compress_kernel_v3`` + num_warps)."""
    lay = tile_layout(g, d, dtype, num_warps, lanes_per_token)
    rg, ri, c2, cg, vec, w = lay["RG"], lay["RI"], lay["C2"], lay["CG"], lay["VEC"], lay["num_warps"]
    tr = rg // w
    tile = BlockedLayout([1, ri, c2, 1, vec], [tr, 1, 1, cg, 1], [w, 1, 1, 1, 1], [4, 3, 2, 1, 0])
    # the tile layout with a trailing pair axis in registers (to broadcast two channel vectors at once)
    tile2 = BlockedLayout(
        [1, ri, c2, 1, vec, 2], [tr, 1, 1, cg, 1, 1], [w, 1, 1, 1, 1, 1], [5, 4, 3, 2, 1, 0]
    )
    return {
        "RG": rg, "RI": ri, "C2": c2, "CG": cg, "VEC": vec, "HL_G": lay["HL_G"], "HL_D": lay["HL_D"],
        "L5": tile,
        "L6": tile2,
        # compact token layout over [RG, RI, CG]: tokens over lanes, then warps; CG partials in registers
        "LT": _blocked([rg, ri, cg], [1, 0, 2], [0, 1, 2], w),
        # compact channel layout over [RG, C2, CG, VEC]: channels over lanes (VEC, C2, then CG) and
        # warps (CG first, so that a reduction over all channels crosses warps along one axis only);
        # RG in registers
        "LC": _blocked([rg, c2, cg, vec], [3, 1, 2, 0], [2, 1, 3, 0], w),
        # the same with a trailing (sum d, sum d^2) pair axis kept in registers
        "LT2": _blocked([rg, ri, cg, 2], [1, 0, 2, 3], [0, 1, 2, 3], w),
        "LC2": _blocked([rg, c2, cg, vec, 2], [3, 1, 2, 0, 4], [2, 1, 3, 0, 4], w),
        # packed key bytes [G / PER, C2, CG, VEC]: lanes along a channel row's bytes first, and those
        # bytes first in registers, so stores are whole rows (and vectors where a thread holds more)
        "KS": _blocked([g // (8 if key_bits == 3 else 8 // key_bits), c2, cg, vec], [0, 3, 2, 1], [2, 1, 3, 0], w,
                       order=[0, 3, 2, 1]),  # fmt: skip
        "num_warps": w,
    }  # fmt: skip


def launch_options(
    n: int,
    x: torch.Tensor,
    persistent: int | None,
    prefetch: bool,
    max_registers: int | None,
    num_warps: int,
    half_tile: bool = False,
    fold: bool = False,
    tree: bool = False,
) -> dict:
    """Grid size (``programs``, per axis-1 index: keys / values) and the constexpr / compile options
    of the persistent, prefetch, register-cap, 16-bit-tile, folded-epilogue and tree-sum launch variants
    (see ``compress_tiles``)."""
    if persistent is not None and persistent < 1:
        raise ValueError(f"persistent={persistent}: expected a number of programs per SM >= 1")
    if prefetch and not persistent:
        raise ValueError("prefetch needs a persistent launch (persistent=R programs per SM)")
    if max_registers is not None and not 24 <= max_registers <= 255:
        raise ValueError(f"max_registers={max_registers}: expected 24..255")
    opts: dict = {"programs": n, "HALF_TILE": bool(half_tile), "FOLD": bool(fold), "TREE": bool(tree)}
    if persistent:
        # the interpreter has no SMs: 2 "SMs" make a small batch loop
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2
        opts["programs"] = max(1, min(n, sms * persistent // 2))
        opts["PERSISTENT"] = True
    if prefetch and not interpreting():
        g, d = x.shape[-2:]
        line_elems = 128 // x.element_size()
        lines = max(1, d // line_elems)
        per_thread = max(1, g * lines // (32 * num_warps))
        opts.update(PREFETCH=True, LINES=lines, LINE_ELEMS=line_elems,
                    LP=BlockedLayout([per_thread], [32], [num_warps], [0]))  # fmt: skip
    if max_registers is not None and not interpreting():
        opts["maxnreg"] = max_registers
    return opts

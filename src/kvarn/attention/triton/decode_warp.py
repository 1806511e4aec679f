"""Decode attention over packed KVarN tiles, one warp per program, queries on the MMA's N side.

Same contract and result as ``decode_tc.quantized_decode_attention`` (docs/layerstore.md), in two
launches: this kernel (the 16-bit segments and the packed tiles) and decode_tc's log-sum-exp merge.
Why a second kernel: decode_tc puts the query rows on the M side of the
tensor-core product, so group 4 x one query is padded to 16 rows, and its four warps exchange
the softmax weights through shared memory every tile; its loop is issue-bound (sm_90: ~3,270
instructions per tile of 128 tokens). Here, per tile (docs/gpu_decode_notes.md, session 5):

* Both products run transposed, ``S^T = codes_k^T @ (q * a_k)^T`` and ``O^T = codes_v^T @ (p * a_v)^T``,
  so the codes are the A operand (M = 16 words, rows of the MMA) and the queries the N side
  (``mma.m16n8k16``: N = 8, group 4 pads to 8, not 16).
* Codes go from global memory to shared memory by ``cp.async`` (``stages`` tiles in flight) and
  come back with ``ldmatrix.trans`` straight into the A-operand registers; one ``and`` per two codes
  (plus one shift for fields above mantissa bit 10) makes them subnormal float16 operands
  ``code * 2**(s-24)`` (decode_tc's "subnormal" code operands), the power of two folded into the
  float32 step that adds the zero-point term.
* Key words ``[D, G*kb/16]`` as stored: field f of word w is token ``(16/kb)*w + f`` ("key plane f"),
  a ``[G*kb/16, D]`` A operand after the transposed load. Value rows are staged plane-major in
  shared memory (plane f = the value rows of key plane f's tokens), so the value product of plane
  f takes plane f's softmax weights as they come out of the key product (one register transpose,
  ``convert_layout``); field e of value word u is channel ``(16/vb)*u + e``.
* One warp owns a whole (row block, KV head, split): its online softmax never leaves the warp,
  and the many small programs (8 per SM on an H100/H200) hide the memory latency together.
* The 16-bit segments (new tokens, sink, tail) are one-warp programs of the same launch, in
  chunks of TC tokens (``_dense_chunk``), each writing its own partial.
* A tile step is its key side (``_key_scores``) then its value side (``_softmax_values``);
  ``pipeline=True`` runs tile j + 1's key side beside tile j's value side (``_pipelined_step``;
  opt-in: slower on the H200, docs/gpu.md session 6).

Scales fold as in decode_tc (SPEC "attention over quantized tiles"; log2 domain, softmax scale in q):
  scores  s[t, n] = r[t] * ((codes_k^T @ (q a_k)^T)[t, n] + q[n] . z_k)
  output  o[d, n] = c[d] * ((codes_v^T @ (p a_v)^T)[d, n] + p[:, n] . z_v)
float16 operands (11 significant bits in q * a_k and p * a_v; with ``QA_SPLIT`` / ``PA_SPLIT``
the rounding remainders are second operands, as decode_tc does for float16 models), float32
accumulation.

This is a Gluon kernel (explicit layouts). Under ``TRITON_INTERPRET=1`` the module binds ``gl`` to
``gluon_interp`` (layouts dropped, shared memory a plain tensor, ``mma_v2`` a float32 ``tl.dot``,
the code fields Triton integer operations), and the interpreter runs this same source on the CPU.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kvarn.attention.triton import decode_tc, interpreting
from kvarn.attention.triton.contract import (
    STORAGE,
    check_decode_inputs,
    kernel_layout,
    output_buffer,
    shape_unsupported_reason,
)
from kvarn.attention.triton.copy_policy import graph_step_copies_active
from kvarn.attention.triton.decode_tc import (
    _subnormal_field_s,
    subnormal_field_asm_text,
    subnormal_field_scale,
)
from kvarn.attention.triton.launch import FastLauncher
from kvarn.attention.triton.split_k import sm_count, split_workspace

if interpreting():
    from kvarn.attention.triton import gluon_interp as gl

    async_copy = gl
    mma_v2 = gl.mma_v2
    tma = gl.tma
    mbarrier = gl.mbarrier
    fence_async_shared = gl.fence_async_shared
    jit = triton.jit
else:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

    jit = gluon.jit
from triton.experimental.gluon.language import (  # plain dataclasses, usable everywhere
    BlockedLayout,
    DistributedLinearLayout,
    DotOperandLayout,
    NVMMADistributedLayout,
    NVMMASharedLayout,
    SwizzledSharedLayout,
)
from triton.experimental.gluon.language.nvidia.hopper.mbarrier import MBarrierLayout

KERNEL_BITS = (2, 4, 8)
MAX_QUERIES = decode_tc.MAX_QUERIES
# Splits per (row, KV head, row block) a caller may ask for (the merge takes any count: its S1_PAD
# is the next power of two), and the most the default picks (decode_tc's cap; higher defaults are not timed).
MAX_SPLITS = 264
DEFAULT_MAX_SPLITS = decode_tc.MAX_SPLITS
# Query rows per program (the MMA's N): 8 fills one n8 tile (group 4 x 1 query pads to 8).
ROWS_PER_PROGRAM = 8
# How value rows are copied to the plane-major stage (launch option ``value_copy``; index = VCOPY).
VALUE_COPIES = ("planes", "coalesced")
# How a tile reaches shared memory (launch option ``copy``): per-lane cp.async, or TMA (sm_90+).
COPIES = ("cp.async", "tma")
# Tiles in flight per copy path: cp.async refills a slot one step after it was read, so it needs
# two; TMA refills each side of a slot as soon as it has been read (``_tile_step``), and one slot
# (16 KB per program at K4V2 D = G = 128) measured faster than two on the H200 (session 8:
# 128k x 1 48.3 vs 52.6 us, 32k x 8 76.4 vs 80.7).
DEFAULT_STAGES = {"cp.async": 2, "tma": 1}
# Last compiled launch (registers, spills) for benchmark diagnostics.
LAST_LAUNCH: list = [None]


@jit
def _field(words, BITS: tl.constexpr, POS: tl.constexpr, INTERPRET: tl.constexpr):
    """The BITS-bit field at bit POS of every 16-bit word as a float16 operand, exactly
    ``code * 2**(s-24)`` (``decode_tc.subnormal_field_position``): one ``and`` per 2 codes, plus
    one shift (shared by the high fields of a register) for fields above mantissa bit 10."""
    if INTERPRET:
        code = ((words >> POS) & ((1 << BITS) - 1)).to(gl.int16)
        return (code << _subnormal_field_s(BITS, POS)).to(gl.float16, bitcast=True)
    else:
        return gl.inline_asm_elementwise(
            subnormal_field_asm_text(BITS, POS), "=r,r", [words], dtype=gl.float16, is_pure=True, pack=2
        )


@jit
def _plane_scores(kwords, qa, qa_lo, qz, r, f: tl.constexpr, KB: tl.constexpr, QA_SPLIT: tl.constexpr,
                  INTERPRET: tl.constexpr, MMA: tl.constexpr):  # fmt: skip
    """Scores ``[KW, N]`` of key plane f (tokens NPK*w + f; ``r`` their key token scales), log2 domain."""
    a = _field(kwords, KB, KB * f, INTERPRET)
    KW: tl.constexpr = kwords.shape[0]
    N: tl.constexpr = qa.shape[1]
    acc = mma_v2(a, qa, gl.zeros([KW, N], dtype=gl.float32, layout=MMA))
    if QA_SPLIT:
        acc = mma_v2(a, qa_lo, acc)
    return (acc * subnormal_field_scale(KB, KB * f) + qz[None, :]) * r.to(gl.float32)[:, None]


@jit
def _columns(x, LAYOUT: tl.constexpr):
    """The C = 2, 4 or 8 columns of ``x [R, C]`` as 8 ``[R]`` tensors in LAYOUT (columns past C
    repeat column 0). The columns live in registers (``meta_layout``), so the splits move nothing
    and the conversions to the MMA's row layout are no-ops."""
    R: tl.constexpr = x.shape[0]
    C: tl.constexpr = x.shape[1]
    if C == 2:
        c0, c1 = gl.split(x)
        c2 = c0
        c3 = c0
        c4 = c0
        c5 = c0
        c6 = c0
        c7 = c0
    elif C == 4:
        a, b = gl.split(gl.reshape(x, [R, 2, 2]))  # a: columns 0, 2; b: 1, 3
        c0, c2 = gl.split(a)
        c1, c3 = gl.split(b)
        c4 = c0
        c5 = c0
        c6 = c0
        c7 = c0
    else:
        a, b = gl.split(gl.reshape(x, [R, 4, 2]))  # a: columns 0, 2, 4, 6; b: 1, 3, 5, 7
        aa, ab = gl.split(gl.reshape(a, [R, 2, 2]))  # aa: 0, 4; ab: 2, 6
        ba, bb = gl.split(gl.reshape(b, [R, 2, 2]))  # ba: 1, 5; bb: 3, 7
        c0, c4 = gl.split(aa)
        c2, c6 = gl.split(ab)
        c1, c5 = gl.split(ba)
        c3, c7 = gl.split(bb)
    return (
        gl.convert_layout(c0, LAYOUT), gl.convert_layout(c1, LAYOUT), gl.convert_layout(c2, LAYOUT),
        gl.convert_layout(c3, LAYOUT), gl.convert_layout(c4, LAYOUT), gl.convert_layout(c5, LAYOUT),
        gl.convert_layout(c6, LAYOUT), gl.convert_layout(c7, LAYOUT),
    )  # fmt: skip


@jit
def _value_plane(
    s, m_new, va, vz, v_stage, vbase, psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7,
    f: tl.constexpr, VB: tl.constexpr, NPV: tl.constexpr,
    PA_SPLIT: tl.constexpr, INTERPRET: tl.constexpr, A_OP: tl.constexpr, B_OP: tl.constexpr,
    VCOPY: tl.constexpr = 0,
):  # fmt: skip
    """Softmax weights of key plane f and the value product of its tokens into P0..P(NPV-1)
    (field e of the value words: channels NPV*u + e); row sums of p and p . z_v accumulated
    elementwise (reduced once per tile)."""
    p = gl.exp2(s - m_new[None, :])
    psum += p
    pzsum += p * vz.to(gl.float32)[:, None]
    pa32 = p * va.to(gl.float32)[:, None]
    pa = pa32.to(gl.float16)
    pa_b = gl.convert_layout(pa, B_OP)
    pa_lo_b = pa_b
    if PA_SPLIT:
        pa_lo_b = gl.convert_layout((pa32 - pa.to(gl.float32)).to(gl.float16), B_OP)
    vwords = _plane_words(v_stage, vbase, f, s.shape[0], VCOPY, A_OP)
    P0 = _value_field(vwords, pa_b, pa_lo_b, P0, 0, VB, PA_SPLIT, INTERPRET)
    P1 = _value_field(vwords, pa_b, pa_lo_b, P1, 1, VB, PA_SPLIT, INTERPRET)
    if NPV >= 4:
        P2 = _value_field(vwords, pa_b, pa_lo_b, P2, 2, VB, PA_SPLIT, INTERPRET)
        P3 = _value_field(vwords, pa_b, pa_lo_b, P3, 3, VB, PA_SPLIT, INTERPRET)
    if NPV >= 8:
        P4 = _value_field(vwords, pa_b, pa_lo_b, P4, 4, VB, PA_SPLIT, INTERPRET)
        P5 = _value_field(vwords, pa_b, pa_lo_b, P5, 5, VB, PA_SPLIT, INTERPRET)
        P6 = _value_field(vwords, pa_b, pa_lo_b, P6, 6, VB, PA_SPLIT, INTERPRET)
        P7 = _value_field(vwords, pa_b, pa_lo_b, P7, 7, VB, PA_SPLIT, INTERPRET)
    return psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7


@jit
def _plane_words(v_stage, vbase, f: tl.constexpr, KW: tl.constexpr, VCOPY: tl.constexpr, A_OP: tl.constexpr):
    """The value words of key plane f's tokens as the A operand ``[VW, KW]`` (ldmatrix.trans)."""
    if VCOPY == 1:  # stage [G, VW] in plane-major row order: plane f = rows f*KW ..
        vplane = v_stage.index(vbase).slice(f * KW, KW)
    else:  # one [KW, VW] slot per plane
        vplane = v_stage.index(vbase + f)
    return vplane.permute((1, 0)).load(A_OP)


@jit
def _value_pair(
    s, m_new, va, vz, v_stage, vbase, psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7, left,
    f: tl.constexpr, VB: tl.constexpr, NPV: tl.constexpr, PA_SPLIT: tl.constexpr,
    INTERPRET: tl.constexpr, A_OP: tl.constexpr, B_OP: tl.constexpr, VCOPY: tl.constexpr,
    HALF3: tl.constexpr, MMA: tl.constexpr,
):  # fmt: skip
    """Column halves (``_pair_scores``): softmax weights of key planes f (left half of the columns)
    and f + 1 (right half), and the value products of both planes' tokens into P0..P(NPV-1); ``va``
    / ``vz`` the planes' value token scales and zeros as ``[KW, 2]`` (``_pairs``)."""
    p = gl.exp2(s - m_new[None, :])
    psum += p
    pzsum += _by_half(p, vz, HALF3, MMA)
    pa32 = _by_half(p, va, HALF3, MMA)
    pa = pa32.to(gl.float16)
    pa_l, pa_r = _halves(gl.convert_layout(pa, B_OP), left)
    pa_lo_l = pa_l
    pa_lo_r = pa_r
    if PA_SPLIT:
        pa_lo_l, pa_lo_r = _halves(gl.convert_layout((pa32 - pa.to(gl.float32)).to(gl.float16), B_OP), left)
    vw0 = _plane_words(v_stage, vbase, f, s.shape[0], VCOPY, A_OP)
    vw1 = _plane_words(v_stage, vbase, f + 1, s.shape[0], VCOPY, A_OP)
    P0 = _value_field(vw1, pa_r, pa_lo_r, _value_field(vw0, pa_l, pa_lo_l, P0, 0, VB, PA_SPLIT, INTERPRET),
                      0, VB, PA_SPLIT, INTERPRET)  # fmt: skip
    P1 = _value_field(vw1, pa_r, pa_lo_r, _value_field(vw0, pa_l, pa_lo_l, P1, 1, VB, PA_SPLIT, INTERPRET),
                      1, VB, PA_SPLIT, INTERPRET)  # fmt: skip
    if NPV >= 4:
        P2 = _value_field(vw1, pa_r, pa_lo_r, _value_field(vw0, pa_l, pa_lo_l, P2, 2, VB, PA_SPLIT, INTERPRET),
                          2, VB, PA_SPLIT, INTERPRET)  # fmt: skip
        P3 = _value_field(vw1, pa_r, pa_lo_r, _value_field(vw0, pa_l, pa_lo_l, P3, 3, VB, PA_SPLIT, INTERPRET),
                          3, VB, PA_SPLIT, INTERPRET)  # fmt: skip
    if NPV >= 8:
        P4 = _value_field(vw1, pa_r, pa_lo_r, _value_field(vw0, pa_l, pa_lo_l, P4, 4, VB, PA_SPLIT, INTERPRET),
                          4, VB, PA_SPLIT, INTERPRET)  # fmt: skip
        P5 = _value_field(vw1, pa_r, pa_lo_r, _value_field(vw0, pa_l, pa_lo_l, P5, 5, VB, PA_SPLIT, INTERPRET),
                          5, VB, PA_SPLIT, INTERPRET)  # fmt: skip
        P6 = _value_field(vw1, pa_r, pa_lo_r, _value_field(vw0, pa_l, pa_lo_l, P6, 6, VB, PA_SPLIT, INTERPRET),
                          6, VB, PA_SPLIT, INTERPRET)  # fmt: skip
        P7 = _value_field(vw1, pa_r, pa_lo_r, _value_field(vw0, pa_l, pa_lo_l, P7, 7, VB, PA_SPLIT, INTERPRET),
                          7, VB, PA_SPLIT, INTERPRET)  # fmt: skip
    return psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7


@jit
def _value_field(vwords, pa_b, pa_lo_b, acc, e: tl.constexpr, VB: tl.constexpr, PA_SPLIT: tl.constexpr,
                 INTERPRET: tl.constexpr):  # fmt: skip
    a = _field(vwords, VB, VB * e, INTERPRET)
    acc = mma_v2(a, pa_b, acc)
    if PA_SPLIT:
        acc = mma_v2(a, pa_lo_b, acc)
    return acc


@jit
def _rescale(acc, P, c, alpha, pz, e: tl.constexpr, VB: tl.constexpr):
    """acc * alpha + c_v * (P * 2**(24-s) + p . z_v) for the channels NPV*u + e of field e."""
    c = c.to(gl.float32)
    return acc * alpha[None, :] + c[:, None] * (P * subnormal_field_scale(VB, VB * e) + pz[None, :])


@jit
def _store_o(acc, po_rows, uu, row_ok, e: tl.constexpr, NPV: tl.constexpr):
    gl.store(po_rows[None, :] + (NPV * uu + e)[:, None], acc, mask=row_ok[None, :])


@jit
def _half_mask(N: tl.constexpr, LAYOUT: tl.constexpr):
    """``[N]`` float16 in LAYOUT: 1 in the left half of the columns (n < N/2), 0 in the right."""
    return _half_columns(1.0, 0.0, N, LAYOUT).to(gl.float16)


@jit
def _halves(b, left):
    """B operand ``b [K, N]`` with its right / left half of the columns zeroed: one float16x2
    multiply per register (a lane's B registers all hold one column)."""
    right = (1.0 - left.to(gl.float32)).to(gl.float16)
    return b * left[None, :], b * right[None, :]


@jit
def _pairs(x, HALF3: tl.constexpr):
    """Token metadata ``x [KW, NPK]`` loaded in ``halves_layouts``' TOK_H layout (lane bit 1 picks
    column 2p + 1 over 2p) as up to 4 ``[KW, 2]`` tensors, pair p = columns (2p, 2p + 1), each in
    ``SliceLayout(2, HALF3)``: what ``_by_half`` multiplies into an accumulator's halves. The
    splits and permutes only rename registers (offline sm_90: no shuffle, no shared memory)."""
    KW: tl.constexpr = x.shape[0]
    NPK: tl.constexpr = x.shape[1]
    LAYOUT: tl.constexpr = gl.SliceLayout(2, HALF3)
    if NPK == 2:
        y0 = x
        y1 = x
        y2 = x
        y3 = x
    elif NPK == 4:
        y0, y1 = gl.split(gl.permute(gl.reshape(x, [KW, 2, 2]), (0, 2, 1)))  # [KW, half, pair]
        y2 = y0
        y3 = y0
    else:  # pair = 2 * pa + pb
        a, b = gl.split(gl.permute(gl.reshape(x, [KW, 2, 2, 2]), (0, 3, 1, 2)))  # [KW, half, pa, pb]
        y0, y2 = gl.split(a)
        y1, y3 = gl.split(b)
    return (
        gl.convert_layout(y0.to(gl.float32), LAYOUT), gl.convert_layout(y1.to(gl.float32), LAYOUT),
        gl.convert_layout(y2.to(gl.float32), LAYOUT), gl.convert_layout(y3.to(gl.float32), LAYOUT),
    )  # fmt: skip


@jit
def _by_half(x, y, HALF3: tl.constexpr, MMA: tl.constexpr):
    """``x [R, N]`` (MMA accumulator layout) times ``y [R, 2]``: column n takes ``y[:, n // (N/2)]``."""
    R: tl.constexpr = x.shape[0]
    N: tl.constexpr = x.shape[1]
    x3 = gl.convert_layout(gl.reshape(x, [R, 2, N // 2]), HALF3)
    return gl.convert_layout(gl.reshape(x3 * gl.expand_dims(y, 2), [R, N]), MMA)


@jit
def _half_columns(lo, hi, N: tl.constexpr, LAYOUT: tl.constexpr):
    """``[N]`` in LAYOUT: ``lo`` in the left half of the columns, ``hi`` in the right."""
    n = gl.arange(0, N, layout=LAYOUT)
    return gl.where(n < N // 2, lo, hi)


@jit
def _fold_halves(x, N: tl.constexpr, LAYOUT: tl.constexpr, MAX: tl.constexpr = False):
    """``[N]`` -> column n holds ``x[n] + x[n ^ N/2]`` (``MAX``: their maximum), in both halves."""
    x2 = gl.reshape(x, [2, N // 2])
    both = gl.max(x2, axis=0) if MAX else gl.sum(x2, axis=0)
    return gl.convert_layout(gl.reshape(gl.expand_dims(both, 0) + gl.zeros_like(x2), [N]), LAYOUT)


@jit
def _fold_halves_2d(x, HALF3: tl.constexpr, MMA: tl.constexpr):
    """``[R, N]`` -> column n holds ``x[:, n] + x[:, n ^ N/2]`` (one butterfly shuffle)."""
    R: tl.constexpr = x.shape[0]
    N: tl.constexpr = x.shape[1]
    x3 = gl.convert_layout(gl.reshape(x, [R, 2, N // 2]), HALF3)
    folded = gl.expand_dims(gl.sum(x3, axis=1), 1) + gl.zeros_like(x3)
    return gl.convert_layout(gl.reshape(folded, [R, N]), MMA)


@jit
def _merge_halves(m_i, l_i, O0, O1, O2, O3, O4, O5, O6, O7, NPV: tl.constexpr, HALF3: tl.constexpr,
                  MMA: tl.constexpr):  # fmt: skip
    """Column halves: columns n and n + N/2 hold two online-softmax streams of one query (the even
    and the odd key planes' tokens); combine them by log-sum-exp, the result in both halves."""
    N: tl.constexpr = m_i.shape[0]
    COLS: tl.constexpr = gl.SliceLayout(0, MMA)
    m_both = _fold_halves(m_i, N, COLS, True)
    # an empty split has -inf in both halves: its weights come out 0 (exp2(-inf)), not NaN
    w = gl.exp2(m_i - gl.where(m_both == float("-inf"), 0.0, m_both))
    l_i = _fold_halves(l_i * w, N, COLS)
    O0 = _fold_halves_2d(O0 * w[None, :], HALF3, MMA)
    O1 = _fold_halves_2d(O1 * w[None, :], HALF3, MMA)
    if NPV >= 4:
        O2 = _fold_halves_2d(O2 * w[None, :], HALF3, MMA)
        O3 = _fold_halves_2d(O3 * w[None, :], HALF3, MMA)
    if NPV >= 8:
        O4 = _fold_halves_2d(O4 * w[None, :], HALF3, MMA)
        O5 = _fold_halves_2d(O5 * w[None, :], HALF3, MMA)
        O6 = _fold_halves_2d(O6 * w[None, :], HALF3, MMA)
        O7 = _fold_halves_2d(O7 * w[None, :], HALF3, MMA)
    return m_both, l_i, O0, O1, O2, O3, O4, O5, O6, O7


@jit
def _pair_scores(kwords, qa_l, qa_r, qa_lo_l, qa_lo_r, qz, r, f: tl.constexpr, KB: tl.constexpr,
                 QA_SPLIT: tl.constexpr, INTERPRET: tl.constexpr, MMA: tl.constexpr,
                 HALF3: tl.constexpr):  # fmt: skip
    """Scores ``[KW, N]`` of key planes f (left half of the columns) and f + 1 (right half) in one
    accumulator; ``r`` their token scales as ``[KW, 2]`` (``_pairs``)."""
    a0 = _field(kwords, KB, KB * f, INTERPRET)
    a1 = _field(kwords, KB, KB * (f + 1), INTERPRET)
    KW: tl.constexpr = kwords.shape[0]
    N: tl.constexpr = qa_l.shape[1]
    acc = mma_v2(a0, qa_l, gl.zeros([KW, N], dtype=gl.float32, layout=MMA))
    acc = mma_v2(a1, qa_r, acc)
    if QA_SPLIT:
        acc = mma_v2(a0, qa_lo_l, acc)
        acc = mma_v2(a1, qa_lo_r, acc)
    scale = _half_columns(
        subnormal_field_scale(KB, KB * f), subnormal_field_scale(KB, KB * (f + 1)), N, gl.SliceLayout(0, MMA)
    )
    return _by_half(acc * scale[None, :] + qz[None, :], r, HALF3, MMA)


@jit
def _issue_tile(
    j, ok, slot, stages, offs, bases, VW: tl.constexpr, NPK: tl.constexpr, VCOPY: tl.constexpr = 0,
    TMA: tl.constexpr = None,
):  # fmt: skip
    """cp.async of tile j into stage ``slot``, as one commit group: key words as stored, value
    rows plane-major (plane f = tokens NPK*w + f), and the tile's six metadata vectors (so no
    load of the tile loop waits on global memory). With TMA the same bytes to the same places,
    each side on its own barrier (``_issue_keys_tma``, ``_issue_values_tma``)."""
    if TMA is not None:
        _issue_keys_tma(j, ok, slot, stages, offs, bases, TMA)
        _issue_values_tma(j, ok, slot, stages, offs, bases, TMA)
    else:
        _issue_keys(j, ok, slot, stages, offs, bases)
        _issue_values(j, ok, slot, stages, offs, bases, VW, NPK, VCOPY)
        async_copy.commit_group()


@jit
def _issue_keys_tma(j, ok, slot, stages, offs, bases, LAYOUTS: tl.constexpr):
    """The key side of tile j into stage ``slot`` by TMA (``copy="tma"``; one thread issues, the
    slot's key barrier counts the bytes): the key words ``[D, KW]`` (a box of a ``[rows, KW]``
    view), the key channel scales and zeros and the key token scales (1-D boxes). ``bases``
    holds each tensor's coordinate of the (row, head)'s tile 0 and its step per tile (set in
    ``_tiles_program``)."""
    k_stage, v_stage, km_stage, tm_stage, c_stage = stages
    descs, bars, v_boxes = offs
    META1: tl.constexpr = LAYOUTS[2]  # 1-D view of a metadata slot (the descriptors' layout)
    kc_d, vc_d, ka_d, kz_d, kr_d, va_d, vz_d, vs_d = descs
    (
        k_row, k_step, v_row, v_step, ka_o, ka_step, kz_o, kz_step, kr_o, kr_step,
        va_o, va_step, vz_o, vz_step, vs_o, vs_step,
    ) = bases  # fmt: skip
    D: tl.constexpr = km_stage.shape[1]
    G: tl.constexpr = tm_stage.shape[1] * tm_stage.shape[2]
    md: tl.constexpr = km_stage.dtype
    KW: tl.constexpr = k_stage.shape[2]
    NBYTES: tl.constexpr = 2 * D * KW + (md.primitive_bitwidth // 8) * (2 * D + G)
    bar = bars.index(2 * slot)
    mbarrier.expect(bar, NBYTES, pred=ok)
    tma.async_copy_global_to_shared(kc_d, [k_row + j * k_step, 0], bar, k_stage.index(slot), pred=ok)
    tma.async_copy_global_to_shared(
        ka_d, [ka_o + j * ka_step], bar, km_stage.index(2 * slot)._reinterpret(md, [D], META1), pred=ok
    )
    tma.async_copy_global_to_shared(
        kz_d, [kz_o + j * kz_step], bar, km_stage.index(2 * slot + 1)._reinterpret(md, [D], META1), pred=ok
    )
    tma.async_copy_global_to_shared(
        kr_d, [kr_o + j * kr_step], bar, tm_stage.index(3 * slot)._reinterpret(md, [G], META1), pred=ok
    )


@jit
def _issue_values_tma(j, ok, slot, stages, offs, bases, LAYOUTS: tl.constexpr):
    """The value side of tile j into stage ``slot`` by TMA, on the slot's value barrier: the
    value rows as NPK planes ``[NPK, KW, VW]`` in one box (a 3-D view whose outer dimension is
    the plane f, stride one row, and middle the word w, stride NPK rows: the plane-major order of
    the cp.async path), the value token scales and zeros and the value channel scales."""
    k_stage, v_stage, km_stage, tm_stage, c_stage = stages
    descs, bars, v_boxes = offs
    META1: tl.constexpr = LAYOUTS[2]
    kc_d, vc_d, ka_d, kz_d, kr_d, va_d, vz_d, vs_d = descs
    (
        k_row, k_step, v_row, v_step, ka_o, ka_step, kz_o, kz_step, kr_o, kr_step,
        va_o, va_step, vz_o, vz_step, vs_o, vs_step,
    ) = bases  # fmt: skip
    D: tl.constexpr = km_stage.shape[1]
    G: tl.constexpr = tm_stage.shape[1] * tm_stage.shape[2]
    md: tl.constexpr = km_stage.dtype
    VW: tl.constexpr = v_stage.shape[2]
    NBYTES: tl.constexpr = 2 * G * VW + (md.primitive_bitwidth // 8) * (2 * G + D)
    bar = bars.index(2 * slot + 1)
    mbarrier.expect(bar, NBYTES, pred=ok)
    tma.async_copy_global_to_shared(vc_d, [0, v_row + j * v_step, 0], bar, v_boxes.index(slot), pred=ok)
    tma.async_copy_global_to_shared(
        va_d, [va_o + j * va_step], bar, tm_stage.index(3 * slot + 1)._reinterpret(md, [G], META1), pred=ok
    )
    tma.async_copy_global_to_shared(
        vz_d, [vz_o + j * vz_step], bar, tm_stage.index(3 * slot + 2)._reinterpret(md, [G], META1), pred=ok
    )
    tma.async_copy_global_to_shared(
        vs_d, [vs_o + j * vs_step], bar, c_stage.index(slot)._reinterpret(md, [D], META1), pred=ok
    )


@jit
def _issue_keys(j, ok, slot, stages, offs, bases):
    """cp.async (uncommitted) of tile j's key side into stage ``slot``: the key words as stored,
    the key channel scales and zeros, and the key token scales."""
    k_stage, v_stage, km_stage, tm_stage, c_stage = stages
    k_off, v_off, d_off, t_off, c_off = offs
    (
        kw_base, skw_n, vw_base, svw_n, ka_base, ska_n, kz_base, skz_n, kr_base, skr_n,
        va_base, sva_n, vz_base, svz_n, vs_base, svs_n,
    ) = bases  # fmt: skip
    j64 = j.to(gl.int64)
    async_copy.async_copy_global_to_shared(k_stage.index(slot), kw_base + j64 * skw_n + k_off, mask=ok)
    async_copy.async_copy_global_to_shared(km_stage.index(2 * slot), ka_base + j64 * ska_n + d_off, mask=ok)
    async_copy.async_copy_global_to_shared(
        km_stage.index(2 * slot + 1), kz_base + j64 * skz_n + d_off, mask=ok
    )
    async_copy.async_copy_global_to_shared(tm_stage.index(3 * slot), kr_base + j64 * skr_n + t_off, mask=ok)


@jit
def _issue_values(
    j, ok, slot, stages, offs, bases, VW: tl.constexpr, NPK: tl.constexpr, VCOPY: tl.constexpr = 0
):
    """cp.async (uncommitted) of tile j's value side into stage ``slot``: the value rows
    plane-major, the value token scales and zeros, and the value channel scales."""
    k_stage, v_stage, km_stage, tm_stage, c_stage = stages
    k_off, v_off, d_off, t_off, c_off = offs
    (
        kw_base, skw_n, vw_base, svw_n, ka_base, ska_n, kz_base, skz_n, kr_base, skr_n,
        va_base, sva_n, vz_base, svz_n, vs_base, svs_n,
    ) = bases  # fmt: skip
    j64 = j.to(gl.int64)
    vw_t = vw_base + j64 * svw_n + v_off
    if VCOPY == 1:  # one copy; v_off sends token 4w + f (contiguous per instruction) to row f*KW + w
        async_copy.async_copy_global_to_shared(v_stage.index(slot), vw_t, mask=ok)
    else:  # one copy per plane (rows 4w + f: strided reads, 4 requests per 128-byte line)
        for f in gl.static_range(NPK):
            async_copy.async_copy_global_to_shared(v_stage.index(slot * NPK + f), vw_t + f * VW, mask=ok)
    async_copy.async_copy_global_to_shared(
        tm_stage.index(3 * slot + 1), va_base + j64 * sva_n + t_off, mask=ok
    )
    async_copy.async_copy_global_to_shared(
        tm_stage.index(3 * slot + 2), vz_base + j64 * svz_n + t_off, mask=ok
    )
    async_copy.async_copy_global_to_shared(c_stage.index(slot), vs_base + j64 * svs_n + c_off, mask=ok)


@jit
def _tile_step(
    j, start, end, qT, m_i, l_i, O0, O1, O2, O3, O4, O5, O6, O7, stages, offs, bases,
    KB: tl.constexpr, VB: tl.constexpr, STAGES: tl.constexpr, QA_SPLIT: tl.constexpr,
    PA_SPLIT: tl.constexpr, INTERPRET: tl.constexpr, MMA: tl.constexpr, A_OP: tl.constexpr,
    B_OP: tl.constexpr, TOK_META: tl.constexpr, CH_META: tl.constexpr, VCOPY: tl.constexpr,
    TMA: tl.constexpr = None, HALVES: tl.constexpr = None,
):  # fmt: skip
    """Tile j (the i-th of the program's split): issue the copies of tile j + STAGES - 1, wait for
    tile j's, then one online-softmax step over all its G tokens."""
    NPK: tl.constexpr = 16 // KB
    k_stage, v_stage, km_stage, tm_stage, c_stage = stages
    VW: tl.constexpr = v_stage.shape[2]
    i = j - start
    buf = i % STAGES
    if TMA is not None:
        # STAGES tiles ahead, each side refilled as soon as it has been read: the key side of
        # tile j + STAGES while tile j's softmax and value product run. A slot's barriers
        # complete once per use: phase = the slot's uses so far, mod 2.
        phase = (i // STAGES) & 1
        mbarrier.wait(offs[1].index(2 * buf), phase)
        s0, s1, s2, s3, s4, s5, s6, s7 = _key_scores(
            buf, qT, stages, KB, QA_SPLIT, INTERPRET, MMA, A_OP, B_OP, TOK_META, HALVES
        )
        gl.thread_barrier()  # every lane has read the key slot
        nxt = j + STAGES
        _issue_keys_tma(nxt, nxt < end, buf, stages, offs, bases, TMA)
        mbarrier.wait(offs[1].index(2 * buf + 1), phase)
        m_i, l_i, O0, O1, O2, O3, O4, O5, O6, O7 = _softmax_values(
            s0, s1, s2, s3, s4, s5, s6, s7, buf, m_i, l_i, O0, O1, O2, O3, O4, O5, O6, O7, stages,
            KB, VB, PA_SPLIT, INTERPRET, MMA, A_OP, B_OP, TOK_META, CH_META, VCOPY, HALVES,
        )  # fmt: skip
        gl.thread_barrier()  # every lane has read the value slot
        _issue_values_tma(nxt, nxt < end, buf, stages, offs, bases, TMA)
    else:
        nxt = j + STAGES - 1
        _issue_tile(nxt, nxt < end, (i + STAGES - 1) % STAGES, stages, offs, bases, VW, NPK, VCOPY)
        async_copy.wait_group(STAGES - 1)  # tile j's copies have landed
        gl.thread_barrier()
        s0, s1, s2, s3, s4, s5, s6, s7 = _key_scores(
            buf, qT, stages, KB, QA_SPLIT, INTERPRET, MMA, A_OP, B_OP, TOK_META, HALVES
        )
        m_i, l_i, O0, O1, O2, O3, O4, O5, O6, O7 = _softmax_values(
            s0, s1, s2, s3, s4, s5, s6, s7, buf, m_i, l_i, O0, O1, O2, O3, O4, O5, O6, O7, stages,
            KB, VB, PA_SPLIT, INTERPRET, MMA, A_OP, B_OP, TOK_META, CH_META, VCOPY, HALVES,
        )  # fmt: skip
        gl.thread_barrier()  # every lane is done with stage `buf` before it is refilled
    return m_i, l_i, O0, O1, O2, O3, O4, O5, O6, O7


@jit
def _pipelined_step(
    j, start, end, qT, s0, s1, s2, s3, s4, s5, s6, s7, m_i, l_i, O0, O1, O2, O3, O4, O5, O6, O7,
    stages, offs, bases,
    KB: tl.constexpr, VB: tl.constexpr, STAGES: tl.constexpr, QA_SPLIT: tl.constexpr,
    PA_SPLIT: tl.constexpr, INTERPRET: tl.constexpr, MMA: tl.constexpr, A_OP: tl.constexpr,
    B_OP: tl.constexpr, TOK_META: tl.constexpr, CH_META: tl.constexpr, VCOPY: tl.constexpr,
):  # fmt: skip
    """Tile j of a software-pipelined split (``pipeline=True``), for j + 1 < end: s0..s7 are tile
    j's scores, computed one step earlier. Issues the key side of tile j + STAGES and the value side
    of tile j + STAGES - 1 (one commit group), waits for the group that brought tile j + 1's keys
    and tile j's values, then computes tile j + 1's scores and tile j's softmax and value product:
    two independent chains in one block, for the scheduler to interleave. Tile t lives in slot
    (t - start) % STAGES on both sides; the key slot of tile j + STAGES held tile j's keys (read
    one step earlier), the value slot of tile j + STAGES - 1 held tile j - 1's values."""
    NPK: tl.constexpr = 16 // KB
    k_stage, v_stage, km_stage, tm_stage, c_stage = stages
    VW: tl.constexpr = v_stage.shape[2]
    i = j - start
    k_next = j + STAGES
    _issue_keys(k_next, k_next < end, i % STAGES, stages, offs, bases)
    v_next = j + STAGES - 1
    _issue_values(v_next, v_next < end, (i + STAGES - 1) % STAGES, stages, offs, bases, VW, NPK, VCOPY)
    async_copy.commit_group()
    async_copy.wait_group(STAGES - 1)  # tile j + 1's keys and tile j's values have landed
    gl.thread_barrier()
    n0, n1, n2, n3, n4, n5, n6, n7 = _key_scores(
        (i + 1) % STAGES, qT, stages, KB, QA_SPLIT, INTERPRET, MMA, A_OP, B_OP, TOK_META
    )
    m_i, l_i, O0, O1, O2, O3, O4, O5, O6, O7 = _softmax_values(
        s0, s1, s2, s3, s4, s5, s6, s7, i % STAGES, m_i, l_i, O0, O1, O2, O3, O4, O5, O6, O7, stages,
        KB, VB, PA_SPLIT, INTERPRET, MMA, A_OP, B_OP, TOK_META, CH_META, VCOPY,
    )  # fmt: skip
    gl.thread_barrier()  # every lane is done with both slots before they are refilled
    return n0, n1, n2, n3, n4, n5, n6, n7, m_i, l_i, O0, O1, O2, O3, O4, O5, O6, O7


@jit
def _key_scores(
    buf, qT, stages, KB: tl.constexpr, QA_SPLIT: tl.constexpr, INTERPRET: tl.constexpr,
    MMA: tl.constexpr, A_OP: tl.constexpr, B_OP: tl.constexpr, TOK_META: tl.constexpr,
    HALVES: tl.constexpr = None,
):  # fmt: skip
    """Scores (log2 domain) of the tile whose key side is in stage ``buf``, one ``[KW, N]`` tensor
    per key plane (planes past NPK repeat plane 0); with column halves (``HALVES``: the layouts of
    ``halves_layouts``) one per pair of planes (``_pair_scores``; pairs past NPK / 2 repeat pair 0)."""
    NPK: tl.constexpr = 16 // KB
    k_stage, v_stage, km_stage, tm_stage, c_stage = stages
    # q * a_k (the key product's B operand) and q . z_k, from this tile's key channel metadata.
    ka = km_stage.index(2 * buf).load(gl.SliceLayout(1, B_OP)).to(gl.float32)
    kz = km_stage.index(2 * buf + 1).load(gl.SliceLayout(1, B_OP)).to(gl.float32)
    qa32 = qT * ka[:, None]
    qa = qa32.to(gl.float16)
    qa_lo = qa
    if QA_SPLIT:
        qa_lo = (qa32 - qa.to(gl.float32)).to(gl.float16)
    qz = gl.convert_layout(gl.sum(qT * kz[:, None], axis=0), gl.SliceLayout(0, MMA))
    if HALVES is not None:
        HALF3: tl.constexpr = HALVES[1]
        left = _half_mask(qT.shape[1], gl.SliceLayout(0, B_OP))
        qa_l, qa_r = _halves(qa, left)
        qa_lo_l = qa_l
        qa_lo_r = qa_r
        if QA_SPLIT:
            qa_lo_l, qa_lo_r = _halves(qa_lo, left)
        rp = _pairs(tm_stage.index(3 * buf).load(HALVES[0]), HALF3)  # key token scales per plane pair
        kw2 = k_stage.index(buf).permute((1, 0)).load(A_OP)
        t0 = _pair_scores(
            kw2, qa_l, qa_r, qa_lo_l, qa_lo_r, qz, rp[0], 0, KB, QA_SPLIT, INTERPRET, MMA, HALF3
        )
        t1 = t0
        t2 = t0
        t3 = t0
        if NPK >= 4:
            t1 = _pair_scores(
                kw2, qa_l, qa_r, qa_lo_l, qa_lo_r, qz, rp[1], 2, KB, QA_SPLIT, INTERPRET, MMA, HALF3
            )
        if NPK >= 8:
            t2 = _pair_scores(
                kw2, qa_l, qa_r, qa_lo_l, qa_lo_r, qz, rp[2], 4, KB, QA_SPLIT, INTERPRET, MMA, HALF3
            )
            t3 = _pair_scores(
                kw2, qa_l, qa_r, qa_lo_l, qa_lo_r, qz, rp[3], 6, KB, QA_SPLIT, INTERPRET, MMA, HALF3
            )
        return t0, t1, t2, t3, t0, t0, t0, t0
    rows: tl.constexpr = gl.SliceLayout(1, MMA)
    r = _columns(tm_stage.index(3 * buf).load(TOK_META), rows)  # key token scales per key plane
    kwords = k_stage.index(buf).permute((1, 0)).load(A_OP)  # [KW, D]: ldmatrix.trans
    s0 = _plane_scores(kwords, qa, qa_lo, qz, r[0], 0, KB, QA_SPLIT, INTERPRET, MMA)
    s1 = _plane_scores(kwords, qa, qa_lo, qz, r[1], 1, KB, QA_SPLIT, INTERPRET, MMA)
    s2 = s0
    s3 = s0
    s4 = s0
    s5 = s0
    s6 = s0
    s7 = s0
    if NPK >= 4:
        s2 = _plane_scores(kwords, qa, qa_lo, qz, r[2], 2, KB, QA_SPLIT, INTERPRET, MMA)
        s3 = _plane_scores(kwords, qa, qa_lo, qz, r[3], 3, KB, QA_SPLIT, INTERPRET, MMA)
    if NPK >= 8:
        s4 = _plane_scores(kwords, qa, qa_lo, qz, r[4], 4, KB, QA_SPLIT, INTERPRET, MMA)
        s5 = _plane_scores(kwords, qa, qa_lo, qz, r[5], 5, KB, QA_SPLIT, INTERPRET, MMA)
        s6 = _plane_scores(kwords, qa, qa_lo, qz, r[6], 6, KB, QA_SPLIT, INTERPRET, MMA)
        s7 = _plane_scores(kwords, qa, qa_lo, qz, r[7], 7, KB, QA_SPLIT, INTERPRET, MMA)
    return s0, s1, s2, s3, s4, s5, s6, s7


@jit
def _softmax_values(
    s0, s1, s2, s3, s4, s5, s6, s7, buf, m_i, l_i, O0, O1, O2, O3, O4, O5, O6, O7, stages,
    KB: tl.constexpr, VB: tl.constexpr, PA_SPLIT: tl.constexpr, INTERPRET: tl.constexpr,
    MMA: tl.constexpr, A_OP: tl.constexpr, B_OP: tl.constexpr, TOK_META: tl.constexpr,
    CH_META: tl.constexpr, VCOPY: tl.constexpr, HALVES: tl.constexpr = None,
):  # fmt: skip
    """One online-softmax step over a tile's scores s0..s(NPK-1) (with ``HALVES``: one per pair of
    key planes, s0..s(NPK/2-1)), with its value side in stage ``buf``: the new running max, sum
    and output accumulators."""
    NPK: tl.constexpr = 16 // KB
    NPV: tl.constexpr = 16 // VB
    k_stage, v_stage, km_stage, tm_stage, c_stage = stages
    if HALVES is not None:
        mx = s0
        if NPK >= 4:
            mx = gl.maximum(mx, s1)
        if NPK >= 8:
            mx = gl.maximum(mx, gl.maximum(s2, s3))
    else:
        mx = gl.maximum(s0, s1)
        if NPK >= 4:
            mx = gl.maximum(mx, gl.maximum(s2, s3))
        if NPK >= 8:
            mx = gl.maximum(mx, gl.maximum(gl.maximum(s4, s5), gl.maximum(s6, s7)))
    m_new = gl.maximum(m_i, gl.max(mx, axis=0))
    alpha = gl.exp2(m_i - m_new)

    vbase = buf if VCOPY == 1 else buf * NPK
    P0 = gl.zeros(O0.shape, dtype=gl.float32, layout=MMA)
    P1 = P0
    P2 = P0
    P3 = P0
    P4 = P0
    P5 = P0
    P6 = P0
    P7 = P0
    psum = gl.zeros(s0.shape, dtype=gl.float32, layout=MMA)
    pzsum = psum
    if HALVES is not None:
        HALF3: tl.constexpr = HALVES[1]
        vap = _pairs(tm_stage.index(3 * buf + 1).load(HALVES[0]), HALF3)
        vzp = _pairs(tm_stage.index(3 * buf + 2).load(HALVES[0]), HALF3)
        left = _half_mask(s0.shape[1], gl.SliceLayout(0, B_OP))
        psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7 = _value_pair(
            s0, m_new, vap[0], vzp[0], v_stage, vbase, psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7, left,
            0, VB, NPV, PA_SPLIT, INTERPRET, A_OP, B_OP, VCOPY, HALF3, MMA,
        )  # fmt: skip
        if NPK >= 4:
            psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7 = _value_pair(
                s1, m_new, vap[1], vzp[1], v_stage, vbase, psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7, left,
                2, VB, NPV, PA_SPLIT, INTERPRET, A_OP, B_OP, VCOPY, HALF3, MMA,
            )  # fmt: skip
        if NPK >= 8:
            psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7 = _value_pair(
                s2, m_new, vap[2], vzp[2], v_stage, vbase, psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7, left,
                4, VB, NPV, PA_SPLIT, INTERPRET, A_OP, B_OP, VCOPY, HALF3, MMA,
            )  # fmt: skip
            psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7 = _value_pair(
                s3, m_new, vap[3], vzp[3], v_stage, vbase, psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7, left,
                6, VB, NPV, PA_SPLIT, INTERPRET, A_OP, B_OP, VCOPY, HALF3, MMA,
            )  # fmt: skip
    else:
        rows: tl.constexpr = gl.SliceLayout(1, MMA)
        va = _columns(tm_stage.index(3 * buf + 1).load(TOK_META), rows)
        vz = _columns(tm_stage.index(3 * buf + 2).load(TOK_META), rows)
        psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7 = _value_plane(
            s0, m_new, va[0], vz[0], v_stage, vbase, psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7,
            0, VB, NPV, PA_SPLIT, INTERPRET, A_OP, B_OP, VCOPY,
        )  # fmt: skip
        psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7 = _value_plane(
            s1, m_new, va[1], vz[1], v_stage, vbase, psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7,
            1, VB, NPV, PA_SPLIT, INTERPRET, A_OP, B_OP, VCOPY,
        )  # fmt: skip
        if NPK >= 4:
            psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7 = _value_plane(
                s2, m_new, va[2], vz[2], v_stage, vbase, psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7,
                2, VB, NPV, PA_SPLIT, INTERPRET, A_OP, B_OP, VCOPY,
            )  # fmt: skip
            psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7 = _value_plane(
                s3, m_new, va[3], vz[3], v_stage, vbase, psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7,
                3, VB, NPV, PA_SPLIT, INTERPRET, A_OP, B_OP, VCOPY,
            )  # fmt: skip
        if NPK >= 8:
            psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7 = _value_plane(
                s4, m_new, va[4], vz[4], v_stage, vbase, psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7,
                4, VB, NPV, PA_SPLIT, INTERPRET, A_OP, B_OP, VCOPY,
            )  # fmt: skip
            psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7 = _value_plane(
                s5, m_new, va[5], vz[5], v_stage, vbase, psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7,
                5, VB, NPV, PA_SPLIT, INTERPRET, A_OP, B_OP, VCOPY,
            )  # fmt: skip
            psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7 = _value_plane(
                s6, m_new, va[6], vz[6], v_stage, vbase, psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7,
                6, VB, NPV, PA_SPLIT, INTERPRET, A_OP, B_OP, VCOPY,
            )  # fmt: skip
            psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7 = _value_plane(
                s7, m_new, va[7], vz[7], v_stage, vbase, psum, pzsum, P0, P1, P2, P3, P4, P5, P6, P7,
                7, VB, NPV, PA_SPLIT, INTERPRET, A_OP, B_OP, VCOPY,
            )  # fmt: skip
    c = _columns(c_stage.index(buf).load(CH_META), gl.SliceLayout(1, MMA))  # value channel scales per field
    l_i = l_i * alpha + gl.sum(psum, axis=0)
    pz = gl.sum(pzsum, axis=0)
    O0 = _rescale(O0, P0, c[0], alpha, pz, 0, VB)
    O1 = _rescale(O1, P1, c[1], alpha, pz, 1, VB)
    if NPV >= 4:
        O2 = _rescale(O2, P2, c[2], alpha, pz, 2, VB)
        O3 = _rescale(O3, P3, c[3], alpha, pz, 3, VB)
    if NPV >= 8:
        O4 = _rescale(O4, P4, c[4], alpha, pz, 4, VB)
        O5 = _rescale(O5, P5, c[5], alpha, pz, 5, VB)
        O6 = _rescale(O6, P6, c[6], alpha, pz, 6, VB)
        O7 = _rescale(O7, P7, c[7], alpha, pz, 7, VB)
    return m_new, l_i, O0, O1, O2, O3, O4, O5, O6, O7


@jit
def _decode_warp_kernel(
    q_ptr, sq_b, sq_h, sq_l,
    kc_ptr, skc_b, skc_h, skc_n,
    ka_ptr, ska_b, ska_h, ska_n,
    kz_ptr, skz_b, skz_h, skz_n,
    kr_ptr, skr_b, skr_h, skr_n,
    vc_ptr, svc_b, svc_h, svc_n,
    va_ptr, sva_b, sva_h, sva_n,
    vz_ptr, svz_b, svz_h, svz_n,
    vs_ptr, svs_b, svs_h, svs_n,
    ntiles_ptr,
    sk_ptr, ssk_b, ssk_h, ssk_t,
    sv_ptr, ssv_b, ssv_h, ssv_t,
    sink_len_ptr,
    tk_ptr, stk_b, stk_h, stk_t,
    tv_ptr, stv_b, stv_h, stv_t,
    tail_len_ptr,
    nk_ptr, snk_b, snk_h, snk_t,
    nv_ptr, snv_b, snv_h, snv_t,
    po_ptr, pm_ptr, pl_ptr,
    qk_scale, NUM_SPLITS,
    kc_desc, vc_desc, ka_desc, kz_desc, kr_desc, va_desc, vz_desc, vs_desc,
    HKV: tl.constexpr, GROUP: tl.constexpr, L: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
    KB: tl.constexpr, VB: tl.constexpr, N: tl.constexpr, STAGES: tl.constexpr, TC: tl.constexpr,
    QA_SPLIT: tl.constexpr, PA_SPLIT: tl.constexpr, INTERPRET: tl.constexpr,
    MMA: tl.constexpr, A_OP: tl.constexpr, B_OP: tl.constexpr, K_COPY: tl.constexpr,
    V_COPY: tl.constexpr, D_COPY: tl.constexpr, T_COPY: tl.constexpr, C_COPY: tl.constexpr,
    K_SMEM: tl.constexpr, V_SMEM: tl.constexpr, META_SMEM_1D: tl.constexpr, META_SMEM_2D: tl.constexpr,
    TOK_META: tl.constexpr, CH_META: tl.constexpr, DENSE_COPY: tl.constexpr, DENSE_SMEM: tl.constexpr,
    PDL_TRIGGER: tl.constexpr = False, VCOPY: tl.constexpr = 0, PIPE: tl.constexpr = False,
    DENSE_LAST: tl.constexpr = False, TMA_LAYOUTS: tl.constexpr = None, HALVES: tl.constexpr = None,
):  # fmt: skip
    """Program (KV row bh, column program_id(1), row block program_id(2)) of one warp. Columns
    0 .. ND-1 attend to the 16-bit segments in chunks of TC tokens (``_dense_chunk``: the new
    tokens, then the sink's and the tail's chunks); columns ND .. ND + NUM_SPLITS - 1 to runs of
    packed tiles (``_tiles_program``). Each writes an un-normalized partial to its slot of the
    split-K workspace ``[B * Hkv, ND + NUM_SPLITS, MROWS(, D)]``; decode_tc's merge combines them."""
    ND: tl.constexpr = 1 + 2 * (G // TC)
    if PDL_TRIGGER:  # the merge (a programmatic dependent launch) may be scheduled from now on
        gl.inline_asm_elementwise(
            "griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1
        )
    bh = gl.program_id(0)
    col = gl.program_id(1)
    if DENSE_LAST:  # launch order: the tile splits first, the short 16-bit programs after them
        col = (col + ND) % (ND + NUM_SPLITS)
    rb = gl.program_id(2)
    b = bh // HKV
    h = bh % HKV
    b64 = b.to(gl.int64)
    h64 = h.to(gl.int64)
    slot0 = (bh * (ND + NUM_SPLITS) + col).to(gl.int64) * (GROUP * L)
    if col < ND:
        if col == 0:  # the new tokens, causal among themselves (never empty: token 0 is seen by all)
            k_t = nk_ptr + b64 * snk_b + h64 * snk_h
            v_t = nv_ptr + b64 * snv_b + h64 * snv_h
            sk_tok = snk_t
            sv_tok = snv_t
            n_valid = L + 0 * col
        elif col <= G // TC:
            c = col - 1
            k_t = sk_ptr + b64 * ssk_b + h64 * ssk_h + (c * TC).to(gl.int64) * ssk_t
            v_t = sv_ptr + b64 * ssv_b + h64 * ssv_h + (c * TC).to(gl.int64) * ssv_t
            sk_tok = ssk_t
            sv_tok = ssv_t
            n_valid = gl.load(sink_len_ptr + b) - c * TC
        else:
            c = col - 1 - G // TC
            k_t = tk_ptr + b64 * stk_b + h64 * stk_h + (c * TC).to(gl.int64) * stk_t
            v_t = tv_ptr + b64 * stv_b + h64 * stv_h + (c * TC).to(gl.int64) * stv_t
            sk_tok = stk_t
            sv_tok = stv_t
            n_valid = gl.load(tail_len_ptr + b) - c * TC
        _dense_chunk(
            q_ptr, sq_b, sq_h, sq_l, b64, h, rb, k_t, sk_tok, v_t, sv_tok, n_valid, col == 0, qk_scale,
            po_ptr, pm_ptr, pl_ptr, slot0, GROUP, L, D, N, TC, INTERPRET, MMA, A_OP, B_OP, DENSE_COPY, DENSE_SMEM,
        )  # fmt: skip
    else:
        _tiles_program(
            q_ptr, sq_b, sq_h, sq_l, kc_ptr, skc_b, skc_h, skc_n, ka_ptr, ska_b, ska_h, ska_n,
            kz_ptr, skz_b, skz_h, skz_n, kr_ptr, skr_b, skr_h, skr_n, vc_ptr, svc_b, svc_h, svc_n,
            va_ptr, sva_b, sva_h, sva_n, vz_ptr, svz_b, svz_h, svz_n, vs_ptr, svs_b, svs_h, svs_n,
            ntiles_ptr, po_ptr, pm_ptr, pl_ptr, qk_scale, NUM_SPLITS, b, b64, h, h64, col - ND + 1, rb, slot0,
            GROUP, L, D, G, KB, VB, N, STAGES, QA_SPLIT, PA_SPLIT, INTERPRET, MMA, A_OP, B_OP,
            K_COPY, V_COPY, D_COPY, T_COPY, C_COPY, K_SMEM, V_SMEM, META_SMEM_1D, META_SMEM_2D, TOK_META, CH_META,
            VCOPY, PIPE, (kc_desc, vc_desc, ka_desc, kz_desc, kr_desc, va_desc, vz_desc, vs_desc), TMA_LAYOUTS,
            HALVES,
        )  # fmt: skip


@jit
def _query_block(q_ptr, sq_b, sq_h, sq_l, b64, h, rb, GROUP: tl.constexpr, L: tl.constexpr, D: tl.constexpr,
                 N: tl.constexpr, B_OP: tl.constexpr, HALVES: tl.constexpr = False):  # fmt: skip
    """The program's N query rows (row = head within the group * L + query index; rows past the
    group's are zero) as the B operand ``[D, N]``, in the query dtype. ``HALVES``: N / 2 rows, in
    both halves of the columns."""
    dq = gl.arange(0, D, layout=gl.SliceLayout(1, B_OP))
    rows_q = rb * N + gl.arange(0, N, layout=gl.SliceLayout(0, B_OP))
    if HALVES:
        rows_q = rows_q % (N // 2)
    q_off = b64 * sq_b + (h * GROUP + rows_q // L).to(gl.int64) * sq_h + (rows_q % L).to(gl.int64) * sq_l
    return gl.load(q_ptr + q_off[None, :] + dq[:, None], mask=(rows_q < GROUP * L)[None, :], other=0.0)


@jit
def _partial_rows(rb, slot0, GROUP: tl.constexpr, L: tl.constexpr, N: tl.constexpr, MMA: tl.constexpr):
    """Query rows of the program in the MMA's column layout, which of them exist, and their
    workspace slots (the partial of row r is at ``slot0 + r``)."""
    rows = rb * N + gl.arange(0, N, layout=gl.SliceLayout(0, MMA))
    return rows, rows < GROUP * L, slot0 + rows


@jit
def _dense_chunk(
    q_ptr, sq_b, sq_h, sq_l, b64, h, rb, k_t, sk_tok, v_t, sv_tok, n_valid, causal, qk_scale,
    po_ptr, pm_ptr, pl_ptr, slot0,
    GROUP: tl.constexpr, L: tl.constexpr, D: tl.constexpr, N: tl.constexpr, TC: tl.constexpr,
    INTERPRET: tl.constexpr, MMA: tl.constexpr, A_OP: tl.constexpr, B_OP: tl.constexpr,
    DENSE_COPY: tl.constexpr, DENSE_SMEM: tl.constexpr,
):  # fmt: skip
    """Attention of the program's query rows to TC 16-bit tokens (rows [0, n_valid) of k_t / v_t;
    with ``causal`` token t is seen by the query at position >= t), as one partial. Products in
    the model dtype on tensor cores: q . k exact in float32; p split hi + lo in the value dtype, so
    p @ v loses nothing to operand rounding (as decode_tc's 16-bit segments)."""
    qm = _query_block(q_ptr, sq_b, sq_h, sq_l, b64, h, rb, GROUP, L, D, N, B_OP)  # [D, N]
    rows, row_ok, slot = _partial_rows(rb, slot0, GROUP, L, N, MMA)
    dd = gl.arange(0, D, layout=gl.SliceLayout(1, MMA))
    if n_valid > 0:
        tt = gl.arange(0, TC, layout=gl.SliceLayout(1, DENSE_COPY))
        cd = gl.arange(0, D, layout=gl.SliceLayout(0, DENSE_COPY))
        ok = (tt < n_valid)[:, None]
        k_smem = gl.allocate_shared_memory(qm.dtype, [TC, D], DENSE_SMEM)
        v_smem = gl.allocate_shared_memory(qm.dtype, [TC, D], DENSE_SMEM)
        k_smem.store(gl.load(k_t + tt[:, None].to(gl.int64) * sk_tok + cd[None, :], mask=ok, other=0.0))
        v_smem.store(gl.load(v_t + tt[:, None].to(gl.int64) * sv_tok + cd[None, :], mask=ok, other=0.0))
        gl.thread_barrier()
        k = k_smem.load(A_OP)  # [TC, D]
        s = mma_v2(k, qm, gl.zeros([TC, N], dtype=gl.float32, layout=MMA)) * qk_scale
        t = gl.arange(0, TC, layout=gl.SliceLayout(1, MMA))
        # valid tokens; with ``causal`` (the new tokens) only those at or before the query's position
        keep = (t < n_valid)[:, None] & ((t[:, None] <= (rows % L)[None, :]) | (causal == 0))
        s = gl.where(keep, s, float("-inf"))
        m = gl.max(s, axis=0)
        p = gl.exp2(s - gl.maximum(m, -3.0e38)[None, :])  # a row that sees no token here: p = 0
        lsum = gl.sum(p, axis=0)
        p_hi = p.to(qm.dtype)
        p_lo = (p - p_hi.to(gl.float32)).to(qm.dtype)
        vt = v_smem.permute((1, 0)).load(A_OP)  # [D, TC]: ldmatrix.trans
        o = mma_v2(vt, gl.convert_layout(p_hi, B_OP), gl.zeros([D, N], dtype=gl.float32, layout=MMA))
        o = mma_v2(vt, gl.convert_layout(p_lo, B_OP), o)
    else:  # an empty chunk (short sink or tail): weight 0 in the merge
        m = gl.full([N], float("-inf"), gl.float32, layout=gl.SliceLayout(0, MMA))
        lsum = gl.zeros([N], dtype=gl.float32, layout=gl.SliceLayout(0, MMA))
        o = gl.zeros([D, N], dtype=gl.float32, layout=MMA)
    gl.store(pm_ptr + slot, m, mask=row_ok)
    gl.store(pl_ptr + slot, lsum, mask=row_ok)
    gl.store(po_ptr + slot[None, :] * D + dd[:, None], o, mask=row_ok[None, :])


@jit
def _with_metadata_stages(
    k_stage, v_stage, md: tl.constexpr, STAGES: tl.constexpr, D: tl.constexpr, KW: tl.constexpr,
    NPK: tl.constexpr, VW: tl.constexpr, NPV: tl.constexpr, META_SMEM_1D: tl.constexpr,
    META_SMEM_2D: tl.constexpr,
):  # fmt: skip
    """The tile loop's stages: the code stages given and, allocated after them (the same for both
    copy paths), the metadata stages: per slot the key channel scales and zeros ``[2, D]``, the
    key / value token vectors ``[3, KW, NPK]`` and the value channel scales ``[VW, NPV]``."""
    return (
        k_stage,
        v_stage,
        gl.allocate_shared_memory(md, [STAGES * 2, D], META_SMEM_1D),
        gl.allocate_shared_memory(md, [STAGES * 3, KW, NPK], META_SMEM_2D),
        gl.allocate_shared_memory(md, [STAGES, VW, NPV], META_SMEM_2D),
    )


@jit
def _tiles_program(
    q_ptr, sq_b, sq_h, sq_l, kc_ptr, skc_b, skc_h, skc_n, ka_ptr, ska_b, ska_h, ska_n,
    kz_ptr, skz_b, skz_h, skz_n, kr_ptr, skr_b, skr_h, skr_n, vc_ptr, svc_b, svc_h, svc_n,
    va_ptr, sva_b, sva_h, sva_n, vz_ptr, svz_b, svz_h, svz_n, vs_ptr, svs_b, svs_h, svs_n,
    ntiles_ptr, po_ptr, pm_ptr, pl_ptr, qk_scale, NUM_SPLITS, b, b64, h, h64, split, rb, slot0,
    GROUP: tl.constexpr, L: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
    KB: tl.constexpr, VB: tl.constexpr, N: tl.constexpr, STAGES: tl.constexpr,
    QA_SPLIT: tl.constexpr, PA_SPLIT: tl.constexpr, INTERPRET: tl.constexpr,
    MMA: tl.constexpr, A_OP: tl.constexpr, B_OP: tl.constexpr, K_COPY: tl.constexpr,
    V_COPY: tl.constexpr, D_COPY: tl.constexpr, T_COPY: tl.constexpr, C_COPY: tl.constexpr,
    K_SMEM: tl.constexpr, V_SMEM: tl.constexpr, META_SMEM_1D: tl.constexpr, META_SMEM_2D: tl.constexpr,
    TOK_META: tl.constexpr, CH_META: tl.constexpr, VCOPY: tl.constexpr, PIPE: tl.constexpr,
    descs=None, TMA_LAYOUTS: tl.constexpr = None, HALVES: tl.constexpr = None,
):  # fmt: skip
    """Split ``split`` (1-based) of the (row, KV head)'s packed tiles, as one partial at ``slot0``.
    With ``TMA_LAYOUTS`` (``tma_descriptors``' shared layouts) the tiles come by TMA (``descs``).
    With ``HALVES`` (``halves_layouts``) the query rows fill both halves of the columns and the key
    planes go in pairs (``_pair_scores``): two softmax streams, merged before the partial is written."""
    NPK: tl.constexpr = 16 // KB
    KW: tl.constexpr = G // NPK  # key words per channel row = tokens per key plane
    NPV: tl.constexpr = 16 // VB
    VW: tl.constexpr = D // NPV  # value words per token row

    # The queries as the B operand [D, N], pre-scaled into the log2 domain.
    qT = (
        _query_block(q_ptr, sq_b, sq_h, sq_l, b64, h, rb, GROUP, L, D, N, B_OP, HALVES is not None).to(
            gl.float32
        )
        * qk_scale
    )

    n_tiles = gl.load(ntiles_ptr + b)
    per_split = gl.cdiv(n_tiles, NUM_SPLITS)
    start = (split - 1) * per_split
    end = gl.minimum(start + per_split, n_tiles)

    kw_base = (kc_ptr + b64 * skc_b + h64 * skc_h).to(gl.pointer_type(gl.int16))
    skw_n = skc_n // 2  # byte strides are even (rows of >= 32 bytes)
    vw_base = (vc_ptr + b64 * svc_b + h64 * svc_h).to(gl.pointer_type(gl.int16))
    svw_n = svc_n // 2
    ka_base = ka_ptr + b64 * ska_b + h64 * ska_h
    kz_base = kz_ptr + b64 * skz_b + h64 * skz_h
    kr_base = kr_ptr + b64 * skr_b + h64 * skr_h
    va_base = va_ptr + b64 * sva_b + h64 * sva_h
    vz_base = vz_ptr + b64 * svz_b + h64 * svz_h
    vs_base = vs_ptr + b64 * svs_b + h64 * svs_h

    # Copy offsets (16-bit words): key rows as stored; value rows of plane f = tokens NPK*w + f;
    # metadata vectors as stored, token vectors as [KW, NPK] (row w: the tokens NPK*w + f) and
    # the value channel scales as [VW, NPV] (row u: the channels NPV*u + e).
    kd = gl.arange(0, D, layout=gl.SliceLayout(1, K_COPY))
    kw = gl.arange(0, KW, layout=gl.SliceLayout(0, K_COPY))
    k_off = kd[:, None] * KW + kw[None, :]
    if (
        VCOPY == 1
    ):  # [G, VW]: stage row f*KW + w <- token NPK*w + f (V_COPY: consecutive tokens per instruction)
        vr = gl.arange(0, G, layout=gl.SliceLayout(1, V_COPY))
        vu = gl.arange(0, VW, layout=gl.SliceLayout(0, V_COPY))
        v_off = (NPK * (vr % KW) + vr // KW)[:, None] * VW + vu[None, :]
    else:  # [KW, VW] per plane f (add f * VW): rows NPK*w
        vr = gl.arange(0, KW, layout=gl.SliceLayout(1, V_COPY))
        vu = gl.arange(0, VW, layout=gl.SliceLayout(0, V_COPY))
        v_off = (NPK * vr[:, None]) * VW + vu[None, :]
    d_off = gl.arange(0, D, layout=D_COPY)
    t_off = (
        gl.arange(0, KW, layout=gl.SliceLayout(1, T_COPY))[:, None] * NPK
        + gl.arange(0, NPK, layout=gl.SliceLayout(0, T_COPY))[None, :]
    )
    c_off = (
        gl.arange(0, VW, layout=gl.SliceLayout(1, C_COPY))[:, None] * NPV
        + gl.arange(0, NPV, layout=gl.SliceLayout(0, C_COPY))[None, :]
    )
    md = ka_ptr.dtype.element_ty
    if TMA_LAYOUTS is not None:
        # The code stages in the descriptors' (NVMMA-swizzled) layouts; the metadata stages as in
        # the cp.async path, each slot written through a 1-D view (``_issue_keys_tma``,
        # ``_issue_values_tma``).
        K_TMA: tl.constexpr = TMA_LAYOUTS[0]
        V_TMA: tl.constexpr = TMA_LAYOUTS[1]
        BAR: tl.constexpr = TMA_LAYOUTS[3]
        # A tile's value planes are one TMA box [NPK, KW, VW]; the tile loop reads them as slots
        # of [STAGES * NPK, KW, VW] (the same bytes).
        v_boxes = gl.allocate_shared_memory(gl.int16, [STAGES, NPK, KW, VW], V_TMA)
        k_stage = gl.allocate_shared_memory(gl.int16, [STAGES, D, KW], K_TMA)
        v_stage = v_boxes._reinterpret(gl.int16, [STAGES * NPK, KW, VW], TMA_LAYOUTS[4])
        stages = _with_metadata_stages(
            k_stage, v_stage, md, STAGES, D, KW, NPK, VW, NPV, META_SMEM_1D, META_SMEM_2D
        )
        bars = gl.allocate_shared_memory(gl.int64, [2 * STAGES, 1], BAR)  # (key, value) per slot
        for sl in gl.static_range(2 * STAGES):
            mbarrier.init(bars.index(sl), count=1)
        fence_async_shared()
        offs = (descs, bars, v_boxes)
        # Tile coordinates: rows of KW words (keys), groups of NPK value rows, metadata elements.
        kb0 = b64 * skc_b + h64 * skc_h
        vb0 = b64 * svc_b + h64 * svc_h
        bases = (
            (kb0 // (2 * KW)).to(gl.int32), skc_n // (2 * KW),
            (vb0 // (2 * NPK * VW)).to(gl.int32), svc_n // (2 * NPK * VW),
            (b64 * ska_b + h64 * ska_h).to(gl.int32), ska_n, (b64 * skz_b + h64 * skz_h).to(gl.int32), skz_n,
            (b64 * skr_b + h64 * skr_h).to(gl.int32), skr_n, (b64 * sva_b + h64 * sva_h).to(gl.int32), sva_n,
            (b64 * svz_b + h64 * svz_h).to(gl.int32), svz_n, (b64 * svs_b + h64 * svs_h).to(gl.int32), svs_n,
        )  # fmt: skip
    else:
        k_stage = gl.allocate_shared_memory(gl.int16, [STAGES, D, KW], K_SMEM)
        v_stage = gl.allocate_shared_memory(
            gl.int16, [STAGES, G, VW] if VCOPY == 1 else [STAGES * NPK, KW, VW], V_SMEM
        )
        stages = _with_metadata_stages(
            k_stage, v_stage, md, STAGES, D, KW, NPK, VW, NPV, META_SMEM_1D, META_SMEM_2D
        )
        offs = (k_off, v_off, d_off, t_off, c_off)
        bases = (
            kw_base, skw_n, vw_base, svw_n, ka_base, ska_n, kz_base, skz_n, kr_base, skr_n,
            va_base, sva_n, vz_base, svz_n, vs_base, svs_n,
        )  # fmt: skip

    uu = gl.arange(0, VW, layout=gl.SliceLayout(1, MMA))  # value words = rows of the output tiles
    m_i = gl.full([N], float("-inf"), gl.float32, layout=gl.SliceLayout(0, MMA))
    l_i = gl.zeros([N], dtype=gl.float32, layout=gl.SliceLayout(0, MMA))
    O0 = gl.zeros([VW, N], dtype=gl.float32, layout=MMA)
    O1 = O0
    O2 = O0
    O3 = O0
    O4 = O0
    O5 = O0
    O6 = O0
    O7 = O0

    if PIPE:
        # Prologue: tile start's key side alone, then STAGES - 1 groups each with the key side of
        # the tile after and the value side of a tile (``_pipelined_step``'s schedule).
        _issue_keys(start, start < end, 0, stages, offs, bases)
        async_copy.commit_group()
        for pre in gl.static_range(STAGES - 1):
            _issue_keys(start + pre + 1, start + pre + 1 < end, (pre + 1) % STAGES, stages, offs, bases)
            _issue_values(start + pre, start + pre < end, pre, stages, offs, bases, VW, NPK, VCOPY)
            async_copy.commit_group()
        async_copy.wait_group(STAGES - 1)
        gl.thread_barrier()
        s0, s1, s2, s3, s4, s5, s6, s7 = _key_scores(
            0, qT, stages, KB, QA_SPLIT, INTERPRET, MMA, A_OP, B_OP, TOK_META
        )
        gl.thread_barrier()  # key slot 0 is refilled by the first step
        if INTERPRET:
            j = start
            while j < end - 1:
                s0, s1, s2, s3, s4, s5, s6, s7, m_i, l_i, O0, O1, O2, O3, O4, O5, O6, O7 = _pipelined_step(
                    j, start, end, qT, s0, s1, s2, s3, s4, s5, s6, s7, m_i, l_i, O0, O1, O2, O3, O4, O5, O6,
                    O7, stages, offs, bases, KB, VB, STAGES, QA_SPLIT, PA_SPLIT, INTERPRET, MMA, A_OP, B_OP,
                    TOK_META, CH_META, VCOPY,
                )  # fmt: skip
                j += 1
        else:
            for j in range(start, end - 1):
                s0, s1, s2, s3, s4, s5, s6, s7, m_i, l_i, O0, O1, O2, O3, O4, O5, O6, O7 = _pipelined_step(
                    j, start, end, qT, s0, s1, s2, s3, s4, s5, s6, s7, m_i, l_i, O0, O1, O2, O3, O4, O5, O6,
                    O7, stages, offs, bases, KB, VB, STAGES, QA_SPLIT, PA_SPLIT, INTERPRET, MMA, A_OP, B_OP,
                    TOK_META, CH_META, VCOPY,
                )  # fmt: skip
        async_copy.wait_group(0)  # the last tile's value side
        gl.thread_barrier()
        if end > start:
            m_i, l_i, O0, O1, O2, O3, O4, O5, O6, O7 = _softmax_values(
                s0, s1, s2, s3, s4, s5, s6, s7, (end - 1 - start) % STAGES, m_i, l_i,
                O0, O1, O2, O3, O4, O5, O6, O7, stages,
                KB, VB, PA_SPLIT, INTERPRET, MMA, A_OP, B_OP, TOK_META, CH_META, VCOPY,
            )  # fmt: skip
    else:
        # STAGES - 1 tiles ahead with cp.async (the slot refilled at a step's start is the one
        # read in the step before); STAGES with TMA (each side refilled once it has been read).
        for pre in gl.static_range(STAGES - 1 if TMA_LAYOUTS is None else STAGES):
            _issue_tile(start + pre, start + pre < end, pre, stages, offs, bases, VW, NPK, VCOPY, TMA_LAYOUTS)
        if INTERPRET:
            # The interpreter cannot take a loaded scalar as a range() bound under numpy 2.
            j = start
            while j < end:
                m_i, l_i, O0, O1, O2, O3, O4, O5, O6, O7 = _tile_step(
                    j, start, end, qT, m_i, l_i, O0, O1, O2, O3, O4, O5, O6, O7, stages, offs, bases,
                    KB, VB, STAGES, QA_SPLIT, PA_SPLIT, INTERPRET, MMA, A_OP, B_OP, TOK_META, CH_META, VCOPY,
                    TMA_LAYOUTS, HALVES,
                )  # fmt: skip
                j += 1
        else:
            for j in range(start, end):
                m_i, l_i, O0, O1, O2, O3, O4, O5, O6, O7 = _tile_step(
                    j, start, end, qT, m_i, l_i, O0, O1, O2, O3, O4, O5, O6, O7, stages, offs, bases,
                    KB, VB, STAGES, QA_SPLIT, PA_SPLIT, INTERPRET, MMA, A_OP, B_OP, TOK_META, CH_META, VCOPY,
                    TMA_LAYOUTS, HALVES,
                )  # fmt: skip
    # Every copy issued was waited for (tiles past the split's end are not issued).
    if TMA_LAYOUTS is not None:
        for sl in gl.static_range(2 * STAGES):
            mbarrier.invalidate(offs[1].index(sl))
    else:
        async_copy.wait_group(0)  # nothing left in flight when the program ends

    if HALVES is not None:
        HALF3V: tl.constexpr = HALVES[2]
        m_i, l_i, O0, O1, O2, O3, O4, O5, O6, O7 = _merge_halves(
            m_i, l_i, O0, O1, O2, O3, O4, O5, O6, O7, NPV, HALF3V, MMA
        )
    # Un-normalized partial, running max and sum.
    _, row_ok, slot = _partial_rows(rb, slot0, GROUP, L, N, MMA)
    gl.store(pm_ptr + slot, m_i, mask=row_ok)
    gl.store(pl_ptr + slot, l_i, mask=row_ok)
    po_rows = po_ptr + slot * D
    _store_o(O0, po_rows, uu, row_ok, 0, NPV)
    _store_o(O1, po_rows, uu, row_ok, 1, NPV)
    if NPV >= 4:
        _store_o(O2, po_rows, uu, row_ok, 2, NPV)
        _store_o(O3, po_rows, uu, row_ok, 3, NPV)
    if NPV >= 8:
        _store_o(O4, po_rows, uu, row_ok, 4, NPV)
        _store_o(O5, po_rows, uu, row_ok, 5, NPV)
        _store_o(O6, po_rows, uu, row_ok, 6, NPV)
        _store_o(O7, po_rows, uu, row_ok, 7, NPV)


def _log2(n: int) -> int:
    return n.bit_length() - 1


def meta_layout(rows: int, cols: int) -> DistributedLinearLayout:
    """Layout of a ``[rows, cols]`` metadata block whose row r sits where row r of an MMA
    accumulator tile sits (lane group r % 8, register block r // 8; the 4 lanes of a group share
    it) and whose columns are consecutive registers: one vector load per row from shared memory,
    and each column, split off in registers, is already in ``SliceLayout(1, MMA)``."""
    return DistributedLinearLayout(
        reg_bases=[[0, 1 << i] for i in range(_log2(cols))] + [[8 << i, 0] for i in range(_log2(rows // 8))],
        lane_bases=[[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]],
        warp_bases=[], block_bases=[], shape=[rows, cols],
    )  # fmt: skip


def coalesced_value_copy_layout(G: int, VW: int, NPK: int) -> DistributedLinearLayout:
    """cp.async layout of a tile's value rows ``[G, VW]`` in plane-major order (row f*KW + w holds
    token NPK*w + f): each lane copies 8 words (16 bytes), and the lanes of one instruction take the
    16-byte chunks of a row, then the planes f, then the words w, so that they read consecutive
    tokens: whole 128-byte lines instead of one 32-byte row of each."""
    kw = G // NPK
    bits = [[0, 8 << i] for i in range(_log2(VW // 8))]  # chunks of a row
    bits += [[kw << i, 0] for i in range(_log2(NPK))]  # planes f
    bits += [[1 << i, 0] for i in range(_log2(kw))]  # words w
    lanes, regs = bits[:5], bits[5:]
    lanes += [[0, 0]] * (5 - len(lanes))  # (tiny tiles: lanes repeat)
    return DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [0, 4]] + regs,
        lane_bases=lanes,
        warp_bases=[],
        block_bases=[],
        shape=[G, VW],
    )


@functools.lru_cache(maxsize=64)
def layouts(D: int, G: int, KB: int, VB: int, value_copy: str = "planes") -> dict:
    """The explicit layouts of one warp's program (constexpr arguments of the kernel)."""
    kw, vw = G * KB // 16, D * VB // 16
    npk, npv = 16 // KB, 16 // VB
    mma = NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])

    def copy(width):  # 8 words (16 bytes) per lane per cp.async, rows across lanes
        per_row = max(1, min(32, width // 8))
        return BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // per_row, per_row],
                             warps_per_cta=[1, 1], order=[1, 0])  # fmt: skip

    def smem(width):  # 16-byte units swizzled so ldmatrix.trans reads 8 rows conflict-free
        per_phase = max(1, 128 // (2 * width))
        return SwizzledSharedLayout(
            vec=8, per_phase=per_phase, max_phase=max(1, 8 // per_phase), order=[1, 0]
        )

    def rows_copy(cols):  # one [*, cols] row (4-16 bytes) per lane
        return BlockedLayout(
            size_per_thread=[1, cols], threads_per_warp=[32, 1], warps_per_cta=[1, 1], order=[1, 0]
        )

    return dict(
        MMA=mma,
        A_OP=DotOperandLayout(operand_index=0, parent=mma, k_width=2),
        B_OP=DotOperandLayout(operand_index=1, parent=mma, k_width=2),
        K_COPY=copy(kw),
        V_COPY=coalesced_value_copy_layout(G, vw, npk) if value_copy == "coalesced" else copy(vw),
        D_COPY=BlockedLayout(
            size_per_thread=[max(2, min(8, D // 32))], threads_per_warp=[32], warps_per_cta=[1], order=[0]
        ),  # fmt: skip
        T_COPY=rows_copy(npk),
        C_COPY=rows_copy(npv),
        K_SMEM=smem(kw),
        V_SMEM=smem(vw),
        META_SMEM_1D=SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0]),
        META_SMEM_2D=SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0]),
        TOK_META=meta_layout(kw, npk),
        CH_META=meta_layout(vw, npv),
        DENSE_COPY=copy(D),
        DENSE_SMEM=SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0]),
    )


def _half3(rows: int) -> DistributedLinearLayout:
    """``[rows, 2, 4]``: an MMA accumulator ``[rows, 8]`` seen as (row, column half, column in the
    half); the same registers and lanes as ``MMA``, so reshaping between the two moves nothing."""
    return DistributedLinearLayout(
        reg_bases=[[0, 0, 1]] + [[8 << i, 0, 0] for i in range(_log2(rows // 8))],
        lane_bases=[[0, 0, 2], [0, 1, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[], block_bases=[], shape=[rows, 2, 4],
    )  # fmt: skip


@functools.lru_cache(maxsize=64)
def halves_layouts(D: int, G: int, KB: int, VB: int) -> tuple:
    """Layouts of ``column_halves``: token metadata ``[KW, NPK]`` loaded so that a lane holds, for
    each pair of planes, the column of its half (lane bit 1: the MMA accumulator's column half,
    registers: the pairs and the row blocks), and ``_half3`` of the key-score and output rows."""
    kw, vw, npk = G * KB // 16, D * VB // 16, 16 // KB  # both >= 16 (``supports``)
    tok = DistributedLinearLayout(
        reg_bases=[[0, 2 << i] for i in range(_log2(npk // 2))] + [[8 << i, 0] for i in range(_log2(kw // 8))],
        lane_bases=[[0, 0], [0, 1], [1, 0], [2, 0], [4, 0]],
        warp_bases=[], block_bases=[], shape=[kw, npk],
    )  # fmt: skip
    return tok, _half3(kw), _half3(vw)


def supports(
    head_dim: int, tile_size: int, key_bits: int, value_bits: int, num_queries: int, dtype
) -> str | None:
    """None when this kernel handles these shapes, else the reason it does not."""
    reason = shape_unsupported_reason(
        head_dim, tile_size, key_bits, value_bits, num_queries, dtype, KERNEL_BITS, MAX_QUERIES
    )
    if reason:
        return reason
    # The codes are the M side of the products (16 rows per MMA): key words per channel row
    # (tokens per key plane) and value words per token row must both be >= 16.
    if tile_size * key_bits // 16 < 16:
        return f"tile_size={tile_size} at {key_bits}-bit keys gives key planes under 16 tokens"
    if head_dim * value_bits // 16 < 16:
        return f"head_dim={head_dim} at {value_bits}-bit values gives under 16 value words per token"
    return None


def default_num_splits(
    batch: int, kv_heads: int, row_blocks: int, device: torch.device, programs_per_sm: int
) -> int:
    """Tile splits per (row, KV head, row block): as many as fill one wave of program slots
    (``programs_per_sm`` x SMs), at least 1. Depends on shapes only (CUDA graphs capture the
    launch). H200, K4V2 Llama-3-8B heads, CUDA graphs (docs/gpu.md): 32k x 8 16 splits 86.1 us
    vs 32 88.7, 48 90.6, 100 96.2; 128k x 1 132 splits 55.5 us vs 100 57.0, 64 67.2; a wave and a
    bit (e.g. 18 splits at 32k x 8: 97.6 us) leaves most SMs idle for the last programs. The
    short 16-bit programs are not counted: they run first and finish early."""
    runs = max(1, batch * kv_heads * row_blocks)
    return max(1, min(DEFAULT_MAX_SPLITS, programs_per_sm * sm_count(device) // runs))


# Programs of this kernel resident per SM on an H100/H200 (ncu, K4V2 D = G = 128: 210 registers
# and 27 KB of shared memory per one-warp program; both limits give 8).
PROGRAMS_PER_SM = 8


def quantized_decode_attention(
    query, k_codes, k_scale, k_zero, k_token_scale, v_codes, v_scale, v_zero, v_channel_scale,
    n_tiles, sink_k, sink_v, sink_len, tail_k, tail_v, tail_len, new_k, new_v,
    key_bits, value_bits, scaling, *, max_tiles: int | None = None, out: torch.Tensor | None = None,
    num_splits: int | None = None, rows_per_program: int | None = None, stages: int | None = None,
    qa_split: bool | None = None, pa_split: bool | None = None, merge_pdl: bool = False,
    value_copy: str = "planes", max_registers: int | None = None, pipeline: bool = False,
    dense_last: bool = True, copy: str | None = None, column_halves: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Attention of ``query [B, Hq, L, D]`` over one layer's KVarN storage (layerstore contract;
    the same as ``decode_tc.quantized_decode_attention``), in one launch of this module's one-warp
    kernel (16-bit segments and packed tiles) and decode_tc's merge. ``rows_per_program`` (8 or 16: query rows per
    program, the MMA's N), ``stages`` (tiles in flight), ``num_splits``, ``qa_split`` /
    ``pa_split`` (second operands for the float16 rounding remainders; default: float16 queries)
    override the launch; defaults depend only on shapes (CUDA graphs capture it). ``merge_pdl``
    (CUDA, sm_90+; GPU-checked, off by default: within noise of the default on the H200, session
    6): the merge as a programmatic dependent launch, triggered when every program of this kernel
    has started, so its launch latency overlaps this kernel (the merge waits for the partials
    with ``griddepcontrol.wait``). ``value_copy`` (``VALUE_COPIES``): how a tile's value rows
    reach the plane-major stage: "planes" (default: one cp.async per key plane, each instruction
    reading one 32-byte row of each of 16 lines) or "coalesced" (GPU-checked, 2-4% slower on the
    H200 in session 6: one copy whose instructions read consecutive tokens,
    ``coalesced_value_copy_layout``; the same stage contents).
    ``max_registers`` (CUDA): the compiler's per-thread register cap (``maxnreg``), which sets how
    many one-warp programs fit on an SM (65,536 registers / (32 x cap)). ``pipeline`` (needs
    ``stages >= 2``): software-pipelined tiles (``_pipelined_step``): each step computes the next
    tile's scores next to this tile's softmax and value product, with the key side copied one
    tile further ahead than the value side (the same shared memory). ``dense_last`` (default; False is
    the session-5 order): the grid enumerates the tile splits before the 16-bit programs (the same partial slots, so the same
    result bit for bit), so a one-wave launch starts every tile program at once and the short
    16-bit programs fill the slots that empty splits leave (H200: 79.3 vs 80.8 us at 32k x 8,
    equal at 128k x 1 and 32k x 1; docs/gpu.md session 6). ``copy`` (``COPIES``): how a tile
    reaches shared memory: "cp.async" (every lane copies 16-byte pieces) or "tma" (CUDA sm_90+: one
    thread issues 8 tensor-memory copies per tile, the key side and the value side each on its own
    mbarrier and each refilled as soon as it has been read; the same stage contents; descriptors
    from ``tma_descriptors``). Default (``copy=None``): "tma" where it applies (inside
    ``copy_policy.graph_step_copies()``, as ``GraphDecoder`` records its steps, on a GPU of
    compute capability 9.0+, no ``pipeline`` or coalesced value copy, storage the descriptors
    take), else "cp.async" (``default_copy``; eager calls keep it for TMA's host cost);
    ``stages`` then defaults per path (``DEFAULT_STAGES``). ``column_halves`` (opt-in, not yet
    timed on a GPU; session 8): for at most 4 query rows per (row, KV head), the rows fill both
    halves of the MMA's 8 columns and the key planes go in pairs, plane 2p in the left half and
    2p + 1 in the right (``_pair_scores``), so each per-element softmax instruction works on two
    planes' tokens instead of one plane's and 4 padding columns; the two halves are two softmax
    streams, merged by log-sum-exp at the end of the split (``_merge_halves``). Not with
    ``pipeline`` or 16 rows per program."""
    storage = dict(
        k_codes=k_codes, k_scale=k_scale, k_zero=k_zero, k_token_scale=k_token_scale,
        v_codes=v_codes, v_scale=v_scale, v_zero=v_zero, v_channel_scale=v_channel_scale,
        n_tiles=n_tiles, sink_k=sink_k, sink_v=sink_v, sink_len=sink_len,
        tail_k=tail_k, tail_v=tail_v, tail_len=tail_len, new_k=new_k, new_v=new_v,
    )  # fmt: skip
    bsz, hq, nq, hd, hkv, ncap, g = check_decode_inputs(
        query, storage, key_bits, value_bits, supports, "one-warp", dense_in_query_dtype=True
    )
    group = hq // hkv
    mrows = group * nq
    n_rows = ROWS_PER_PROGRAM if rows_per_program is None else rows_per_program
    if n_rows not in (8, 16):
        raise ValueError(f"rows_per_program={rows_per_program!r}: expected 8 or 16")
    if value_copy not in VALUE_COPIES:
        raise ValueError(f"value_copy={value_copy!r}: expected one of {VALUE_COPIES}")
    if copy is not None and copy not in COPIES:
        raise ValueError(f"copy={copy!r}: expected one of {COPIES}")
    query, storage = kernel_layout(query, storage)
    dev = query.device
    descs = tma_layouts = None
    if copy is None:
        copy, descs, tma_layouts = default_copy(
            storage, hd, g, key_bits, value_bits, dev, pipeline, value_copy
        )
    stages = DEFAULT_STAGES[copy] if stages is None else stages
    if stages not in (1, 2, 3, 4):
        raise ValueError(f"stages={stages!r}: expected 1..4")
    n_rb = -(-mrows // n_rows)
    if qa_split is None:
        qa_split = query.dtype == torch.float16
    if pa_split is None:
        pa_split = query.dtype == torch.float16
    if num_splits is None:
        num_splits = default_num_splits(bsz, hkv, n_rb, query.device, PROGRAMS_PER_SM)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits={num_splits}: expected 1..{MAX_SPLITS}")

    tc = dense_chunk(hd, g)
    s1 = dense_programs(g, tc) + num_splits
    part_o, part_m, part_l = split_workspace(bsz * hkv, s1, mrows, hd, dev, decode_tc.POISON_WORKSPACE)
    out = output_buffer(out, (bsz, hq, nq, hd), query.dtype, dev)
    if copy == "tma" and descs is None:
        if pipeline or value_copy != "planes":
            raise ValueError("copy='tma' takes neither pipeline=True nor value_copy='coalesced'")
        if dev.type == "cuda" and not interpreting() and torch.cuda.get_device_capability(dev)[0] < 9:
            raise ValueError("copy='tma' needs a GPU of compute capability 9.0 or newer")
        descs, tma_layouts = tma_descriptors(storage, hd, g, key_bits, value_bits)
    elif copy == "cp.async":
        descs, tma_layouts = (None,) * 8, None
    args = decode_tc.launch_args(
        query, [storage[n] for n in STORAGE], part_o, part_m, part_l, scaling, num_splits
    ) + tuple(descs)
    meta = dict(
        HKV=hkv, GROUP=group, L=nq, D=hd, G=g, KB=key_bits, VB=value_bits, N=n_rows, STAGES=stages, TC=tc,
        QA_SPLIT=qa_split, PA_SPLIT=pa_split, INTERPRET=interpreting(), VCOPY=VALUE_COPIES.index(value_copy),
        **layouts(hd, g, key_bits, value_bits, value_copy),
    )  # fmt: skip
    if pipeline and stages < 2:
        raise ValueError(f"pipeline=True needs stages >= 2, got stages={stages}")
    halves = None
    if column_halves:
        halves = halves_layouts(hd, g, key_bits, value_bits)
        if n_rows != 8 or mrows > 4 or pipeline:
            raise ValueError(
                f"column_halves=True takes at most 4 query rows per KV head (got {mrows}: group {group} x "
                f"{nq} queries), 8 rows per program and no pipeline"
            )
    if max_registers is not None and not 24 <= max_registers <= 255:
        raise ValueError(f"max_registers={max_registers!r}: expected 24..255")
    pdl = bool(merge_pdl) and dev.type == "cuda" and not interpreting()
    options = {"maxnreg": max_registers} if max_registers is not None and not interpreting() else {}
    LAST_LAUNCH[0] = _WARP_LAUNCH(
        (bsz * hkv, s1, n_rb),
        args,
        {
            **meta,
            "PDL_TRIGGER": pdl,
            "PIPE": bool(pipeline),
            "DENSE_LAST": bool(dense_last),
            "TMA_LAYOUTS": tma_layouts,
            "HALVES": halves,
        },  # fmt: skip
        num_warps=1,
        **options,
    )
    decode_tc.launch_merge(out, part_o, part_m, part_l, hkv, group, nq, bsz * hkv, mrows, pdl=pdl)
    return out


def default_copy(storage, head_dim, tile_size, key_bits, value_bits, device, pipeline, value_copy):
    """The copy path ``copy=None`` takes, with its descriptors: ``("tma", descs, layouts)`` inside
    ``copy_policy.graph_step_copies()`` (a decode step being warmed up and recorded as a CUDA
    graph) on a GPU of compute capability 9.0+ when the launch and the storage suit TMA (faster
    on the GPU at every benchmark point on the H200, docs/gpu.md session 8), else
    ``("cp.async", None, None)``: eager calls (TMA's host cost is paid per launch,
    ``copy_policy``), older GPUs, the interpreter (the TMA path is tested there by asking for it),
    ``pipeline`` or the coalesced value copy, and storage whose strides, alignment or vector
    widths the descriptors cannot take."""
    if (
        device.type != "cuda"
        or interpreting()
        or pipeline
        or value_copy != "planes"
        or not graph_step_copies_active()
        or torch.cuda.get_device_capability(device)[0] < 9
    ):
        return "cp.async", None, None
    try:
        descs, layouts_ = tma_descriptors(storage, head_dim, tile_size, key_bits, value_bits)
    except ValueError:  # strides, alignment or row widths TMA cannot take: every lane copies
        return "cp.async", None, None
    return "tma", descs, layouts_


def _extent(x: torch.Tensor) -> int:
    """Elements from ``x``'s first to one past its last (a strided view's span of storage)."""
    return 1 + sum((n - 1) * st for n, st in zip(x.shape, x.stride(), strict=True))


def _tma_swizzle(row_bytes: int, what: str) -> int:
    if row_bytes not in (32, 64, 128):
        raise ValueError(
            f"copy='tma': {what} rows of {row_bytes} bytes; the TMA path takes rows of 32, 64 or 128 "
            "bytes (the swizzle width ldmatrix reads conflict-free), use copy='cp.async'"
        )
    return row_bytes


def tma_descriptors(storage: dict, head_dim: int, tile_size: int, key_bits: int, value_bits: int):
    """Tensor descriptors over one layer's packed tiles for ``copy="tma"`` and the shared layouts
    of the kernel's stages, ``(descs, (key stage, value box, metadata view, barrier, value plane))``.

    Each descriptor spans the storage from its first element, whatever the batch, head and tile
    strides, so the kernel finds tile (b, h, j) by a coordinate (``_issue_keys_tma``,
    ``_issue_values_tma``): key words as rows of KW words (box ``[D, KW]``); value rows as
    ``[NPK, rows / NPK, VW]`` with strides ``(VW, NPK * VW, 1)``, so that a ``[NPK, KW, VW]`` box
    lands plane-major (plane f = the rows ``NPK * w + f``); metadata vectors 1-D (box of one
    vector). Those coordinates need the
    leading strides to be whole rows (row groups for values): checked, with an error naming the
    tensor, as is every other TMA limit (16-byte aligned bases, int32 coordinates, metadata
    vectors of a multiple of 128 bytes)."""
    kw, vw = tile_size * key_bits // 16, head_dim * value_bits // 16
    npk = 16 // key_bits
    k16 = storage["k_codes"].view(torch.int16)
    v16 = storage["v_codes"].view(torch.int16)
    names = ("k_scale", "k_zero", "k_token_scale", "v_scale", "v_zero", "v_channel_scale")
    meta = [storage[n] for n in names]
    k_layout = NVMMASharedLayout(
        swizzle_byte_width=_tma_swizzle(2 * kw, "key word"), element_bitwidth=16, rank=2
    )
    v_layout = NVMMASharedLayout(
        swizzle_byte_width=_tma_swizzle(2 * vw, "value"), element_bitwidth=16, rank=3
    )
    m_layout = NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8 * meta[0].element_size(), rank=1)

    def checked_extent(name, x, unit):
        """``_extent(x)`` once ``x`` passes the TMA path's limits."""
        if any(st % unit for st in x.stride()[:3]):
            raise ValueError(
                f"copy='tma': {name} has strides {tuple(x.stride())} (elements); the leading three must "
                f"be multiples of {unit}"
            )
        if x.data_ptr() % 16:
            raise ValueError(f"copy='tma': {name} does not start on a 16-byte boundary")
        n = _extent(x)
        if n >= 2**31:
            raise ValueError(f"copy='tma': {name} spans {n} elements, past int32 coordinates")
        return n

    k_rows = checked_extent("k_codes", k16, kw) // kw
    v_groups = checked_extent("v_codes", v16, npk * vw) // (npk * vw)
    # each metadata vector's box starts on a 16-byte boundary
    m_extents = [checked_extent(n, x, 16 // x.element_size()) for n, x in zip(names, meta, strict=True)]
    for n, x in zip(names, meta, strict=True):
        # Tensor copies write shared memory at 128-byte aligned addresses, and a tile's metadata
        # vectors sit back to back in their stages (GPU: "misaligned address" at G = 32, bf16).
        if (x.shape[-1] * x.element_size()) % 128:
            raise ValueError(
                f"copy='tma': {n} vectors of {x.shape[-1] * x.element_size()} bytes; the TMA path "
                "takes metadata vectors of a multiple of 128 bytes (its shared-memory boxes start on "
                "128-byte boundaries), use copy='cp.async'"
            )
    if interpreting():
        from triton.tools.tensor_descriptor import TensorDescriptor

        def desc(base, shape, strides, block, layout):
            return TensorDescriptor(base, shape, strides, block)
    else:
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        def desc(base, shape, strides, block, layout):
            return TensorDescriptor(base, shape, strides, block, layout)

    descs = [
        desc(torch.as_strided(k16, (k_rows, kw), (kw, 1)), [k_rows, kw], [kw, 1], [head_dim, kw], k_layout),
        desc(
            torch.as_strided(v16, (npk, v_groups, vw), (vw, npk * vw, 1)),
            [npk, v_groups, vw],
            [vw, npk * vw, 1],
            [npk, kw, vw],
            v_layout,
        ),  # fmt: skip
    ]
    for x, n in zip(meta, m_extents, strict=True):
        descs.append(desc(torch.as_strided(x, (n,), (1,)), [n], [1], [x.shape[-1]], m_layout))
    v_planes = NVMMASharedLayout(swizzle_byte_width=v_layout.swizzle_byte_width, element_bitwidth=16, rank=2)
    return descs, (k_layout, v_layout, m_layout, MBarrierLayout(), v_planes)


def dense_chunk(head_dim: int, tile_size: int) -> int:
    """16-bit tokens per dense program (two [TC, D] buffers in shared memory: 16 KB at most)."""
    return min(tile_size, 32 if head_dim <= 128 else 16)


def dense_programs(tile_size: int, chunk: int) -> int:
    """Programs per (row, KV head, row block) for the 16-bit segments: new tokens, sink, tail."""
    return 1 + 2 * (tile_size // chunk)


_WARP_LAUNCH = FastLauncher(_decode_warp_kernel)

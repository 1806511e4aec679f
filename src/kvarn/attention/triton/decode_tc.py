"""Decode attention over the KVarN layer storage on tensor cores, codes kept in bit planes.

Same contract and result as ``kvarn.attention.triton.decode_chunked.quantized_decode_attention``
(docs/layerstore: sink + packed tiles + tail + this call's new tokens), built so that no packed
code is ever interleaved back into token or channel order:

* Key codes are packed along tokens: byte ``i`` of channel row ``d`` holds tokens
  ``NPK*i .. NPK*i + NPK-1`` (``NPK = 8 / key_bits``). ``(byte >> kb*j) & mask`` is therefore a
  ``[D, G/NPK]`` matrix of the codes of tokens ``t = NPK*i + j`` ("key plane j"), which goes
  straight into a tensor-core product ``(q * a_k) @ plane``. Softmax does not care about token
  order, so each key plane is handled as its own chunk of the online softmax.
* Value codes are packed along channels: ``(byte >> vb*c) & mask`` of the value rows of a key
  plane's tokens is the ``[G/NPK, D/NPV]`` matrix of channels ``d = NPV*i + c`` ("value plane
  c"); ``(p * a_v) @ plane`` accumulates into accumulator ``c``, and the output is written back
  to channels ``NPV*i + c`` with strided stores.

Scales fold around the products (SPEC "attention over quantized tiles"); the softmax scale and
log2(e) are folded into the query once:
  scores  s[m, t] = r[t] * ((q[m] * a_k) @ codes_k[:, t] + q[m] . z_k)       (log2 domain)
  output  o[m, d] = c[d] * ((p[m] * a_v) @ codes_v[:, d] + p[m] . z_v)
Operands are float16 for every model dtype: codes 0..255 are exact in it, and ``q * a_k`` /
``p * a_v`` keep 11 significant bits (bf16 would keep 8, visibly worse than the output rounding);
accumulation is float32. float16 range is ample for these factors (the query is pre-scaled by
``scaling * log2(e)``; p <= 1).

Two launches of the main kernel: ``(B * Hkv, 1, row blocks)`` for split 0 and
``(B * Hkv, num_splits, row blocks)`` for splits 1..num_splits. Split 0 of a (row, KV head) attends to the 16-bit segments (new tokens, causal, then sink and tail masked by
their lengths); splits ``s >= 1`` take a contiguous run of the row's ``n_tiles[b]`` tiles, one
tile per loop iteration, sized at run time: the launch depends only on shapes (CUDA graphs
capture it). All query heads of the GQA group and all L queries are the rows of one program
(padded to 16 / 32), so each tile's codes are read once per KV head. A merge kernel combines the
``1 + num_splits`` partials per query row by log-sum-exp.
"""

from __future__ import annotations

import contextlib
import functools
import struct

import torch
import triton
import triton.language as tl

from kvarn.attention.triton import interpreting
from kvarn.attention.triton.contract import (
    STORAGE,
    check_decode_inputs,
    is_pow2,
    kernel_layout,
    output_buffer,
    shape_unsupported_reason,
)
from kvarn.attention.triton.launch import FastLauncher
from kvarn.attention.triton.split_k import (
    merge_grid,
    merge_num_warps,
    merge_partials,
    online_step,
    sm_count,
    split_workspace,
)

LOG2E = 1.4426950408889634
MAX_QUERIES = 16
MAX_SPLITS = 160
# Registers cap of the tile launch where measured faster (H100, D = 128: 3 programs per SM instead
# of 2, a few spilled bytes; other head dims spill hundreds of bytes under it, so no cap there).
MAXNREG_D128 = 168
KERNEL_BITS = (2, 4, 8)
# Tile-loop variants (launch option ``variant``): "planes" = byte planes, one online-softmax step
# per key plane; "words" = key codes as 16-bit words, one online-softmax step per tile.
VARIANTS = ("planes", "words")
# How a packed code field becomes a float16 tensor-core operand (launch option ``code_operands``,
# "words" only): "fma" = OR-ed into float16 1024, one f16x2 fma leaves the code; "subnormal" = the
# masked field alone, a subnormal float16 ``code * 2**(s-24)``, and the power of two goes into the
# float32 step that already adds the zero-point term (no fma: sm_90, K4V2 D=G=128 m_block=4, 128 of
# the loop's 956 instructions per warp per tile). Both exact; docs/gpu_decode_notes.md, round 4.
CODE_OPERANDS = ("fma", "subnormal")
# What code_operands="auto" gives "words" ("planes" always takes "fma"). "subnormal" is exact and
# bit for bit the fma path's result wherever float16 subnormals reach the tensor cores intact
# (interpreter; V100/T4/A100 per Fasi et al. 2021; PTX leaves it unspecified): to be confirmed by
# scripts/gpu_check.py on the H100; "fma" here restores the previous default everywhere.
WORDS_CODE_OPERANDS = "subnormal"
# Set by scripts/gpu_check.py: fill the split-K workspace with NaN before each launch.
POISON_WORKSPACE = False
# The last compiled launch (registers, spills) for benchmark diagnostics.
LAST_LAUNCH: list = [None]


@triton.jit
def _dot(a, b, INTERPRET: tl.constexpr):
    """a @ b with float32 accumulation. The interpreter multiplies 16-bit operands in 16 bits,
    so there the (exactly representable) operands go through float32 instead."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


def f16x2(x: float) -> str:
    """A float16 constant in both halves of a 32-bit PTX immediate."""
    h = struct.unpack("<H", struct.pack("<e", x))[0]
    return f"0x{h:04X}{h:04X}"


def _plane_asm_text(bits: int, j: int) -> str:
    """PTX for code j of 4 packed bytes -> 4 float16 codes (two f16x2 registers), exactly.

    Per 4 codes: 2 byte permutes, 2 and-or (lop3), 2 f16x2 fma. Each byte goes to its own 16-bit
    lane, ``lane & mask(j) | 0x6400`` is float16 ``1024 + code * 2**(bits*j)``, and one fma with
    ``2**-(bits*j)`` and ``-1024 * 2**-(bits*j)`` leaves the code (all steps exact).
    """
    mask = ((1 << bits) - 1) << (bits * j)
    scale = 2.0 ** -(bits * j)

    return (
        "{\n.reg .b32 t0, t1, z, s, c;\n"
        "mov.b32 z, 0;\n"
        f"mov.b32 s, {f16x2(scale)};\n"
        f"mov.b32 c, {f16x2(-1024.0 * scale)};\n"
        "prmt.b32 t0, $2, z, 0x4140;\n"
        "prmt.b32 t1, $2, z, 0x4342;\n"
        f"lop3.b32 t0, t0, 0x{mask:04X}{mask:04X}, 0x64006400, 0xea;\n"
        f"lop3.b32 t1, t1, 0x{mask:04X}{mask:04X}, 0x64006400, 0xea;\n"
        "fma.rn.f16x2 $0, t0, s, c;\n"
        "fma.rn.f16x2 $1, t1, s, c;\n}"
    )


# PTX texts per (bits, plane / field), built once at import; kernels pick theirs at compile time
# (Triton reads globals only as constexpr, and a constexpr_function may not call struct).
_PLANE_ASM = tl.constexpr({(b, j): _plane_asm_text(b, j) for b in (2, 4, 8) for j in range(8 // b)})


@triton.constexpr_function
def _plane_asm_of(bits: int, j: int) -> str:
    return _PLANE_ASM.value[(bits, j)]


@triton.jit
def _plane_asm(packed, j: tl.constexpr, BITS: tl.constexpr):
    """``_plane`` in hand-written PTX on 32-bit words (4 bytes per instance): ~1.5 instructions
    per code instead of ~4-5 for byte-wise shifts, masks and conversions. GPU only."""
    text: tl.constexpr = _plane_asm_of(BITS, j)
    return tl.inline_asm_elementwise(text, "=r,=r,r", [packed], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _plane(packed, j: tl.constexpr, BITS: tl.constexpr):
    """Code j of every byte of ``packed`` (uint8) as float16, exactly.

    No int -> float conversion (quarter rate on Hopper): the code is OR-ed into the mantissa of
    float16 1024.0 (unit mantissa step at that exponent), then 1024 is subtracted exactly.
    """
    if BITS == 8:
        code = packed.to(tl.int16)
    else:
        code = ((packed >> (BITS * j)) & ((1 << BITS) - 1)).to(tl.int16)
    return (code | 0x6400).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def _code_plane(packed, j: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    """Plane j of packed codes as float16: PTX on the GPU when ASM, else Triton operations."""
    if ASM:
        return _plane_asm(packed, j, BITS)
    else:
        return _plane(packed, j, BITS)


def _word_asm_text(bits: int, j: int) -> str:
    """PTX for field j of 2 packed 16-bit words -> 2 float16 codes (one f16x2 register), exactly.

    Fields ending at or below bit 10 are masked in place (``lane & mask | 0x6400`` is float16
    ``1024 + code * 2**shift``); higher fields are first shifted down by 8 (the other word's
    bits that move in are masked off). One fma with ``2**-shift`` and ``-1024 * 2**-shift``
    leaves the code. 2 instructions per 2 codes (3 for the shifted fields).
    """
    shift = bits * j
    pre, src = "", "$1"
    if shift + bits > 10:
        shift -= 8
        pre, src = "shr.b32 t, $1, 8;\n", "t"
    mask = ((1 << bits) - 1) << shift
    scale = 2.0**-shift

    return (
        "{\n.reg .b32 t, s, c;\n"
        f"mov.b32 s, {f16x2(scale)};\n"
        f"mov.b32 c, {f16x2(-1024.0 * scale)};\n"
        + pre
        + f"lop3.b32 t, {src}, 0x{mask:04X}{mask:04X}, 0x64006400, 0xea;\n"
        "fma.rn.f16x2 $0, t, s, c;\n}"
    )


@triton.constexpr_function
def subnormal_field_position(bits: int, pos: int) -> tuple[int, int]:
    """(right shift, s) for "subnormal" code operands: the field at bits [pos, pos + bits) of a
    16-bit lane goes to mantissa bits [s, s + bits) of a float16 (s + bits <= 10, exponent bits
    zero: the value is ``code * 2**(s-24)``). Fields that fit stay where they are; the others
    (pos >= 11 - bits) all take the same right shift by 6, so ptxas shares one shift per register
    among them; the top field lands at s = 10 - bits."""
    if pos + bits <= 10:
        return 0, pos
    return 6, pos - 6


@triton.constexpr_function
def subnormal_field_asm_text(bits: int, pos: int) -> str:
    """PTX for the field at bit pos of 2 packed 16-bit lanes -> 2 subnormal float16 operands
    ``code * 2**(s-24)`` (one f16x2 register): one and per 2 codes, plus a shr for fields above
    the mantissa. The right shift by 6 moves the high lane's bits 0..5 into the low lane's bits
    10..15, above every placed field, so the mask clears them."""
    shift, s = subnormal_field_position(bits, pos)
    mask = ((1 << bits) - 1) << s
    if shift:
        return f"{{\n.reg .b32 t;\nshr.b32 t, $1, {shift};\nand.b32 $0, t, 0x{mask:04X}{mask:04X};\n}}"
    return f"and.b32 $0, $1, 0x{mask:04X}{mask:04X};"


@triton.constexpr_function
def subnormal_field_scale(bits: int, pos: int) -> float:
    """2**(24 - s): what a product of subnormal field operands is multiplied by to count codes."""
    return float(2 ** (24 - subnormal_field_position(bits, pos)[1]))


@triton.constexpr_function
def _subnormal_field_s(bits, pos):
    return subnormal_field_position(bits, pos)[1]


_WORD_ASM = tl.constexpr({(b, j): _word_asm_text(b, j) for b in (2, 4, 8) for j in range(16 // b)})


@triton.constexpr_function
def _word_asm_of(bits: int, j: int) -> str:
    return _WORD_ASM.value[(bits, j)]


@triton.jit
def _word_field_asm(words, j: tl.constexpr, BITS: tl.constexpr):
    """``_word_field`` in PTX on pairs of 16-bit words. GPU only."""
    text: tl.constexpr = _word_asm_of(BITS, j)
    return tl.inline_asm_elementwise(text, "=r,r", [words], dtype=tl.float16, is_pure=True, pack=2)


@triton.jit
def _word_field(words, j: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr, SUBNORMAL: tl.constexpr):
    """Field j of every little-endian 16-bit word of codes (uint16) as a float16 operand: the
    code of token ``(16 / BITS) * n + j`` for word n of a key channel row; exactly the code, or
    with SUBNORMAL exactly ``code * 2**(s-24)`` (``subnormal_field_position``; the products are
    scaled back by ``subnormal_field_scale``)."""
    if not SUBNORMAL:
        if ASM:
            return _word_field_asm(words, j, BITS)
        else:
            code = ((words >> (BITS * j)) & ((1 << BITS) - 1)).to(tl.int16)
            return (code | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    else:
        if ASM:
            return tl.inline_asm_elementwise(
                subnormal_field_asm_text(BITS, BITS * j),
                "=r,r",
                [words],
                dtype=tl.float16,
                is_pure=True,
                pack=2,
            )
        else:
            code = ((words >> (BITS * j)) & ((1 << BITS) - 1)).to(tl.int16)
            return (code << _subnormal_field_s(BITS, BITS * j)).to(tl.float16, bitcast=True)


@triton.jit
def _plane_scores(qa, qa_lo, kwords, qz, j: tl.constexpr, KB: tl.constexpr, QA_SPLIT: tl.constexpr,
                  ASM: tl.constexpr, INTERPRET: tl.constexpr, SUBNORMAL: tl.constexpr):  # fmt: skip
    """(q * a_k) @ key word-plane j: scores of tokens NPW*n + j, [M, G/NPW].

    The raw product (``_tile_scores`` adds q . z_k after the interleave), or with SUBNORMAL
    operands the product scaled back to codes and q . z_k added in one fma, per field (the
    scale depends on it): one float32 op per score, as the add it replaces.
    """
    kp = _word_field(kwords, j, KB, ASM, SUBNORMAL)
    s = _dot(qa, kp, INTERPRET)
    if QA_SPLIT:
        s += _dot(qa_lo, kp, INTERPRET)
    if SUBNORMAL:
        s = s * subnormal_field_scale(KB, KB * j) + qz[:, None]
    return s


@triton.jit
def _tile_scores(qa, qa_lo, kwords, qz, KB: tl.constexpr, QA_SPLIT: tl.constexpr, ASM: tl.constexpr,
                 INTERPRET: tl.constexpr, SUBNORMAL: tl.constexpr):  # fmt: skip
    """Scores ``(q * a_k) @ codes + q . z_k`` of all G tokens of a tile, in token order.

    Word n of channel row d holds tokens NPW*n .. NPW*n + NPW-1 (NPW = 16 / KB), so field j of
    every word is a [D, G/NPW] operand (tokens NPW*n + j); the NPW products are interleaved back
    into token order (register-only reshapes), so the softmax and the value products see one
    [M, G] tile.
    """
    NPW: tl.constexpr = 16 // KB
    s0 = _plane_scores(qa, qa_lo, kwords, qz, 0, KB, QA_SPLIT, ASM, INTERPRET, SUBNORMAL)
    s1 = _plane_scores(qa, qa_lo, kwords, qz, 1, KB, QA_SPLIT, ASM, INTERPRET, SUBNORMAL)
    if NPW == 2:
        s = tl.interleave(s0, s1)
    else:
        s2 = _plane_scores(qa, qa_lo, kwords, qz, 2, KB, QA_SPLIT, ASM, INTERPRET, SUBNORMAL)
        s3 = _plane_scores(qa, qa_lo, kwords, qz, 3, KB, QA_SPLIT, ASM, INTERPRET, SUBNORMAL)
        if NPW == 4:
            # interleave(a, b)[2m + k] = (a, b)[k][m]: token 4n + 2k + k' from plane 2k + k'
            s = tl.interleave(tl.interleave(s0, s2), tl.interleave(s1, s3))
        else:
            s4 = _plane_scores(qa, qa_lo, kwords, qz, 4, KB, QA_SPLIT, ASM, INTERPRET, SUBNORMAL)
            s5 = _plane_scores(qa, qa_lo, kwords, qz, 5, KB, QA_SPLIT, ASM, INTERPRET, SUBNORMAL)
            s6 = _plane_scores(qa, qa_lo, kwords, qz, 6, KB, QA_SPLIT, ASM, INTERPRET, SUBNORMAL)
            s7 = _plane_scores(qa, qa_lo, kwords, qz, 7, KB, QA_SPLIT, ASM, INTERPRET, SUBNORMAL)
            # token 8n + 4k + 2k' + k'' from plane 4k + 2k' + k''
            s = tl.interleave(
                tl.interleave(tl.interleave(s0, s4), tl.interleave(s2, s6)),
                tl.interleave(tl.interleave(s1, s5), tl.interleave(s3, s7)),
            )
    if not SUBNORMAL:
        s = s + qz[:, None]
    return s


@triton.jit
def _dense_softmax_step(
    q16, m_i, l_i, k_base, sk_t, t, valid, q_pos, qk_scale,
    D: tl.constexpr, CAUSAL: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Scores of 16-bit tokens ``t`` (rows of ``k_base``; ``valid`` masks them, CAUSAL against
    the query positions) and the online-softmax step; p comes back as hi + lo parts in the key
    dtype, so the value product loses nothing to operand rounding."""
    d = tl.arange(0, D)
    k = tl.load(k_base + t[:, None].to(tl.int64) * sk_t + d[None, :], mask=valid[:, None], other=0.0)
    s = _dot(q16, tl.trans(k), INTERPRET) * qk_scale
    keep = valid[None, :]
    if CAUSAL:
        keep = keep & (t[None, :] <= q_pos[:, None])
    s = tl.where(keep, s, float("-inf"))
    m_i, p, alpha, l_i = online_step(m_i, l_i, s)
    p_hi = p.to(k.dtype)
    p_lo = (p - p_hi.to(tl.float32)).to(k.dtype)
    return m_i, l_i, alpha, p_hi, p_lo


@triton.jit
def _attend_dense(
    q16, m_i, l_i, acc, k_base, sk_t, v_base, sv_t, n_valid, q_pos, qk_scale,
    T: tl.constexpr, TC: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Attend to up to T 16-bit tokens (rows [0, n_valid)), TC at a time.

    q16 is the query in the model dtype: its products with the 16-bit keys are exact in float32
    and the softmax scale (log2 domain) is applied to the scores. p is split hi + lo in the value
    dtype for p @ v, so the 16-bit segments lose nothing to operand rounding.
    """
    d = tl.arange(0, D)
    for c in tl.static_range(T // TC):
        if c * TC < n_valid:  # skip empty chunks (short tails, no sink)
            t = c * TC + tl.arange(0, TC)
            valid = t < n_valid
            v = tl.load(v_base + t[:, None].to(tl.int64) * sv_t + d[None, :], mask=valid[:, None], other=0.0)
            m_i, l_i, alpha, p_hi, p_lo = _dense_softmax_step(
                q16, m_i, l_i, k_base, sk_t, t, valid, q_pos, qk_scale, D, CAUSAL, INTERPRET
            )
            acc = acc * alpha[:, None] + _dot(p_hi, v, INTERPRET) + _dot(p_lo, v, INTERPRET)
    return m_i, l_i, acc


@triton.jit
def _dense_program(
    q_ptr, q_off, row_ok, q_pos, qk_scale, b, b64, h64,
    sk_ptr, ssk_b, ssk_h, ssk_t, sv_ptr, ssv_b, ssv_h, ssv_t, sink_len_ptr,
    tk_ptr, stk_b, stk_h, stk_t, tv_ptr, stv_b, stv_h, stv_t, tail_len_ptr,
    nk_ptr, snk_b, snk_h, snk_t, nv_ptr, snv_b, snv_h, snv_t,
    po_ptr, pm_ptr, pl_ptr, slot,
    M_BLOCK: tl.constexpr, D: tl.constexpr, G: tl.constexpr, L: tl.constexpr, L_PAD: tl.constexpr,
    DC: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Split 0: new tokens (causal among themselves) first, so every query row has a finite max
    before fully masked segments (empty sink or tail) arrive; then sink and tail."""
    d = tl.arange(0, D)
    q16 = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full([M_BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([M_BLOCK], tl.float32)
    acc = tl.zeros([M_BLOCK, D], tl.float32)
    m_i, l_i, acc = _attend_dense(
        q16, m_i, l_i, acc, nk_ptr + b64 * snk_b + h64 * snk_h, snk_t, nv_ptr + b64 * snv_b + h64 * snv_h,
        snv_t, L, q_pos, qk_scale, L_PAD, L_PAD, D, True, INTERPRET,
    )  # fmt: skip
    sink_len = tl.load(sink_len_ptr + b)
    m_i, l_i, acc = _attend_dense(
        q16, m_i, l_i, acc, sk_ptr + b64 * ssk_b + h64 * ssk_h, ssk_t, sv_ptr + b64 * ssv_b + h64 * ssv_h,
        ssv_t, sink_len, q_pos, qk_scale, G, DC, D, False, INTERPRET,
    )  # fmt: skip
    tail_len = tl.load(tail_len_ptr + b)
    m_i, l_i, acc = _attend_dense(
        q16, m_i, l_i, acc, tk_ptr + b64 * stk_b + h64 * stk_h, stk_t, tv_ptr + b64 * stv_b + h64 * stv_h,
        stv_t, tail_len, q_pos, qk_scale, G, DC, D, False, INTERPRET,
    )  # fmt: skip
    tl.store(pm_ptr + slot, m_i, mask=row_ok)
    tl.store(pl_ptr + slot, l_i, mask=row_ok)
    tl.store(po_ptr + slot[:, None] * D + d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _pv(pa, pa_lo, plane, PA_SPLIT: tl.constexpr, INTERPRET: tl.constexpr):
    """(p * a_v) @ plane, with the float16 rounding remainder of p * a_v as a second operand
    when PA_SPLIT (float16 outputs: one operand's rounding would reach the output rounding)."""
    out = _dot(pa, plane, INTERPRET)
    if PA_SPLIT:
        out += _dot(pa_lo, plane, INTERPRET)
    return out


@triton.jit
def _value_planes(acc0, acc1, acc2, acc3, alpha, p, pa, pa_lo, vz, vrows, cs_ptr, dv,
                  NPV: tl.constexpr, VB: tl.constexpr, ASM: tl.constexpr, PA_SPLIT: tl.constexpr,
                  INTERPRET: tl.constexpr):  # fmt: skip
    """acc_c = acc_c * alpha + ((p*a_v) @ value plane c + p . z_v) * c_v[NPV*i + c] for c < NPV."""
    pz = tl.sum(p * vz[None, :], axis=1)[:, None]
    al = alpha[:, None]
    c0 = tl.load(cs_ptr + dv * NPV).to(tl.float32)[None, :]
    acc0 = acc0 * al + (_pv(pa, pa_lo, _code_plane(vrows, 0, VB, ASM), PA_SPLIT, INTERPRET) + pz) * c0
    if NPV >= 2:
        c1 = tl.load(cs_ptr + dv * NPV + 1).to(tl.float32)[None, :]
        acc1 = acc1 * al + (_pv(pa, pa_lo, _code_plane(vrows, 1, VB, ASM), PA_SPLIT, INTERPRET) + pz) * c1
    if NPV >= 4:
        c2 = tl.load(cs_ptr + dv * NPV + 2).to(tl.float32)[None, :]
        acc2 = acc2 * al + (_pv(pa, pa_lo, _code_plane(vrows, 2, VB, ASM), PA_SPLIT, INTERPRET) + pz) * c2
        c3 = tl.load(cs_ptr + dv * NPV + 3).to(tl.float32)[None, :]
        acc3 = acc3 * al + (_pv(pa, pa_lo, _code_plane(vrows, 3, VB, ASM), PA_SPLIT, INTERPRET) + pz) * c3
    return acc0, acc1, acc2, acc3


@triton.jit
def _attend_tile(
    qs, m_i, l_i, acc0, acc1, acc2, acc3, j, kbytes,
    ka_base, ska_n, kz_base, skz_n, kr_base, skr_n,
    vc_base, svc_n, va_base, sva_n, vz_base, svz_n, vs_base, svs_n,
    D: tl.constexpr, G: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr, QA_SPLIT: tl.constexpr,
    PA_SPLIT: tl.constexpr, ASM: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Online-softmax update with quantized tile j, one key plane (G / NPK tokens) at a time.

    ``kbytes`` are tile j's key codes ``[D, G*kb/8]``, loaded one iteration ahead by the caller.
    """
    NPK: tl.constexpr = 8 // KB
    NPV: tl.constexpr = 8 // VB
    GP: tl.constexpr = G // NPK  # tokens per key plane
    VROW: tl.constexpr = D * VB // 8  # value code bytes per token row
    DV: tl.constexpr = D // NPV
    d = tl.arange(0, D)
    i = tl.arange(0, GP)
    dv = tl.arange(0, DV)
    j64 = j.to(tl.int64)
    ka = tl.load(ka_base + j64 * ska_n + d).to(tl.float32)
    kz = tl.load(kz_base + j64 * skz_n + d).to(tl.float32)
    qa32 = qs * ka[None, :]
    qa = qa32.to(tl.float16)
    if QA_SPLIT:  # the rounding remainder as a second operand: ~22 significant bits in q * a_k
        qa_lo = (qa32 - qa.to(tl.float32)).to(tl.float16)
    qz = tl.sum(qs * kz[None, :], axis=1)
    kr_t = kr_base + j64 * skr_n
    va_t = va_base + j64 * sva_n
    vz_t = vz_base + j64 * svz_n
    vc_t = vc_base + j64 * svc_n
    cs_t = vs_base + j64 * svs_n
    for jp in tl.static_range(NPK):
        t = i * NPK + jp  # tokens of key plane jp
        r = tl.load(kr_t + t).to(tl.float32)
        kp = _code_plane(kbytes, jp, KB, ASM)
        s = _dot(qa, kp, INTERPRET)
        if QA_SPLIT:
            s += _dot(qa_lo, kp, INTERPRET)
        s = (s + qz[:, None]) * r[None, :]
        m_i, p, alpha, l_i = online_step(m_i, l_i, s)
        va = tl.load(va_t + t).to(tl.float32)
        vz = tl.load(vz_t + t).to(tl.float32)
        pa32 = p * va[None, :]
        pa = pa32.to(tl.float16)
        pa_lo = (pa32 - pa.to(tl.float32)).to(tl.float16)  # dead code unless PA_SPLIT
        vrows = tl.load(vc_t + t[:, None] * VROW + tl.arange(0, VROW)[None, :])  # [GP, VROW] uint8
        acc0, acc1, acc2, acc3 = _value_planes(
            acc0,
            acc1,
            acc2,
            acc3,
            alpha,
            p,
            pa,
            pa_lo,
            vz,
            vrows,
            cs_t,
            dv,
            NPV,
            VB,
            ASM,
            PA_SPLIT,
            INTERPRET,
        )
    return m_i, l_i, acc0, acc1, acc2, acc3


@triton.jit
def _add_pairs(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _key_meta(j, ok, ka_base, ska_n, kz_base, skz_n, D: tl.constexpr):
    """Tile j's key channel scale and zero ``[D]`` in the storage dtype (zeros where not ``ok``)."""
    j64 = j.to(tl.int64)
    d = tl.arange(0, D)
    ka = tl.load(ka_base + j64 * ska_n + d, mask=ok, other=0.0)
    kz = tl.load(kz_base + j64 * skz_n + d, mask=ok, other=0.0)
    return ka, kz


@triton.jit
def _token_meta(
    j, ok, kr_base, skr_n, va_base, sva_n, vz_base, svz_n, vs_base, svs_n,
    D: tl.constexpr, G: tl.constexpr, NPV: tl.constexpr,
):  # fmt: skip
    """Tile j's key token scale, value token scale / zero ``[G]`` and value channel scales per
    value plane ``[D / NPV]``, in the storage dtype (zeros where not ``ok``)."""
    j64 = j.to(tl.int64)
    t = tl.arange(0, G)
    r = tl.load(kr_base + j64 * skr_n + t, mask=ok, other=0.0)
    va = tl.load(va_base + j64 * sva_n + t, mask=ok, other=0.0)
    vz = tl.load(vz_base + j64 * svz_n + t, mask=ok, other=0.0)
    cs = vs_base + j64 * svs_n + tl.arange(0, D // NPV) * NPV
    c0 = tl.load(cs, mask=ok, other=0.0)
    c1 = c0
    c2 = c0
    c3 = c0
    if NPV >= 2:
        c1 = tl.load(cs + 1, mask=ok, other=0.0)
    if NPV >= 4:
        c2 = tl.load(cs + 2, mask=ok, other=0.0)
        c3 = tl.load(cs + 3, mask=ok, other=0.0)
    return r, va, vz, c0, c1, c2, c3


@triton.jit
def _value_plane_update(acc, pa, pa_lo, vrows, c: tl.constexpr, cv, pz, al, VB: tl.constexpr,
                        ASM: tl.constexpr, PA_SPLIT: tl.constexpr, INTERPRET: tl.constexpr,
                        SUBNORMAL: tl.constexpr):  # fmt: skip
    """acc * alpha + ((p * a_v) @ value plane c + p . z_v) * c_v (channels NPV*i + c); with
    SUBNORMAL operands the product's power of two goes into the fma that adds p . z_v."""
    pv = _pv(pa, pa_lo, _word_field(vrows, c, VB, ASM, SUBNORMAL), PA_SPLIT, INTERPRET)
    if SUBNORMAL:
        pv = pv * subnormal_field_scale(VB, VB * c) + pz
    else:
        pv = pv + pz
    return acc * al + pv * cv.to(tl.float32)[None, :]


@triton.jit
def _attend_tile_words(
    qs, m_i, l_i, acc0, acc1, acc2, acc3, kwords, vrows, ka, kz, r, va, vz, c0, c1, c2, c3,
    KB: tl.constexpr, VB: tl.constexpr, QA_SPLIT: tl.constexpr,
    PA_SPLIT: tl.constexpr, ASM: tl.constexpr, INTERPRET: tl.constexpr, SUBNORMAL: tl.constexpr,
):  # fmt: skip
    """Online-softmax update with one quantized tile in ONE step (variant "words").

    ``kwords``: the tile's key codes as 16-bit words ``[D, G*kb/16]``; ``vrows``: its value codes
    ``[G, D*vb/8]``; metadata from ``_key_meta`` / ``_token_meta``. All G scores first (``_tile_scores``, token
    order), then one max, one joint reduction for the row sum and p . z_v, one rescale, then the
    value planes over all G tokens at once. SUBNORMAL: codes as subnormal float16 operands
    (``_word_field``).
    """
    NPV: tl.constexpr = 8 // VB
    qa32 = qs * ka.to(tl.float32)[None, :]
    qa = qa32.to(tl.float16)
    qa_lo = qa
    if QA_SPLIT:  # the rounding remainder as a second operand: ~22 significant bits in q * a_k
        qa_lo = (qa32 - qa.to(tl.float32)).to(tl.float16)
    qz = tl.sum(qs * kz.to(tl.float32)[None, :], axis=1)
    s = _tile_scores(qa, qa_lo, kwords, qz, KB, QA_SPLIT, ASM, INTERPRET, SUBNORMAL)
    s = s * r.to(tl.float32)[None, :]
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    p_sum, pz = tl.reduce((p, p * vz.to(tl.float32)[None, :]), 1, _add_pairs)
    l_i = l_i * alpha + p_sum
    pa32 = p * va.to(tl.float32)[None, :]
    pa = pa32.to(tl.float16)
    pa_lo = pa
    if PA_SPLIT:
        pa_lo = (pa32 - pa.to(tl.float32)).to(tl.float16)
    al = alpha[:, None]
    pz = pz[:, None]
    acc0 = _value_plane_update(acc0, pa, pa_lo, vrows, 0, c0, pz, al, VB, ASM, PA_SPLIT, INTERPRET, SUBNORMAL)
    if NPV >= 2:
        acc1 = _value_plane_update(
            acc1, pa, pa_lo, vrows, 1, c1, pz, al, VB, ASM, PA_SPLIT, INTERPRET, SUBNORMAL
        )
    if NPV >= 4:
        acc2 = _value_plane_update(
            acc2, pa, pa_lo, vrows, 2, c2, pz, al, VB, ASM, PA_SPLIT, INTERPRET, SUBNORMAL
        )
        acc3 = _value_plane_update(
            acc3, pa, pa_lo, vrows, 3, c3, pz, al, VB, ASM, PA_SPLIT, INTERPRET, SUBNORMAL
        )
    return m_new, l_i, acc0, acc1, acc2, acc3


@triton.jit
def _words_iteration(
    j, end, qs, m_i, l_i, acc0, acc1, acc2, acc3, ka, kz, r, va, vz, c0, c1, c2, c3,
    kw_base, skw_n, kw_off, ka_base, ska_n, kz_base, skz_n, kr_base, skr_n,
    vc_base, svc_n, vc_off, va_base, sva_n, vz_base, svz_n, vs_base, svs_n,
    D: tl.constexpr, G: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr, QA_SPLIT: tl.constexpr,
    PA_SPLIT: tl.constexpr, ASM: tl.constexpr, INTERPRET: tl.constexpr, META_AHEAD: tl.constexpr,
    SUBNORMAL: tl.constexpr,
):  # fmt: skip
    """Tile j of ``_words_loop``. The metadata passed in is tile j's where loaded ahead; the
    metadata returned is what the next iteration gets."""
    NPV: tl.constexpr = 8 // VB
    KEY_AHEAD: tl.constexpr = 1 if META_AHEAD >= 1 else 0
    TOKEN_AHEAD: tl.constexpr = 1 if META_AHEAD >= 2 else 0
    nka, nkz = _key_meta(j + KEY_AHEAD, j + KEY_AHEAD < end, ka_base, ska_n, kz_base, skz_n, D)
    nr, nva, nvz, nc0, nc1, nc2, nc3 = _token_meta(
        j + TOKEN_AHEAD, j + TOKEN_AHEAD < end, kr_base, skr_n, va_base, sva_n, vz_base, svz_n, vs_base, svs_n,
        D, G, NPV,
    )  # fmt: skip
    if KEY_AHEAD == 0:
        ka, kz = nka, nkz
    if TOKEN_AHEAD == 0:
        r, va, vz, c0, c1, c2, c3 = nr, nva, nvz, nc0, nc1, nc2, nc3
    j64 = j.to(tl.int64)
    kwords = tl.load(kw_base + j64 * skw_n + kw_off)
    # each value byte widened once to 16 bits: field c of it is then one lop3 + one fma per 2 codes
    vrows = tl.load(vc_base + j64 * svc_n + vc_off).to(tl.uint16)
    m_i, l_i, acc0, acc1, acc2, acc3 = _attend_tile_words(
        qs, m_i, l_i, acc0, acc1, acc2, acc3, kwords, vrows, ka, kz, r, va, vz, c0, c1, c2, c3,
        KB, VB, QA_SPLIT, PA_SPLIT, ASM, INTERPRET, SUBNORMAL,
    )  # fmt: skip
    return m_i, l_i, acc0, acc1, acc2, acc3, nka, nkz, nr, nva, nvz, nc0, nc1, nc2, nc3


@triton.jit
def _words_loop(
    qs, m_i, l_i, acc0, acc1, acc2, acc3, start, end,
    kc_base, skc_n, ka_base, ska_n, kz_base, skz_n, kr_base, skr_n,
    vc_base, svc_n, va_base, sva_n, vz_base, svz_n, vs_base, svs_n,
    D: tl.constexpr, G: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr, QA_SPLIT: tl.constexpr,
    PA_SPLIT: tl.constexpr, ASM: tl.constexpr, INTERPRET: tl.constexpr, META_AHEAD: tl.constexpr,
    SUBNORMAL: tl.constexpr,
):  # fmt: skip
    """Tiles [start, end) with variant "words": the key codes read as 16-bit words.

    The codes are software-pipelined by Triton (``num_stages``); the small metadata loads are
    not, so their latency stalls each tile unless loaded one tile ahead: META_AHEAD = 0 none,
    1 the key channel scale / zero (needed first, by ``q * a_k``), 2 all of it. Registers
    (sm_90 compile, K4V2 D=128 bf16, uncapped): 202 / 206 / 206; under the 168 cap: 166 / 168 /
    168 + 8 bytes of stack.
    """
    NPV: tl.constexpr = 8 // VB
    KW: tl.constexpr = G * KB // 16
    VROW: tl.constexpr = D * VB // 8
    kw_base = kc_base.to(tl.pointer_type(tl.uint16))  # byte strides are even (rows >= 16 bytes)
    skw_n = skc_n // 2
    kw_off = tl.arange(0, D)[:, None] * KW + tl.arange(0, KW)[None, :]
    vc_off = tl.arange(0, G)[:, None] * VROW + tl.arange(0, VROW)[None, :]
    # Tile `start`'s metadata for the first iteration (masked off where not loaded ahead).
    ka, kz = _key_meta(start, (start < end) & (META_AHEAD >= 1), ka_base, ska_n, kz_base, skz_n, D)
    r, va, vz, c0, c1, c2, c3 = _token_meta(
        start, (start < end) & (META_AHEAD >= 2), kr_base, skr_n, va_base, sva_n, vz_base, svz_n, vs_base, svs_n,
        D, G, NPV,
    )  # fmt: skip
    if INTERPRET:
        # The interpreter cannot take a loaded scalar as a range() bound under numpy 2.
        j = start
        while j < end:
            m_i, l_i, acc0, acc1, acc2, acc3, ka, kz, r, va, vz, c0, c1, c2, c3 = _words_iteration(
                j, end, qs, m_i, l_i, acc0, acc1, acc2, acc3, ka, kz, r, va, vz, c0, c1, c2, c3,
                kw_base, skw_n, kw_off, ka_base, ska_n, kz_base, skz_n, kr_base, skr_n,
                vc_base, svc_n, vc_off, va_base, sva_n, vz_base, svz_n, vs_base, svs_n,
                D, G, KB, VB, QA_SPLIT, PA_SPLIT, ASM, INTERPRET, META_AHEAD, SUBNORMAL,
            )  # fmt: skip
            j += 1
    else:
        for j in range(start, end):
            m_i, l_i, acc0, acc1, acc2, acc3, ka, kz, r, va, vz, c0, c1, c2, c3 = _words_iteration(
                j, end, qs, m_i, l_i, acc0, acc1, acc2, acc3, ka, kz, r, va, vz, c0, c1, c2, c3,
                kw_base, skw_n, kw_off, ka_base, ska_n, kz_base, skz_n, kr_base, skr_n,
                vc_base, svc_n, vc_off, va_base, sva_n, vz_base, svz_n, vs_base, svs_n,
                D, G, KB, VB, QA_SPLIT, PA_SPLIT, ASM, INTERPRET, META_AHEAD, SUBNORMAL,
            )  # fmt: skip
    return m_i, l_i, acc0, acc1, acc2, acc3


@triton.jit
def _decode_tc_kernel(
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
    qk_scale, NUM_SPLITS,  # a run-time argument: changing the split count needs no recompile
    HKV: tl.constexpr, GROUP: tl.constexpr, L: tl.constexpr, L_PAD: tl.constexpr,
    D: tl.constexpr, G: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr,
    M_BLOCK: tl.constexpr, DC: tl.constexpr, QA_SPLIT: tl.constexpr,
    PA_SPLIT: tl.constexpr, DENSE: tl.constexpr, PREFETCH: tl.constexpr, UNPACK_ASM: tl.constexpr,
    INTERPRET: tl.constexpr, WORDS: tl.constexpr, META_AHEAD: tl.constexpr, SUBNORMAL: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    # Two launches of this kernel: DENSE (split 0 only) and the tiles (splits 1..NUM_SPLITS), so
    # the register-hungry 16-bit path does not set the register budget of the tile loop.
    if DENSE:
        split = 0
    else:
        split = tl.program_id(1) + 1
    mb = tl.program_id(2)
    b = bh // HKV
    h = bh % HKV
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    MROWS: tl.constexpr = GROUP * L

    # Query rows of this program: row = (query head within the group) * L + query index.
    rows = mb * M_BLOCK + tl.arange(0, M_BLOCK)
    row_ok = rows < MROWS
    q_head = h * GROUP + rows // L
    q_pos = rows % L
    q_off = b64 * sq_b + q_head.to(tl.int64) * sq_h + q_pos.to(tl.int64) * sq_l
    # Partials: [B*Hkv, 1 + NUM_SPLITS, MROWS, D].
    slot = (bh * (NUM_SPLITS + 1) + split).to(tl.int64) * MROWS + rows

    if DENSE:
        _dense_program(
            q_ptr, q_off, row_ok, q_pos, qk_scale, b, b64, h64,
            sk_ptr, ssk_b, ssk_h, ssk_t, sv_ptr, ssv_b, ssv_h, ssv_t, sink_len_ptr,
            tk_ptr, stk_b, stk_h, stk_t, tv_ptr, stv_b, stv_h, stv_t, tail_len_ptr,
            nk_ptr, snk_b, snk_h, snk_t, nv_ptr, snv_b, snv_h, snv_t,
            po_ptr, pm_ptr, pl_ptr, slot, M_BLOCK, D, G, L, L_PAD, DC, INTERPRET,
        )  # fmt: skip
    else:
        NPV: tl.constexpr = 8 // VB
        DV: tl.constexpr = D // NPV
        d = tl.arange(0, D)
        # The query, loaded once, pre-scaled into the log2 domain.
        qs = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        qs = qs * qk_scale
        m_i = tl.full([M_BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([M_BLOCK], tl.float32)
        acc0 = tl.zeros([M_BLOCK, DV], tl.float32)
        acc1 = tl.zeros([M_BLOCK, DV], tl.float32)
        acc2 = tl.zeros([M_BLOCK, DV], tl.float32)
        acc3 = tl.zeros([M_BLOCK, DV], tl.float32)
        n_tiles = tl.load(ntiles_ptr + b)
        per_split = tl.cdiv(n_tiles, NUM_SPLITS)
        start = (split - 1) * per_split
        end = tl.minimum(start + per_split, n_tiles)
        kc_base = kc_ptr + b64 * skc_b + h64 * skc_h
        ka_base = ka_ptr + b64 * ska_b + h64 * ska_h
        kz_base = kz_ptr + b64 * skz_b + h64 * skz_h
        kr_base = kr_ptr + b64 * skr_b + h64 * skr_h
        vc_base = vc_ptr + b64 * svc_b + h64 * svc_h
        va_base = va_ptr + b64 * sva_b + h64 * sva_h
        vz_base = vz_ptr + b64 * svz_b + h64 * svz_h
        vs_base = vs_ptr + b64 * svs_b + h64 * svs_h
        if WORDS:
            m_i, l_i, acc0, acc1, acc2, acc3 = _words_loop(
                qs, m_i, l_i, acc0, acc1, acc2, acc3, start, end,
                kc_base, skc_n, ka_base, ska_n, kz_base, skz_n, kr_base, skr_n,
                vc_base, svc_n, va_base, sva_n, vz_base, svz_n, vs_base, svs_n,
                D, G, KB, VB, QA_SPLIT, PA_SPLIT, UNPACK_ASM and not INTERPRET, INTERPRET, META_AHEAD, SUBNORMAL,
            )  # fmt: skip
        else:
            # With PREFETCH the key codes [D, G*kb/8] (two thirds of a K4V2 tile's bytes) are loaded
            # one tile ahead, so their latency overlaps the previous tile's arithmetic (costs
            # registers: sm_90 compile, 4 warps: 255 + 288 B spilled; 8 warps: 236, no spills).
            KROW: tl.constexpr = G * KB // 8
            kc_off = tl.arange(0, D)[:, None] * KROW + tl.arange(0, KROW)[None, :]
            if PREFETCH:
                kbytes = tl.load(kc_base + start.to(tl.int64) * skc_n + kc_off, mask=start < end, other=0)
            else:
                kbytes = tl.zeros([D, KROW], tl.uint8)
            # without PREFETCH the "next" load is of the current tile, issued just before its use
            AHEAD: tl.constexpr = 1 if PREFETCH else 0
            if INTERPRET:
                # The interpreter cannot take a loaded scalar as a range() bound under numpy 2.
                j = start
                while j < end:
                    k_next = tl.load(
                        kc_base + (j + AHEAD).to(tl.int64) * skc_n + kc_off, mask=j + AHEAD < end, other=0
                    )
                    if not PREFETCH:
                        kbytes = k_next
                    m_i, l_i, acc0, acc1, acc2, acc3 = _attend_tile(
                        qs, m_i, l_i, acc0, acc1, acc2, acc3, j, kbytes,
                        ka_base, ska_n, kz_base, skz_n, kr_base, skr_n,
                        vc_base, svc_n, va_base, sva_n, vz_base, svz_n, vs_base, svs_n, D, G, KB, VB, QA_SPLIT, PA_SPLIT, UNPACK_ASM and not INTERPRET, INTERPRET,
                    )  # fmt: skip
                    kbytes = k_next
                    j += 1
            else:
                for j in range(start, end):
                    k_next = tl.load(
                        kc_base + (j + AHEAD).to(tl.int64) * skc_n + kc_off, mask=j + AHEAD < end, other=0
                    )
                    if not PREFETCH:
                        kbytes = k_next
                    m_i, l_i, acc0, acc1, acc2, acc3 = _attend_tile(
                        qs, m_i, l_i, acc0, acc1, acc2, acc3, j, kbytes,
                        ka_base, ska_n, kz_base, skz_n, kr_base, skr_n,
                        vc_base, svc_n, va_base, sva_n, vz_base, svz_n, vs_base, svs_n, D, G, KB, VB, QA_SPLIT, PA_SPLIT, UNPACK_ASM and not INTERPRET, INTERPRET,
                    )  # fmt: skip
                    kbytes = k_next
        tl.store(pm_ptr + slot, m_i, mask=row_ok)
        tl.store(pl_ptr + slot, l_i, mask=row_ok)
        # Accumulator c holds channels NPV*i + c.
        dv = tl.arange(0, DV)
        o_rows = po_ptr + slot[:, None] * D
        tl.store(o_rows + (dv * NPV)[None, :], acc0, mask=row_ok[:, None])
        if NPV >= 2:
            tl.store(o_rows + (dv * NPV + 1)[None, :], acc1, mask=row_ok[:, None])
        if NPV >= 4:
            tl.store(o_rows + (dv * NPV + 2)[None, :], acc2, mask=row_ok[:, None])
            tl.store(o_rows + (dv * NPV + 3)[None, :], acc3, mask=row_ok[:, None])


_TILE_LAUNCH = FastLauncher(_decode_tc_kernel)
_MERGE_LAUNCH = FastLauncher(merge_partials)


def default_num_splits(batch: int, kv_heads: int, device: torch.device, programs_per_sm: int = 3) -> int:
    """Tile splits per (row, KV head), from a cost model of the launch's waves.

    ``batch * kv_heads * splits`` runs of ``tiles / splits`` tiles fill ``programs_per_sm`` x SMs
    program slots in ``ceil(programs / slots)`` waves; a run also pays a fixed cost of about 1.5
    tiles (query load, partial stores, merge). The model takes a nominal 1,024 tiles per row
    (128k tokens): the launch must not depend on the context length, so that CUDA graphs can
    capture a decode step. H100, words kernel, 3 programs per SM (three launches): 128k x 1 49
    splits (one wave) 82 us vs 132 splits 89 us; 32k x 8 6 splits 141 us, 12 splits 144 us, 17
    splits 147 us (docs/gpu.md). Of the split counts within 1.5% of the best, the fewest.
    """
    return _num_splits_for(max(1, batch * kv_heads), max(1, programs_per_sm) * sm_count(device))


@functools.lru_cache(maxsize=256)
def _num_splits_for(runs: int, slots: int) -> int:
    # (cached: the search costs ~40 us of host time, paid on every decode call otherwise)

    def cost(s: int) -> float:
        return -(-runs * s // slots) * (1024 / s + 1.5)

    best = min(cost(s) for s in range(1, MAX_SPLITS + 1))
    return next(s for s in range(1, MAX_SPLITS + 1) if cost(s) <= 1.015 * best)  # fewest near the best


def programs_per_sm(regs_per_thread: int | None, num_warps: int) -> int:
    """Programs resident per SM when registers are the limit (255 assumed when uncapped)."""
    regs = ((regs_per_thread or 255) + 7) // 8 * 8  # allocated in units of 8 per thread
    return max(1, 65536 // (32 * num_warps * regs))


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One extra stream per device for the 16-bit segments' launch (created once: a new stream
    per call would cost host time and cannot be made during a CUDA-graph capture)."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=key)
    return _SIDE_STREAMS[key]


def _next_pow2(n: int) -> int:
    # plain Python: triton.next_power_of_2 is a constexpr function with a per-call wrapper
    return 1 << max(0, n - 1).bit_length()


def supports(
    head_dim: int, tile_size: int, key_bits: int, value_bits: int, num_queries: int, dtype
) -> str | None:
    """None when this kernel handles these shapes, else the reason it does not."""
    reason = shape_unsupported_reason(
        head_dim, tile_size, key_bits, value_bits, num_queries, dtype, KERNEL_BITS, MAX_QUERIES
    )
    if reason:
        return reason
    # Tensor-core products need every dimension >= 16: key planes of G*kb/8 tokens, value
    # planes of D*vb/8 channels.
    if tile_size * key_bits // 8 < 16:
        return f"tile_size={tile_size} at {key_bits}-bit keys gives key planes under 16 tokens"
    if head_dim * value_bits // 8 < 16:
        return f"head_dim={head_dim} at {value_bits}-bit values gives value planes under 16 channels"
    return None


def quantized_decode_attention(
    query, k_codes, k_scale, k_zero, k_token_scale, v_codes, v_scale, v_zero, v_channel_scale,
    n_tiles, sink_k, sink_v, sink_len, tail_k, tail_v, tail_len, new_k, new_v,
    key_bits, value_bits, scaling, *, max_tiles: int | None = None, out: torch.Tensor | None = None,
    num_splits: int | None = None, m_block: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None, qa_split: bool | None = None,
    prefetch: bool = False, unpack_asm: bool = True, pa_split: bool | None = None,
    maxnreg: int | None | str = "auto", variant: str = "auto", meta_ahead: int | None = None,
    code_operands: str = "auto", overlap_dense: bool | None = None, dense_chunk: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Attention of ``query [B, Hq, L, D]`` over one layer's KVarN storage (layerstore contract).

    All tensors in the cache (rotated) frame; returns ``[B, Hq, L, D]`` in the query dtype
    (float16 or bfloat16). ``max_tiles`` is accepted for the backend seam and ignored (the launch
    never depends on lengths). ``out`` (optional, ``[B, Hq, L, D]``) receives the result, e.g. a
    static buffer for CUDA-graph capture. ``num_splits`` / ``m_block`` / ``num_warps`` /
    ``num_stages`` override the launch tuning (benchmarks); defaults depend only on shapes.
    ``m_block`` (query rows per program; default: the group x L rows rounded up to a power of
    two, at most 16) below 16 is taken as given (capped at the rows there are): no padded rows in
    the softmax, e.g. 4 for GQA group 4 x L 1. ``num_stages`` defaults to 3 for "words", 2 else.
    ``prefetch=True`` loads each tile's key codes one tile ahead. ``unpack_asm=True`` extracts the
    code planes with hand-written PTX (GPU only; the interpreter keeps the Triton operations).
    ``pa_split`` (default: float16 queries) adds the second value operand (p * a_v remainder).
    ``qa_split`` (default: float16 queries) adds the second key operand (the q * a_k remainder);
    without it scores carry ~2.5e-4 more relative error: under bf16's output rounding (so bf16
    models go without, ~20% faster on an H100), ~2.5x float16's.
    ``maxnreg`` caps the tile launch's registers per thread (more programs per SM, maybe spills);
    ``"auto"`` caps at ``MAXNREG_D128`` for head_dim 128 with 4 warps, None never caps.
    Defaults (PTX unpack, one key operand, the cap) are the fastest measured on an H100 whose
    errors stay at the output rounding (scripts/gpu_check.py).
    ``variant="words"`` (needs ``tile_size * key_bits >= 256``) reads the key codes as 16-bit words
    (ldmatrix instead of byte loads) and takes one online-softmax step per tile (``VARIANTS``;
    docs/gpu_decode_notes.md); ``meta_ahead`` (words only: 0, 1 or 2) loads none / the key channel
    / all metadata one tile ahead. ``prefetch`` applies to "planes" only. ``"auto"`` picks "words"
    with ``meta_ahead=1`` where it applies (H100: 32k x 8 175 us vs planes 265 us, 128k x 1
    106 us vs 154 us; docs/gpu.md), else "planes".
    ``code_operands`` (``CODE_OPERANDS``): how packed codes become float16 tensor-core operands:
    "fma" (the codes, one f16x2 fma per 2 codes) or, words only, "subnormal" (``code * 2**(s-24)``,
    the power of two folded into the zero-point step; no fma: sm_90 words K4V2 D=128 loop 956 ->
    818 instructions per warp per tile). Both exact; "subnormal" relies on the tensor cores taking
    float16 subnormal inputs, which PTX leaves unspecified (docs/gpu_decode_notes.md, round 4).
    ``"auto"``: ``WORDS_CODE_OPERANDS`` for "words", "fma" for "planes".
    A call is three launches: the 16-bit segments, the tiles, the merge. ``overlap_dense`` (CUDA):
    the 16-bit segments' launch runs on a second stream, concurrently with the tile launch; None
    (default): only while a CUDA graph is captured (H100 graph replays: 32k x 8 125.9 vs 130.2 us,
    128k x 1 74.0 vs 76.0 us); in eager calls the stream switch costs more host time than it saves
    (decoding is host-bound). ``dense_chunk`` (power of two; default 128 at head_dim <= 128, else
    32): 16-bit tokens per step of the dense segments. (A one-launch option, ``fused``, was
    measured slower and removed in session 4; docs/gpu.md.)
    """
    if dense_chunk is not None and (not isinstance(dense_chunk, int) or not is_pow2(dense_chunk)):
        raise ValueError(f"dense_chunk={dense_chunk!r}: expected a power of two")
    storage = dict(
        k_codes=k_codes, k_scale=k_scale, k_zero=k_zero, k_token_scale=k_token_scale,
        v_codes=v_codes, v_scale=v_scale, v_zero=v_zero, v_channel_scale=v_channel_scale,
        n_tiles=n_tiles, sink_k=sink_k, sink_v=sink_v, sink_len=sink_len,
        tail_k=tail_k, tail_v=tail_v, tail_len=tail_len, new_k=new_k, new_v=new_v,
    )  # fmt: skip
    bsz, hq, nq, hd, hkv, ncap, g = check_decode_inputs(
        query, storage, key_bits, value_bits, supports, "tensor-core", dense_in_query_dtype=True
    )

    group = hq // hkv
    mrows = group * nq
    # Query rows per program. 16 by default (one m16 tensor-core tile): at 32 rows the four value
    # accumulators spill (sm_90 compile: 1.6 KB per thread); larger groups x queries take
    # several row blocks, re-reading the codes (from L2) per block: the multi-query path only.
    # An explicit m_block below 16 is honoured (Triton pads the products to m16 itself, but the
    # elementwise work, the softmax, runs on the real rows only: group 4 x L 1 = 4 rows instead
    # of 16; sm_90 compile, words K4V2 D=128: loop 1037 -> 915 instructions per warp per tile).
    if m_block is not None and (not is_pow2(m_block) or m_block > 64):
        raise ValueError(f"m_block={m_block!r}: expected a power of two in [1, 64] or None")
    if m_block is None and mrows < 16:
        # Default: the real rows, rounded up to a power of two (H100, words K4V2, group 4 x L 1:
        # 32k x 8 145 us with 4 rows and 3 stages vs 175 us with 16 rows; docs/gpu.md).
        m_block = _next_pow2(mrows)
    if m_block is not None and m_block < 16:
        m_block = min(_next_pow2(mrows), m_block)
    else:
        m_block = max(16, min(_next_pow2(mrows), m_block or 16))
    n_mb = -(-mrows // m_block)
    num_warps = num_warps or 4
    if maxnreg == "auto":
        maxnreg = MAXNREG_D128 if hd == 128 and num_warps == 4 else None
    if num_splits is None:
        num_splits = default_num_splits(bsz, hkv, query.device, programs_per_sm(maxnreg, num_warps))
    if qa_split is None:
        qa_split = query.dtype == torch.float16
    if pa_split is None:  # below bf16's output rounding without it; not below float16's
        pa_split = query.dtype == torch.float16
    if variant == "auto":
        variant = "words" if g * key_bits // 16 >= 16 else "planes"
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: expected 'auto' or one of {VARIANTS}")
    words = variant == "words"
    # Pipelining depth of the tile loop: 3 measured best for words with small row blocks (H100
    # sweep, run 10), neutral at 16 rows; planes keeps 2.
    num_stages = num_stages or (3 if words else 2)
    if meta_ahead is None:
        meta_ahead = 1 if words else 0
    if meta_ahead not in (0, 1, 2):
        raise ValueError(f"meta_ahead={meta_ahead!r}: expected 0 (none), 1 (key channel metadata) or 2 (all)")
    if code_operands == "auto":
        code_operands = WORDS_CODE_OPERANDS if words else "fma"
    if code_operands not in CODE_OPERANDS:
        raise ValueError(f"code_operands={code_operands!r}: expected 'auto' or one of {CODE_OPERANDS}")
    if code_operands != "fma" and not words:
        raise ValueError(
            f"code_operands={code_operands!r} applies to variant='words' only (this launch: variant={variant!r})"
        )
    if words and g * key_bits // 16 < 16:
        raise ValueError(
            f"variant='words' needs key word planes of >= 16 tokens; tile_size={g} at {key_bits}-bit keys "
            f"gives {g * key_bits // 16}"
        )

    # The kernel indexes the leading dims by stride (capacity slices stay views) and assumes the
    # innermost dims dense.
    query, storage = kernel_layout(query, storage)
    s1 = num_splits + 1
    dev = query.device
    part_o, part_m, part_l = split_workspace(bsz * hkv, s1, mrows, hd, dev, POISON_WORKSPACE)
    out = output_buffer(out, (bsz, hq, nq, hd), query.dtype, dev)

    args = launch_args(query, [storage[n] for n in STORAGE], part_o, part_m, part_l, scaling, num_splits)
    interp = interpreting()
    meta = dict(
        HKV=hkv, GROUP=group, L=nq, L_PAD=max(16, _next_pow2(nq)),
        D=hd, G=g, KB=key_bits, VB=value_bits, M_BLOCK=m_block,
        # 16-bit tokens per dense step: whole 128-token tiles at head_dim <= 128 (H100, three
        # launches: 128k x 1 76.0 us vs 79.1 us with 32, 32k x 8 129.0 vs 132.7 us)
        DC=min(g, dense_chunk or (128 if hd <= 128 else 32)), QA_SPLIT=qa_split, PA_SPLIT=pa_split,
    )  # fmt: skip
    main_stream = side = None
    if overlap_dense is None:
        overlap_dense = dev.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if overlap_dense and dev.type == "cuda" and not interp:
        # The 16-bit segments on a second stream, concurrently with the tile launch (their
        # latency-bound few programs otherwise sit alone on the GPU before it); the merge
        # waits for both. Captured by CUDA graphs as two branches.
        main_stream = torch.cuda.current_stream(dev)
        side = _side_stream(dev)
        side.wait_stream(main_stream)
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        _TILE_LAUNCH(
            (bsz * hkv, 1, n_mb), args,
            {**meta, "DENSE": True, "PREFETCH": False, "UNPACK_ASM": False, "INTERPRET": interp,
             "WORDS": False, "META_AHEAD": 0, "SUBNORMAL": False},
            num_warps=4, num_stages=1,
        )  # fmt: skip
    tile_options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None and not interp:
        tile_options["maxnreg"] = maxnreg
    LAST_LAUNCH[0] = _TILE_LAUNCH(
        (bsz * hkv, num_splits, n_mb), args,
        {**meta, "DENSE": False, "PREFETCH": prefetch, "UNPACK_ASM": unpack_asm and not interp, "INTERPRET": interp,
         "WORDS": words, "META_AHEAD": int(meta_ahead) if words else 0, "SUBNORMAL": code_operands == "subnormal"},
        **tile_options,
    )  # fmt: skip
    if side is not None:
        main_stream.wait_stream(side)
    launch_merge(out, part_o, part_m, part_l, hkv, group, nq, bsz * hkv, mrows)
    return out


def launch_args(query, st: list, part_o, part_m, part_l, scaling: float, num_splits: int) -> tuple:
    """The kernel arguments of ``_decode_tc_kernel`` (``st``: the storage tensors in ``STORAGE``
    order, inner dims dense): pointers with their leading strides, the workspace, the scale."""
    (
        k_codes, k_scale, k_zero, k_token_scale, v_codes, v_scale, v_zero, v_channel_scale,
        n_tiles, sink_k, sink_v, sink_len, tail_k, tail_v, tail_len, new_k, new_v,
    ) = st  # fmt: skip

    def s(x):
        return x.stride()[:3]

    return (
        query, *s(query),
        k_codes, *s(k_codes), k_scale, *s(k_scale), k_zero, *s(k_zero),
        k_token_scale, *s(k_token_scale),
        v_codes, *s(v_codes), v_scale, *s(v_scale), v_zero, *s(v_zero),
        v_channel_scale, *s(v_channel_scale),
        n_tiles,
        sink_k, *s(sink_k), sink_v, *s(sink_v), sink_len,
        tail_k, *s(tail_k), tail_v, *s(tail_v), tail_len,
        new_k, *s(new_k), new_v, *s(new_v),
        part_o, part_m, part_l,
        float(scaling) * LOG2E, num_splits,
    )  # fmt: skip


def launch_merge(out, part_o, part_m, part_l, hkv, group, nq, kv_rows, mrows, pdl: bool = False) -> None:
    """The log-sum-exp merge of the ``[kv_rows, S1, mrows(, D)]`` partials into ``out``. ``pdl``
    (CUDA): launch it as a programmatic dependent launch of the kernel before it (its launch
    overlaps that kernel's tail; the merge waits for its results in ``merge_partials``)."""
    hd = part_o.shape[-1]
    s1 = part_o.shape[1]
    grid = merge_grid(kv_rows * mrows, hd)
    pdl = pdl and out.device.type == "cuda" and not interpreting()
    _MERGE_LAUNCH(
        grid, (part_o, part_m, part_l, out, *out.stride()[:3]),
        dict(HKV=hkv, GROUP=group, L=nq, D=hd, S1=s1, S1_PAD=_next_pow2(s1), DB=hd // grid[1], PDL=pdl),
        num_warps=merge_num_warps(hd, _next_pow2(s1)), **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip

"""Decode attention over quantized tiles, token-chunked ("chunked", kernel v2 in docs/gpu.md).

The fallback behind ``decode_tc.py`` (the tensor-core bit-plane kernel the dispatch tries first):
it takes what that kernel declines (float32 models, 2-bit keys on tiles under 64 tokens, value
planes under 16 channels). GPU-checked on an H100 (scripts/gpu_check.py); 2-3x slower than the
tc kernel at long context.

One kernel, split-K (flash-decoding), then a small log-sum-exp merge kernel.

Grid of the main kernel: ``(1 + num_splits, B * Hkv, M blocks)``. For one (row, KV head):
* program ``s = 0`` attends to the 16-bit segments (this call's new tokens, causal among
  themselves, then the sink and the tail, masked by ``sink_len`` / ``tail_len``);
* programs ``s = 1..num_splits`` each take a contiguous run of the row's ``n_tiles`` quantized
  tiles, sized at run time from ``n_tiles[b]``, so the launch depends only on (B, Hkv, L) and a
  CUDA graph can capture it.
All query heads of the GQA group and all L queries form the M rows of one program, so each tile's
packed codes are read once per KV head (per M block when group*L exceeds the block) and go
straight into the tensor cores as small integers (exact in bf16). Scales are folded around the
matrix products (SPEC "attention over quantized tiles"):
  scores  s[m, t] = r[t] * ((q[m] * a_k) @ codes_k[:, t] + q[m] . z_k)
  output  o[m, d] = c[d] * ((p[m] * a_v) @ codes_v[:, d] + p[m] . z_v)
The float32 factors ``q * a`` and ``p * a`` are split into two bf16 terms (hi + lo) so the bf16
matrix products lose nothing measurable: for bf16 queries and bf16 metadata ``q * a`` is exact in
hi + lo; otherwise the split keeps 16 significant bits. Accumulation is float32.

Each program writes its un-normalized partial output with its running max and sum (log2
domain); the merge kernel combines the ``1 + num_splits`` partials per query row.
"""

from __future__ import annotations

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
)
from kvarn.attention.triton.split_k import (
    merge_grid,
    merge_num_warps,
    merge_partials,
    online_step,
    sm_count,
    split_workspace,
)

LOG2E = 1.4426950408889634
MAX_QUERIES = 16  # largest L the kernel is built and tested for (multi-query verification)
KERNEL_BITS = (2, 4, 8)
# Set by scripts/gpu_check.py: fill the split-K workspace with NaN before each launch.
POISON_WORKSPACE = False

# The last compiled launch (registers, spills) for benchmark diagnostics.
LAST_LAUNCH: list = [None]


@triton.jit
def _unpack(packed, BITS: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """uint8 [R, C*BITS/8] packed along the last axis -> codes [R, C] (int32), codec layout."""
    if BITS == 8:
        return packed.to(tl.int32)
    else:
        PER: tl.constexpr = 8 // BITS
        shift = (tl.arange(0, PER) * BITS)[None, None, :]
        codes = (packed.to(tl.int32)[:, :, None] >> shift) & ((1 << BITS) - 1)
        return tl.reshape(codes, [R, C])


@triton.jit
def _codes_operand(codes, INTERPRET: tl.constexpr):
    """Integer codes as a matrix operand: bf16 holds 0..255 exactly."""
    if INTERPRET:
        return codes.to(tl.float32)  # the interpreter's int -> bf16 conversion is not a value cast
    else:
        return codes.to(tl.bfloat16)


@triton.jit
def _mma(a, b, acc, INTERPRET: tl.constexpr):
    """acc + a @ b for bf16 operands; the interpreter stores bf16 as raw uint16 and cannot
    multiply it, so there the (exactly representable) operands go through float32 instead."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc=acc)


@triton.jit
def _split(x, DT: tl.constexpr):
    """x (float32) = hi + lo, both in the 16-bit dtype DT: ~2x its significand through a matrix product."""
    hi = x.to(DT)
    lo = (x - hi.to(tl.float32)).to(DT)
    return hi, lo


@triton.jit
def _attend_dense(
    q, q16, m_i, l_i, acc, k_base, v_base, stride_t, n_valid, q_pos, qk_scale,
    T: tl.constexpr, TC: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Attend to up to T 16-bit tokens (rows [0, n_valid)) at k_base / v_base, TC at a time.

    For 16-bit models the products q.k are exact in the model dtype (q16, k) and p is split
    hi + lo for p @ v; float32 models use tf32x3 (about float32 accuracy).
    """
    d = tl.arange(0, D)
    for c in tl.static_range(T // TC):
        if c * TC < n_valid:  # skip empty chunks (short tails, no sink)
            t = c * TC + tl.arange(0, TC)
            valid = t < n_valid
            offs = t[:, None].to(tl.int64) * stride_t + d[None, :]
            k = tl.load(k_base + offs, mask=valid[:, None], other=0.0)
            v = tl.load(v_base + offs, mask=valid[:, None], other=0.0)
            if k.dtype == tl.float32:
                s = tl.dot(q, tl.trans(k), input_precision="tf32x3")
            else:
                s = _mma(q16, tl.trans(k), tl.zeros([q.shape[0], TC], tl.float32), INTERPRET)
            s = s * qk_scale
            keep = valid[None, :]
            if CAUSAL:
                keep = keep & (t[None, :] <= q_pos[:, None])
            s = tl.where(keep, s, float("-inf"))
            m_i, p, alpha, l_i = online_step(m_i, l_i, s)
            if v.dtype == tl.float32:
                pv = tl.dot(p, v, input_precision="tf32x3")
            else:
                p_hi, p_lo = _split(p, v.dtype)
                pv = _mma(p_hi, v, tl.zeros([q.shape[0], D], tl.float32), INTERPRET)
                pv = _mma(p_lo, v, pv, INTERPRET)
            acc = acc * alpha[:, None] + pv
    return m_i, l_i, acc


@triton.jit
def _attend_tile(
    q, m_i, l_i, acc, j, kc_base, skc_n, ka_base, ska_n, kz_base, skz_n, kr_base, skr_n,
    vc_base, svc_n, va_base, sva_n, vz_base, svz_n, vs_base, svs_n, qk_scale,
    D: tl.constexpr, G: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr, TC: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """Online-softmax update with quantized tile j, TC tokens at a time.

    Per tile: q * a_k (split hi + lo into bf16) and q . z_k once. Per chunk of TC tokens: the key
    codes [D, TC] (a contiguous byte range of every channel row) and the value codes [TC, D] go
    into bf16 matrix products unscaled; r scales the chunk's scores, a_v (split hi + lo) folds
    into p, and c scales the chunk's output before it joins the accumulator.
    """
    KROW: tl.constexpr = G * KB // 8
    KCB: tl.constexpr = TC * KB // 8  # key bytes per channel row per chunk
    VROW: tl.constexpr = D * VB // 8
    d = tl.arange(0, D)
    j64 = j.to(tl.int64)
    ka = tl.load(ka_base + j64 * ska_n + d).to(tl.float32)
    kz = tl.load(kz_base + j64 * skz_n + d).to(tl.float32)
    vs = tl.load(vs_base + j64 * svs_n + d).to(tl.float32)
    qa_hi, qa_lo = _split(q * ka[None, :], tl.bfloat16)
    qz = tl.sum(q * kz[None, :], axis=1)
    kc_tile = kc_base + j64 * skc_n
    vc_tile = vc_base + j64 * svc_n
    for c in tl.static_range(G // TC):
        t = c * TC + tl.arange(0, TC)
        kpk = tl.load(kc_tile + d[:, None] * KROW + (c * KCB + tl.arange(0, KCB))[None, :])
        kcode = _codes_operand(_unpack(kpk, KB, D, TC), INTERPRET)
        s = _mma(qa_hi, kcode, tl.zeros([q.shape[0], TC], tl.float32), INTERPRET)
        s = _mma(qa_lo, kcode, s, INTERPRET)
        kr = tl.load(kr_base + j64 * skr_n + t).to(tl.float32)
        s = (s + qz[:, None]) * (kr * qk_scale)[None, :]
        m_i, p, alpha, l_i = online_step(m_i, l_i, s)
        vpk = tl.load(vc_tile + t[:, None] * VROW + tl.arange(0, VROW)[None, :])
        vcode = _codes_operand(_unpack(vpk, VB, TC, D), INTERPRET)
        va = tl.load(va_base + j64 * sva_n + t).to(tl.float32)
        vz = tl.load(vz_base + j64 * svz_n + t).to(tl.float32)
        pa_hi, pa_lo = _split(p * va[None, :], tl.bfloat16)
        pv = _mma(pa_hi, vcode, tl.zeros([q.shape[0], D], tl.float32), INTERPRET)
        pv = _mma(pa_lo, vcode, pv, INTERPRET)
        pz = tl.sum(p * vz[None, :], axis=1)
        acc = acc * alpha[:, None] + (pv + pz[:, None]) * vs[None, :]
    return m_i, l_i, acc


@triton.jit
def _decode_kernel(
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
    qk_scale,
    HKV: tl.constexpr, GROUP: tl.constexpr, L: tl.constexpr, L_PAD: tl.constexpr,
    D: tl.constexpr, G: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr,
    NUM_SPLITS: tl.constexpr, M_BLOCK: tl.constexpr, TC: tl.constexpr, DC: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    bh = tl.program_id(1)
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
    d = tl.arange(0, D)
    q_off = b64 * sq_b + q_head.to(tl.int64) * sq_h + q_pos.to(tl.int64) * sq_l
    q16 = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
    q = q16.to(tl.float32)

    m_i = tl.full([M_BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([M_BLOCK], tl.float32)
    acc = tl.zeros([M_BLOCK, D], tl.float32)

    if split == 0:
        # 16-bit segments. New tokens first: every query sees at least new token 0, so the
        # running max is finite before fully masked segments (empty sink or tail) arrive.
        m_i, l_i, acc = _attend_dense(
            q, q16, m_i, l_i, acc, nk_ptr + b64 * snk_b + h64 * snk_h, nv_ptr + b64 * snv_b + h64 * snv_h,
            snk_t, L, q_pos, qk_scale, L_PAD, L_PAD, D, True, INTERPRET,
        )  # fmt: skip
        sink_len = tl.load(sink_len_ptr + b)
        m_i, l_i, acc = _attend_dense(
            q, q16, m_i, l_i, acc, sk_ptr + b64 * ssk_b + h64 * ssk_h, sv_ptr + b64 * ssv_b + h64 * ssv_h,
            ssk_t, sink_len, q_pos, qk_scale, G, DC, D, False, INTERPRET,
        )  # fmt: skip
        tail_len = tl.load(tail_len_ptr + b)
        m_i, l_i, acc = _attend_dense(
            q, q16, m_i, l_i, acc, tk_ptr + b64 * stk_b + h64 * stk_h, tv_ptr + b64 * stv_b + h64 * stv_h,
            stk_t, tail_len, q_pos, qk_scale, G, DC, D, False, INTERPRET,
        )  # fmt: skip
    else:
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
        if INTERPRET:
            # Triton's interpreter cannot take a loaded scalar as a range() bound under numpy 2.
            j = start
            while j < end:
                m_i, l_i, acc = _attend_tile(
                    q, m_i, l_i, acc, j, kc_base, skc_n, ka_base, ska_n, kz_base, skz_n, kr_base, skr_n,
                    vc_base, svc_n, va_base, sva_n, vz_base, svz_n, vs_base, svs_n, qk_scale, D, G, KB, VB, TC, INTERPRET,
                )  # fmt: skip
                j += 1
        else:
            for j in range(start, end):
                m_i, l_i, acc = _attend_tile(
                    q, m_i, l_i, acc, j, kc_base, skc_n, ka_base, ska_n, kz_base, skz_n, kr_base, skr_n,
                    vc_base, svc_n, va_base, sva_n, vz_base, svz_n, vs_base, svs_n, qk_scale, D, G, KB, VB, TC, INTERPRET,
                )  # fmt: skip

    # Partials: [B*Hkv, 1 + NUM_SPLITS, MROWS, (D)].
    slot = (bh * (NUM_SPLITS + 1) + split).to(tl.int64) * MROWS + rows
    tl.store(pm_ptr + slot, m_i, mask=row_ok)
    tl.store(pl_ptr + slot, l_i, mask=row_ok)
    tl.store(po_ptr + slot[:, None] * D + d[None, :], acc, mask=row_ok[:, None])


def default_num_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Tile splits per (row, KV head): enough programs to fill the GPU about twice over.

    Depends only on the batch shape and the device (never on the context length), so a decode
    step's launch configuration is fixed and CUDA graphs can capture it.
    """
    return max(1, min(64, -(-2 * sm_count(device) // max(1, batch * kv_heads))))


def supports(
    head_dim: int, tile_size: int, key_bits: int, value_bits: int, num_queries: int, dtype
) -> str | None:
    """None when the kernel handles these shapes, else the reason it does not."""
    if not is_pow2(head_dim) or head_dim < 16 or head_dim > 256:
        return f"head_dim={head_dim} is not a power of two in [16, 256]"
    if not is_pow2(tile_size) or tile_size < 16:
        return f"tile_size={tile_size} is not a power of two >= 16"
    if key_bits not in KERNEL_BITS or value_bits not in KERNEL_BITS:
        return f"key_bits={key_bits}, value_bits={value_bits}: the kernel decodes {list(KERNEL_BITS)} bits"
    if not 1 <= num_queries <= MAX_QUERIES:
        return f"{num_queries} new queries per row; the kernel takes 1..{MAX_QUERIES}"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} is not float16/bfloat16/float32"
    return None


def quantized_decode_attention(
    query, k_codes, k_scale, k_zero, k_token_scale, v_codes, v_scale, v_zero, v_channel_scale,
    n_tiles, sink_k, sink_v, sink_len, tail_k, tail_v, tail_len, new_k, new_v,
    key_bits, value_bits, scaling, *, max_tiles: int | None = None, out: torch.Tensor | None = None,
    num_splits: int | None = None, m_block: int | None = None, token_chunk: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Attention of ``query [B, Hq, L, D]`` over one layer's KVarN storage (layerstore contract).

    All tensors in the cache (rotated) frame; returns ``[B, Hq, L, D]`` in the query dtype.
    ``max_tiles`` (a host-side bound on ``n_tiles``) is accepted for the backend seam and ignored:
    the launch never depends on lengths. ``out`` (optional, ``[B, Hq, L, D]`` in the query dtype)
    receives the result, e.g. a static buffer for CUDA-graph capture. ``num_splits`` / ``m_block`` / ``token_chunk`` / ``num_warps`` / ``num_stages`` override the launch tuning
    (benchmarks); the defaults depend only on shapes, never on lengths.
    """
    storage = dict(
        k_codes=k_codes, k_scale=k_scale, k_zero=k_zero, k_token_scale=k_token_scale,
        v_codes=v_codes, v_scale=v_scale, v_zero=v_zero, v_channel_scale=v_channel_scale,
        n_tiles=n_tiles, sink_k=sink_k, sink_v=sink_v, sink_len=sink_len,
        tail_k=tail_k, tail_v=tail_v, tail_len=tail_len, new_k=new_k, new_v=new_v,
    )  # fmt: skip
    bsz, hq, nq, hd, hkv, ncap, g = check_decode_inputs(
        query, storage, key_bits, value_bits, supports, "Triton", dense_in_query_dtype=False
    )

    group = hq // hkv
    mrows = group * nq
    if m_block is None:
        # Query rows per program. Beyond 32 rows Triton's Hopper path switched to warpgroup MMAs
        # and the first GPU run faulted (docs/gpu.md); 32 keeps mma.sync. Larger groups x
        # queries take several row blocks (codes re-read per block: the multi-query path only).
        m_block = 32
    m_block = max(16, min(triton.next_power_of_2(mrows), m_block))
    if token_chunk is None:
        token_chunk = 32
    token_chunk = min(token_chunk, g)
    n_mb = triton.cdiv(mrows, m_block)
    if num_splits is None:
        num_splits = default_num_splits(bsz, hkv, query.device)
    if num_warps is None:
        num_warps = 4
    if num_stages is None:
        num_stages = 2

    # The kernel indexes the leading dims by stride (capacity slices stay views) and assumes the
    # innermost dims dense.
    query, storage = kernel_layout(query, storage)
    (
        k_codes, k_scale, k_zero, k_token_scale, v_codes, v_scale, v_zero, v_channel_scale,
        n_tiles, sink_k, sink_v, sink_len, tail_k, tail_v, tail_len, new_k, new_v,
    ) = (storage[n] for n in STORAGE)  # fmt: skip

    s1 = num_splits + 1
    dev = query.device
    part_o, part_m, part_l = split_workspace(bsz * hkv, s1, mrows, hd, dev, POISON_WORKSPACE)
    out = output_buffer(out, (bsz, hq, nq, hd), query.dtype, dev)

    def st(x, n):
        return [x.stride(i) for i in range(n)]

    LAST_LAUNCH[0] = _decode_kernel[(s1, bsz * hkv, n_mb)](
        query, *st(query, 3),
        k_codes, *st(k_codes, 3), k_scale, *st(k_scale, 3), k_zero, *st(k_zero, 3),
        k_token_scale, *st(k_token_scale, 3),
        v_codes, *st(v_codes, 3), v_scale, *st(v_scale, 3), v_zero, *st(v_zero, 3),
        v_channel_scale, *st(v_channel_scale, 3),
        n_tiles,
        sink_k, *st(sink_k, 3), sink_v, *st(sink_v, 3), sink_len,
        tail_k, *st(tail_k, 3), tail_v, *st(tail_v, 3), tail_len,
        new_k, *st(new_k, 3), new_v, *st(new_v, 3),
        part_o, part_m, part_l,
        float(scaling) * LOG2E,
        HKV=hkv, GROUP=group, L=nq, L_PAD=max(16, triton.next_power_of_2(nq)),
        D=hd, G=g, KB=key_bits, VB=value_bits, NUM_SPLITS=num_splits, M_BLOCK=m_block, TC=token_chunk, DC=min(g, 32), INTERPRET=interpreting(),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    grid = merge_grid(bsz * hkv * mrows, hd)
    merge_partials[grid](
        part_o, part_m, part_l, out, *st(out, 3),
        HKV=hkv, GROUP=group, L=nq, D=hd, S1=s1, S1_PAD=triton.next_power_of_2(s1), DB=hd // grid[1],
        num_warps=merge_num_warps(hd, triton.next_power_of_2(s1)),
    )  # fmt: skip
    return out

"""Split-K (flash-decoding) pieces shared by the decode kernels: the online-softmax step, the
partials workspace, the log-sum-exp merge kernel, and the SM count the split heuristics use.

Each (row, KV head) is attended by 1 + num_splits programs (split 0: the 16-bit segments, splits
1..S: runs of tiles); each writes an un-normalized partial output with its running max and sum
(log2 domain) to ``[B * Hkv, 1 + S, rows(, D)]`` float32, and ``merge_partials`` combines them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait


@triton.jit
def online_step(m_i, l_i, s):
    """Online-softmax step for scores s (log2 domain): new max, p, rescale factor, new sum."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return m_new, p, alpha, l_i * alpha + tl.sum(p, axis=1)


def split_workspace(rows: int, splits: int, mrows: int, head_dim: int, device, poison: bool):
    """Un-normalized partial outputs and their running max / sum, ``[rows, splits, mrows(, D)]``
    float32; ``poison`` fills them with NaN so unwritten partials show (GPU checks)."""
    part_o = torch.empty(rows, splits, mrows, head_dim, dtype=torch.float32, device=device)
    part_m = torch.empty(rows, splits, mrows, dtype=torch.float32, device=device)
    part_l = torch.empty(rows, splits, mrows, dtype=torch.float32, device=device)
    if poison:
        for x in (part_o, part_m, part_l):
            x.fill_(float("nan"))
    return part_o, part_m, part_l


@triton.jit
def merge_partials(
    po_ptr, pm_ptr, pl_ptr, out_ptr, so_b, so_h, so_l,
    HKV: tl.constexpr, GROUP: tl.constexpr, L: tl.constexpr, D: tl.constexpr,
    S1: tl.constexpr, S1_PAD: tl.constexpr, DB: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    """One program per query row and DB channels: log-sum-exp combination of the 1 + num_splits
    partials. Channel blocks spread one row's reads over several programs (its maxima and sums are
    re-read by each: tiny), which shortens this latency-bound launch (H100, 128k x 1, 49 splits).
    PDL: launched as a programmatic dependent of the partials' kernel, so wait here until that
    grid has finished and its writes are visible (``griddepcontrol.wait``)."""
    if PDL:
        gdc_wait()
    pid = tl.program_id(0)
    MROWS: tl.constexpr = GROUP * L
    bh = pid // MROWS
    row = pid % MROWS
    s = tl.arange(0, S1_PAD)
    d = tl.program_id(1) * DB + tl.arange(0, DB)
    ok = s < S1
    slot = (bh * S1 + s).to(tl.int64) * MROWS + row
    m = tl.load(pm_ptr + slot, mask=ok, other=float("-inf"))
    lsum = tl.load(pl_ptr + slot, mask=ok, other=0.0)
    m_max = tl.max(m, axis=0)  # finite: the 16-bit partial always holds new token 0
    w = tl.exp2(m - m_max)  # empty splits (m = -inf) weigh 0
    o = tl.load(po_ptr + slot[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(lsum * w, axis=0)
    b = bh // HKV
    h = bh % HKV
    q_head = h * GROUP + row // L
    q_pos = row % L
    off = b.to(tl.int64) * so_b + q_head.to(tl.int64) * so_h + q_pos.to(tl.int64) * so_l
    tl.store(out_ptr + off + d, out.to(out_ptr.dtype.element_ty))


MERGE_CHANNELS = 32  # channels per merge program (grid: query rows x head_dim / MERGE_CHANNELS)


def merge_grid(rows: int, head_dim: int) -> tuple[int, int]:
    db = min(head_dim, MERGE_CHANNELS)
    return rows, head_dim // db


def merge_num_warps(head_dim: int, s1_pad: int) -> int:
    return 4 if min(head_dim, MERGE_CHANNELS) * s1_pad <= 8192 else 8


@functools.lru_cache(maxsize=8)
def _device_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; 4 elsewhere (the interpreter: small launches in tests)."""
    if device.type != "cuda":
        return 4
    return _device_sm_count(device.index if device.index is not None else torch.cuda.current_device())

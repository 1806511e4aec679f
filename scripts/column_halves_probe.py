"""Offline sm_90 probe for decode_warp's ``column_halves``: per-half token metadata, no data movement.

    PYTHONPATH=src python3 scripts/column_halves_probe.py

With column halves, accumulator column n of a key-score tile ``[KW, 8]`` holds plane 2p's tokens
(n < 4) or plane 2p + 1's (n >= 4), so each element's token scale depends on its column half. This
compiles (for sm_90, no GPU) the path decode_warp takes: a tile's token metadata ``[KW, NPK]`` in
shared memory, loaded in ``halves_layouts``' TOK_H layout (lane bit 1 = the column half), split into
plane pairs (``_pairs``) and multiplied into an accumulator by half (``_by_half``). It prints the
SASS histogram; session 8 (Triton 3.6.0): 4 ``LDS`` and 8 ``FMUL`` per 8 accumulator elements, no
``SHFL`` and no shared-memory round trip beyond the staging store, i.e. the splits, permutes and
reshapes only rename registers.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import compress_sass  # noqa: E402  (offline compile + cuobjdump helpers)
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402

from kvarn.attention.triton import decode_warp  # noqa: E402

KW, NPK = 32, 4  # K4 tiles of 128 tokens
TOK_H_, HALF3_, _ = decode_warp.halves_layouts(128, 128, 4, 2)
TOK_H = gl.constexpr(TOK_H_)
HALF3 = gl.constexpr(HALF3_)
MMA = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8]))
PLAIN = gl.constexpr(gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0]))
ROWS = gl.constexpr(
    gl.BlockedLayout(size_per_thread=[1, NPK], threads_per_warp=[32, 1], warps_per_cta=[1, 1], order=[1, 0])
)
pairs = decode_warp._pairs
by_half = decode_warp._by_half


@gluon.jit
def scale_by_half(meta_ptr, acc_ptr, out_ptr, W: gl.constexpr, C: gl.constexpr, P: gl.constexpr):
    r = gl.arange(0, W, layout=gl.SliceLayout(1, ROWS))
    c = gl.arange(0, C, layout=gl.SliceLayout(0, ROWS))
    stage = gl.allocate_shared_memory(gl.bfloat16, [W, C], PLAIN)
    stage.store(gl.load(meta_ptr + r[:, None] * C + c[None, :]))
    gl.thread_barrier()
    y = pairs(stage.load(TOK_H), HALF3)
    mm = gl.arange(0, W, layout=gl.SliceLayout(1, MMA))
    nn = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
    acc = gl.load(acc_ptr + mm[:, None] * 8 + nn[None, :])
    gl.store(out_ptr + mm[:, None] * 8 + nn[None, :], by_half(acc, y[P], HALF3, MMA))


def main() -> None:
    kernel = compress_sass.compile_sm90(
        scale_by_half,
        {"meta_ptr": "*bf16", "acc_ptr": "*fp32", "out_ptr": "*fp32"},
        {"W": KW, "C": NPK, "P": 1},
        1,
    )
    ops = [op for _, op, _ in compress_sass.sass(compress_sass.sass_text(kernel.asm["cubin"]))]
    hist = collections.Counter(ops)
    print("SASS histogram:", dict(hist.most_common(20)))
    print(
        f"LDS {hist['LDS']}, FMUL {hist['FMUL']}, SHFL {hist['SHFL']}, STS {hist['STS']} (1: the staging store)"
    )


if __name__ == "__main__":
    main()

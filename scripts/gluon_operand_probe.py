"""Offline sm_90 probe for the next decode kernel: key-code words as the MMA *A* operand in Gluon.

    PYTHONPATH=src python3 scripts/gluon_operand_probe.py [--sass out.sass]

docs/gpu_decode_notes.md ("Session 4") designs a decode tile loop with the queries on the MMA's N
side, so that the codes are the A operand of both products. This compiles (for sm_90, no GPU) the
smallest Gluon kernel with that data path: a tile of 16-bit key words, stored as the cache stores
them (channel rows, words along tokens), goes to shared memory, comes back in the A-operand layout
of ``mma.m16n8k16`` (``[M = words, K = channels]``, a transposed view), one field is taken with one
``and`` per register (two codes: the subnormal float16 operands of decode_tc), and the result feeds
``mma_v2``; and the value side: value words of one field plane's tokens (rows staged plane-major)
as the A operand, with the softmax weights handed from the key product's accumulator to the B
operand. It prints the SASS histograms and whether every ``HMMA`` is preceded by ``LDSM...MT88``
(``ldmatrix.trans``) and ``LOP3`` only, i.e. no layout conversion between the shared-memory load
and the tensor-core instruction. Session 4 result (Triton 3.6.0): ``LDSM.16.MT88.4`` -> ``LOP3``
-> ``HMMA.16816.F32`` for both operands, nothing in between; the P handoff is one ``STSM`` + one
barrier + one ``LDSM.16.MT88``.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import compress_sass  # noqa: E402  (offline compile + cuobjdump helpers)
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.ampere import mma_v2  # noqa: E402

CHANNELS, WORDS, QUERIES = 128, 64, 8
MMA = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[4, 1], instr_shape=[16, 8]))
A_OPERAND = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2))
B_OPERAND = gl.constexpr(gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2))
ROWS = gl.constexpr(
    gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[4, 1], order=[1, 0])
)
STAGE = gl.constexpr(gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0]))


@gluon.jit
def codes_as_a_operand(words_ptr, b_ptr, out_ptr, C: gl.constexpr, W: gl.constexpr, N: gl.constexpr):
    ch = gl.arange(0, C, layout=gl.SliceLayout(1, ROWS))
    wd = gl.arange(0, W, layout=gl.SliceLayout(0, ROWS))
    stage = gl.allocate_shared_memory(gl.int16, [C, W], STAGE)
    stage.store(gl.load(words_ptr + ch[:, None] * W + wd[None, :]))
    gl.thread_barrier()
    words = stage.permute((1, 0)).load(A_OPERAND)  # [M = words, K = channels]: ldmatrix.trans
    field0 = gl.inline_asm_elementwise(  # field 0 of both words of a register: two float16 subnormals
        "and.b32 $0, $1, 0x000F000F;", "=r,r", [words], dtype=gl.float16, is_pure=True, pack=2
    )
    kk = gl.arange(0, C, layout=gl.SliceLayout(1, B_OPERAND))
    nn = gl.arange(0, N, layout=gl.SliceLayout(0, B_OPERAND))
    b = gl.load(b_ptr + kk[:, None] * N + nn[None, :])
    acc = mma_v2(field0, b, gl.zeros([W, N], dtype=gl.float32, layout=MMA))
    mm = gl.arange(0, W, layout=gl.SliceLayout(1, MMA))
    on = gl.arange(0, N, layout=gl.SliceLayout(0, MMA))
    gl.store(out_ptr + mm[:, None] * N + on[None, :], acc)


PLAIN = gl.constexpr(gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0]))


@gluon.jit
def values_and_p_handoff(s_ptr, v_ptr, out_ptr, J: gl.constexpr):
    """The value side: softmax weights of field plane J (tokens 4w + J, an MMA accumulator
    [32 tokens, 8 queries] from the key product) handed to the B operand, and the value words of
    the same tokens as the A operand [M = 16 words (channels 8w' + f), K = 32 tokens]. The value
    rows are staged plane-major (slot [j, w] = token 4w + j), so plane J is a plain subview."""
    mm = gl.arange(0, 32, layout=gl.SliceLayout(1, MMA))
    on = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
    p = gl.exp2(gl.load(s_ptr + mm[:, None] * 8 + on[None, :])).to(gl.float16)
    p_b = gl.convert_layout(p, B_OPERAND)  # accumulator -> B operand: the P handoff
    ww = gl.arange(0, 32, layout=gl.SliceLayout(1, ROWS))
    wd = gl.arange(0, 16, layout=gl.SliceLayout(0, ROWS))
    stage = gl.allocate_shared_memory(gl.int16, [4, 32, 16], PLAIN)
    for j in gl.static_range(4):
        stage.index(j).store(gl.load(v_ptr + (4 * ww[:, None] + j) * 16 + wd[None, :]))
    gl.thread_barrier()
    words = stage.index(J).permute((1, 0)).load(A_OPERAND)  # [M = 16 words, K = 32 tokens]
    field0 = gl.inline_asm_elementwise(
        "and.b32 $0, $1, 0x00030003;", "=r,r", [words], dtype=gl.float16, is_pure=True, pack=2
    )
    acc = mma_v2(field0, p_b, gl.zeros([16, 8], dtype=gl.float32, layout=MMA))
    om = gl.arange(0, 16, layout=gl.SliceLayout(1, MMA))
    gl.store(out_ptr + om[:, None] * 8 + on[None, :], acc)


def report(name: str, kernel, sass_path: str | None) -> None:
    text = compress_sass.sass_text(kernel.asm["cubin"])
    if sass_path:
        Path(f"{sass_path}.{name}").write_text(text)
    ops = [op for _, op, _ in compress_sass.sass(text)]
    print(f"{name}: SASS histogram", dict(collections.Counter(ops).most_common(14)))
    clean, hmmas = 0, [i for i, op in enumerate(ops) if op == "HMMA"]
    for i in hmmas:
        j = max(k for k in range(i) if ops[k] == "LDSM")
        clean += not ({op for op in ops[j + 1 : i]} & {"STS", "LDS", "SHFL", "STSM"})
    print(f"  {len(hmmas)} HMMA, {clean} fed from ldmatrix + lop3 with no conversion in between")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sass", default=None, help="write the SASS listings to PREFIX.keys / PREFIX.values")
    args = ap.parse_args()
    kernel = compress_sass.compile_sm90(
        codes_as_a_operand,
        {"words_ptr": "*i16", "b_ptr": "*fp16", "out_ptr": "*fp32"},
        {"C": CHANNELS, "W": WORDS, "N": QUERIES},
        4,
    )
    report("keys", kernel, args.sass)
    kernel = compress_sass.compile_sm90(
        values_and_p_handoff, {"s_ptr": "*fp32", "v_ptr": "*i16", "out_ptr": "*fp32"}, {"J": 1}, 4
    )
    report("values", kernel, args.sass)
    print("(LDG / PRMT / STS.128: the probes' naive global loads and staging; the P handoff shows as")
    print(" one STSM + BAR + LDSM.MT88 in the values kernel)")


if __name__ == "__main__":
    main()

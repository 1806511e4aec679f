"""Compile the tile-compression kernels for sm_90 without a GPU and count what they execute.

    PYTHONPATH=src python3 benchmarks/compress_sass.py [--variants v1,v3,v3-w8,...] [--dump DIR]

Triton compiles for a target it does not run on (``triton.compile`` with ``GPUTarget("cuda", 90,
32)``), and the ptxas/cuobjdump bundled with Triton give registers, spills and SASS. For each
launch variant of the K4V2 / G=128 / D=128 / bf16 / 8-iteration configuration (the prefill
benchmark's) this prints registers, spills, shared memory, resident programs per SM (from
registers and shared memory), and the SASS of each normalization loop (the key program's and the
value program's): instructions per iteration and per warp, and the opcode classes that matter
(FP32 arithmetic, shuffles, barriers, shared-memory traffic, MUFU). "warp-instr/tile" estimates
the instructions one tile costs the SM: (loop x iterations + straight-line code) x warps, averaged
over the key and value programs; at 4 warp-instructions per cycle per SM this gives the issue
floor printed as "issue ms" for the 131,072 tile encodes of the 32k x 32 layers x 8 heads prefill
(132 SMs at 1.98 GHz). A floor, not a prediction: latency, barriers and memory stalls come on top.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvarn.attention.triton import compress, compress_v3

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ITERS, G, D, KB, VB = 8, 128, 128, 4, 2
TILES = 2 * 32 * 8 * 32768 // G  # K and V tiles of the 32k-token, 32-layer, 8-head prefill
SMS, CLOCK = 132, 1.98e9

_PTR = [("k_ptr", "*bf16"), ("k_stride_n", "i32"), ("k_stride_t", "i32"), ("v_ptr", "*bf16"),
        ("v_stride_n", "i32"), ("v_stride_t", "i32")]  # fmt: skip
_OUT = [("kc_ptr", "*u8"), ("ka_ptr", "*bf16"), ("kz_ptr", "*bf16"), ("kr_ptr", "*bf16"),
        ("vc_ptr", "*u8"), ("va_ptr", "*bf16"), ("vz_ptr", "*bf16"), ("vs_ptr", "*bf16")]  # fmt: skip


def _v1(num_warps: int = 4) -> tuple:
    sig = dict(_PTR + [("h_ptr", "*bf16"), ("hscale_ptr", "*fp32")] + _OUT)
    const = dict(KB=KB, VB=VB, G=G, D=D, ITERS=ITERS, NORMALIZE=True, ROTATE=False,
                 ROT_PRECISION="tf32", INTERPRET=False)  # fmt: skip
    return compress._compress_kernel, sig, const, num_warps


def _v3(num_warps: int = 4, lanes_per_token: int = 8, persistent: int | None = None, prefetch: bool = False,
        max_registers: int | None = None, half_tile: bool = False, fold: bool = False,
        tree: bool = False) -> tuple:  # fmt: skip
    import torch

    cfg = compress_v3.kernel_config(G, D, torch.bfloat16, num_warps, lanes_per_token, key_bits=KB)
    nw = cfg.pop("num_warps")
    x = torch.empty(1, G, D, dtype=torch.bfloat16)
    opts = compress_v3.launch_options(
        TILES // 2, x, persistent, prefetch, max_registers, nw, half_tile, fold, tree
    )
    opts.pop("programs")
    maxnreg = opts.pop("maxnreg", None)
    sig = dict(_PTR + _OUT + [("n_tiles", "i32"), ("n_programs", "i32")])
    const = dict(KB=KB, VB=VB, G=G, D=D, ITERS=ITERS, NORMALIZE=True, COMPILED=True, **cfg, **opts)
    return compress_v3._compress_kernel_v3, sig, const, nw, maxnreg


VARIANTS = {
    "v1": lambda: _v1(4),
    "v3": lambda: _v3(4, 8),
    "v3-cg16": lambda: _v3(4, 16),
    "v3-cg4": lambda: _v3(4, 4),
    "v3-w8": lambda: _v3(8, 8),
    "v3-w2": lambda: _v3(2, 8),
    # launch options (compress_tiles persistent=, prefetch=, max_registers=)
    "v3-p2": lambda: _v3(4, 8, persistent=2),
    "v3-p2f": lambda: _v3(4, 8, persistent=2, prefetch=True),
    "v3-r168": lambda: _v3(4, 8, max_registers=168),
    "v3-w8-r128": lambda: _v3(8, 8, max_registers=128),
    "v3-w8-r128-p2f": lambda: _v3(8, 8, persistent=2, prefetch=True, max_registers=128),
    # code variants (compress_tiles fold=, half_tile=)
    "v3-e": lambda: _v3(4, 8, fold=True),
    "v3-t": lambda: _v3(4, 8, tree=True),
    "v3-e-t": lambda: _v3(4, 8, fold=True, tree=True),
    "v3-h-e-t-r168": lambda: _v3(4, 8, half_tile=True, fold=True, tree=True, max_registers=168),
    "v3-h": lambda: _v3(4, 8, half_tile=True),
    "v3-h-r168": lambda: _v3(4, 8, half_tile=True, max_registers=168),
    "v3-h-r128": lambda: _v3(4, 8, half_tile=True, max_registers=128),
    "v3-h-e-r168": lambda: _v3(4, 8, half_tile=True, fold=True, max_registers=168),
}


def compile_sm90(fn, sig: dict, const: dict, num_warps: int, maxnreg: int | None = None):
    sig = dict(sig)
    for name in const:
        sig[name] = "constexpr"
    # what the JIT specializes for 16-byte aligned pointers and strides divisible by 16
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(sig)
        if sig[name] in _ALIGNED_TYPES and name not in ("n_tiles", "n_programs")
    }
    if getattr(fn, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource

        src = GluonASTSource(fn, sig, const, attrs)
    else:
        src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    options = {"num_warps": num_warps}
    if maxnreg:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


_ALIGNED_TYPES = {"*bf16", "*u8", "*fp32", "i32"}
_OP = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?\s*([^;]*);")


def sass_text(cubin: bytes) -> str:
    """cuobjdump's SASS listing (with the encodings, whose second word holds the control bits)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    return text


def sass(text: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of every SASS instruction of a listing."""
    return [(int(m.group(1), 16), m.group(3), m.group(5)) for m in _OP.finditer(text)]


# Latencies (cycles) assumed for variable-latency SASS ops, whose consumers wait on a scoreboard;
# fixed-latency ops (FP32, integer) are covered by the stall counts ptxas writes into each
# instruction's control bits. Rough sm_90 figures; the model ranks variants, it is not a timing.
_VAR_LATENCY = {"LDS": 30, "LDSM": 30, "SHFL": 25, "MUFU": 20, "LDG": 600, "LDL": 30, "S2R": 20, "S2UR": 20,
                "F2I": 15, "I2F": 15, "F2F": 15, "FRND": 15, "STS": 12, "STSM": 12, "STL": 12, "STG": 12}  # fmt: skip
_BARRIER_CYCLES = 20  # a BAR.SYNC whose warps arrive together
_CTRL = re.compile(
    r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[^;]*;\s*/\* 0x[0-9a-f]+ \*/\s*/\* (0x[0-9a-f]+) \*/"
)


def cycles_alone(cubin_sass: str, lo: int, hi: int, reps: int = 3) -> int:
    """Cycles one warp alone needs for one pass over the code between addresses lo and hi (a loop
    body), issuing in order: each instruction waits for the stall count of the previous one (its
    control bits) and for the scoreboards it names (variable-latency producers, _VAR_LATENCY); a
    barrier adds _BARRIER_CYCLES. Steady state of ``reps`` passes. Compared with the instruction
    count it shows how much latency a warp exposes that other warps must fill."""
    body = []
    for m in _CTRL.finditer(cubin_sass):
        addr = int(m.group(1), 16)
        if lo <= addr <= hi:
            c = int(m.group(4), 16) >> 41  # stall 4 bits, yield, write sb 3, read sb 3, wait mask 6
            body.append((m.group(3), c & 15, (c >> 5) & 7, (c >> 8) & 7, (c >> 11) & 63))
    t, sb, per = 0, [0] * 6, 0
    for _ in range(reps):
        t0 = t
        for op, stall, wsb, rsb, wait in body:
            t = max([sb[j] for j in range(6) if wait >> j & 1] + [t])
            lat = _VAR_LATENCY.get(op, 6)
            if wsb < 6:
                sb[wsb] = t + lat
            if rsb < 6:
                sb[rsb] = t + min(lat, 8)
            t += max(stall, 1) + (_BARRIER_CYCLES if op == "BAR" else 0)
        per = t - t0
    return per


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers, spilled bytes) as ptxas reports them for sm_90a."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([os.path.join(BIN, "ptxas"), "-v", "-arch=sm_90a", path, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True).stderr  # fmt: skip
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", out).group(1))
    return regs, spills


def loops(instrs) -> list[tuple[int, int]]:
    """(start, end) addresses of backward branches' ranges, innermost only (the normalization
    loop; a persistent launch's tile loop around it is left out)."""
    spans = []
    for addr, op, args in instrs:
        if op == "BRA":
            m = re.search(r"0x([0-9a-f]+)", args)
            if m and int(m.group(1), 16) < addr:
                spans.append((int(m.group(1), 16), addr))
    return [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]


CLASSES = {
    "fp32": {"FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "FSETP", "FCHK"},
    "int": {"IADD3", "IMAD", "LOP3", "SHF", "LEA", "ISETP", "SEL", "PRMT", "IMNMX", "SGXT", "IABS"},
    "shfl": {"SHFL"},
    "bar": {"BAR"},
    "lds": {"LDS", "LDSM"},
    "sts": {"STS", "STSM"},
    "mufu": {"MUFU"},
    "cvt": {"F2I", "I2F", "F2F", "F2FP", "I2FP", "FRND"},
    "gmem": {"LDG", "STG"},
}


def classify(ops: collections.Counter) -> dict:
    out = {k: sum(ops[o] for o in v) for k, v in CLASSES.items()}
    out["other"] = sum(ops.values()) - sum(out.values())
    return out


def analyze(name: str, dump: str | None) -> dict:
    fn, sig, const, nw, *maxnreg = VARIANTS[name]()
    k = compile_sm90(fn, sig, const, nw, *maxnreg)
    if dump:
        os.makedirs(dump, exist_ok=True)
        for ext in ("ttgir", "ptx"):
            with open(os.path.join(dump, f"{name}.{ext}"), "w") as f:
                f.write(k.asm[ext])
    text = sass_text(k.asm["cubin"])
    instrs = sass(text)
    lps = loops(instrs)
    total = len(instrs)
    in_loops, alone = [], []
    for lo, hi in lps:
        body = [op for a, op, _ in instrs if lo <= a <= hi]
        in_loops.append((len(body), collections.Counter(body)))
        alone.append(cycles_alone(text, lo, hi))
    straight = total - sum(n for n, _ in in_loops)
    # both programs' straight-line code is in the binary; one program runs one half of it
    per_tile = sum(n * ITERS for n, _ in in_loops) / max(1, len(in_loops)) + straight / 2
    regs, spills = ptxas_usage(k.asm["ptx"])
    smem = k.metadata.shared
    by_regs = 65536 // (max(regs, 1) * 32 * nw) if regs else 0
    by_smem = (228 * 1024) // max(smem + 1024, 1)
    return {
        "name": name, "warps": nw, "regs": regs, "spills": spills, "smem": smem,
        "progs/SM": min(by_regs, by_smem, 32 // nw), "loops": in_loops, "straight": straight, "alone": alone,
        "warp_instr_tile": per_tile * nw,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="v1,v3")
    ap.add_argument("--dump", default=None, help="write each variant's TTGIR and PTX here")
    args = ap.parse_args()
    print(
        f"K{KB}V{VB}, G={G}, D={D}, bf16, {ITERS} iterations, sm_90 (offline compile, Triton {triton.__version__})"
    )
    print()
    print("| variant | warps | regs | spills (B) | smem (B) | progs/SM | loop instr/warp/iter (K; V) "
          "| fp32 | shfl | bar | lds+sts | mufu | 1-warp cycles/iter (K; V) | warp-instr/tile | issue ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.variants.split(","):
        r = analyze(name.strip(), args.dump)
        cls = [classify(ops) for _, ops in r["loops"]]

        def both(key, cls=cls):
            return "; ".join(str(c[key]) for c in cls)

        ms = TILES * r["warp_instr_tile"] / (4 * SMS * CLOCK) * 1e3
        print(
            f"| {r['name']} | {r['warps']} | {r['regs']} | {r['spills']} | {r['smem']} | {r['progs/SM']} "
            f"| {'; '.join(str(n) for n, _ in r['loops'])} | {both('fp32')} | {both('shfl')} | {both('bar')} "
            f"| {'; '.join(str(c['lds'] + c['sts']) for c in cls)} | {both('mufu')} "
            f"| {'; '.join(str(c) for c in r['alone'])} "
            f"| {r['warp_instr_tile']:.0f} | {ms:.2f} |"
        )


if __name__ == "__main__":
    main()

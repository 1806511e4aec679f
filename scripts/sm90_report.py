"""Compile the Triton launches of a kernel wrapper for sm_90 without a GPU and report resources.

    PYTHONPATH=src python3 scripts/sm90_report.py decode_tc [--set num_warps=2 ...] [--sass out.sass]

The wrapper is called on CPU tensors with ``JITFunction.run`` replaced by a recorder, so each
launch's exact arguments (and thus Triton's own specialization: 16-byte alignment, integer
divisibility) are captured; each is then compiled with ``triton.compile`` for CUDA capability 9.0
and the cubin inspected with the ``cuobjdump`` shipped inside Triton: registers, spill bytes,
shared memory, and a histogram of SASS instruction classes (what each launch costs per tile is
read off the loop body). No device time; the numbers predict, the GPU measures.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def capture(call) -> list[tuple[JITFunction, tuple, dict]]:
    """Run ``call()`` with every Triton launch recorded instead of executed."""
    launches = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, dict(kwargs), grid))
        return None

    JITFunction.run = record
    try:
        call()
    finally:
        JITFunction.run = original
    return launches


def compile_sm90(fn: JITFunction, args: tuple, kwargs: dict):
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**kwargs, "debug": False}
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    if getattr(fn, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource

        src = GluonASTSource(fn, signature, constexprs, attrs)
    else:
        src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=TARGET, options=options.__dict__)


def sass_report(cubin: bytes) -> tuple[dict, collections.Counter, str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    res = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
    sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", path], capture_output=True, text=True).stdout
    os.unlink(path)
    usage = {}
    for key, pat in (("regs", r"REG:(\d+)"), ("stack", r"STACK:(\d+)"), ("shared", r"SHARED:(\d+)"),
                     ("local", r"LOCAL:(\d+)")):  # fmt: skip
        m = re.search(pat, res)
        usage[key] = int(m.group(1)) if m else None
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            ops[m.group(1).split(".")[0]] += 1
    return usage, ops, sass


def sass_ops(sass: str) -> list[tuple[int, str]]:
    out = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2)))
    return out


def loop_spans(sass: str) -> list[tuple[int, int]]:
    """(start, end) of each innermost loop: ranges of backward branches containing no other."""
    spans = []
    for line in sass.splitlines():
        m = re.match(
            r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA\S*\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", line
        )
        if m and int(m.group(2), 16) < int(m.group(1), 16):
            spans.append((int(m.group(2), 16), int(m.group(1), 16)))
    return [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]


def decode_tc_call(overrides: dict, args_ns):
    from kvarn.attention.triton import decode_tc, decode_warp
    from kvarn.attention.triton.testing import random_layer_storage
    from kvarn.config import KVarNConfig

    config = KVarNConfig(key_bits=args_ns.key_bits, value_bits=args_ns.value_bits, tile_size=args_ns.tile)
    b = args_ns.batch
    st = random_layer_storage(
        batch=b, kv_heads=8, group=args_ns.group, num_queries=args_ns.queries, head_dim=args_ns.head_dim,
        config=config, n_tiles=[2] * b, sink_len=[args_ns.tile] * b, tail_len=[3] * b,
        dtype=getattr(torch, args_ns.dtype), seed=0,
    )  # fmt: skip
    decode_tc.sm_count = lambda _device: 132  # H100
    module = decode_warp if args_ns.wrapper == "decode_warp" else decode_tc
    return lambda: module.quantized_decode_attention(**st, **overrides)


def parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wrapper", choices=["decode_tc", "decode_warp"])
    ap.add_argument("--set", nargs="*", default=[], help="wrapper keyword overrides, key=value")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--queries", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--key-bits", type=int, default=4)
    ap.add_argument("--value-bits", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--sass", default=None, help="write each launch's SASS, PTX and TTGIR to this prefix")
    ap.add_argument("--top", type=int, default=14)
    a = ap.parse_args()
    overrides = dict(kv.split("=", 1) for kv in a.set)
    overrides = {k: parse_value(v) for k, v in overrides.items()}
    launches = capture(decode_tc_call(overrides, a))
    for i, (fn, args, kwargs, grid) in enumerate(launches):
        k = compile_sm90(fn, args, kwargs)
        usage, ops, sass = sass_report(k.asm["cubin"])
        flags = {n: kwargs[n] for n in ("DENSE", "num_warps", "num_stages") if n in kwargs}
        total = sum(ops.values())
        print(f"launch {i}: {fn.__name__} grid={grid} {flags}")
        # cuobjdump's SHARED is the static part; Triton's pipeline buffers are dynamic (metadata)
        print(f"  regs={usage['regs']} stack={usage['stack']} local={usage['local']} shared={usage['shared']} "
              f"dynamic_shared={k.metadata.shared} SASS={total}")  # fmt: skip
        print("  " + " ".join(f"{op}:{n}" for op, n in ops.most_common(a.top)))
        for lo, hi in loop_spans(sass):
            body = collections.Counter(op for addr, op in sass_ops(sass) if lo <= addr <= hi)
            print(f"  loop [{lo:#x}, {hi:#x}]: {sum(body.values())} instructions per warp per iteration")
            print("    " + " ".join(f"{op}:{n}" for op, n in body.most_common(a.top + 6)))
        if a.sass:
            Path(f"{a.sass}.{i}.sass").write_text(sass)
            Path(f"{a.sass}.{i}.ptx").write_text(k.asm["ptx"])
            Path(f"{a.sass}.{i}.ttgir").write_text(k.asm["ttgir"])
    sys.stdout.flush()


if __name__ == "__main__":
    main()

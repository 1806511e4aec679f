"""Stand-ins for the few Gluon functions ``compress_v3`` uses, so it also runs in Triton's interpreter.

Gluon (``triton.experimental.gluon``) is Triton with explicit layouts; its kernels only compile for
a GPU. In a Gluon kernel layouts decide where values live, never what they are: ``convert_layout``
moves data without changing it, and loads, stores, reductions and arithmetic mean what they mean in
Triton. So the same kernel source, with each layout argument dropped and ``convert_layout`` the
identity, is a Triton kernel computing the same values, which the interpreter can run on CPU. Under
``TRITON_INTERPRET=1`` ``compress_v3`` binds its ``gl`` to this module and its ``jit`` to
``triton.jit``; on a GPU to Gluon itself.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.experimental.gluon.language import BlockedLayout, SliceLayout  # noqa: F401 (plain dataclasses)

constexpr = tl.constexpr
float32 = tl.float32
int32 = tl.int32
int64 = tl.int64
uint8 = tl.uint8


def __getattr__(name: str):
    """Every other name (load, store, sum, reduce, exp2, ...) is Triton's function of that name,
    looked up at call time: the interpreter patches ``triton.language`` while a kernel runs."""
    return getattr(tl, name)


@triton.jit
def arange(start: tl.constexpr, end: tl.constexpr, layout: tl.constexpr = None):
    return tl.arange(start, end)


@triton.jit
def full(shape: tl.constexpr, value, dtype: tl.constexpr, layout: tl.constexpr = None):
    return tl.full(shape, value, dtype)


@triton.jit
def zeros(shape: tl.constexpr, dtype: tl.constexpr, layout: tl.constexpr = None):
    return tl.zeros(shape, dtype)


@triton.jit
def convert_layout(value, layout: tl.constexpr, assert_trivial: tl.constexpr = False):
    return value

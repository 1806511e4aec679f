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


# --- shared memory, cp.async and mma_v2 (decode_warp) -------------------------------------------
# Shared memory here is a Python object holding one tensor per slot of its leading dimension;
# ``cp.async`` is a load and a store, the waits and barriers have nothing to wait for.


def _slot(i) -> int:
    """A slot index given as a Python int, a constexpr or an interpreter scalar tensor."""
    if isinstance(i, tl.constexpr):
        i = i.value
    handle = getattr(i, "handle", None)
    if handle is not None:
        return int(handle.data.item())
    return int(i)


class SharedMemory:
    """A [slots, ...] shared-memory allocation: ``index(i)`` is slot i."""

    def __init__(self, dtype, shape):
        self.dtype, self.shape, self.slots = dtype, list(shape), {}

    def index(self, i):
        return SharedView(self, _slot(i), False)

    # an allocation used whole (no leading slot dimension) is its own single slot
    def store(self, value):
        SharedView(self, None, False).store(value)

    def load(self, layout=None):
        return SharedView(self, None, False).load(layout)

    def permute(self, order):
        return SharedView(self, None, False).permute(order)


class SharedView:
    def __init__(self, memory: SharedMemory, slot: int, transposed: bool):
        self.memory, self.slot, self.transposed = memory, slot, transposed

    def permute(self, order):
        order = [o.value if isinstance(o, tl.constexpr) else o for o in order]
        if list(order) != [1, 0]:
            raise NotImplementedError(f"permute {order}: only the 2-D transpose is modelled")
        return SharedView(self.memory, self.slot, not self.transposed)

    def store(self, value):
        if self.transposed:
            value = tl.trans(value)
        self.memory.slots[self.slot] = value

    def load(self, layout=None):
        value = self.memory.slots[self.slot]
        return tl.trans(value) if self.transposed else value

    def slice(self, start, length, dim=0):
        if self.transposed or _slot(dim) != 0:
            raise NotImplementedError("slice: only dim 0 of an untransposed view is modelled")
        return SharedRows(self, _slot(start), _slot(length), False)


class SharedRows:
    """Rows [start, start + length) of a 2-D view (``length`` divides the rows, as in decode_warp)."""

    def __init__(self, view: SharedView, start: int, length: int, transposed: bool):
        self.view, self.start, self.length, self.transposed = view, start, length, transposed

    def permute(self, order):
        order = [o.value if isinstance(o, tl.constexpr) else o for o in order]
        if list(order) != [1, 0]:
            raise NotImplementedError(f"permute {order}: only the 2-D transpose is modelled")
        return SharedRows(self.view, self.start, self.length, not self.transposed)

    def load(self, layout=None):
        whole = self.view.load()
        rows, cols = whole.shape[0], whole.shape[1]
        blocks = tl.reshape(whole, [rows // self.length, self.length, cols])
        pick = tl.arange(0, rows // self.length)[:, None, None] == self.start // self.length
        value = tl.sum(tl.where(pick, blocks, 0), axis=0).to(whole.dtype)
        return tl.trans(value) if self.transposed else value


def allocate_shared_memory(dtype, shape, layout=None, value=None):
    return SharedMemory(dtype, shape)


def _view_reinterpret(self, dtype, shape, layout):
    """Same bytes seen with another shape: the model keeps values, so only a slot holding a
    tensor of ``shape``'s element count is re-shaped when it is read or written."""
    return Reinterpreted(self, [s.value if isinstance(s, tl.constexpr) else s for s in shape])


def _memory_reinterpret(self, dtype, shape, layout):
    """``[S, k, ...]`` seen as ``[S * k, ...]`` (decode_warp's value boxes read as planes)."""
    shape = [s.value if isinstance(s, tl.constexpr) else s for s in shape]
    k = shape[0] // self.shape[0]
    if len(self.shape) != len(shape) + 1 or self.shape[1] != k or list(self.shape[2:]) != list(shape[1:]):
        raise NotImplementedError(f"reinterpret {self.shape} as {shape}: only [S, k, ...] -> [S*k, ...]")
    return Regrouped(self, k)


class Regrouped:
    def __init__(self, memory: SharedMemory, k: int):
        self.memory, self.k = memory, k
        self.dtype, self.shape = memory.dtype, [memory.shape[0] * k, *memory.shape[2:]]

    def index(self, i):
        return SlotPart(self.memory, _slot(i) // self.k, _slot(i) % self.k)


class SlotPart:
    """Part ``part`` (along the leading dimension) of slot ``slot``, read only."""

    def __init__(self, memory: SharedMemory, slot: int, part: int):
        self.memory, self.slot, self.part, self.transposed = memory, slot, part, False

    def permute(self, order):
        order = [o.value if isinstance(o, tl.constexpr) else o for o in order]
        if list(order) != [1, 0]:
            raise NotImplementedError(f"permute {order}: only the 2-D transpose is modelled")
        view = SlotPart(self.memory, self.slot, self.part)
        view.transposed = not self.transposed
        return view

    def load(self, layout=None):
        whole = self.memory.slots[self.slot]
        pick = tl.arange(0, whole.shape[0])[:, None, None] == self.part
        value = tl.sum(tl.where(pick, whole, 0), axis=0).to(whole.dtype)
        return tl.trans(value) if self.transposed else value


SharedMemory._reinterpret = _memory_reinterpret
SharedView._reinterpret = _view_reinterpret


class Reinterpreted:
    def __init__(self, view: SharedView, shape: list):
        self.view, self.shape = view, shape

    def store(self, value):
        old = self.view.memory.shape[1:]
        self.view.store(tl.reshape(value, old))

    def load(self, layout=None):
        return tl.reshape(self.view.load(), self.shape)


class tma:  # noqa: N801 (stands in for the ``tma`` module)
    """TMA copies as descriptor loads (``triton.tools`` descriptors under the interpreter)."""

    @staticmethod
    def async_copy_global_to_shared(desc, coord, barrier, result, pred=True):
        if _slot(pred):
            result.store(desc.load(coord))


class mbarrier:  # noqa: N801 (stands in for the ``mbarrier`` module)
    """Barriers have nothing to wait for: a copy has landed when its call returns."""

    @staticmethod
    def init(bar, count):
        return None

    @staticmethod
    def expect(bar, nbytes, pred=True):
        return None

    @staticmethod
    def wait(bar, phase, pred=True, deps=()):
        return None

    @staticmethod
    def invalidate(bar):
        return None


def fence_async_shared(cluster=False):
    return None


def async_copy_global_to_shared(
    smem, pointer, mask=None, cache_modifier="", eviction_policy="", volatile=False
):
    smem.store(tl.load(pointer, mask=mask, other=0))


def commit_group():
    return None


def wait_group(num_outstanding=0):
    return None


def thread_barrier():
    return None


@triton.jit
def mma_v2(a, b, acc, input_precision: tl.constexpr = None):
    """acc + a @ b with float32 products: the interpreter multiplies 16-bit operands in 16 bits,
    while the tensor cores form the (exact) products of float16 operands in float32."""
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")

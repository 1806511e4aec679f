"""Count what a cache step asks of the device: dispatched torch ops and host synchronizations.

On a GPU, a decode step of a 32-layer model is only as fast as its slowest lane: the GPU (kernels)
or the host (Python + one launch per op). Two things make the host lane long: many small ops per
layer, and any *host sync* (``.item()``, ``bool(t)``, ``.tolist()``, ``nonzero``, a tensor built
from a Python list on the device, ...), which stops the host until every queued kernel has run, so
the next layer's launches can no longer overlap the GPU's work. Both can be counted on a CPU:

* :class:`OpCounter` is a ``TorchDispatchMode`` that records every aten op dispatched inside it
  (views separately: they launch nothing), the ops that would synchronize a CUDA stream, and
  host-to-device uploads (``torch.tensor(list)``: a pageable copy that synchronizes on CUDA).
  ``Tensor.tolist`` / ``numpy`` / ``cpu`` do not always reach the dispatcher, so they are wrapped
  while the counter is active.
* :func:`gpu_path_on_cpu` makes the cache take its CUDA code path on CPU tensors: the Triton seams
  (``kvarn.attention.triton.dispatch``) report "enabled", and each kernel call runs either the real
  kernel wrapper under Triton's interpreter (``backend="interpreter"``, needs ``TRITON_INTERPRET=1``
  before Triton kernels are imported) or its PyTorch twin (``backend="twin"``); either way the
  work inside the kernel is not counted, each call counts as one kernel.

``benchmarks/cache_decode.py --count-ops`` and ``tests/test_cache_gpu_path.py`` use both.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that make the host wait for the device (their result, or their output's shape, is
# data that only the device has).
SYNC_OPS = frozenset(
    {
        "_local_scalar_dense",  # .item(), int(t), float(t), bool(t)
        "is_nonzero",
        "equal",
        "nonzero",
        "masked_select",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "unique_dim_consecutive",
        "_assert_async_msg",  # not a sync by itself, but only used with data-dependent checks
    }
)
# Tensor methods that copy device data to the host without always dispatching an aten op.
HOST_READS = ("tolist", "numpy", "cpu", "__array__")


def _op_name(func) -> str:
    return func._schema.name.split("::", 1)[-1]


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten ops, host syncs and host-to-device uploads.

    Attributes after (or during) use:
        ops: Counter of op name -> calls, views excluded (each is roughly one kernel launch or
            allocation on a GPU).
        views: number of view ops (no kernel, a few microseconds of host time each).
        syncs: list of "op (why)" strings, one per host synchronization.
        uploads: number of tensors built from host data (``torch.tensor(list)``; on CUDA a
            pageable copy that synchronizes).
        kernels: Counter of kernel name -> calls made through :meth:`kernel`.
    """

    def __init__(self, trace: bool = False) -> None:
        super().__init__()
        # With trace=True: every op (views included) and kernel call in order, with its arguments
        # normalized by _describe; two calls whose traces are equal dispatch the same work on the
        # same persistent buffers (what a CUDA graph's replay assumes).
        self.trace: list[tuple] | None = [] if trace else None
        self.persistent: set[int] = set()
        self.ops: Counter[str] = Counter()
        self.views = 0
        self.syncs: list[str] = []
        self.uploads = 0
        self.kernels: Counter[str] = Counter()
        self._paused = 0
        self._saved: dict[str, object] = {}

    # ---- dispatch -------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._paused:
            self._record(func, args, kwargs)
        return func(*args, **kwargs)

    def _record(self, func, args, kwargs) -> None:
        name = _op_name(func)
        if self.trace is not None:
            self.trace.append((name, self._describe(args), self._describe(tuple(kwargs.items()))))
        if name in ("lift_fresh", "lift_fresh_copy"):
            self.uploads += 1
            return
        if func.is_view or name == "_unsafe_view":  # _unsafe_view: a view without aliasing info
            self.views += 1
            return
        self.ops[name] += 1
        if name in SYNC_OPS:
            self.syncs.append(name)
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and _has_bool_index(args):
            self.syncs.append(f"{name} (boolean mask index)")
        elif (
            name == "repeat_interleave"
            and isinstance(args[0], torch.Tensor)
            and kwargs.get("output_size") is None
        ):
            if len(args) == 1 or isinstance(args[1], torch.Tensor):
                self.syncs.append(f"{name} (tensor repeats)")

    def _describe(self, value):
        """Arguments as a comparable value: a tensor in one of ``persistent``'s storages by where
        it lies in it (storage, offset, shape, strides), any other tensor by shape and dtype only
        (temporaries live at different addresses from call to call), everything else as is."""
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage().data_ptr()
            if storage in self.persistent:
                return ("buffer", storage, value.storage_offset(), tuple(value.shape), value.stride())
            return ("tensor", tuple(value.shape), value.dtype)
        if isinstance(value, (list, tuple)):
            return tuple(self._describe(v) for v in value)
        return value

    # ---- host reads that bypass the dispatcher --------------------------------------------------
    def __enter__(self):
        for method in HOST_READS:
            original = getattr(torch.Tensor, method)
            self._saved[method] = original
            setattr(torch.Tensor, method, self._host_read(method, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)
        self._saved.clear()
        return super().__exit__(*exc)

    def _host_read(self, method: str, original):
        counter = self

        def wrapper(tensor, *args, **kwargs):
            if not counter._paused:
                counter.syncs.append(f"Tensor.{method}")
            return original(tensor, *args, **kwargs)

        return wrapper

    # ---- regions --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Ops inside are not counted (the inside of a kernel stand-in)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def kernel(self, name: str):
        """Record one call of kernel ``name`` and return a context in which its work is not counted."""
        if not self._paused:
            self.kernels[name] += 1
            if self.trace is not None:
                self.trace.append(("kernel", name))
        return self.paused()

    # ---- summary --------------------------------------------------------------------------------
    @property
    def total_ops(self) -> int:
        """Non-view ops plus kernel calls: roughly the launches a GPU would see."""
        return sum(self.ops.values()) + sum(self.kernels.values())

    def snapshot(self) -> dict:
        return {
            "ops": sum(self.ops.values()),
            "kernels": sum(self.kernels.values()),
            "views": self.views,
            "syncs": len(self.syncs),
            "uploads": self.uploads,
        }


_ACTIVE: list[OpCounter] = []


@contextlib.contextmanager
def counting(trace: bool = False) -> Iterator[OpCounter]:
    """``with counting() as c:`` count the ops dispatched inside (see :class:`OpCounter`)."""
    counter = OpCounter(trace)
    _ACTIVE.append(counter)
    try:
        with counter:
            yield counter
    finally:
        _ACTIVE.pop()


@contextlib.contextmanager
def _kernel_region(name: str) -> Iterator[None]:
    if _ACTIVE:
        with _ACTIVE[-1].kernel(name):
            yield
    else:
        yield


@contextlib.contextmanager
def gpu_path_on_cpu(backend: str = "twin") -> Iterator[None]:
    """Make the cache take its CUDA/Triton code path on CPU tensors (see the module docstring).

    ``backend="twin"``: the kernels' PyTorch twins (fast; what the op counts use).
    ``backend="interpreter"``: the real Triton kernel wrappers under ``TRITON_INTERPRET=1`` (slow;
    checks the contract between the cache and the kernels end to end).
    """
    if backend not in ("twin", "interpreter"):
        raise ValueError(f"backend={backend!r}: expected 'twin' or 'interpreter'")
    from kvarn.attention import decode as decode_seam
    from kvarn.attention.reference import quantized_attention_reference
    from kvarn.attention.triton import dispatch
    from kvarn.cache import layer as layer_module
    from kvarn.codec import encode_tiles

    if backend == "interpreter":
        from kvarn.attention.triton import interpreting

        if not interpreting():
            raise RuntimeError("gpu_path_on_cpu(backend='interpreter') needs TRITON_INTERPRET=1")

    real_enabled, real_decode, real_compress = (
        dispatch.enabled_for,
        dispatch.maybe_triton_decode,
        dispatch.maybe_triton_compress,
    )

    def enabled_for(x: torch.Tensor) -> bool:
        return True

    def maybe_triton_decode(*args, **kwargs):
        with _kernel_region("decode_attention"):
            if backend == "interpreter":
                return real_decode(*args, **kwargs)
            return quantized_attention_reference(*args)

    def maybe_triton_compress(k_tiles, v_tiles, config):
        with _kernel_region("compress_tiles"):
            if backend == "interpreter":
                return real_compress(k_tiles, v_tiles, config)
            return encode_tiles(k_tiles, v_tiles, config)

    saved = {
        (dispatch, "enabled_for"): real_enabled,
        (decode_seam, "enabled_for"): decode_seam.enabled_for,
        (decode_seam, "maybe_triton_decode"): decode_seam.maybe_triton_decode,
        (layer_module, "maybe_triton_compress"): layer_module.maybe_triton_compress,
    }
    dispatch.enabled_for = enabled_for
    decode_seam.enabled_for = enabled_for
    decode_seam.maybe_triton_decode = maybe_triton_decode
    layer_module.maybe_triton_compress = maybe_triton_compress
    try:
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)

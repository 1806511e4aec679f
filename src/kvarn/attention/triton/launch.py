"""Re-launch compiled Triton kernels without Triton's per-call argument binding.

A decode step launches the same kernels with the same shapes in every layer. Triton's
``kernel[grid](...)`` re-derives the specialization of every argument (dtype, 16-byte alignment,
integer divisibility) and looks the compiled kernel up on each call; with ~70 arguments that costs
tens of microseconds per launch, more than the GPU time of a short decode. ``FastLauncher`` keys
its own cache on a refinement of Triton's specialization (every tensor's dtype and 16-byte
alignment, every other argument by value) and, once a key has been launched through Triton,
calls the compiled kernel's launcher directly. A key never maps to a kernel compiled under
assumptions the arguments break: everything Triton specializes on is determined by the key.

Under the interpreter, or when a launch hook is installed (profilers), every launch goes through
Triton's normal path.
"""

from __future__ import annotations

import torch
from triton import knobs

from kvarn.attention.triton import interpreting


def _arg_key(a):
    # Integers and floats enter the key by value (a tuple of them hashes in C), so any change of
    # a stride or size goes through Triton once, which re-specializes or reuses its own cache.
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() & 15)
    if hasattr(a, "block_shape") and hasattr(a, "base"):  # a host tensor descriptor (TMA)
        return (
            "desc",
            tuple(a.block_shape),
            getattr(a, "layout", None),
            a.base.dtype,
            a.base.data_ptr() & 15,
        )
    return a


# Triton reads TRITON_INTERPRET once, when a kernel is decorated; so do we.
_INTERPRETING = interpreting()


def _hooked(hook) -> bool:
    """Whether a launch hook is installed. Triton 3.6 keeps a ``HookChain`` object there at all
    times (truthy even when empty: testing the object itself sent every launch down the slow
    path); older versions keep None or a function."""
    calls = getattr(hook, "calls", None)
    return bool(calls) if calls is not None else hook is not None


def launch_hooks_installed() -> bool:
    return _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook)


class FastLauncher:
    """``launcher(grid, args, constexprs, **options)`` == ``fn[grid](*args, **constexprs, **options)``."""

    def __init__(self, fn):
        self.fn = fn
        self.cache: dict = {}

    def __call__(self, grid: tuple, args: tuple, constexprs: dict, **options):
        if _INTERPRETING or launch_hooks_installed():
            return self.fn[grid](*args, **constexprs, **options)
        key = (tuple(_arg_key(a) for a in args), tuple(constexprs.items()), tuple(options.items()))
        compiled = self.cache.get(key)
        if compiled is None:
            if len(self.cache) > 1024:  # shapes keep changing: start over rather than grow
                self.cache.clear()
            compiled = self.fn[grid](*args, **constexprs, **options)  # compiles (once) and launches
            self.cache[key] = compiled
            return compiled
        # The launcher takes every parameter in declaration order (it skips constexpr slots).
        names = self.fn.arg_names
        full = (*args, *(constexprs[n] for n in names[len(args) :]))
        grid = (*grid, 1, 1)
        stream = torch.cuda.current_stream().cuda_stream
        compiled.run(
            grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
            None, None, None, *full,
        )  # fmt: skip
        return compiled

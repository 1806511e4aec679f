"""Which copy path the one-warp decode kernel's default launch takes (``decode_warp.default_copy``).

On Hopper, tiles can reach shared memory by TMA (tensor-memory copies, fewer instructions on the
GPU) or by per-lane ``cp.async``. TMA costs host time on every launch (its descriptors are built
and encoded per call: 522.9 against 248.5 us per eager call on the H200 machine's host, session 8),
which an eager decode step, host-bound already, would pay in every layer; a CUDA-graph replay pays
none of it. So the default launch takes TMA only inside ``graph_step_copies()``: the block in
which a decode step is warmed up and recorded as a CUDA graph (``GraphDecoder`` opens it). The
warm-up inside the block compiles the TMA kernel, since a recording cannot load a module.

This module imports nothing from Triton: the integrations open the block without importing a kernel.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_state = threading.local()


def graph_step_copies_active() -> bool:
    """Whether this thread is inside ``graph_step_copies()``."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def graph_step_copies() -> Iterator[None]:
    """Within this block (this thread, nestable), decode launches that do not name a copy path
    take TMA where it applies: wrap both a graph's warm-up call and its recording."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1

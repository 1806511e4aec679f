"""Independent per-item model work spread over worker processes that each load the model.

Greedy decoding of one prompt on a GPU is bound by kernel launches (a small model's step takes
about as long as the host needs to issue it), so one process leaves the device mostly idle.
:func:`map_with_model` runs ``fn(loaded, item)`` for every item, either in this process
(``workers=1``) or in ``workers`` spawned processes, each with its own copy of the model on the
same device, taking the next item as soon as it is free; results come back in item order. Every
item is computed by the same function on the same inputs either way, so results are the same
(up to float rounding where the device's kernels are not bitwise reproducible).

Worker processes are started with ``spawn`` (CUDA cannot be used after ``fork``), so a script
that calls this must guard its entry point with ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import TypeVar

import torch

from kvarn.eval.common import EvalInputError, LoadedModel, progress

T = TypeVar("T")
R = TypeVar("R")

_WORKER_MODEL: LoadedModel | None = None  # the model of this worker process


def _load_worker_model(path: str | None, dtype: torch.dtype, device: str, threads: int) -> None:
    global _WORKER_MODEL
    from kvarn.eval.common import load_model_for_eval

    torch.set_num_threads(threads)
    _WORKER_MODEL = load_model_for_eval(path, dtype=dtype, device=device)


def _call_with_worker_model(fn: Callable[[LoadedModel, T], R], item: T) -> R:
    if _WORKER_MODEL is None:
        raise RuntimeError("worker model not loaded")
    return fn(_WORKER_MODEL, item)


def check_workers(workers: int) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise EvalInputError(f"--workers must be an integer >= 1, got {workers!r}")


def map_with_model(
    loaded: LoadedModel,
    fn: Callable[[LoadedModel, T], R],
    items: Sequence[T],
    workers: int = 1,
    desc: str = "items",
    unit: str = "item",
) -> list[R]:
    """``[fn(loaded, item) for item in items]``, in this process or spread over ``workers`` processes.

    ``fn`` must be picklable (a module-level function or a ``functools.partial`` of one) when
    ``workers > 1``; each worker loads ``loaded.path`` on ``loaded.device`` in ``loaded``'s dtype.
    """
    check_workers(workers)
    if workers == 1 or len(items) <= 1:
        return [fn(loaded, item) for item in progress(items, desc=desc, unit=unit)]
    threads = max(1, torch.get_num_threads() // workers)
    dtype = next(loaded.model.parameters()).dtype
    results: list = [None] * len(items)
    pool = ProcessPoolExecutor(
        max_workers=min(workers, len(items)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_load_worker_model,
        initargs=(loaded.path, dtype, str(loaded.device), threads),
    )
    try:
        futures = {pool.submit(_call_with_worker_model, fn, item): i for i, item in enumerate(items)}
        for future in progress(as_completed(futures), total=len(items), desc=desc, unit=unit):
            results[futures[future]] = future.result()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results

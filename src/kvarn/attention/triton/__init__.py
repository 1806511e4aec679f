"""Fused Triton kernels for KVarN: tile compression and decode attention over quantized tiles.

Triton is an optional dependency: importing this package never imports Triton. ``available()``
says whether the kernels can run here (Triton importable and a CUDA device present); the kernel
modules (``compress``, ``decode``) import Triton themselves and are loaded only when used.
Under ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (slowly), which is how CI tests
them without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os

__all__ = ["available", "interpreting", "triton_importable"]


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    """Triton is installed and imports cleanly."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install must not break kvarn
        return False
    return True


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): kernels take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=1)
def _cuda_usable() -> bool:
    import torch

    return torch.cuda.is_available()


def available() -> bool:
    """The fused kernels can run on CUDA tensors in this process."""
    return triton_importable() and _cuda_usable()

"""``kvarn.save_cache`` / ``kvarn.load_cache``: a KVarNCache in one safetensors file (prompt caching).

The file holds the tensors of :meth:`KVarNCache.state_dict` (``layers.{i}.{name}``: each row's valid
tiles, sink and tail tokens and counters; no spare capacity) and its string header (format and
version, kvarn version, quantizer, model fingerprint, per-layer metadata; see docs/cache.md,
"Saving and loading a cache").
"""

from __future__ import annotations

import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kvarn.cache.cache import KVarNCache
from kvarn.cache.errors import CacheFileError
from kvarn.config import KVarNConfig


def save_cache(cache: KVarNCache, path: str | os.PathLike) -> None:
    """Write ``cache`` (at rest, not empty) to the safetensors file ``path``.

    Raises CacheStateError when the cache is empty or not at rest (see ``KVarNCache.state_dict``).
    """
    if not isinstance(cache, KVarNCache):
        raise TypeError(f"save_cache takes a KVarNCache, got {type(cache).__name__}")
    tensors, metadata = cache.state_dict()
    save_file({name: t.detach().to("cpu") for name, t in tensors.items()}, os.fspath(path), metadata=metadata)


def load_cache(
    path: str | os.PathLike,
    config=None,
    device: torch.device | str | None = None,
    quant: KVarNConfig | str | None = None,
) -> KVarNCache:
    """Read a cache written by :func:`save_cache`, onto ``device`` (default CPU).

    Pass the model's ``config`` (``model.config``) to check that the cache fits it (layer count and
    types, KV heads, head dim, sliding window, model type) and to have the loaded layers check the
    attention implementation, and ``quant`` to insist on a quantizer. Raises CacheFileError naming
    the problem (not a kvarn cache, damaged or truncated file, missing tensor, newer format, another
    model or quantizer).
    """
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            metadata = f.metadata()
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CacheFileError(f"{os.fspath(path)} is not a readable safetensors file: {exc}") from exc
    return KVarNCache.from_state_dict(config, (tensors, metadata), device=device or "cpu", quant=quant)

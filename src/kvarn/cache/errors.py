"""Errors raised by KVarNCache: each names the problem and the fix."""

from __future__ import annotations


class CacheUsageError(RuntimeError):
    """The cache is used in a way it cannot honour (wrong attention implementation, dtype or batch
    size changed mid-generation, reused across models, ...)."""


class UnsupportedModelError(ValueError):
    """The model (config or attention module) is not one KVarNCache can store."""


NOT_KVARN_ATTENTION = (
    "KVarNCache needs the model's attention implementation to be 'kvarn' (found {found!r}): the cache "
    "stores packed tiles that only the kvarn attention function reads. Call "
    "model.set_attn_implementation('kvarn') after `import kvarn` (or load with "
    "attn_implementation='kvarn'), or use kvarn.cache_for(model)."
)


class CacheFileError(ValueError):
    """A saved cache cannot be loaded: not a kvarn cache file, a damaged or incomplete one, a newer
    format, or a cache of another model or quantizer than the one asked for."""


class CacheStateError(CacheUsageError):
    """The cache is not at rest (a forward call, a CUDA-graph decode or assisted decoding is in
    progress), so its state cannot be saved."""

"""Storage: KVarNCache (a transformers Cache) and its per-layer class."""

from kvarn.cache.cache import CacheBytes, KVarNCache
from kvarn.cache.errors import CacheUsageError, UnsupportedModelError
from kvarn.cache.layer import KVarNLayer

__all__ = ["CacheBytes", "CacheUsageError", "KVarNCache", "KVarNLayer", "UnsupportedModelError"]

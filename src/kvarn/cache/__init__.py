"""Storage: KVarNCache (a transformers Cache) and its per-layer class."""

from kvarn.cache.cache import CacheBytes, CacheState, KVarNCache
from kvarn.cache.errors import CacheFileError, CacheStateError, CacheUsageError, UnsupportedModelError
from kvarn.cache.layer import KVarNLayer
from kvarn.cache.persist import load_cache, save_cache

__all__ = [
    "CacheBytes",
    "CacheFileError",
    "CacheState",
    "CacheStateError",
    "CacheUsageError",
    "KVarNCache",
    "KVarNLayer",
    "UnsupportedModelError",
    "load_cache",
    "save_cache",
]

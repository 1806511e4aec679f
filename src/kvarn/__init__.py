"""kvarn: KVarN variance-normalized KV-cache quantization for PyTorch and transformers."""

# Importing kvarn registers the "kvarn" attention and mask functions with transformers, so the
# switch is transformers' own: from_pretrained(..., attn_implementation="kvarn").
from kvarn.cache import (  # noqa: E402
    CacheFileError,
    CacheStateError,
    CacheUsageError,
    KVarNCache,
    UnsupportedModelError,
    load_cache,
    save_cache,
)
from kvarn.codec import (
    QuantizedKeys,
    QuantizedTiles,
    QuantizedValues,
    decode_tiles,
    encode_tiles,
    tile_nbytes,
)
from kvarn.config import METHODS, PRESETS, ConfigError, KVarNConfig
from kvarn.fake_quant import fake_quantize, fake_quantize_tiles
from kvarn.integrations.cuda_graph import GraphDecoder, graph_generate  # noqa: E402
from kvarn.integrations.fast_generate import (  # noqa: E402
    GeneratePath,
    decide_generate_path,
    graph_generation,
    install_graph_generation,
    last_generate_path,
    remove_graph_generation,
)
from kvarn.integrations.transformers import cache_for, enable, register  # noqa: E402
from kvarn.method.hadamard import hadamard_transform

register()

__version__ = "0.1.0"

__all__ = [
    "CacheFileError",
    "CacheStateError",
    "CacheUsageError",
    "GeneratePath",
    "GraphDecoder",
    "KVarNCache",
    "UnsupportedModelError",
    "cache_for",
    "enable",
    "register",
    "METHODS",
    "PRESETS",
    "ConfigError",
    "KVarNConfig",
    "QuantizedKeys",
    "QuantizedTiles",
    "QuantizedValues",
    "decide_generate_path",
    "decode_tiles",
    "encode_tiles",
    "fake_quantize",
    "fake_quantize_tiles",
    "graph_generate",
    "graph_generation",
    "hadamard_transform",
    "install_graph_generation",
    "last_generate_path",
    "load_cache",
    "remove_graph_generation",
    "save_cache",
    "tile_nbytes",
]

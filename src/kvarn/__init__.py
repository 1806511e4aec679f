"""kvarn: KVarN variance-normalized KV-cache quantization for PyTorch and transformers."""

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
from kvarn.method.hadamard import hadamard_transform

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "PRESETS",
    "ConfigError",
    "KVarNConfig",
    "QuantizedKeys",
    "QuantizedTiles",
    "QuantizedValues",
    "decode_tiles",
    "encode_tiles",
    "fake_quantize",
    "fake_quantize_tiles",
    "hadamard_transform",
    "tile_nbytes",
]

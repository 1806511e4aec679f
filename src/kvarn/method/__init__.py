"""The KVarN method as pure tensor functions (SPEC steps 1-5), independent of any cache."""

from kvarn.method.hadamard import hadamard_blocks, hadamard_matrix, hadamard_transform
from kvarn.method.normalize import imbalance, variance_normalize
from kvarn.method.packing import pack_codes, unpack_codes
from kvarn.method.rtn import dequantize_rows, quantize_rows

__all__ = [
    "dequantize_rows",
    "hadamard_blocks",
    "hadamard_matrix",
    "hadamard_transform",
    "imbalance",
    "pack_codes",
    "quantize_rows",
    "unpack_codes",
    "variance_normalize",
]

"""Execution backends: attention over a KVarN layer's storage (packed tiles + dense sink/tail)."""

from kvarn.attention.decode import quantized_decode_attention
from kvarn.attention.reference import quantized_attention_reference
from kvarn.attention.unpack import unpack_codes_float

__all__ = ["quantized_attention_reference", "quantized_decode_attention", "unpack_codes_float"]

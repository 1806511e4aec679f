"""Unpacking stored codes straight into floating point, chunk by chunk, for the attention math.

``kvarn.method.packing.unpack_codes`` is the general (int32) inverse of the packing; this is the
decode-path variant: it shifts the packed bytes with uint8 arithmetic (every code of a byte in one
broadcast shift), masks, and converts to the compute dtype in one pass. The layout is the one of
docs/architecture.md (code ``j`` of a byte in bits ``[j*bits, (j+1)*bits)``, 3 bits as 24-bit
little-endian words), so the result equals ``unpack_codes(packed, bits).to(dtype)``.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=64)
def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device)


@functools.lru_cache(maxsize=16)
def _shifts3(device: torch.device) -> torch.Tensor:
    return torch.arange(0, 24, 3, dtype=torch.int32, device=device)


def unpack_codes_float(packed: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unpack uint8 ``packed [..., m]`` holding ``m * 8 / bits`` codes into ``dtype`` ``[..., n]``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    if bits == 8:
        return packed.to(dtype)
    lead, m = packed.shape[:-1], packed.shape[-1]
    if bits == 3:
        if m % 3:
            raise ValueError(f"3-bit packed axis must be a multiple of 3 bytes, got {m}")
        b = packed.reshape(*lead, m // 3, 3).to(torch.int32)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        codes = (word.unsqueeze(-1) >> _shifts3(packed.device)) & 7
        return codes.reshape(*lead, m * 8 // 3).to(dtype)
    if bits not in (2, 4):
        raise ValueError(f"bits={bits!r} is not supported; allowed: [2, 3, 4, 8]")
    codes = (packed.unsqueeze(-1) >> _shifts(bits, packed.device)) & ((1 << bits) - 1)
    return codes.reshape(*lead, m * (8 // bits)).to(dtype)

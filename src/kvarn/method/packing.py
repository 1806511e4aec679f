"""Bit packing of unsigned codes into uint8 along the last axis.

Layout (the contract with the GPU kernels, docs/architecture.md):
* 2, 4, 8 bits: byte ``i`` holds codes ``i*k .. i*k+k-1`` (``k = 8 // bits``), code ``j`` of the byte
  in bits ``[j*bits, (j+1)*bits)``, lowest bits first.
* 3 bits: each run of 8 codes is the 24-bit little-endian integer ``sum_j code_j << 3j``, stored as
  3 bytes, so 8 codes take exactly 3 bytes.
"""

from __future__ import annotations

import torch

SUPPORTED = (2, 3, 4, 8)


def codes_per_group(bits: int) -> int:
    """How many codes the last axis must be a multiple of."""
    _check_bits(bits)
    return 8 if bits == 3 else 8 // bits


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take."""
    _check_bits(bits)
    if n % codes_per_group(bits):
        raise ValueError(
            f"{n} codes cannot be packed at {bits} bits: need a multiple of {codes_per_group(bits)}"
        )
    return n * bits // 8


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED:
        raise ValueError(f"bits={bits!r} is not supported for packing; allowed: {list(SUPPORTED)}")


def _bit_offsets(bits: int, device) -> torch.Tensor:
    """Where each code of a group starts: code ``j`` at bit ``j * bits`` (lowest bits first)."""
    return torch.arange(0, bits * codes_per_group(bits), bits, device=device, dtype=torch.int32)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (each < 2**bits) along the last axis."""
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    n = codes.shape[-1]
    packed_size(n, bits)  # validates divisibility
    if bits == 8:
        return codes.clone()
    lead, k = codes.shape[:-1], codes_per_group(bits)
    groups = codes.to(torch.int32).reshape(*lead, n // k, k)
    word = (groups << _bit_offsets(bits, codes.device)).sum(dim=-1)  # a byte; 24 bits at 3 bits
    if bits == 3:  # the 24-bit group as 3 little-endian bytes
        word = torch.stack((word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF), dim=-1)
    return word.to(torch.uint8).reshape(*lead, n * bits // 8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_codes`; ``n`` (optional) checks the expected code count."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    m = packed.shape[-1]
    count = m * 8 // bits
    if bits == 3 and m % 3:
        raise ValueError(f"3-bit packed axis must be a multiple of 3 bytes, got {m}")
    if n is not None and n != count:
        raise ValueError(f"packed axis of {m} bytes holds {count} codes at {bits} bits, expected {n}")
    if bits == 8:
        return packed.clone()
    lead = packed.shape[:-1]
    word = packed.to(torch.int32)  # a group of codes per byte
    if bits == 3:  # a group of 8 codes per 3 little-endian bytes
        b = word.reshape(*lead, m // 3, 3)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    codes = (word.unsqueeze(-1) >> _bit_offsets(bits, packed.device)) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(*lead, count)

"""Unpacking stored codes into floating point for the attention math, chunk by chunk.

Two layouts of the same codes (packing layout of docs/architecture.md: code ``j`` of a byte in
bits ``[j*bits, (j+1)*bits)``, 3 bits as 24-bit little-endian words):

* :func:`unpack_codes_float` - natural order ``[..., n]``, equal to
  ``kvarn.method.packing.unpack_codes(packed, bits).to(dtype)``.
* :func:`code_planes` - bit-plane order ``[..., k, rows, m]``: plane ``j`` holds code ``j`` of every
  byte, i.e. natural index ``i * k + j`` sits at ``[j, :, i]``. The planes are cut with shifts and
  masks on int32 words (four bytes per operation), which is several times faster on CPU than a
  broadcast shift of every byte; the attention contracts each plane separately and interleaves
  only its small results (scores, outputs), never the codes.
"""

from __future__ import annotations

import functools

import torch

_PLANE_MASK = {2: 0x03030303, 4: 0x0F0F0F0F}


@functools.lru_cache(maxsize=64)
def _byte_shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device)


@functools.lru_cache(maxsize=64)
def _word_shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 8, bits, dtype=torch.int32, device=device)[:, None, None]


@functools.lru_cache(maxsize=16)
def _shifts3(device: torch.device) -> torch.Tensor:
    return torch.arange(0, 24, 3, dtype=torch.int32, device=device)


def _check(packed: torch.Tensor, bits: int) -> None:
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits={bits!r} is not supported; allowed: [2, 3, 4, 8]")
    if bits == 3 and packed.shape[-1] % 3:
        raise ValueError(f"3-bit packed axis must be a multiple of 3 bytes, got {packed.shape[-1]}")


def unpack_codes_float(packed: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unpack uint8 ``packed [..., m]`` holding ``m * 8 / bits`` codes into ``dtype`` ``[..., n]``."""
    _check(packed, bits)
    if bits == 8:
        return packed.to(dtype)
    lead, m = packed.shape[:-1], packed.shape[-1]
    if bits == 3:
        b = packed.reshape(*lead, m // 3, 3).to(torch.int32)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        codes = (word.unsqueeze(-1) >> _shifts3(packed.device)) & 7
        return codes.reshape(*lead, m * 8 // 3).to(dtype)
    codes = (packed.unsqueeze(-1) >> _byte_shifts(bits, packed.device)) & ((1 << bits) - 1)
    return codes.reshape(*lead, m * (8 // bits)).to(dtype)


def plane_count(bits: int, packed_len: int) -> int:
    """How many planes :func:`code_planes` returns for a packed axis of ``packed_len`` bytes."""
    return 8 // bits if bits in _PLANE_MASK and packed_len % 4 == 0 else 1


def code_planes(packed: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes of ``packed [..., R, m]`` as ``dtype`` planes ``[..., k, R, m']``.

    ``k = 8 // bits`` planes of ``m' = m`` for 2 and 4 bits (natural code ``i * k + j`` at
    ``[j, :, i]``); for 8 and 3 bits, or a packed axis that is not a multiple of 4 bytes, a
    single plane in natural order (``k = 1``).
    """
    _check(packed, bits)
    if plane_count(bits, packed.shape[-1]) == 1:
        return unpack_codes_float(packed, bits, dtype).unsqueeze(-3)
    if packed.stride(-1) != 1 or any(st % 4 for st in packed.stride()[:-1]) or packed.storage_offset() % 4:
        packed = packed.contiguous()
    words = packed.view(torch.int32).unsqueeze(-3)  # [..., 1, R, m/4]
    planes = (words >> _word_shifts(bits, packed.device)) & _PLANE_MASK[bits]  # [..., k, R, m/4]
    return planes.view(torch.uint8).to(dtype)

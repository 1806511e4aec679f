"""Orthonormal Hadamard rotation along the last dimension (SPEC step 1).

For a power-of-two size D this is the Sylvester Hadamard matrix scaled by 1/sqrt(D), applied with
the fast Walsh-Hadamard butterfly in O(D log D). For other sizes (80, 96, 112, 160, 192, ...) the
rotation is block-diagonal: D is split into its binary decomposition, largest block first
(80 = 64 + 16, 96 = 64 + 32, 112 = 64 + 32 + 16), and each block gets its own orthonormal Sylvester
Hadamard. Every block is symmetric and orthonormal, so the whole matrix is too: H = H^T = H^-1,
which is what lets queries be rotated once and outputs be un-rotated with the same transform.
Blocks mix fewer channels than a full Hadamard would (a 16-channel block spreads outliers over 16
channels only); that is the price of exactness without padding the cache.
"""

from __future__ import annotations

import functools
import math

import torch


@functools.cache
def hadamard_blocks(dim: int) -> tuple[int, ...]:
    """Power-of-two block sizes, largest first, whose sum is ``dim``."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"head_dim must be a positive integer for the Hadamard rotation, got {dim!r}")
    return tuple(1 << b for b in range(dim.bit_length() - 1, -1, -1) if dim & (1 << b))


def _fwht_pow2(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard butterfly over the last dim (a power of two)."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return x


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Apply the orthonormal (block-)Hadamard rotation along the last dimension.

    Computes in float32 (float64 stays float64) and returns the input dtype. Self-inverse:
    ``hadamard_transform(hadamard_transform(x)) == x`` up to rounding.
    """
    if not torch.is_floating_point(x):
        raise TypeError(f"hadamard_transform needs a floating-point tensor, got {x.dtype}")
    dim = x.shape[-1]
    blocks = hadamard_blocks(dim)
    work = x if x.dtype == torch.float64 else x.float()
    if len(blocks) == 1:
        out = _fwht_pow2(work) * (1.0 / math.sqrt(dim))
    else:
        parts = torch.split(work, list(blocks), dim=-1)
        out = torch.cat([_fwht_pow2(p) * (1.0 / math.sqrt(p.shape[-1])) for p in parts], dim=-1)
    return out.to(x.dtype)


@functools.lru_cache(maxsize=32)
def _hadamard_matrix_cpu(dim: int) -> torch.Tensor:
    return hadamard_transform(torch.eye(dim, dtype=torch.float64))


def hadamard_matrix(dim: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The dense [dim, dim] rotation matrix (symmetric, orthonormal); for kernels and tests."""
    return _hadamard_matrix_cpu(dim).to(dtype=dtype, device=device)

"""The Hadamard rotation as the cache applies it: queries and outputs per call, tokens once on entry.

Two precisions, for two reasons:

* **Tokens entering the cache** are rotated in float64 and rounded to the model dtype. A float32
  product can round differently depending on the shape of the call (BLAS blocking), so a token
  rotated in a 1-token decode step and in a 100-token prefill (or alone and in a padded batch)
  could differ in the last bit and quantize differently; the float64 product rounded once does
  not depend on the call. Long inputs are rotated in chunks to bound the float64 temporaries.
* **Queries and outputs** are rotated by one ``addmm`` in the model dtype: the Sylvester matrix
  times ``1/sqrt(D)`` is ``alpha * S`` with an exact +-1 matrix ``S`` (exact in every dtype), and
  ``addmm(..., beta=0, alpha=1/sqrt(D))`` accumulates ``x @ S`` in float32 and applies ``alpha``
  before the one rounding to the model dtype: the float32 product of the previous version in one
  op instead of three (cast, product, cast), which matters on the GPU decode path. Block-diagonal
  rotations whose blocks do not scale by powers of two (e.g. D = 96 = 64 + 32) keep the float32
  product.
"""

from __future__ import annotations

import functools
import math

import torch

from kvarn.method.hadamard import hadamard_blocks, hadamard_matrix

STORAGE_CHUNK = 2048  # tokens per float64 product when a long call enters the cache


@functools.lru_cache(maxsize=64)
def _float64_matrix(dim: int, device: torch.device) -> torch.Tensor:
    return hadamard_matrix(dim, dtype=torch.float64, device=device)


@functools.lru_cache(maxsize=64)
def _integer_form(dim: int) -> tuple[torch.Tensor, float] | None:
    """``(S, alpha)`` with ``H = alpha * S`` and ``S`` exact small integers, or None.

    Block ``b`` of the (block-)Hadamard matrix has entries ``+-1/sqrt(b)``; with
    ``alpha = 1/sqrt(largest block)`` its integer form has entries ``sqrt(largest / b)``, an
    integer iff ``largest / b`` is a power of four (one block: always).
    """
    blocks = hadamard_blocks(dim)
    ratios = [blocks[0] // b for b in blocks]
    if any(math.isqrt(r) ** 2 != r for r in ratios):
        return None
    alpha = 1.0 / math.sqrt(blocks[0])
    return (hadamard_matrix(dim, dtype=torch.float64) / alpha).round(), alpha


@functools.lru_cache(maxsize=64)
def _query_operands(dim: int, dtype: torch.dtype, device: torch.device):
    form = _integer_form(dim)
    if form is None:  # float32 product (block scales that are not powers of two)
        return hadamard_matrix(dim, dtype=torch.float32, device=device), None, None
    s, alpha = form
    return s.to(dtype=dtype, device=device), alpha, torch.zeros(1, dtype=dtype, device=device)


def rotate_queries(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` along the last dim, rounded once to ``x.dtype`` (queries, attention outputs)."""
    dim = x.shape[-1]
    matrix, alpha, zero = _query_operands(dim, x.dtype, x.device)
    if alpha is None:
        return (x.float() @ matrix).to(x.dtype)
    flat = x.reshape(-1, dim)
    return torch.addmm(zero, flat, matrix, beta=0, alpha=alpha).view(x.shape)


def rotate_for_storage(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` computed in float64 and rounded to ``x.dtype`` (tokens entering the cache).

    ``x`` is ``[..., T, D]``; the token axis (-2) is cut into chunks of ``STORAGE_CHUNK``.
    """
    rot = _float64_matrix(x.shape[-1], x.device)
    tokens = x.shape[-2]
    if tokens <= STORAGE_CHUNK:
        return (x.double() @ rot).to(x.dtype)
    out = torch.empty_like(x)
    for t0 in range(0, tokens, STORAGE_CHUNK):
        part = x[..., t0 : t0 + STORAGE_CHUNK, :]
        out[..., t0 : t0 + STORAGE_CHUNK, :] = (part.double() @ rot).to(x.dtype)
    return out

"""Asymmetric round-to-nearest per row (SPEC step 4)."""

from __future__ import annotations

import torch

STEP_FLOOR = 1e-10  # a constant row gets this step: every code is 0 and the row is exactly `lo`


def quantize_rows(b: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize each row (last axis) of ``b`` to ``bits`` unsigned codes.

    Returns ``(codes uint8 [..., C], lo [...], step [...])`` with ``b ~= codes * step + lo``,
    computed in float32.
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits={bits!r} is not supported; allowed: [2, 3, 4, 8]")
    b = b.float()
    qmax = (1 << bits) - 1
    lo = b.amin(dim=-1)
    hi = b.amax(dim=-1)
    step = ((hi - lo) / qmax).clamp_min(STEP_FLOOR)
    codes = torch.round((b - lo.unsqueeze(-1)) / step.unsqueeze(-1)).clamp_(0, qmax)
    return codes.to(torch.uint8), lo, step


def dequantize_rows(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_rows` (float32)."""
    return codes.float() * step.float().unsqueeze(-1) + lo.float().unsqueeze(-1)

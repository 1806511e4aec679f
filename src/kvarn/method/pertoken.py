"""Per-token baselines: asymmetric RTN per token and float8 e4m3 with a per-token scale.

Both quantize each token's head vector (last axis) on its own, no rotation, no normalization.
Metadata is rounded to the configured metadata dtype *before* it is used, so the reconstruction is
exactly what a cache storing that metadata would return.
"""

from __future__ import annotations

import torch

from kvarn.method.rtn import quantize_rows

FP8_MAX = 448.0  # largest finite float8 e4m3fn value
SCALE_FLOOR = 1e-12


def per_token_rtn(x: torch.Tensor, bits: int, metadata_dtype: torch.dtype) -> torch.Tensor:
    """Quantize-dequantize every token vector (last axis) with asymmetric RTN; float32 result."""
    codes, lo, step = quantize_rows(x, bits)
    lo = lo.to(metadata_dtype).float()
    step = step.to(metadata_dtype).float()
    return codes.float() * step.unsqueeze(-1) + lo.unsqueeze(-1)


def fp8_e4m3_per_token(x: torch.Tensor, metadata_dtype: torch.dtype) -> torch.Tensor:
    """Quantize-dequantize to float8 e4m3 with one scale per token (amax / 448); float32 result."""
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(SCALE_FLOOR)
    scale = scale.to(metadata_dtype).float()
    # the rounded scale can be a hair smaller than amax/448: clamp to stay finite in e4m3fn
    q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.float() * scale

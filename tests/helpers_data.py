"""Random test data with the outliers real K/V have: heavy tails, huge channels, huge tokens."""

from __future__ import annotations

import torch


def outlier_tiles(
    n: int, g: int, d: int, *, seed: int, dtype=torch.float32, scale: float = 1.0
) -> torch.Tensor:
    """[n, g, d] token-major tiles: Student-t noise, a few channels x40, a few tokens x20, shifted means."""
    gen = torch.Generator().manual_seed(seed)
    x = _student_t(gen, (n, g, d))
    ch = torch.randint(0, d, (max(1, d // 32),), generator=gen)
    x[:, :, ch] *= 40.0
    tok = torch.randint(0, g, (max(1, g // 32),), generator=gen)
    x[:, tok, :] *= 20.0
    x += torch.randn(n, 1, d, generator=gen) * 3.0  # per-channel offsets, as keys have
    return (x * scale).to(dtype)


def _student_t(gen: torch.Generator, shape, df: float = 3.0) -> torch.Tensor:
    z = torch.randn(shape, generator=gen)
    chi2 = torch.randn((*shape, int(df)), generator=gen).pow(2).sum(-1)
    return z / torch.sqrt(chi2 / df)

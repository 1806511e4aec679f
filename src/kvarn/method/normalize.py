"""Dual-axis variance normalization in the log domain with best-imbalance tracking (SPEC step 3).

Works on a batch of tiles ``x`` of shape ``[N, R, C]`` (R = rows, the axis RTN groups over; C =
columns). All arithmetic is float32 regardless of the input dtype, as in the reference backends.
"""

from __future__ import annotations

import torch

STD_MIN = 1e-3
STD_MAX = 1e3
LOG_SCALE_MIN = -0.3  # a row/column can be boosted by at most e^0.3 ...
LOG_SCALE_MAX = 10.0  # ... but shrunk by up to e^10
IMBALANCE_FLOOR = 1e-8


def imbalance(y: torch.Tensor) -> torch.Tensor:
    """max/min ratio of column stds plus that of row stds, per tile ([N, R, C] -> [N]).

    Unbiased (n-1) standard deviations; a perfectly balanced tile scores 2.
    """
    col_std = y.std(dim=-2)  # one std per column, over the rows
    row_std = y.std(dim=-1)  # one std per row, over the columns
    col_ratio = col_std.amax(dim=-1) / col_std.amin(dim=-1).clamp_min(IMBALANCE_FLOOR)
    row_ratio = row_std.amax(dim=-1) / row_std.amin(dim=-1).clamp_min(IMBALANCE_FLOOR)
    return col_ratio + row_ratio


def _apply(x: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # Always recomputed from X (never compounded), in SPEC's order: per column, then per row.
    return x / torch.exp(u).unsqueeze(-2) / torch.exp(w).unsqueeze(-1)


def variance_normalize(
    x: torch.Tensor, iterations: int = 8, *, return_best_iteration: bool = False
) -> tuple[torch.Tensor, ...]:
    """Find per-row and per-column scales that balance each tile's variances.

    Args:
        x: tiles ``[N, R, C]`` (any float dtype; computed in float32).
        iterations: column-step + row-step rounds; no early stop.

    Returns:
        ``(s_row [N, R], s_col [N, C])`` float32, the scales of the best state seen, where the
        identity (all ones) competes too and ties go to the later iteration. The normalized tile
        is ``x / s_col[:, None, :] / s_row[:, :, None]``. With ``return_best_iteration`` a third
        tensor ``[N]`` (int64) says which state won: 0 is the identity, k the state after round k.
    """
    if x.ndim != 3:
        raise ValueError(f"variance_normalize expects tiles [N, R, C], got shape {tuple(x.shape)}")
    x = x.float()
    n, r, c = x.shape
    u = x.new_zeros(n, c)  # log column scales
    w = x.new_zeros(n, r)  # log row scales
    best_u, best_w = u, w
    best = imbalance(x)
    best_it = torch.zeros(n, dtype=torch.long, device=x.device)
    y = x
    for it in range(1, iterations + 1):
        s = y.std(dim=-2).clamp(STD_MIN, STD_MAX)  # column step: std of each column over rows
        u = (u + torch.log(s)).clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
        y = _apply(x, u, w)
        s = y.std(dim=-1).clamp(STD_MIN, STD_MAX)  # row step: std of each row over columns
        w = (w + torch.log(s)).clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
        y = _apply(x, u, w)
        score = imbalance(y)
        keep = score <= best  # ties go to the later iteration
        best = torch.where(keep, score, best)
        best_u = torch.where(keep.unsqueeze(-1), u, best_u)
        best_w = torch.where(keep.unsqueeze(-1), w, best_w)
        best_it = torch.where(keep, it, best_it)
    if return_best_iteration:
        return torch.exp(best_w), torch.exp(best_u), best_it
    return torch.exp(best_w), torch.exp(best_u)

"""A slow, obviously-correct float64 re-statement of SPEC steps 3-5, one tile at a time in NumPy.

Nothing here is shared with the library code it checks.
"""

from __future__ import annotations

import numpy as np


def ref_imbalance(y: np.ndarray) -> float:
    col = y.std(axis=0, ddof=1)  # per column, over the rows
    row = y.std(axis=1, ddof=1)  # per row, over the columns
    return col.max() / max(col.min(), 1e-8) + row.max() / max(row.min(), 1e-8)


def ref_normalize(x: np.ndarray, iterations: int):
    """Return (s_row, s_col, best_iteration, scores) for one tile [R, C] in float64."""
    r, c = x.shape
    u = np.zeros(c)
    w = np.zeros(r)
    best = ref_imbalance(x)
    best_u, best_w, best_it = u.copy(), w.copy(), 0
    scores = [best]
    y = x.copy()
    for it in range(1, iterations + 1):
        s = np.clip(y.std(axis=0, ddof=1), 1e-3, 1e3)
        u = np.clip(u + np.log(s), -0.3, 10.0)
        y = x / np.exp(u)[None, :] / np.exp(w)[:, None]
        s = np.clip(y.std(axis=1, ddof=1), 1e-3, 1e3)
        w = np.clip(w + np.log(s), -0.3, 10.0)
        y = x / np.exp(u)[None, :] / np.exp(w)[:, None]
        score = ref_imbalance(y)
        scores.append(score)
        if score <= best:
            best, best_u, best_w, best_it = score, u.copy(), w.copy(), it
    return np.exp(best_w), np.exp(best_u), best_it, scores


def ref_rtn(b: np.ndarray, bits: int):
    """Per-row asymmetric RTN of [R, C]: (codes, lo, step, unrounded (b - lo) / step)."""
    qmax = 2**bits - 1
    lo = b.min(axis=1)
    step = np.maximum((b.max(axis=1) - lo) / qmax, 1e-10)
    exact = (b - lo[:, None]) / step[:, None]
    codes = np.clip(np.rint(exact), 0, qmax)
    return codes, lo, step, exact


def ref_encode_tile(x: np.ndarray, bits: int, iterations: int, normalize: bool):
    """One tile [R, C] (keys: [D, G]; values: [G, D]) -> dict of codes and folded metadata."""
    if normalize:
        s_row, s_col, best_it, scores = ref_normalize(x, iterations)
    else:
        s_row, s_col, best_it, scores = np.ones(x.shape[0]), np.ones(x.shape[1]), 0, []
    b = x / s_col[None, :] / s_row[:, None]
    codes, lo, step, exact = ref_rtn(b, bits)
    return {
        "codes": codes,
        "a": s_row * step,
        "z": s_row * lo,
        "col": s_col,
        "best_it": best_it,
        "scores": scores,
        "exact": exact,
        "step": step,
        "b": b,
    }


def ref_reconstruct(enc: dict) -> np.ndarray:
    """(code * a + z) * col, in the tile's own [R, C] orientation."""
    return (enc["codes"] * enc["a"][:, None] + enc["z"][:, None]) * enc["col"][None, :]

"""How far a representation has moved: linear CKA (Kornblith et al. 2019) and the relative change.

Both compare two feature matrices of the same N inputs, row i of each from input i (e.g. a tokenizer's latents
before and after a fine-tune). Linear CKA is 1 for representations equal up to rotation and isotropic scaling,
and falls towards 0 as they become unrelated; the relative change ||Y - X||_F / ||X||_F also sees rotations and
scale, which CKA ignores by design.
"""

from __future__ import annotations

import numpy as np


def _pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"expected two (N, D) matrices of the same N, got {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError(f"need at least 2 rows, got {len(x)}")
    for name, value in (("x", x), ("y", y)):
        if not np.isfinite(value).all():
            raise ValueError(f"{name}: {int((~np.isfinite(value)).sum())} non-finite values")
    return x, y


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of x (N, D1) and y (N, D2): ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), columns centred.

    Computed from the (N, N) Gram matrices when N is below the widths (cheaper), else from the cross-covariances;
    both are the same number."""
    x, y = _pair(x, y)
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    if len(x) < max(x.shape[1], y.shape[1]):
        gx, gy = x @ x.T, y @ y.T  # (N, N)
        cross, norm_x, norm_y = (gx * gy).sum(), np.linalg.norm(gx), np.linalg.norm(gy)
    else:
        cross = np.linalg.norm(y.T @ x) ** 2  # (D2, D1)
        norm_x, norm_y = np.linalg.norm(x.T @ x), np.linalg.norm(y.T @ y)
    if norm_x == 0 or norm_y == 0:
        raise ValueError("linear_cka: a representation is constant over the rows")
    return float(cross / (norm_x * norm_y))


def relative_change(before: np.ndarray, after: np.ndarray) -> float:
    """||after - before||_F / ||before||_F of two (N, D) matrices of the same inputs."""
    before, after = _pair(before, after)
    scale = np.linalg.norm(before)
    if scale == 0:
        raise ValueError("relative_change: `before` is all zeros")
    return float(np.linalg.norm(after - before) / scale)

"""Kernel Inception distance (Binkowski et al. 2018, "Demystifying MMD GANs"): the squared maximum mean
discrepancy between two feature sets under the cubic polynomial kernel

    k(x, y) = (x . y / D + 1)^3

estimated without bias, on `subsets` random subsets of `subset_size` vectors of each set (the size capped at
the smaller set), and reported as the mean and the standard deviation over the subsets. Per subset of m
vectors x_i and y_j, the estimate is

    MMD^2_u = sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2

(the within-set sums leave out each vector with itself). This is the estimator and the protocol of the
paper, torch-fidelity and torchmetrics (100 subsets of 1000; their standard deviation is the ddof-0 one, so
is this one). Unlike FID, the estimate is unbiased: its expectation does not depend on the sample count, so
figures measured at different counts can be compared, and for two sets from one distribution it scatters
around 0 (it can be slightly negative). When the subset size reaches both set sizes every subset is the
whole of both sets: the standard deviation is then 0 and says nothing about sampling noise (see
`aligntok.eval.bootstrap` for intervals over the images).

The kernel matrices of the whole sets are computed once when that is cheaper than per subset (sets of a
few thousand vectors; every subset is then a gather), else each subset computes its own three (m, m) blocks.
`kid_resampler` gives the estimate for resampled rows of the evaluated set (the bootstrap), from kernel
matrices computed once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

KID_SUBSETS = 100
"""Subsets the estimate is averaged over (the paper's and torch-fidelity's protocol)."""
KID_SUBSET_SIZE = 1000
"""Vectors of each set per subset (capped at the smaller set's size)."""
FULL_KERNEL_ROWS = 4096
"""Whole-set kernel matrices are used only up to this many vectors in both sets together (at most 4096^2
float64 = 128 MB); larger sets compute each subset's blocks."""
CHUNK = 1024
"""Rows of a kernel matrix computed at once where only its sums are needed."""


@dataclass(frozen=True)
class KID:
    mean: float
    """Mean of the unbiased MMD^2 estimates over the subsets."""
    std: float
    """Their standard deviation (ddof 0, as torch-fidelity and torchmetrics)."""
    subsets: int
    """Distinct subsets the figures are over: the `subsets` asked for, or 1 where a subset is all of both sets."""
    subset_size: int
    """Vectors of each set per subset: `min(subset_size, n_x, n_y)`."""


def _as_features(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"{name}: expected features (N, D) with N >= 2, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: {int((~np.isfinite(x)).sum())} non-finite values")
    return x


def _pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_features(x, "x"), _as_features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x, y: feature dims differ: x {x.shape}, y {y.shape}")
    return x, y


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """k(a_i, b_j) = (a_i . b_j / D + 1)^3 for a (N, D), b (M, D): (N, M) float64."""
    gram = a @ b.T / a.shape[1] + 1.0  # (N, M)
    return gram * gram * gram


def _mmd2(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """Unbiased MMD^2 from the kernel blocks of m vectors of each set: (m, m) x3."""
    m = len(kxx)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.sum() / m**2)


def _whole_sets_cheaper(n_x: int, n_y: int, m: int, subsets: int) -> bool:
    """Whether the whole-set kernel matrices cost fewer kernel entries than `subsets` x 3 (m, m) blocks,
    within the memory bound `FULL_KERNEL_ROWS`."""
    return n_x + n_y <= FULL_KERNEL_ROWS and n_x * n_x + n_y * n_y + n_x * n_y <= 3 * subsets * m * m


def kid(x: np.ndarray, y: np.ndarray, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
        seed: int = 0) -> KID:
    """KID of features x (N, D) against y (M, D), N, M >= 2: the mean and standard deviation of the unbiased
    MMD^2 over `subsets` subsets of m = min(subset_size, N, M) vectors of each set, drawn without replacement
    by `np.random.default_rng(seed)` (the same seed gives the same subsets, hence the same figure). Where m is
    the size of both sets every subset is the whole of both, so the estimate is computed once and its std is 0."""
    x, y = _pair(x, y)
    if subsets < 1:
        raise ValueError(f"subsets: must be >= 1, got {subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size: must be >= 2 (the within-set sums need two vectors), got {subset_size}")
    m = min(subset_size, len(x), len(y))
    if m == len(x) == len(y):
        subsets = 1  # every draw would be a permutation of the same two sets: one value, not float noise as a std
    rng = np.random.default_rng(seed)
    draws = [(rng.choice(len(x), m, replace=False), rng.choice(len(y), m, replace=False)) for _ in range(subsets)]
    if _whole_sets_cheaper(len(x), len(y), m, subsets):
        kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
        values = [_mmd2(kxx[np.ix_(i, i)], kyy[np.ix_(j, j)], kxy[np.ix_(i, j)]) for i, j in draws]
    else:
        values = [_mmd2(polynomial_kernel(x[i], x[i]), polynomial_kernel(y[j], y[j]), polynomial_kernel(x[i], y[j]))
                  for i, j in draws]
    scores = np.asarray(values)  # (subsets,)
    return KID(mean=float(scores.mean()), std=float(scores.std()), subsets=subsets, subset_size=m)


def kid_resampler(x: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], float]:
    """The unbiased MMD^2 of the rows `x[rows]` (any K >= 2 row indices, repeats allowed) against all of y,
    for the bootstrap: K(x, x) (N, N), the row sums of K(x, y) (N,) and the within-y mean are computed once,
    each call costs O(N^2). Pairs of the same row of x are left out of the within-x mean (as the vector with
    itself is): a resample with repeats would otherwise count k(x, x) as a distinct pair and bias the figure
    upwards. With `rows = arange(N)` this is the whole-set estimate that KID's subsets average to."""
    x, y = _pair(x, y)
    kxx = polynomial_kernel(x, x)  # (N, N)
    diag = np.diag(kxx).copy()  # (N,)
    cross = np.zeros(len(x))  # (N,): sum_j k(x_i, y_j)
    within_y = 0.0
    for start in range(0, len(y), CHUNK):
        block = y[start:start + CHUNK]
        cross += polynomial_kernel(x, block).sum(axis=1)
        kyy = polynomial_kernel(block, y)  # (c, M)
        within_y += kyy.sum() - np.trace(kyy[:, start:start + CHUNK])
    within_y /= len(y) * (len(y) - 1)

    def mmd2(rows: np.ndarray) -> float:
        w = np.bincount(np.asarray(rows), minlength=len(x)).astype(np.float64)  # (N,) times each row is drawn
        total = w.sum()
        if total < 2:
            raise ValueError(f"rows: need at least 2 rows, got {int(total)}")
        pairs = total * total - w @ w  # ordered pairs of distinct draws that are not the same row
        within_x = (w @ kxx @ w - (w * w) @ diag) / pairs
        return float(within_x + within_y - 2.0 * (w @ cross) / (total * len(y)))

    return mmd2

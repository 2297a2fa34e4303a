"""Bootstrap confidence intervals over the rows (images, samples) a figure is computed from.

The statistic of N rows is recomputed on `resamples` sets of N rows drawn with replacement by a seeded numpy
Generator, and the interval is the (1 - level)/2 and (1 + level)/2 quantiles of the recomputed values (the
percentile bootstrap). The draws depend only on (seed, N, resamples), not on the statistic: figures of several
tokenizers measured on the same N validation images are resampled with the same images (a paired bootstrap).

Two sets (reconstructions or samples against the reference features): only the evaluated set's rows are
resampled; the reference is held fixed and passed whole. That is cheaper (whatever depends on the reference
alone is computed once) and asks how much the figure would move with another draw of the evaluated images
against this reference; the reference's own sampling noise is left out, so the interval is narrower than a
bootstrap of both sets would give.

FID is biased upwards, the more so the fewer distinct vectors a set has, and a resample of N rows holds
about 63% distinct ones: its FIDs sit above the point estimate (with 150 reconstructions' 2048-d features the
whole bootstrap distribution lay above it). `point` corrects this: the quantiles are shifted by
(point - mean of the resampled values), the bootstrap's estimate of that extra bias, so the interval is the
resampled spread placed at the figure. It is then an interval for the figure's expected value at this sample
count (what comparisons at equal counts need), not for the figure at infinitely many samples. Means and the
unbiased KID need no shift (their resampled values centre on the point already).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

LEVEL = 0.95
RESAMPLES = 200
"""Resamples for the costly figures (FID, KID: one eigendecomposition or kernel contraction each)."""
MEAN_RESAMPLES = 2000
"""Resamples for means of per-image scores (PSNR, SSIM, probe correctness): microseconds each."""


class Interval(NamedTuple):
    low: float
    high: float


def resample_rows(n: int, resamples: int, seed: int) -> np.ndarray:
    """Row indices of `resamples` bootstrap draws of n rows from n: (resamples, n) int64, from
    `np.random.default_rng(seed)`. A draw of a single row n times (chance n^(1-n), only for a handful of rows)
    carries no spread and leaves unbiased within-set sums undefined: it is drawn again."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n, size=(resamples, n))  # (R, n)
    while (one := (rows == rows[:, :1]).all(axis=1)).any():
        rows[one] = rng.integers(0, n, size=(int(one.sum()), n))
    return rows


def bootstrap_ci(statistic: Callable[..., float], rows: Any, reference: Any = None, *, level: float = LEVEL,
                 resamples: int = RESAMPLES, seed: int = 0, point: float | None = None) -> Interval:
    """Percentile-bootstrap interval of `statistic(rows)` (or `statistic(rows, reference)` when a reference
    is given; it is never resampled) over the rows of `rows` (N, ...), N >= 2.

    A statistic that precomputes per-row quantities can take row indices: pass `rows = np.arange(N)` and it
    is called with each draw's (N,) indices. `point`: shift the quantiles by (point - mean of the resampled
    values), for a statistic whose resamples are biased against it (FID: see the module docstring).
    """
    if not 0 < level < 1:
        raise ValueError(f"level: must lie in (0, 1), got {level}")
    outside = (1 - level) / 2
    if resamples * outside < 1:
        raise ValueError(f"resamples: {resamples} leave no resample beyond the {level:g} interval's ends; "
                         f"need at least {math.ceil(1 / outside - 1e-9)}")
    data = np.asarray(rows)
    if data.ndim < 1 or len(data) < 2:
        raise ValueError(f"rows: expected N >= 2 rows, got shape {data.shape}")
    if np.issubdtype(data.dtype, np.number) and not np.isfinite(data).all():
        raise ValueError(f"rows: {int((~np.isfinite(data)).sum())} non-finite values")
    if point is not None and not math.isfinite(point):
        raise ValueError(f"point: must be finite, got {point}")
    extra = () if reference is None else (reference,)
    values = np.empty(resamples)  # (R,)
    for i, drawn in enumerate(resample_rows(len(data), resamples, seed)):
        values[i] = statistic(data[drawn], *extra)
    if not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise ValueError(f"statistic: resample {bad} gave {values[bad]}")
    low, high = np.quantile(values, [outside, 1 - outside])
    shift = 0.0 if point is None else point - float(values.mean())
    return Interval(float(low + shift), float(high + shift))


def ci_keys(name: str, interval: Interval) -> dict[str, float]:
    """`{name}_ci_lo`, `{name}_ci_hi`: flat float keys beside the figure, as DVC metrics show them."""
    return {f"{name}_ci_lo": interval.low, f"{name}_ci_hi": interval.high}


def with_interval(metrics: dict[str, float], key: str, digits: int = 2, scale: float = 1.0,
                  missing: str = "-") -> str:
    """`12.34 [11.02, 13.80]` (the figure x `scale` and its `ci_keys` interval), the figure alone where it has
    no interval, `missing` where it is absent."""
    if key not in metrics:
        return missing
    text = f"{scale * metrics[key]:.{digits}f}"
    if f"{key}_ci_lo" in metrics:
        text += f" [{scale * metrics[f'{key}_ci_lo']:.{digits}f}, {scale * metrics[f'{key}_ci_hi']:.{digits}f}]"
    return text

"""Linear probe: how linearly separable the classes are in a feature space (a latent, pixels, the encoder).

Logistic regression (scikit-learn, L-BFGS, multinomial) on standardised features; the scaler is fit on the
training features only. Top-1 accuracy on held-out features. Plus the feature makers the evaluation
uses: a spatially mean-pooled latent, and pixels at a fixed small size (`PIXEL_SIDE`, 32 x 32 x 3 = 3,072
features) whatever the image resolution.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

MAX_ITER = 1000
C = 1.0
PIXEL_SIDE = 32
"""Side of the pixel probe's images: larger images are area-averaged to 32 x 32 (3 x 32 x 32 = 3,072
features; a 256 px image flattened would give 196,608), smaller ones are used as they are (nothing is
upsampled). At the embedded default's 32 px the pixel features are the flattened images themselves."""
BLAS_THREADS = 1
"""BLAS threads during the fit. These matrices are small: on a 2-core box shared with other work, one thread
fit 5,000 x 32 features in 0.15 s and two threads in 1.5-7 s (OpenBLAS threads spin waiting for each other)."""


@dataclass(frozen=True)
class ProbeResult:
    top1: float
    """Fraction of validation samples whose predicted class is the label."""
    n_train: int
    n_val: int
    dim: int
    classes: int
    converged: bool
    """False when L-BFGS stopped at `max_iter` before its tolerance."""
    correct: np.ndarray | None = field(default=None, repr=False, compare=False)  # (n_val,) bool
    """Whether each validation sample's predicted class is its label, in the order given (`top1` is their
    mean): what a bootstrap of `top1` over the validation images resamples."""


def pooled_latent(latent: torch.Tensor) -> torch.Tensor:
    """Spatial mean of a latent grid: (B, C, h, w) -> (B, C)."""
    if latent.ndim != 4:
        raise ValueError(f"expected a latent (B, C, h, w), got {tuple(latent.shape)}")
    return latent.mean(dim=(2, 3))  # (B, C)


def flat_pixels(images: torch.Tensor) -> torch.Tensor:
    """Raw pixels as features: (B, 3, H, W) -> (B, 3*H*W)."""
    if images.ndim != 4:
        raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
    return images.flatten(1)  # (B, 3*H*W)


def pixel_features(images: torch.Tensor, side: int = PIXEL_SIDE) -> torch.Tensor:
    """The pixel probe's features: (B, 3, H, W) -> (B, 3*h*w), h = min(H, side), w = min(W, side); each
    feature the mean of the pixels its cell covers (area averaging, `adaptive_avg_pool2d`)."""
    if images.ndim != 4:
        raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
    h, w = min(images.shape[2], side), min(images.shape[3], side)
    if (h, w) != tuple(images.shape[2:]):
        images = F.adaptive_avg_pool2d(images, (h, w))  # (B, 3, h, w)
    return flat_pixels(images)  # (B, 3*h*w)


def _check(x: np.ndarray, y: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y)
    if x.ndim != 2 or y.shape != (len(x),):
        raise ValueError(f"{name}: expected features (N, D) and labels (N,), got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: {int((~np.isfinite(x)).sum())} non-finite feature values")
    return x, y


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                 C: float = C, max_iter: int = MAX_ITER, blas_threads: int | None = BLAS_THREADS) -> ProbeResult:
    """Fit on train (N, D) / (N,), report top-1 on val (M, D) / (M,), with each val sample's correctness.

    Args:
        C: inverse L2 strength of sklearn's `LogisticRegression`.
        max_iter: L-BFGS iteration cap; hitting it is reported as `converged=False`, not raised.
        blas_threads: BLAS thread limit during fit and predict (None: leave the process's setting).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    train_x, train_y = _check(train_x, train_y, "train")
    val_x, val_y = _check(val_x, val_y, "val")
    if train_x.shape[1] != val_x.shape[1]:
        raise ValueError(f"feature dims differ: train {train_x.shape}, val {val_x.shape}")
    if len(np.unique(train_y)) < 2:
        raise ValueError(f"train: need at least 2 classes, got {np.unique(train_y).tolist()}")
    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(solver="lbfgs", C=C, max_iter=max_iter)
    with threadpool_limits(limits=blas_threads, user_api="blas"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(scaler.transform(train_x), train_y)
        correct = clf.predict(scaler.transform(val_x)) == val_y  # (M,) bool
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return ProbeResult(top1=float(correct.mean()), n_train=len(train_x), n_val=len(val_x), dim=train_x.shape[1],
                       classes=len(clf.classes_), converged=converged, correct=correct)

"""Improved precision and recall (Kynkäänniemi et al. 2019) on feature matrices, with k-NN manifolds.

The manifold of a set is the union of balls around its samples, each with the radius of the distance to
its k-th nearest neighbour in the same set (the sample itself not counted). Precision: the fraction of
generated samples inside the real manifold (fidelity). Recall: the fraction of real samples inside the
generated manifold (coverage). A sample lies inside when its distance to some centre is <= that centre's
radius. Distances are Euclidean, in float64, from `torch.cdist` over row chunks, so memory stays
(chunk, N) whatever N is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CHUNK = 1024
"""Rows of the distance matrix held at once."""


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float
    recall: float
    k: int
    n_real: int
    n_fake: int


def _tensor(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).double()
    if t.ndim != 2:
        raise ValueError(f"{name}: expected features (N, D), got shape {tuple(t.shape)}")
    return t


def knn_radii(feats: torch.Tensor, k: int, chunk: int = CHUNK) -> torch.Tensor:
    """Distance of each sample to its k-th nearest neighbour in the set, itself excluded: (N, D) -> (N,)."""
    n = len(feats)
    if not 1 <= k < n:
        raise ValueError(f"k={k} needs at least {k + 1} samples, got {n}")
    radii = []
    for start in range(0, n, chunk):
        dist = torch.cdist(feats[start:start + chunk], feats)  # (c, N)
        # the k+1 smallest include the sample itself (distance ~0), as in the reference implementation
        radii.append(dist.topk(k + 1, dim=1, largest=False).values[:, k])  # (c,)
    return torch.cat(radii)  # (N,)


def inside_manifold(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
                    chunk: int = CHUNK) -> torch.Tensor:
    """Whether each query (M, D) lies within radii (N,) of some centre (N, D): (M,) bool."""
    inside = []
    for start in range(0, len(queries), chunk):
        dist = torch.cdist(queries[start:start + chunk], centres)  # (c, N)
        inside.append((dist <= radii[None, :]).any(dim=1))  # (c,)
    return torch.cat(inside)  # (M,)


def precision_recall(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3,
                     chunk: int = CHUNK) -> PrecisionRecall:
    """Precision and recall of generated features `fake` (M, D) against `real` (N, D), k-NN manifolds."""
    r, f = _tensor(real, "real"), _tensor(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dims differ: real {tuple(r.shape)}, fake {tuple(f.shape)}")
    precision = inside_manifold(f, r, knn_radii(r, k, chunk), chunk).double().mean()
    recall = inside_manifold(r, f, knn_radii(f, k, chunk), chunk).double().mean()
    return PrecisionRecall(precision=float(precision), recall=float(recall), k=k, n_real=len(r), n_fake=len(f))

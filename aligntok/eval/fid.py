"""Fréchet distance between Gaussian fits of two feature sets (FID on Inception features, FD_dinov2 on the
foundation encoder's), and the feature statistics it is computed from, with their provenance.

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2, which equal those of the
symmetric PSD matrix S1^(1/2) S2 S1^(1/2): two symmetric eigendecompositions (`eigh`) in float64, rounding
negatives clipped to 0. This is the value scipy's `sqrtm(S1 @ S2)` trace gives (the pytorch-fid formula),
about 3x faster, and it stays real when the covariances are singular (fewer samples than dimensions).
With the features at hand and fewer samples than dimensions, `fid_from_features` gets the same trace as
the nuclear norm of the (n1, n2) cross-Gram matrix, without any D x D decomposition; `fid_resampler`
gets the FD of resampled rows (the bootstrap) from Gram matrices computed once.

`FeatureAccumulator` streams feature batches into the mean and covariance (float64), so a set of any size
costs one D x D matrix; it keeps the vectors themselves only up to a bound (`FEATURES_KEPT`, or more where
precision/recall needs them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aligntok.fileio import atomic_write

log = logging.getLogger(__name__)

_PROVENANCE = ("network", "resize", "source")

FEATURES_KEPT = 2048
"""Feature vectors a `FeatureAccumulator` keeps by default beside its statistics (2048 x 2048 float32: 16 MB).
Up to about D vectors a side, `fid_from_features`' low-rank route is the faster FD and needs them; above
that, `frechet_distance` on the streamed mean and covariance is the route, and nothing grows with N."""
CHUNK = 1024
"""Rows merged into the statistics at once. Fixed, so the figures depend only on the sequence of rows, not
on how they arrived (one batch at a time, or a round of batches gathered from several ranks)."""


@dataclass(frozen=True, eq=False)  # arrays: compare fields explicitly
class FeatureStats:
    """Mean and covariance of N feature vectors, with where they came from.

    `features` (N, D), when kept, lets precision/recall and the low-rank FD path use the samples.
    """

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    n: int
    network: str
    """Feature network, e.g. `inception-2015-12-05` or `fd_dinov2`."""
    resize: str = ""
    """How images were resized for the network (`aligntok.eval.inception.RESIZE`); empty if not given."""
    source: str = ""
    """Which images, e.g. `shards/train: first 1000`."""
    features: np.ndarray | None = field(default=None, repr=False, compare=False)  # (N, D) or None

    @classmethod
    def from_features(cls, features: np.ndarray, *, network: str, source: str = "", resize: str = "",
                      keep: bool = False) -> FeatureStats:
        """Fit mean and (unbiased) covariance to features (N, D), N >= 2; `keep` stores the features too."""
        x = _as_matrix(features, "features")
        mu, sigma = x.mean(axis=0), np.cov(x, rowvar=False)  # (D,), (D, D)
        return cls(mu=mu, sigma=np.atleast_2d(sigma), n=len(x), network=network, resize=resize, source=source,
                   features=x if keep else None)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def save(self, path: Path, features: np.ndarray | None = None) -> None:
        """Write `path` (.npz, no pickles) atomically; `features` (N, D) default to the kept ones, if any."""
        features = self.features if features is None else features
        arrays = {"mu": self.mu, "sigma": self.sigma, "n": np.int64(self.n)}
        arrays |= {key: np.array(getattr(self, key)) for key in _PROVENANCE}  # 0-d unicode arrays
        if features is not None:
            if features.shape[1:] != self.mu.shape or len(features) != self.n:
                raise ValueError(f"{path}: features {features.shape} do not match n={self.n}, dim={self.dim}")
            arrays["features"] = features

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:  # a file handle: np.savez would append .npz to the name
                np.savez(handle, **arrays)

        atomic_write(Path(path), write)

    @classmethod
    def load(cls, path: Path) -> FeatureStats:
        """Read what `save` wrote (`allow_pickle=False`); a missing key is an error naming file and key."""
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("mu", "sigma", "n", *_PROVENANCE) if k not in data.files]
            if missing:
                raise ValueError(f"{path}: not a feature-statistics file, missing {missing}")
            return cls(mu=data["mu"], sigma=data["sigma"], n=int(data["n"]),
                       **{key: str(data[key]) for key in _PROVENANCE},
                       features=data["features"] if "features" in data.files else None)


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"{name}: expected (N, D) with N >= 2, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: {int((~np.isfinite(x)).sum())} non-finite values")
    return x


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix (D, D) via `eigh`; rounding negatives clipped to 0."""
    w, v = np.linalg.eigh(sigma)  # (D,), (D, D)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # (D, D)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for PSD S1, S2 (D, D), via the eigenvalues of S1^(1/2) S2 S1^(1/2)."""
    root = _psd_sqrt(sigma1)  # (D, D)
    inner = root @ sigma2 @ root  # (D, D), symmetric up to rounding
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)  # (D,)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): mu (D,), sigma (D, D).

    If the eigendecomposition fails or gives a non-finite trace, `eps` is added to both diagonals
    (pytorch-fid's fallback) and a warning is logged.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    for name, value in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f"frechet_distance: {name} has non-finite values")
    try:
        covmean = trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        covmean = float("nan")
    if not np.isfinite(covmean):
        log.warning("frechet_distance: decomposition failed; adding %g to the covariance diagonals", eps)
        offset = eps * np.eye(d)
        covmean = trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    diff = mu1 - mu2  # (D,)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * covmean)


def low_rank_cheaper(n1: int, n2: int, dim: int) -> bool:
    """Whether `fid_from_features` takes its low-rank route for sets of n1 and n2 D-dim vectors (an
    (n1, n2) SVD, ~n1 n2 min(n1, n2), against two (D, D) eigh's, ~D^3)."""
    return n1 * n2 * min(n1, n2) < dim**3


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between the Gaussian fits of features a (N1, D) and b (N2, D).

    With fewer samples than dimensions, tr((S1 S2)^(1/2)) is the nuclear norm of A B^T / sqrt((N1-1)(N2-1)),
    A and B the centred features (S1 = A^T A / (N1-1)): an (N1, N2) SVD instead of two (D, D) eigh's.
    """
    a, b = _as_matrix(a, "a"), _as_matrix(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: a {a.shape}, b {b.shape}")
    (n1, dim), n2 = a.shape, len(b)
    if not low_rank_cheaper(n1, n2, dim):
        sa, sb = FeatureStats.from_features(a, network=""), FeatureStats.from_features(b, network="")
        return frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)  # (D,)
    ca, cb = a - mu1, b - mu2  # (N1, D), (N2, D) centred
    cross = ca @ cb.T / np.sqrt((n1 - 1) * (n2 - 1))  # (N1, N2)
    covmean = float(np.linalg.svd(cross, compute_uv=False).sum())
    trace1, trace2 = (ca * ca).sum() / (n1 - 1), (cb * cb).sum() / (n2 - 1)  # tr(S1), tr(S2)
    diff = mu1 - mu2
    return float(diff @ diff + trace1 + trace2 - 2.0 * covmean)


def fid_resampler(a: np.ndarray, b: np.ndarray) -> Callable[[np.ndarray], float]:
    """The Fréchet distance of the rows `a[rows]` (any K >= 2 row indices, repeats allowed) against all of b,
    for the bootstrap: a (N1, D), b (N2, D).

    Everything a resample needs is a function of inner products computed once. With A = a - mu1 and
    B = b - mu2 the centred sets and m the resampled rows' mean of A: |m + mu1 - mu2|^2 and tr(S1) come from
    A A^T (N1, N1), and tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of
    P H[rows, rows] P / ((K-1)(N2-1)), H = (A B^T)(A B^T)^T (N1, N1), P the centring matrix (the squared
    singular values of `fid_from_features`' cross matrix; a constant shift of a cancels in P, and centring
    first keeps the large common part out of H's rounding). Each call then costs one (U, U) `eigvalsh`, U the
    distinct rows drawn, whatever D and N2; `rows = arange(N1)` gives `fid_from_features(a, b)`.
    """
    a, b = _as_matrix(a, "a"), _as_matrix(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: a {a.shape}, b {b.shape}")
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)  # (D,)
    ca, cb = a - mu1, b - mu2  # (N1, D), (N2, D)
    shift, n2 = mu1 - mu2, len(b)  # (D,)
    trace2 = float((cb * cb).sum()) / (n2 - 1)
    inner = ca @ ca.T  # (N1, N1)
    towards = ca @ shift  # (N1,)
    cross = ca @ cb.T  # (N1, N2)
    gram = cross @ cross.T  # (N1, N1)

    def fid(rows: np.ndarray) -> float:
        rows = np.asarray(rows)
        if rows.ndim != 1 or len(rows) < 2:
            raise ValueError(f"rows: expected K >= 2 row indices, got shape {rows.shape}")
        # The distinct rows u, drawn w times each: the K x K matrices with repeated rows have the same nonzero
        # eigenvalues as these (U, U) ones, and no zero eigenvalue per repeat whose rounding the square root
        # would magnify (sqrt(1e-16 lambda_max) each).
        u, w = np.unique(rows, return_counts=True)  # (U,), (U,)
        w, k = w.astype(np.float64), len(rows)
        mean_sq = w @ inner[np.ix_(u, u)] @ w / k**2  # |m|^2
        trace1 = (w @ np.diag(inner)[u] - k * mean_sq) / (k - 1)
        h = gram[np.ix_(u, u)]  # (U, U)
        hw = h @ w / k  # (U,)
        centred = h - hw[:, None] - hw[None, :] + w @ hw / k  # (U, U): rows centred on the resampled mean
        root = np.sqrt(w)
        eig = np.linalg.eigvalsh(root[:, None] * centred * root[None, :])  # (U,)
        # Centring leaves one zero eigenvalue (along sqrt(w)): below the rounding floor, taken as exactly 0.
        eig[eig <= eig.max() * len(eig) * np.finfo(np.float64).eps] = 0.0
        covmean = float(np.sqrt(eig).sum()) / np.sqrt((k - 1) * (n2 - 1))
        diff_sq = mean_sq + 2.0 * (w @ towards[u]) / k + shift @ shift  # |m + mu1 - mu2|^2
        return float(diff_sq + trace1 + trace2 - 2.0 * covmean)

    return fid


class FeatureAccumulator:
    """Mean and covariance of feature vectors streamed in batches (B, D), in float64, plus the first `keep`.

    Rows are merged `CHUNK` at a time by Chan et al.'s pairwise update (chunk mean and centred scatter, then
    a rank-one correction for the shift of the mean): the covariance equals `np.cov` of the stacked rows
    within float64 rounding, and the same rows give the same bits however they were batched. The kept
    rows are stored as float32 when that is exact (the FID Inception and the encoder compute in float32),
    else as float64.

    Args:
        keep: vectors kept (the first ones); `features` / `stats().features` are all of them only while
            `n <= keep`.
        marks: counts m whose statistics of the first m rows are frozen on the way (`prefix(m)`), for runs
            reused at fewer samples.
    """

    def __init__(self, keep: int = FEATURES_KEPT, marks: Iterable[int] = ()) -> None:
        self.keep, self.marks = int(keep), frozenset(int(m) for m in marks)
        self.n = 0  # rows added
        self.dim: int | None = None  # D, from the first rows
        self._merged = 0  # rows in _mean / _scatter; the others wait in _pending
        self._mean: np.ndarray | None = None  # (D,) float64
        self._scatter: np.ndarray | None = None  # (D, D) float64: sum of outer products of centred rows
        self._pending: list[np.ndarray] = []  # (<= CHUNK rows in all, D)
        self._kept: list[np.ndarray] = []
        self._kept_rows = 0
        self._frozen: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def add(self, batch: np.ndarray | object) -> None:
        """Append feature vectors (B, D) (a NumPy array or a CPU tensor); B may be 0."""
        x = np.asarray(batch, dtype=np.float64)  # (B, D)
        if x.ndim != 2 or (self.dim is not None and x.shape[1] != self.dim):
            raise ValueError(f"features: expected a batch (B, {self.dim or 'D'}), got shape {x.shape}")
        if not len(x):
            return
        if not np.isfinite(x).all():
            raise ValueError(f"features: {int((~np.isfinite(x)).sum())} non-finite values")
        self.dim = x.shape[1]
        if self._kept_rows < self.keep:
            rows = x[: self.keep - self._kept_rows]
            narrow = rows.astype(np.float32)
            self._kept.append(narrow if np.array_equal(narrow, rows) else rows.copy())
            self._kept_rows += len(rows)
        while len(x):
            room = CHUNK - sum(map(len, self._pending))
            to_mark = min((m - self.n for m in self.marks if m > self.n), default=len(x))
            take = min(len(x), room, to_mark)
            self._pending.append(x[:take].copy())
            x, self.n = x[take:], self.n + take
            if take == room or self.n in self.marks:
                self._flush()
            if self.n in self.marks:
                self._frozen[self.n] = (self._mean.copy(), self._scatter.copy())

    @property
    def complete(self) -> bool:
        """Whether every vector added is kept."""
        return self.n <= self.keep

    @property
    def features(self) -> np.ndarray:
        """The kept vectors (min(n, keep), D), float32 when exact, else float64."""
        if not self._kept:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        return np.concatenate(self._kept) if len(self._kept) > 1 else self._kept[0]

    def _flush(self) -> None:
        if not self._pending:
            return
        x = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]  # (c, D)
        self._pending = []
        mean = x.mean(axis=0)  # (D,)
        centred = x - mean  # (c, D)
        scatter = centred.T @ centred  # (D, D)
        if self._mean is None:
            self._mean, self._scatter, self._merged = mean, scatter, len(x)
            return
        total = self._merged + len(x)
        delta = mean - self._mean  # (D,)
        self._mean = self._mean + delta * (len(x) / total)
        self._scatter = self._scatter + scatter + np.outer(delta, delta) * (self._merged * len(x) / total)
        self._merged = total

    def stats(self, *, network: str, source: str = "", resize: str = "") -> FeatureStats:
        """The statistics of every vector added (n >= 2), with the vectors when all are kept."""
        self._flush()
        if self.n < 2:
            raise ValueError(f"features: need at least 2 vectors for a covariance, got {self.n}")
        return FeatureStats(mu=self._mean.copy(), sigma=self._scatter / (self.n - 1), n=self.n, network=network,
                            resize=resize, source=source, features=self.features if self.complete else None)

    def prefix(self, count: int, *, network: str, source: str = "", resize: str = "") -> FeatureStats:
        """The statistics of the first `count` vectors: all of them, a frozen mark, or the kept vectors (whose
        first `count` come with the result when kept); any other count is a ValueError."""
        if count == self.n:
            return self.stats(network=network, source=source, resize=resize)
        kept = self.features[:count] if count <= self._kept_rows else None
        if count in self._frozen:
            mean, scatter = self._frozen[count]
            return FeatureStats(mu=mean.copy(), sigma=scatter / (count - 1), n=count, network=network,
                                resize=resize, source=source, features=kept)
        if kept is not None and count >= 2:
            return FeatureStats.from_features(kept, network=network, source=source, resize=resize, keep=True)
        raise ValueError(f"features: the first {count} of {self.n} vectors are neither kept ({self._kept_rows}) "
                         f"nor a mark ({sorted(self._frozen)})")

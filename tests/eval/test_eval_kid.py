"""Kernel Inception distance on small feature arrays: against torchmetrics' MMD and a direct double loop,
zero for one distribution, unbiased in the sample count (where FID is not), seeded, and its resampler for
the bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aligntok.eval.fid import fid_from_features
from aligntok.eval.kid import KID_SUBSET_SIZE, KID_SUBSETS, kid, kid_resampler


def _gaussian(rng: np.random.Generator, n: int, dim: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    return rng.standard_normal((n, dim)) * scale + shift  # (n, dim)


def _kid_loops(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 with the cubic kernel, written out pair by pair (x, y: (m, D) each)."""
    m, dim = len(x), x.shape[1]

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (float(a @ b) / dim + 1.0) ** 3

    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    return within - 2.0 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2


def test_protocol_defaults_are_the_papers() -> None:
    assert (KID_SUBSETS, KID_SUBSET_SIZE) == (100, 1000)


def test_kid_matches_torchmetrics_mmd_on_the_whole_sets() -> None:
    """subset_size = n: every subset is all of both sets, so the figure is the whole-set estimate, as
    torchmetrics' `poly_mmd` computes it (float64 tensors); on 2048-d features, as the evaluate stage's."""
    from torchmetrics.image.kid import poly_mmd

    rng = np.random.default_rng(0)
    x, y = np.abs(_gaussian(rng, 64, 2048)), np.abs(_gaussian(rng, 64, 2048, shift=0.3, scale=1.2))
    got = kid(x, y, subsets=3, subset_size=64)
    expected = float(poly_mmd(torch.from_numpy(x), torch.from_numpy(y)))
    assert expected > 0.1  # far apart: the relative tolerance is meaningful
    assert got.mean == pytest.approx(expected, rel=1e-10)
    assert got.subset_size == 64 and got.subsets == 1 and got.std == 0.0  # one distinct subset, not float noise
    assert kid_resampler(x, y)(np.arange(64)) == pytest.approx(expected, rel=1e-10)


def test_kid_std_is_over_distinct_subsets_only() -> None:
    """Subsets of all of one set but part of the other differ, so they keep their spread."""
    rng = np.random.default_rng(4)
    x, y = _gaussian(rng, 20, 4), _gaussian(rng, 30, 4, shift=0.5)
    got = kid(x, y, subsets=5, subset_size=50)
    assert got.subset_size == 20 and got.subsets == 5 and got.std > 1e-6 * abs(got.mean)


def test_kid_matches_a_pair_by_pair_loop() -> None:
    rng = np.random.default_rng(1)
    x, y = _gaussian(rng, 5, 3), _gaussian(rng, 5, 3, shift=0.5)
    expected = _kid_loops(x, y)
    assert kid(x, y, subsets=1, subset_size=5).mean == pytest.approx(expected, rel=1e-12)
    # subsets of 3 of 5: each one is the loop on its rows
    rows = np.random.default_rng(7)
    draws = [(rows.choice(5, 3, replace=False), rows.choice(5, 3, replace=False)) for _ in range(4)]
    per_subset = [_kid_loops(x[i], y[j]) for i, j in draws]
    got = kid(x, y, subsets=4, subset_size=3, seed=7)
    assert got.mean == pytest.approx(np.mean(per_subset), rel=1e-12)
    assert got.std == pytest.approx(np.std(per_subset), rel=1e-10)


def test_subsets_cost_route_gives_the_whole_set_route_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large sets compute each subset's kernel blocks instead of gathering from whole-set matrices: the same
    subsets, the same figure."""
    import aligntok.eval.kid as kid_module

    rng = np.random.default_rng(2)
    x, y = _gaussian(rng, 120, 16), _gaussian(rng, 90, 16, shift=0.2)
    whole = kid(x, y, subsets=10, subset_size=40, seed=3)
    monkeypatch.setattr(kid_module, "FULL_KERNEL_ROWS", 0)
    blocks = kid(x, y, subsets=10, subset_size=40, seed=3)
    assert blocks.mean == pytest.approx(whole.mean, rel=1e-12) and blocks.std == pytest.approx(whole.std, rel=1e-10)


def test_kid_of_two_draws_of_one_distribution_is_zero_within_its_spread() -> None:
    rng = np.random.default_rng(3)
    x, x2 = _gaussian(rng, 300, 32), _gaussian(rng, 300, 32)
    same = kid(x, x2, subset_size=100)
    assert same.std > 0 and abs(same.mean) < same.std
    far = kid(x, _gaussian(rng, 300, 32, shift=0.3), subset_size=100)
    assert far.mean > 5 * far.std  # and it does see a shift of 0.3 sigma per dimension


def test_kid_is_unbiased_in_the_sample_count_where_fid_is_not() -> None:
    """Two fixed Gaussians, 200 draws each at n = 50 and n = 400: KID's means agree within their standard
    errors; FID at 50 samples sits far above FID at 400 (its bias shrinks like 1/n)."""
    rng = np.random.default_rng(4)
    dim, reps = 16, 200

    def figures(n: int) -> tuple[np.ndarray, np.ndarray]:
        kids, fids = [], []
        for r in range(reps):
            x, y = _gaussian(rng, n, dim), _gaussian(rng, n, dim, shift=0.25, scale=1.1)
            kids.append(kid(x, y, subsets=1, subset_size=n, seed=r).mean)  # all of both sets
            fids.append(fid_from_features(x, y))
        return np.asarray(kids), np.asarray(fids)

    (kid50, fid50), (kid400, fid400) = figures(50), figures(400)
    kid_se = np.hypot(kid50.std(ddof=1), kid400.std(ddof=1)) / np.sqrt(reps)
    fid_se = np.hypot(fid50.std(ddof=1), fid400.std(ddof=1)) / np.sqrt(reps)
    assert kid400.mean() > 10 * kid400.std(ddof=1) / np.sqrt(reps)  # a real distance, not 0
    assert abs(kid50.mean() - kid400.mean()) < 3 * kid_se
    assert fid50.mean() - fid400.mean() > 20 * fid_se


def test_kid_is_seeded() -> None:
    rng = np.random.default_rng(5)
    x, y = _gaussian(rng, 80, 8), _gaussian(rng, 60, 8, shift=0.1)
    assert kid(x, y, subsets=20, subset_size=30, seed=11) == kid(x, y, subsets=20, subset_size=30, seed=11)
    assert kid(x, y, subsets=20, subset_size=30, seed=11).mean != kid(x, y, subsets=20, subset_size=30, seed=12).mean


def test_subset_size_is_capped_at_the_smaller_set() -> None:
    rng = np.random.default_rng(6)
    got = kid(_gaussian(rng, 30, 4), _gaussian(rng, 12, 4), subsets=2)
    assert got.subset_size == 12 and got.subsets == 2


def test_kid_refuses_bad_input_naming_the_argument() -> None:
    ok = np.zeros((4, 3))
    with pytest.raises(ValueError, match=r"^x: expected features \(N, D\) with N >= 2, got shape \(1, 3\)"):
        kid(np.zeros((1, 3)), ok)
    with pytest.raises(ValueError, match=r"^y: expected features \(N, D\)"):
        kid(ok, np.zeros(3))
    with pytest.raises(ValueError, match=r"^x, y: feature dims differ"):
        kid(ok, np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"^y: 1 non-finite values"):
        kid(ok, np.array([[0, 0, np.inf], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"^subsets: must be >= 1"):
        kid(ok, ok, subsets=0)
    with pytest.raises(ValueError, match=r"^subset_size: must be >= 2"):
        kid(ok, ok, subset_size=1)
    with pytest.raises(ValueError, match=r"^rows: need at least 2 rows"):
        kid_resampler(ok, ok)(np.array([1]))


def test_resampler_leaves_out_pairs_of_the_same_row() -> None:
    """Rows drawn with repeats: the within-x mean runs over pairs of draws that are different rows of x, so
    a repeated row is not mistaken for a second sample (which would add k(x, x) and bias KID upwards)."""
    rng = np.random.default_rng(8)
    x, y = _gaussian(rng, 6, 3), _gaussian(rng, 7, 3, shift=0.4)
    rows = np.array([0, 0, 0, 2, 3, 3])
    dim = 3

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (float(a @ b) / dim + 1.0) ** 3

    pairs = [(i, j) for i in rows for j in rows if i != j]
    within_x = np.mean([k(x[i], x[j]) for i, j in pairs])
    within_y = np.mean([k(y[i], y[j]) for i in range(7) for j in range(7) if i != j])
    cross = np.mean([k(x[i], y[j]) for i in rows for j in range(7)])
    assert kid_resampler(x, y)(rows) == pytest.approx(within_x + within_y - 2 * cross, rel=1e-12)

"""Bootstrap intervals: nominal coverage for a mean, width ~ 1/sqrt(n), seeded draws, two-set statistics with
the reference held fixed, FID's bias-shifted interval, and the Gram-matrix resamplers of FID and KID against
direct computation on the resampled rows."""

from __future__ import annotations

import numpy as np
import pytest

from aligntok.eval.bootstrap import MEAN_RESAMPLES, Interval, bootstrap_ci, ci_keys, resample_rows
from aligntok.eval.fid import fid_from_features, fid_resampler
from aligntok.eval.kid import kid_resampler


def _mean_of(values: np.ndarray) -> float:
    return float(values.mean())


def test_interval_of_a_mean_covers_the_true_mean_at_about_the_nominal_rate() -> None:
    """200 samples of 40 N(0, 1) draws: the 95% interval holds 0 in 90-99% of them (binomial sd ~1.5%)."""
    rng = np.random.default_rng(0)
    hits = 0
    for seed in range(200):
        low, high = bootstrap_ci(_mean_of, rng.standard_normal(40), resamples=1000, seed=seed)
        hits += low <= 0.0 <= high
    assert 0.90 <= hits / 200 <= 0.99


def test_width_shrinks_like_one_over_sqrt_n() -> None:
    rng = np.random.default_rng(1)

    def width(n: int) -> float:
        widths = [np.subtract(*bootstrap_ci(_mean_of, rng.standard_normal(n), resamples=MEAN_RESAMPLES, seed=s)[::-1])
                  for s in range(10)]
        return float(np.mean(widths))

    narrow, wide = width(400), width(25)
    assert wide / narrow == pytest.approx(4.0, rel=0.15)  # sqrt(400 / 25)
    assert narrow == pytest.approx(2 * 1.96 / np.sqrt(400), rel=0.1)


def test_draws_are_seeded_and_shared_by_every_statistic() -> None:
    values = np.random.default_rng(2).standard_normal(30)
    first = bootstrap_ci(_mean_of, values, seed=5)
    assert isinstance(first, Interval) and first == bootstrap_ci(_mean_of, values, seed=5)
    assert first != bootstrap_ci(_mean_of, values, seed=6)
    seen = []
    bootstrap_ci(lambda rows: seen.append(rows) or 0.0, np.arange(30), seed=5)
    assert np.array_equal(np.stack(seen), resample_rows(30, 200, 5))  # the rows the mean was resampled with
    assert ci_keys("psnr", first) == {"psnr_ci_lo": first.low, "psnr_ci_hi": first.high}


def test_a_draw_of_one_repeated_row_is_drawn_again() -> None:
    rows = resample_rows(2, 4000, seed=0)  # half of all draws of 2 from 2 are one row twice
    assert rows.shape == (4000, 2) and (rows[:, 0] != rows[:, 1]).all()


def test_two_set_statistic_resamples_only_the_evaluated_rows() -> None:
    rng = np.random.default_rng(3)
    evaluated, reference = rng.standard_normal((50, 2)), rng.standard_normal((20, 2))
    seen = []

    def gap(rows: np.ndarray, ref: np.ndarray) -> float:
        seen.append(ref)
        return float(rows.mean() - ref.mean())

    low, high = bootstrap_ci(gap, evaluated, reference, seed=1)
    assert all(ref is reference for ref in seen) and len(seen) == 200
    mean_only = bootstrap_ci(_mean_of, evaluated, seed=1)
    assert (low, high) == pytest.approx(tuple(v - reference.mean() for v in mean_only), abs=1e-12)


def test_bad_input_is_refused_naming_the_argument() -> None:
    values = np.arange(10.0)
    with pytest.raises(ValueError, match=r"^level: must lie in \(0, 1\), got 1.0"):
        bootstrap_ci(_mean_of, values, level=1.0)
    with pytest.raises(ValueError, match=r"^resamples: 20 leave no resample beyond the 0.95 interval's ends; need "
                                         r"at least 40"):
        bootstrap_ci(_mean_of, values, resamples=20)
    with pytest.raises(ValueError, match=r"^rows: expected N >= 2 rows, got shape \(1,\)"):
        bootstrap_ci(_mean_of, values[:1])
    with pytest.raises(ValueError, match=r"^rows: 1 non-finite values"):
        bootstrap_ci(_mean_of, np.array([1.0, np.nan, 2.0]))
    with pytest.raises(ValueError, match=r"^statistic: resample 0 gave nan"):
        bootstrap_ci(lambda rows: float("nan"), values)
    with pytest.raises(ValueError, match=r"^point: must be finite"):
        bootstrap_ci(_mean_of, values, point=float("inf"))


# ----------------------------------------------------------------------------- FID and KID over resampled rows
def _features(rng: np.random.Generator, n: int, dim: int, shift: float = 0.0) -> np.ndarray:
    spectrum = 1.0 / np.arange(1, dim + 1)  # decaying, like a network's features
    return rng.standard_normal((n, dim)) * np.sqrt(spectrum) + shift  # (n, dim)


@pytest.mark.parametrize(("n", "m", "dim"), [(30, 200, 64), (6, 16, 2048), (40, 25, 8)])
def test_fid_resampler_gives_fid_of_the_resampled_rows(n: int, m: int, dim: int) -> None:
    """Against `fid_from_features` on the rows themselves, repeats and all, on both of its routes."""
    rng = np.random.default_rng(4)
    a, b = _features(rng, n, dim, shift=0.1), _features(rng, m, dim)
    fid = fid_resampler(a, b)
    assert fid(np.arange(n)) == pytest.approx(fid_from_features(a, b), rel=1e-10)
    for rows in resample_rows(n, 5, seed=1):
        assert fid(rows) == pytest.approx(fid_from_features(a[rows], b), rel=1e-10)
    with pytest.raises(ValueError, match=r"^rows: expected K >= 2 row indices"):
        fid(np.array([0]))


def test_kid_resampler_on_distinct_rows_is_the_whole_set_estimate_of_those_rows() -> None:
    rng = np.random.default_rng(5)
    x, y = _features(rng, 20, 16, shift=0.2), _features(rng, 30, 16)
    rows = np.array([3, 1, 4, 15, 9, 2, 6])
    assert kid_resampler(x, y)(rows) == pytest.approx(kid_resampler(x[rows], y)(np.arange(7)), rel=1e-12)


def test_plain_percentile_fid_interval_misses_its_point_and_the_shifted_one_covers_the_expected_fid() -> None:
    """FID of 40 samples (16-d) against a fixed reference. A resample holds ~63% distinct rows and its FID
    is biased further up: the plain percentile interval lies above the point estimate. Shifted by the
    bootstrap's bias estimate (`point`), it covers E[FID_40] (mean of 1000 fresh draws) at least at the
    nominal rate; in simulation its spread is 1.3-1.9x FID's sampling spread, so it errs wide."""
    rng = np.random.default_rng(6)
    n, dim = 40, 16
    reference = _features(rng, 200, dim)
    expected = np.mean([fid_from_features(_features(rng, n, dim, shift=0.15), reference) for _ in range(1000)])
    above = covered = 0
    for seed in range(60):
        x = _features(rng, n, dim, shift=0.15)
        point, fid = fid_from_features(x, reference), fid_resampler(x, reference)
        plain = bootstrap_ci(fid, np.arange(n), seed=seed)
        shifted = bootstrap_ci(fid, np.arange(n), seed=seed, point=point)
        above += point < plain.low
        covered += shifted.low <= expected <= shifted.high
        assert shifted.low < point < shifted.high
    assert above / 60 > 0.8
    assert covered / 60 >= 0.93


def test_kid_bootstrap_is_centred_on_its_point_and_matches_its_sampling_spread() -> None:
    """KID's resampler leaves out pairs of a repeated row, so its resamples are not biased: over 20 draws of
    50 unit-variance 16-d features, their mean sits within 0.2 sd of the point (counting repeats as distinct
    pairs puts it ~2 sd above: k(x, x) = 8 against k(x, x') ~ 1), the plain percentile interval's width is
    2 x 1.96 sd of KID over 600 fresh draws within 20%, and it covers KID's expected value."""
    rng = np.random.default_rng(7)
    n, dim = 50, 16
    reference = rng.standard_normal((200, dim))

    def draw() -> np.ndarray:
        return rng.standard_normal((n, dim)) + 0.15  # (n, dim)

    fresh = [kid_resampler(draw(), reference)(np.arange(n)) for _ in range(600)]
    offsets, widths, covered = [], [], 0
    for seed in range(20):
        resampled = kid_resampler(draw(), reference)
        values = np.array([resampled(rows) for rows in resample_rows(n, 200, seed)])
        offsets.append((values.mean() - resampled(np.arange(n))) / values.std())
        low, high = bootstrap_ci(resampled, np.arange(n), seed=seed)
        assert (low, high) == pytest.approx(tuple(np.quantile(values, [0.025, 0.975])), rel=1e-12)  # same draws
        widths.append(high - low)
        covered += low <= np.mean(fresh) <= high
    assert abs(np.mean(offsets)) < 0.2
    assert np.mean(widths) == pytest.approx(2 * 1.96 * np.std(fresh), rel=0.2)
    assert covered / 20 >= 0.85

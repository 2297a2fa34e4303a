"""Streaming feature statistics (`FeatureAccumulator`) and the rank-to-rank stream (`stream_batches`): the
streamed mean and covariance equal the full-array ones within float64 rounding, the same rows give the same
bits however they are batched or spread over ranks, and the FD from streamed statistics equals the FD of the
full arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aligntok.distributed import Placement
from aligntok.eval.evaluate import fd
from aligntok.eval.fid import CHUNK, FeatureAccumulator, FeatureStats, fid_from_features, low_rank_cheaper
from aligntok.eval.stream import Rows, stream_batches


def _features(seed: int, n: int, dim: int, offset: float = 3.0) -> np.ndarray:
    """Correlated features far from the origin (the naive sum-of-squares covariance would lose digits)."""
    rng = np.random.default_rng(seed)
    return offset + rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim))  # (n, dim)


def _streamed(x: np.ndarray, sizes: list[int], **kwargs) -> FeatureAccumulator:
    acc = FeatureAccumulator(**kwargs)
    start = 0
    for size in sizes:
        acc.add(torch.from_numpy(x[start:start + size]))
        start += size
    assert start == len(x)
    return acc


def test_streamed_statistics_equal_the_full_array_ones_within_float64_rounding() -> None:
    x = _features(0, 2 * CHUNK + 300, 6)  # three chunks, the last one partial
    full = FeatureStats.from_features(x, network="n")
    stats = _streamed(x, [50] * (len(x) // 50) + [len(x) % 50], keep=0).stats(network="n")
    assert stats.n == len(x) and stats.features is None  # nothing kept: keep=0
    np.testing.assert_allclose(stats.mu, full.mu, rtol=1e-13, atol=0)
    np.testing.assert_allclose(stats.sigma, full.sigma, rtol=1e-11, atol=1e-12 * np.abs(full.sigma).max())


def test_the_same_rows_give_the_same_bits_however_they_are_batched() -> None:
    x = _features(1, CHUNK + 517, 5)
    one = _streamed(x, [len(x)]).stats(network="n")
    sevens = _streamed(x, [7] * (len(x) // 7) + [len(x) % 7]).stats(network="n")
    rounds = _streamed(x, [1000, 0, 517, 24]).stats(network="n")
    for other in (sevens, rounds):
        assert np.array_equal(other.mu, one.mu) and np.array_equal(other.sigma, one.sigma)


def test_fd_from_streamed_statistics_equals_the_fd_of_the_full_arrays() -> None:
    """Above the low-rank range the stage's FD comes from the streamed statistics; it must equal the figure
    of the old path (both full feature arrays through `fid_from_features`) within float64 rounding."""
    a, b = _features(2, 1500, 8), _features(3, 1200, 8, offset=3.5)
    assert not low_rank_cheaper(len(a), len(b), 8)
    old = fid_from_features(a, b)
    evaluated = _streamed(a, [64] * 23 + [28], keep=100).stats(network="n")
    reference = _streamed(b, [250] * 4 + [200], keep=100).stats(network="n")
    assert evaluated.features is None and reference.features is None  # more vectors than kept
    assert old > 0.1
    assert fd(evaluated, reference) == pytest.approx(old, rel=1e-10)


def test_fd_takes_the_low_rank_route_with_the_very_vectors_when_both_are_kept() -> None:
    """Few samples (the embedded default's case): the figure is bit for bit the old one, computed from the
    vectors, which float32 storage keeps exactly when they are float32 values."""
    a = _features(4, 40, 64).astype(np.float32).astype(np.float64)
    b = _features(5, 60, 64).astype(np.float32).astype(np.float64)
    evaluated, reference = _streamed(a, [16, 16, 8]).stats(network="n"), _streamed(b, [60]).stats(network="n")
    assert evaluated.features.dtype == np.float32 and np.array_equal(evaluated.features, a)
    assert fd(evaluated, reference) == fid_from_features(a, b)


def test_kept_vectors_are_float64_unless_float32_is_exact_and_stop_at_keep() -> None:
    x = _features(6, 30, 3)
    acc = _streamed(x, [10, 10, 10], keep=25)
    assert acc.features.dtype == np.float64 and np.array_equal(acc.features, x[:25])
    assert not acc.complete and acc.stats(network="n").features is None
    exact = _streamed(x.astype(np.float32).astype(np.float64), [30], keep=30)
    assert exact.features.dtype == np.float32 and exact.stats(network="n").features.shape == (30, 3)


def test_prefix_statistics_from_marks_or_kept_vectors() -> None:
    x = _features(7, CHUNK + 400, 4)
    acc = _streamed(x, [300] * 4 + [CHUNK + 400 - 1200], keep=50, marks=[1100])
    at_mark = acc.prefix(1100, network="n")  # frozen on the way, across a chunk boundary
    expected = FeatureStats.from_features(x[:1100], network="n")
    np.testing.assert_allclose(at_mark.mu, expected.mu, rtol=1e-13)
    np.testing.assert_allclose(at_mark.sigma, expected.sigma, rtol=1e-11, atol=1e-12 * np.abs(expected.sigma).max())
    assert at_mark.features is None and at_mark.n == 1100
    kept = acc.prefix(20, network="n")  # from the kept vectors, which come with it
    assert kept.n == 20 and np.array_equal(kept.features, x[:20])
    assert acc.prefix(len(x), network="n").n == len(x)
    with pytest.raises(ValueError, match="the first 500 of 1424 vectors are neither kept"):
        acc.prefix(500, network="n")


def test_a_mark_does_not_change_the_full_statistics_beyond_rounding() -> None:
    x = _features(8, 700, 4)
    plain, marked = _streamed(x, [100] * 7).stats(network="n"), _streamed(x, [100] * 7, marks=[333]).stats(network="n")
    np.testing.assert_allclose(marked.sigma, plain.sigma, rtol=1e-12)


def test_bad_batches_are_refused() -> None:
    acc = FeatureAccumulator()
    acc.add(np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"expected a batch \(B, 4\), got shape \(2, 5\)"):
        acc.add(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="1 non-finite"):
        acc.add(np.array([[0.0, 1.0, np.inf, 2.0]]))
    with pytest.raises(ValueError, match="need at least 2 vectors"):
        FeatureAccumulator().stats(network="n")


# ------------------------------------------------------------------------------------------------- stream
def _compute(index: int) -> dict[str, torch.Tensor]:
    rows = 5 if index < 6 else 3  # 7 batches, the last one short
    x = torch.from_numpy(_features(100 + index, rows, 4))
    return {"x": x, "shown": (x[:1] * 10).to(torch.uint8) if index == 0 else torch.zeros(0, 4, dtype=torch.uint8)}


def _stream_as_a_rank() -> dict | None:
    from aligntok.config import RuntimeConfig
    from aligntok.distributed import placed

    with placed(RuntimeConfig()) as place:
        sinks = {"x": FeatureAccumulator(keep=10), "shown": Rows()}
        stream_batches(_compute, sinks, 7, place, rows=lambda i: 5 if i < 6 else 3)
        if not place.is_main:
            assert sinks["shown"].parts == [] and sinks["x"].n == 0  # the other ranks' sinks stay empty
            return None
        stats = sinks["x"].stats(network="n")
        return {"mu": stats.mu, "sigma": stats.sigma, "kept": sinks["x"].features, "shown": sinks["shown"].tensor}


def test_stream_batches_feeds_rank_0_the_rows_of_one_process_in_batch_order() -> None:
    from support.ranks import spawn_ranks

    one = FeatureAccumulator(keep=10), Rows()
    stream_batches(_compute, {"x": one[0], "shown": one[1]}, 7, Placement())
    rows = np.concatenate([_compute(i)["x"].numpy() for i in range(7)])
    assert one[0].n == 33 and np.array_equal(one[0].features, rows[:10])
    three = spawn_ranks(_stream_as_a_rank, 3)  # 7 batches over 3 ranks: the last round is short
    assert three[1] is None and three[2] is None
    stats = one[0].stats(network="n")
    assert np.array_equal(three[0]["mu"], stats.mu) and np.array_equal(three[0]["sigma"], stats.sigma)
    assert np.array_equal(three[0]["kept"], rows[:10]) and torch.equal(three[0]["shown"], one[1].tensor)

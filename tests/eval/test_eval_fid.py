"""FID with the real FID network (inception-2015-12-05 from the installed wheel) on real photos from the
shared ImageNet sample: few images, since the network runs ~3-5 images/s on this CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aligntok.eval.fid import FeatureStats, fid_from_features
from aligntok.eval.inception import FEATURE_DIM, NETWORK, RESIZE, WEIGHTS_SHA1, InceptionFeatures, extract_features
from support.tiny import one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # see support.tiny.one_thread: ~3x faster on busy cores

COUNT = 16
NOISE = (0.05, 0.1, 0.2)
"""Std of the Gaussian noise added to the images (values in [0, 1], clamped after)."""


def _load(folder: Path, count: int, size: int = 96) -> torch.Tensor:
    """The first `count` photos (sorted by name), centre square resized to size: (count, 3, size, size)."""
    out = []
    for path in sorted(folder.glob("*.JPEG"))[:count]:
        img = Image.open(path).convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    return InceptionFeatures()


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    from support.paths import IMAGENET_SAMPLE

    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"{IMAGENET_SAMPLE} not present")
    return _load(IMAGENET_SAMPLE, COUNT)


@pytest.fixture(scope="module")
def features(inception: InceptionFeatures, photos: torch.Tensor) -> dict[float, np.ndarray]:
    """Features of the clean photos (noise 0) and of each noisy copy: {std: (COUNT, 2048)}."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    for std in (0.0, *NOISE):
        noisy = (photos + std * torch.randn(photos.shape, generator=generator)).clamp(0, 1)
        out[std] = extract_features(inception, noisy.split(8), total=COUNT, progress=False)
    return out


def test_network_identity_and_feature_shape(inception: InceptionFeatures, features) -> None:
    assert inception.description["weights_sha1"] == WEIGHTS_SHA1
    assert (inception.name, inception.resize) == (NETWORK, RESIZE)
    clean = features[0.0]
    assert clean.shape == (COUNT, FEATURE_DIM) and clean.dtype == np.float64
    assert clean.min() >= 0 and (clean > 0).mean() > 0.5  # average pool of ReLU maps: non-negative, dense


def test_fid_is_zero_for_the_same_set_and_grows_with_noise(features) -> None:
    clean = features[0.0]
    assert abs(fid_from_features(clean, clean)) < 1e-8 * np.trace(np.cov(clean.T))
    fids = [fid_from_features(clean, features[std]) for std in NOISE]
    assert 0 < fids[0] < fids[1] < fids[2], fids
    stats = FeatureStats.from_features(clean, network=NETWORK, resize=RESIZE, source="imagenet-sample")
    assert stats.sigma.shape == (FEATURE_DIM, FEATURE_DIM) and stats.n == COUNT


def test_features_do_not_depend_on_the_batch_and_see_content(inception: InceptionFeatures, photos, features) -> None:
    """The first two photos alone give the rows they got in a batch of 8; each one's mirror image is nearer to
    it than any other photo is (the network sees content, not pixels)."""
    clean = features[0.0]
    alone = inception(photos[:2]).numpy()
    assert np.allclose(alone, clean[:2], rtol=1e-4, atol=1e-4)
    mirrored = inception(photos[:2].flip(-1)).numpy()
    for i in range(2):
        others = np.linalg.norm(np.delete(clean, i, axis=0) - clean[i], axis=1)
        assert np.linalg.norm(mirrored[i] - clean[i]) < others.min()


def test_onnxruntime_backend_gives_the_torchscript_features(inception: InceptionFeatures, photos, features) -> None:
    """runtime.fid_backend: onnxruntime runs a graph exported from the same TorchScript file; its features
    equal the module's to float rounding, so FIDs from either backend agree."""
    ort = InceptionFeatures(backend="onnxruntime")
    assert ort.backend == "onnxruntime" and inception.backend == "torch"
    got = extract_features(ort, photos.split(8), total=COUNT, progress=False)
    clean = features[0.0]
    assert np.abs(got - clean).max() < 1e-4 * max(1.0, np.abs(clean).max())
    noisy = features[NOISE[-1]]
    assert abs(fid_from_features(got, noisy) - fid_from_features(clean, noisy)) < 1e-3


def test_onnxruntime_backend_falls_back_to_torchscript(monkeypatch: pytest.MonkeyPatch, photos,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    def no_export(*args: object, **kwargs: object) -> None:
        raise RuntimeError("exporter unavailable")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    with caplog.at_level("WARNING", logger="aligntok.eval.inception"):
        fallback = InceptionFeatures(backend="onnxruntime")
    assert fallback.backend == "torch" and fallback.session is None
    assert any("ONNX Runtime is unavailable (RuntimeError: exporter unavailable)" in r.getMessage()
               for r in caplog.records)
    assert fallback(photos[:1]).shape == (1, FEATURE_DIM)
    with pytest.raises(ValueError, match="backend 'tensorrt' is unknown"):
        InceptionFeatures(backend="tensorrt")

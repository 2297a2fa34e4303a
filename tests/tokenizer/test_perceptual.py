"""The independent perceptual network (EfficientNet-Lite0) and the discriminator carried across stages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aligntok.config import ConfigError, DiscriminatorConfig
from aligntok.tokenizer.losses import PerceptualLoss
from aligntok.tokenizer.perceptual import EFFICIENTNET_LITE0, EfficientNetFeatures, load_efficientnet_lite0
from aligntok.tokenizer.model import build_discriminator
from aligntok.tokenizer.stages import StagePaths, carry_discriminator, perceptual_loss, save_discriminator


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return load_efficientnet_lite0()


def test_the_mapped_weights_classify_real_photos(lite0: torch.nn.Module, imagenet_sample: Path) -> None:
    """A wrong name mapping would still load (shapes match) but classify at chance; 75% is Lite0's top-1."""
    import torchvision.transforms as T
    from PIL import Image
    from timm.data import ImageNetInfo

    wnids = ImageNetInfo().label_names()  # the 1,000 WordNet ids in class-index order
    files = sorted(imagenet_sample.glob("*.JPEG"))[::10][:48]
    prep = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                      T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    images = torch.stack([prep(Image.open(f).convert("RGB")) for f in files])  # (48, 3, 224, 224)
    labels = torch.tensor([wnids.index(f.name.split("_")[0]) for f in files])
    with torch.no_grad():
        top1 = (lite0(images).argmax(1) == labels).float().mean().item()
    assert top1 > 0.6, top1


def test_feature_distance_is_zero_on_identity_and_grows_with_noise(lite0: torch.nn.Module) -> None:
    loss = PerceptualLoss(EfficientNetFeatures(lite0), use_lpips=False, feature_name=EFFICIENTNET_LITE0)
    assert loss.name == EFFICIENTNET_LITE0
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    distances = [loss(x, (x + s * noise).clamp(-1, 1)).item() for s in (0.0, 0.05, 0.2, 0.5)]
    assert distances[0] < 1e-6
    assert distances == sorted(distances) and distances[1] > 0


def test_gradients_reach_the_reconstruction_and_the_network_stays_frozen(lite0: torch.nn.Module) -> None:
    loss = PerceptualLoss(EfficientNetFeatures(lite0), use_lpips=False, feature_name=EFFICIENTNET_LITE0)
    loss.train()
    assert not loss.net.training and not any(p.requires_grad for p in loss.net.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_hat = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    before = {k: v.clone() for k, v in loss.net.state_dict().items()}
    loss(x, x_hat).backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0
    assert all(torch.equal(before[k], v) for k, v in loss.net.state_dict().items())  # BN stats untouched


def test_auto_falls_back_to_efficientnet_and_lpips_without_weights_is_a_config_error(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import aligntok.tokenizer.stages as stages

    monkeypatch.setattr(stages, "find_lpips_backbone", lambda: None)
    paths = StagePaths(data=tmp_path, encoder=tmp_path, out=tmp_path)
    assert perceptual_loss("auto", paths).name == EFFICIENTNET_LITE0
    with pytest.raises(ConfigError, match="tokenizer.perceptual: 'lpips'"):
        perceptual_loss("lpips", paths)


def _disc_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    disc = build_discriminator(DiscriminatorConfig(channels=8, layers=2), 32)
    return disc, torch.optim.AdamW(disc.parameters(), lr=1e-3, betas=(0.5, 0.9))


def test_a_carried_discriminator_continues_with_its_weights_and_moments(tmp_path: Path) -> None:
    disc, opt = _disc_and_optimizer(0)
    for _ in range(3):  # a trained critic with non-zero AdamW moments
        opt.zero_grad()
        disc(torch.randn(2, 3, 32, 32)).mean().backward()
        opt.step()
    save_discriminator(tmp_path / "stage1", disc, opt)

    fresh, fresh_opt = _disc_and_optimizer(1)
    paths = StagePaths(data=tmp_path, encoder=tmp_path, out=tmp_path / "stage2", previous=tmp_path / "stage1")
    carry_discriminator("refine_decoder", paths, fresh, fresh_opt, lr=5e-5)
    for key, value in disc.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    moments = opt.state_dict()["state"]
    carried = fresh_opt.state_dict()["state"]
    assert carried.keys() == moments.keys()
    assert all(torch.equal(carried[i]["exp_avg"], moments[i]["exp_avg"]) for i in moments)
    assert [g["lr"] for g in fresh_opt.param_groups] == [5e-5]  # this stage's rate, not the old one


def test_carrying_without_a_saved_discriminator_names_the_missing_file(tmp_path: Path) -> None:
    disc, opt = _disc_and_optimizer(0)
    paths = StagePaths(data=tmp_path, encoder=tmp_path, out=tmp_path / "b", previous=tmp_path / "a")
    with pytest.raises(ConfigError, match=r"refine_decoder.carry_discriminator: .*discriminator.safetensors"):
        carry_discriminator("refine_decoder", paths, disc, opt, lr=1e-4)


def test_folding_the_frozen_batch_norms_keeps_the_features(lite0: torch.nn.Module) -> None:
    """EfficientNetFeatures folds each eval-mode batch norm into its convolution: same features to rounding,
    and gradients to the input (what the perceptual loss uses) agree too."""
    import copy

    plain = EfficientNetFeatures(copy.deepcopy(lite0), fold_norms=False)
    folded = EfficientNetFeatures(copy.deepcopy(lite0))
    n_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    assert n_norms > 40 and sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()) <= 1  # the head's
    x = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(0))

    def taps(features: EfficientNetFeatures) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        image = x.clone().requires_grad_(True)
        out = features.features(image)
        sum(v.square().mean() for v in out.values()).backward()
        return out, image.grad

    (f_plain, g_plain), (f_folded, g_folded) = taps(plain), taps(folded)
    assert list(f_plain) == list(f_folded)
    for name in f_plain:
        torch.testing.assert_close(f_folded[name], f_plain[name], rtol=1e-4, atol=1e-4 * f_plain[name].abs().max().item())
    torch.testing.assert_close(g_folded, g_plain, rtol=1e-3, atol=1e-3 * g_plain.abs().max().item())

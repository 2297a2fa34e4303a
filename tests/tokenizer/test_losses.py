"""Tokenizer losses on tiny tensors against hand-computed values; the perceptual-loss selector."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from aligntok.tokenizer import losses
from aligntok.tokenizer.losses import (
    PerceptualLoss,
    adaptive_gan_weight,
    encoder_feature_distance,
    find_lpips_backbone,
    gan_weight_at,
    hinge_d_loss,
    hinge_g_loss,
    kl_loss,
    l1_loss,
    semantic_preservation_loss,
)
from aligntok.encoder import FoundationEncoder, create_random_encoder


def test_l1_loss_is_the_mean_absolute_difference() -> None:
    x = torch.tensor([[0.0, 1.0], [2.0, -3.0]]).view(1, 1, 2, 2)
    assert l1_loss(x, torch.zeros_like(x)).item() == pytest.approx(1.5)
    assert l1_loss(x, x).item() == 0.0


def test_hinge_losses_on_known_logits() -> None:
    logits = torch.tensor([2.0, -0.5]).view(2, 1, 1, 1)
    # real: relu(1-2)=0, relu(1+0.5)=1.5 -> 0.75; fake: relu(1+2)=3, relu(1-0.5)=0.5 -> 1.75
    assert hinge_d_loss(logits, logits).item() == pytest.approx(0.5 * (0.75 + 1.75))
    assert hinge_d_loss(torch.full((2, 1, 1, 1), 1.0), torch.full((2, 1, 1, 1), -1.0)).item() == 0.0
    assert hinge_g_loss(logits).item() == pytest.approx(-0.75)


def test_kl_is_zero_for_the_prior_and_matches_a_hand_value() -> None:
    zeros = torch.zeros(3, 4, 2, 2)
    assert kl_loss(zeros, zeros).item() == 0.0
    mean = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(2, 2, 1, 1)
    logvar = torch.tensor([[0.0, 0.0], [math.log(2.0), 0.0]]).view(2, 2, 1, 1)
    # per sample, summed: 0.5 * (1 + 1 - 1 - 0) = 0.5 and 0.5 * (2 - 1 - ln 2); then the batch mean
    expected = (0.5 + 0.5 * (1.0 - math.log(2.0))) / 2
    assert kl_loss(mean, logvar).item() == pytest.approx(expected)


def test_semantic_preservation_is_mse_and_stops_gradient_at_the_target() -> None:
    z = torch.tensor([1.0, 2.0], requires_grad=True)
    source = torch.zeros(2, requires_grad=True)
    z_star = source * 1.0  # a target that is part of a graph
    loss = semantic_preservation_loss(z, z_star)
    assert loss.item() == pytest.approx(2.5)
    loss.backward()
    assert torch.allclose(z.grad, torch.tensor([1.0, 2.0]))  # 2 (z - z*) / N
    assert source.grad is None


def test_adaptive_gan_weight_is_the_ratio_of_gradient_norms_at_the_last_layer() -> None:
    last_layer = torch.nn.Parameter(torch.tensor([[1.0, 2.0]]))  # a tiny linear "decoder"
    h = torch.tensor([3.0, 4.0])
    out = last_layer @ h  # (1,)
    rec_loss = out.sum()  # grad wrt W = h, norm 5
    g_loss = -2.0 * out.sum()  # grad wrt W = -2h, norm 10
    weight = adaptive_gan_weight(rec_loss, g_loss, last_layer, base_weight=0.5)
    assert weight.item() == pytest.approx(0.5 * 5.0 / (10.0 + 1e-4))
    assert not weight.requires_grad
    rec_loss.backward()  # the graphs were retained
    assert torch.allclose(last_layer.grad, h.view(1, 2))


def test_adaptive_gan_weight_is_clamped() -> None:
    last_layer = torch.nn.Parameter(torch.tensor([[1.0, 2.0]]))
    out = (last_layer @ torch.tensor([3.0, 4.0])).sum()
    weight = adaptive_gan_weight(out, 0.0 * out, last_layer, base_weight=2.0, max_weight=100.0)
    assert weight.item() == pytest.approx(200.0)  # 5 / 1e-4 clamped to 100, times 2


@pytest.mark.parametrize(("step", "expected"), [(0, 0.0), (4, 0.0), (5, 1.0), (100, 1.0)])
def test_gan_weight_gating(step: int, expected: float) -> None:
    assert gan_weight_at(step, start_step=5) == expected


def test_encoder_feature_distance_hand_values() -> None:
    e1 = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    e2 = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    # invariant to the feature scale
    assert encoder_feature_distance({"a": e1}, {"a": 3.0 * e1}).item() == pytest.approx(0.0)
    assert encoder_feature_distance({"a": e1}, {"a": e2}).item() == pytest.approx(2.0)  # 2 - 2 cos 90
    assert encoder_feature_distance({"a": e1}, {"a": -e1}).item() == pytest.approx(4.0)
    # mean over layers
    assert encoder_feature_distance({"a": e1, "b": e1}, {"a": e2, "b": e1}).item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        encoder_feature_distance({"a": e1}, {"b": e1})


@pytest.fixture(scope="module")
def tiny_encoder() -> FoundationEncoder:
    torch.manual_seed(0)
    vit, desc = create_random_encoder("vit_small_patch14_dinov2", depth=2, image_size=28)
    return FoundationEncoder(vit, desc)


def _no_lpips(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lpips" else real(name, *a)
    )


def test_perceptual_loss_falls_back_to_the_encoder_feature_distance(
    monkeypatch: pytest.MonkeyPatch, tiny_encoder: FoundationEncoder
) -> None:
    _no_lpips(monkeypatch)
    loss_fn = PerceptualLoss(tiny_encoder)
    assert loss_fn.name == "encoder-feature-distance"
    assert loss_fn.net is not tiny_encoder  # a frozen copy: fine-tuning the tokenizer's encoder won't move it
    assert all(not p.requires_grad for p in loss_fn.net.parameters())
    assert all(p.requires_grad for p in tiny_encoder.parameters())
    loss_fn.train()
    assert not loss_fn.net.training

    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert loss_fn(x, x).item() == pytest.approx(0.0, abs=1e-6)
    x_hat = (x + 0.5 * torch.randn_like(x)).requires_grad_(True)
    value = loss_fn(x, x_hat)
    expected = encoder_feature_distance(
        tiny_encoder.features((x + 1) / 2), tiny_encoder.features((x_hat + 1) / 2)
    )
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    value.backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0


def test_perceptual_loss_needs_an_encoder_without_lpips(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_lpips(monkeypatch)
    assert find_lpips_backbone() is None
    with pytest.raises(ValueError, match="feature_encoder"):
        PerceptualLoss(None)


FAKE_LPIPS = '''
import torch

class LPIPS(torch.nn.Module):
    def __init__(self, net="alex", verbose=True, **kwargs):
        super().__init__()
        self.net = net
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, a, b):
        return self.scale * (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)
'''


def _fake_lpips(root: Path, nets: list[str], checkpoints: list[str]) -> Path:
    """A stand-in `lpips` package and torch hub cache under `root`; returns the hub dir."""
    package = root / "site" / "lpips"
    (package / "weights" / "v0.1").mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_LPIPS)
    for net in nets:
        (package / "weights" / "v0.1" / f"{net}.pth").write_bytes(b"")
    hub = root / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    for name in checkpoints:
        (hub / "checkpoints" / name).write_bytes(b"")
    return hub


@pytest.mark.parametrize(
    ("nets", "checkpoints", "expected"),
    [
        (["vgg", "alex"], ["vgg16-397923af.pth", "alexnet-owt-7be5be79.pth"], "vgg"),
        (["vgg", "alex"], ["alexnet-owt-7be5be79.pth"], "alex"),
        (["vgg", "alex"], [], None),  # package present, backbone weights not cached: never download
        ([], ["vgg16-397923af.pth"], None),  # lpips' own linear weights missing
    ],
)
def test_lpips_detection(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    nets: list[str],
    checkpoints: list[str],
    expected: str | None,
) -> None:
    hub = _fake_lpips(tmp_path, nets, checkpoints)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "lpips", raising=False)
    assert find_lpips_backbone(hub) == expected


def test_perceptual_loss_uses_lpips_when_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_encoder: FoundationEncoder
) -> None:
    hub = _fake_lpips(tmp_path, ["vgg"], ["vgg16-397923af.pth"])
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(losses.torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.delitem(sys.modules, "lpips", raising=False)
    try:
        loss_fn = PerceptualLoss(tiny_encoder)
        assert loss_fn.name == "lpips-vgg"
        assert loss_fn.net.net == "vgg"
        assert not any(p.requires_grad for p in loss_fn.net.parameters())
        x, x_hat = torch.zeros(2, 3, 8, 8), torch.full((2, 3, 8, 8), 0.5)
        assert loss_fn(x, x_hat).item() == pytest.approx(0.5)
        assert PerceptualLoss(tiny_encoder, use_lpips=False).name == "encoder-feature-distance"
    finally:
        sys.modules.pop("lpips", None)


def _grid(*vectors: list[float]) -> torch.Tensor:
    """Position vectors -> (1, D, 1, N): one image, a 1 x N grid."""
    return torch.tensor(vectors).T.reshape(1, len(vectors[0]), 1, len(vectors))


def test_vf_cosine_margin_loss_hand_values() -> None:
    from aligntok.tokenizer.losses import vf_cosine_margin_loss

    z = _grid([1.0, 0.0], [0.0, 2.0], [-3.0, 0.0])  # cos with f = 1, 0, -1
    f = _grid([1.0, 0.0], [5.0, 0.0], [1.0, 0.0])
    assert vf_cosine_margin_loss(z, f, margin=0.0).item() == pytest.approx((0.0 + 1.0 + 2.0) / 3)
    assert vf_cosine_margin_loss(z, f, margin=0.5).item() == pytest.approx((0.0 + 0.5 + 1.5) / 3)
    assert vf_cosine_margin_loss(z, f).item() == pytest.approx((0.0 + 0.5 + 1.5) / 3)  # VA-VAE's m1 = 0.5
    assert vf_cosine_margin_loss(7.0 * z, 0.1 * f, margin=0.0).item() == pytest.approx(1.0)  # scale-free
    # within the margin: cos 0.6 > 1 - 0.5 costs nothing
    assert vf_cosine_margin_loss(_grid([0.6, 0.8]), _grid([1.0, 0.0]), margin=0.5).item() == 0.0


def test_vf_cosine_margin_loss_trains_the_latent_not_the_target() -> None:
    from aligntok.tokenizer.losses import vf_cosine_margin_loss

    z = _grid([0.0, 1.0]).requires_grad_(True)
    source = torch.ones(1, requires_grad=True)
    f = _grid([1.0, 0.0]) * source
    vf_cosine_margin_loss(z, f, margin=0.0).backward()
    # d(1 - cos)/dz at z = e2, f = e1: -(f/|f| - cos z/|z|)/|z| = (-1, 0)
    assert torch.allclose(z.grad.flatten(), torch.tensor([-1.0, 0.0]))
    assert source.grad is None


def test_vf_distance_matrix_loss_hand_values() -> None:
    from aligntok.tokenizer.losses import vf_distance_matrix_loss

    z = _grid([1.0, 0.0], [0.0, 1.0])  # similarity matrix [[1, 0], [0, 1]]
    f = _grid([1.0, 0.0], [2.0, 0.0])  # similarity matrix [[1, 1], [1, 1]]
    # |diff| = [[0, 1], [1, 0]]: mean over the 4 ordered pairs, diagonal included
    assert vf_distance_matrix_loss(z, f, margin=0.0).item() == pytest.approx(0.5)
    assert vf_distance_matrix_loss(z, f, margin=0.25).item() == pytest.approx(2 * 0.75 / 4)
    assert vf_distance_matrix_loss(z, f).item() == pytest.approx(2 * 0.75 / 4)  # VA-VAE's m2 = 0.25
    assert vf_distance_matrix_loss(z, f, margin=1.0).item() == 0.0
    # three positions at 0, 60 and 90 degrees against three equal tokens: off-diagonal |diff| 0.5, 0, 0.5 (x2)
    c, s = math.cos(math.pi / 3), math.sin(math.pi / 3)
    z3 = _grid([1.0, 0.0], [c, s], [0.0, 1.0])  # similarities: (0,1) 0.5, (0,2) 0, (1,2) s
    f3 = _grid([1.0, 0.0], [1.0, 0.0], [1.0, 0.0])
    expected = 2 * ((1 - 0.5) + (1 - 0.0) + (1 - s)) / 9
    assert vf_distance_matrix_loss(z3, f3, margin=0.0).item() == pytest.approx(expected)


def test_vf_distance_matrix_loss_compares_structure_only() -> None:
    from aligntok.tokenizer.losses import vf_distance_matrix_loss

    torch.manual_seed(0)
    z = torch.randn(2, 4, 3, 3)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6))
    f = torch.einsum("ed,bdhw->behw", rotation[:, :4], z) * 3.0  # the same geometry in another, wider space
    assert vf_distance_matrix_loss(z, f, margin=0.0).item() == pytest.approx(0.0, abs=1e-6)
    shuffled = f[:, :, [2, 0, 1]]  # rows of positions moved: the structure differs
    assert vf_distance_matrix_loss(z, shuffled, margin=0.0).item() > 0.01
    z_leaf, source = z.clone().requires_grad_(True), torch.ones(1, requires_grad=True)
    vf_distance_matrix_loss(z_leaf, shuffled * source, margin=0.0).backward()
    assert z_leaf.grad.abs().sum() > 0 and source.grad is None  # the target gets no gradient
    with pytest.raises(AssertionError, match="differ in batch or grid"):
        vf_distance_matrix_loss(z, f[:, :, :2])

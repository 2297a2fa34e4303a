"""PSNR and SSIM (aligntok.eval.metrics) against known values and an independent SSIM written out here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from aligntok.eval.metrics import psnr, ssim


def ssim_reference(x: torch.Tensor, y: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Wang et al. 2004 SSIM, data range 1, Gaussian window, mean over channels and positions: (B, C, H, W)
    x2 -> (B,). Written from the paper, in float64. Positions: every pixel, the images reflect-padded by
    size // 2, as torchmetrics 1.9 does (the paper's code keeps only the 'valid' positions)."""
    pad = size // 2
    x = F.pad(x.double(), (pad, pad, pad, pad), mode="reflect")
    y = F.pad(y.double(), (pad, pad, pad, pad), mode="reflect")
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(x.shape[1], 1, size, size)  # (C, 1, k, k)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=x.shape[1])  # (B, C, H-k+1, W-k+1)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(dim=1)  # (B,)


def test_psnr_known_values() -> None:
    images = torch.zeros(2, 3, 8, 8)
    recon = torch.stack([torch.full((3, 8, 8), 0.1), torch.full((3, 8, 8), 0.01)])
    assert psnr(images, recon).tolist() == pytest.approx([20.0, 40.0], abs=1e-4)  # MSE 1e-2, 1e-4
    assert psnr(images, images)[0] == pytest.approx(100.0)  # capped by eps = 1e-10
    with pytest.raises(AssertionError):
        psnr(images, recon[:1])


def test_ssim_matches_the_paper_formula_per_image() -> None:
    torch.manual_seed(0)
    images = torch.rand(3, 3, 32, 32)
    noisy = (images + 0.1 * torch.randn_like(images)).clamp(0, 1)
    blurred = F.avg_pool2d(images, 3, stride=1, padding=1)
    recon = torch.stack([images[0], noisy[1], blurred[2]])
    out = ssim(images, recon)  # (3,)
    assert out.shape == (3,)
    assert torch.allclose(out.double(), ssim_reference(images, recon), atol=1e-5)
    assert out[0] == pytest.approx(1.0, abs=1e-6) and 0 < out[2] < out[1] < 0.99


def test_ssim_falls_with_noise_and_is_symmetric() -> None:
    torch.manual_seed(1)
    images = torch.rand(1, 3, 24, 24)
    scores = [ssim(images, (images + s * torch.randn_like(images)).clamp(0, 1)).item() for s in (0.02, 0.1, 0.3)]
    assert scores[0] > scores[1] > scores[2]
    other = torch.rand(1, 3, 24, 24)
    assert math.isclose(ssim(images, other).item(), ssim(other, images).item(), abs_tol=1e-6)

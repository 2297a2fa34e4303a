"""Image-quality metrics as pure functions of tensors (images in [0, 1])."""

from __future__ import annotations

import torch


def psnr(images: torch.Tensor, reconstructions: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Per-image PSNR in dB: (B, 3, H, W) x2 in [0, 1] -> (B,)."""
    assert images.shape == reconstructions.shape, (images.shape, reconstructions.shape)
    mse = (images - reconstructions).pow(2).flatten(1).mean(dim=1)  # (B,)
    return 10.0 * torch.log10(1.0 / (mse + eps))


def ssim(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, sigma 1.5; torchmetrics): (B, 3, H, W) x2 -> (B,)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(
        reconstructions, images, data_range=1.0, reduction="none"
    )

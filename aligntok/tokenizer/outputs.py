"""What every tokenizer shares at its boundary: the pixel-range conversions and `TokenizerOutput`.

Images in and out of `encode` / `decode` are float (B, 3, H, W) in [0, 1]; decoders predict pixels in
[-1, 1] (the LDM convention, the range the losses see).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> pixels in [-1, 1] (the decoder's and the losses' range)."""
    return images * 2.0 - 1.0


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> images in [0, 1], clamped (for output only: clamping stops gradients)."""
    return ((pixels + 1.0) / 2.0).clamp(0.0, 1.0)


@dataclass
class TokenizerOutput:
    """What a tokenizer's `forward` returns.

    latent: z (B, C, h, w); for the VAE, the reparameterised sample.
    reconstruction: x_hat (B, 3, H, W) in [-1, 1], unclamped (compare with `to_signed(images)`).
    posterior_mean, posterior_logvar: (B, C, h, w) for the VAE's KL term; None for the aligned tokenizer.
    """

    latent: torch.Tensor
    reconstruction: torch.Tensor
    posterior_mean: torch.Tensor | None = None
    posterior_logvar: torch.Tensor | None = None

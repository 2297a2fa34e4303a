"""Convolutional decoder (LDM / VA-VAE layout): latent grid (B, C, h, w) -> pixels (B, 3, H, W).

The layout follows the `Decoder` of latent diffusion (Rombach et al. 2022), which VA-VAE and the
paper reuse: `conv_in` from the latent channels, a mid block (ResnetBlock, AttnBlock, ResnetBlock),
an up path over the levels of `channel_mult` in reverse, with `num_res_blocks + 1` ResnetBlocks per
level, self-attention wherever the feature-map side is in `attn_resolutions`, nearest x2 upsampling
+ conv between levels, then GroupNorm + SiLU + `conv_out` to RGB.

The decoder predicts pixels in [-1, 1] (no tanh, unclamped); `AlignedTokenizer.decode` maps to [0, 1].
Upsampling factor = 2 ** (len(channel_mult) - 1).

The building blocks are in `blocks.py`, shared with the baseline's VAE encoder (`vae.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aligntok.tokenizer.blocks import Level, MidBlock, group_norm


class Decoder(nn.Module):
    """LDM / VA-VAE convolutional decoder: (B, latent_channels, h, w) -> (B, 3, h*f, w*f) in about [-1, 1].

    Args:
        latent_channels: C, the channels of the latent.
        channels: base width; level i has width `channels * channel_mult[i]`.
        channel_mult: width multipliers from the full-resolution level (index 0) to the lowest.
        num_res_blocks: the up path uses `num_res_blocks + 1` ResnetBlocks per level (LDM).
        attn_resolutions: feature-map sides at which every ResnetBlock is followed by attention.
        latent_size: side h of the latent grid (fixes where attention goes).
        out_channels: 3 (RGB).
    """

    def __init__(
        self,
        latent_channels: int,
        channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        latent_size: int,
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.latent_size = latent_size
        self.upsampling_factor = 2 ** (len(channel_mult) - 1)
        block_in = channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(latent_channels, block_in, kernel_size=3, padding=1)
        self.mid = MidBlock(block_in)
        levels = []
        side = latent_size
        for level in reversed(range(len(channel_mult))):  # lowest resolution first
            block_out = channels * channel_mult[level]
            attention = side in attn_resolutions
            levels.append(Level(block_in, block_out, num_res_blocks + 1, attention, "up", resample=level != 0))
            block_in = block_out
            side = side * 2 if level != 0 else side
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """conv_out.weight: the parameter at which the adaptive GAN weight compares gradient norms."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, C, h, w) -> pixels (B, 3, h*f, w*f), trained towards [-1, 1], not clamped."""
        C = self.latent_channels
        assert z.ndim == 4 and z.shape[1] == C, f"expected (B, {C}, h, w), got {tuple(z.shape)}"
        x = self.conv_in(z)  # (B, ch*mult[-1], h, w)
        x = self.mid(x)  # (B, ch*mult[-1], h, w)
        for level in self.up:
            x = level(x)  # (B, ch*mult[i], 2*side, 2*side) ... up to (B, ch*mult[0], H, W)
        x = F.silu(self.norm_out(x))  # (B, ch*mult[0], H, W)
        return self.conv_out(x)  # (B, 3, H, W)

"""Convolutional decoder (LDM / VA-VAE layout): latent grid (B, C, h, w) -> pixels (B, 3, H, W).

The layout follows the `Decoder` of latent diffusion (Rombach et al. 2022), which VA-VAE and the
paper reuse: `conv_in` from the latent channels, a mid block (ResnetBlock, AttnBlock, ResnetBlock),
an up path over the levels of `channel_mult` in reverse, with `num_res_blocks + 1` ResnetBlocks per
level, self-attention wherever the feature-map side is in `attn_resolutions`, nearest x2 upsampling
+ conv between levels, then GroupNorm + SiLU + `conv_out` to RGB.

The decoder predicts pixels in [-1, 1] (no tanh, unclamped); `AlignedTokenizer.decode` maps to [0, 1].
Upsampling factor = 2 ** (len(channel_mult) - 1).

The building blocks (`ResnetBlock`, `AttnBlock`, `Upsample`, `Downsample`) are shared with the
baseline VAE encoder in `vae.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MAX_GROUPS = 32


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with LDM's 32 groups, or gcd(32, channels) groups when 32 does not divide `channels`.

    gcd keeps the group count a power of two and always divides the channels (e.g. 24 -> 8 groups).
    """
    return nn.GroupNorm(math.gcd(MAX_GROUPS, channels), channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-Conv3x3 twice, plus a 1x1 shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        same = in_channels == out_channels
        self.shortcut = nn.Identity() if same else nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, C_out, H, W)
        return self.shortcut(x) + h  # (B, C_out, H, W)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map (1x1 conv projections)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        h = self.norm(x)  # (B, C, H, W)
        q = self.q(h).flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, HW, C)
        k = self.k(h).flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, HW, C)
        v = self.v(h).flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), softmax(q k^T / sqrt(C)) v
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj_out(h)  # (B, C, H, W)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, 2H, 2W)."""
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)  # (B, C, 2H, 2W)


class Downsample(nn.Module):
    """3x3 conv with stride 2 after a right/bottom zero pad (LDM), halving the side exactly."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H/2, W/2)."""
        x = F.pad(x, (0, 1, 0, 1))  # (B, C, H+1, W+1)
        return self.conv(x)  # (B, C, H/2, W/2)


class MidBlock(nn.Module):
    """ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution (always has attention)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        x = self.block_1(x)  # (B, C, H, W)
        x = self.attn_1(x)  # (B, C, H, W)
        return self.block_2(x)  # (B, C, H, W)


class UpLevel(nn.Module):
    """One level of the up path: ResnetBlocks (each followed by attention if enabled), then Upsample."""

    def __init__(
        self, in_channels: int, out_channels: int, num_blocks: int, attention: bool, upsample: bool
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(num_blocks)]
        )
        self.attns = nn.ModuleList([AttnBlock(out_channels) for _ in range(num_blocks)] if attention else [])
        self.upsample = Upsample(out_channels) if upsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, 2H, 2W) (or (B, C_out, H, W) at the last level)."""
        for i, block in enumerate(self.blocks):
            x = block(x)  # (B, C_out, H, W)
            if self.attns:
                x = self.attns[i](x)  # (B, C_out, H, W)
        return self.upsample(x)  # (B, C_out, 2H, 2W) or (B, C_out, H, W)


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
            levels.append(UpLevel(block_in, block_out, num_res_blocks + 1, attention, upsample=level != 0))
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

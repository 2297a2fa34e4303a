"""The convolutional building blocks of the LDM layout, shared by the `Decoder` and the baseline's
`VAEEncoder`: GroupNorm, ResnetBlock, single-head AttnBlock, x2 Up/Downsample, the mid block, and
`Level` (one level of either path: ResnetBlocks, optional attention, then the resampling).
"""

from __future__ import annotations

import math
from typing import Literal

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


class Level(nn.Module):
    """One level of the down path (`direction="down"`) or the up path (`"up"`): ResnetBlocks, each followed by
    attention if enabled, then Downsample / Upsample (or nothing at the last level).

    The resampling module is stored as `downsample` or `upsample`, LDM's names (and the state-dict keys).
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attention: bool,
                 direction: Literal["down", "up"], resample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(num_blocks)]
        )
        self.attns = nn.ModuleList([AttnBlock(out_channels) for _ in range(num_blocks)] if attention else [])
        self.resample_name = f"{direction}sample"
        kind = Downsample if direction == "down" else Upsample
        setattr(self, self.resample_name, kind(out_channels) if resample else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H/2 or 2H, ...) (or (B, C_out, H, W) without resampling)."""
        for i, block in enumerate(self.blocks):
            x = block(x)  # (B, C_out, H, W)
            if self.attns:
                x = self.attns[i](x)  # (B, C_out, H, W)
        return getattr(self, self.resample_name)(x)  # (B, C_out, H/2, W/2), (B, C_out, 2H, 2W) or as is

"""Adapter: a per-token 2-layer MLP squeezing encoder features (B, D, h, w) into the latent (B, C, h, w)."""

from __future__ import annotations

import torch
from timm.layers import Mlp
from torch import nn


class Adapter(nn.Module):
    """Linear(D -> hidden) -> GELU -> Linear(hidden -> C), applied to every token independently.

    Args:
        in_channels: D, the encoder width.
        latent_channels: C, the latent channels.
        hidden: hidden width (default: D, the paper's setting is open; we follow "hidden = encoder width").
    """

    def __init__(self, in_channels: int, latent_channels: int, hidden: int | None = None) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.mlp = Mlp(in_channels, hidden or in_channels, latent_channels, act_layer=nn.GELU)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, D, h, w) -> latent z: (B, C, h, w)."""
        assert features.ndim == 4 and features.shape[1] == self.in_channels, (
            f"expected (B, {self.in_channels}, h, w), got {tuple(features.shape)}"
        )
        x = features.permute(0, 2, 3, 1)  # (B, h, w, D)
        x = self.mlp(x)  # (B, h, w, C)
        return x.permute(0, 3, 1, 2).contiguous()  # (B, C, h, w)

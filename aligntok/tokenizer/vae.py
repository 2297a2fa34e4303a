"""The "vanilla VAE" baseline: an LDM-style convolutional encoder trained from scratch, KL-regularised.

It has the same latent shape as the aligned tokenizer for the same config (downsampling factor
2 ** (len(channel_mult) - 1) = data.resolution / latent grid) and the same `Decoder`, so the two
differ only in where the latent comes from. Images in [0, 1] are mapped to [-1, 1] before the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aligntok.tokenizer.blocks import Level, MidBlock, group_norm
from aligntok.tokenizer.decoder import Decoder
from aligntok.tokenizer.outputs import TokenizerOutput, to_signed, to_unit

LOGVAR_RANGE = (-30.0, 20.0)
"""LDM's clamp on the posterior log-variance (keeps exp(logvar) finite)."""


class VAEEncoder(nn.Module):
    """LDM Encoder, the mirror of `Decoder`: (B, 3, H, W) in [-1, 1] -> (B, 2C, H/f, W/f) = mean, logvar.

    Args:
        latent_channels: C.
        channels, channel_mult, num_res_blocks, attn_resolutions: as for `Decoder` (the down path uses
            `num_res_blocks` ResnetBlocks per level, LDM's layout).
        resolution: input side H (fixes where attention goes).
    """

    def __init__(
        self,
        latent_channels: int,
        channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.resolution = resolution
        self.downsampling_factor = 2 ** (len(channel_mult) - 1)
        self.conv_in = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1)
        levels = []
        block_in, side = channels, resolution
        for level, mult in enumerate(channel_mult):
            block_out = channels * mult
            last = level == len(channel_mult) - 1
            levels.append(Level(block_in, block_out, num_res_blocks, side in attn_resolutions, "down", resample=not last))
            block_in = block_out
            side = side if last else side // 2
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(block_in)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * latent_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) in [-1, 1] -> moments (B, 2C, h, w), h = H / f."""
        x = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            x = level(x)  # (B, ch*mult[i], H/2^i/2, ...) down to (B, ch*mult[-1], h, w)
        x = self.mid(x)  # (B, ch*mult[-1], h, w)
        x = F.silu(self.norm_out(x))  # (B, ch*mult[-1], h, w)
        return self.conv_out(x)  # (B, 2C, h, w)


class VAETokenizer(nn.Module):
    """Baseline tokenizer: VAE encoder + `Decoder`; images (B, 3, H, W) in [0, 1] <-> z (B, C, h, w)."""

    kind = "vae"

    def __init__(self, encoder: VAEEncoder, decoder: Decoder) -> None:
        super().__init__()
        grid = encoder.resolution // encoder.downsampling_factor
        if decoder.latent_channels != encoder.latent_channels or decoder.latent_size != grid:
            raise ValueError(
                f"decoder latent ({decoder.latent_channels}, {decoder.latent_size}) != encoder latent "
                f"({encoder.latent_channels}, {grid})"
            )
        self.encoder = encoder
        self.decoder = decoder
        self.latent_shape = (encoder.latent_channels, grid, grid)
        self.resolution = encoder.resolution

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's conv_out.weight (for `adaptive_gan_weight`)."""
        return self.decoder.last_layer

    def modules_by_role(self) -> dict[str, nn.Module]:
        """{"encoder", "decoder"}: every parameter belongs to exactly one role."""
        return {"encoder": self.encoder, "decoder": self.decoder}

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (B, 3, R, R) in [0, 1], R = resolution -> mean, logvar, each (B, C, h, w)."""
        R = self.resolution
        shape = tuple(images.shape)
        assert len(shape) == 4 and shape[1:] == (3, R, R), f"expected (B, 3, {R}, {R}), got {shape}"
        moments = self.encoder(to_signed(images))  # (B, 2C, h, w)
        mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        return mean, logvar.clamp(*LOGVAR_RANGE)  # (B, C, h, w) each

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, R, R) in [0, 1] -> the posterior mean (B, C, h, w) (deterministic)."""
        mean, _ = self.posterior(images)  # (B, C, h, w)
        return mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, C, h, w) -> images (B, 3, R, R) in [0, 1], clamped."""
        return to_unit(self.decoder(z))  # (B, 3, R, R)

    def forward(self, images: torch.Tensor, sample: bool = True, noise: torch.Tensor | None = None) -> TokenizerOutput:
        """images: (B, 3, R, R) in [0, 1] -> z = mean + sigma * eps (or the mean when `sample` is False),
        reconstruction (B, 3, R, R) in [-1, 1] unclamped, and mean/logvar for `kl_loss`. `noise`: eps
        (B, C, h, w), drawn by the caller (training draws it for the global batch); default `randn_like`."""
        mean, logvar = self.posterior(images)  # (B, C, h, w) each
        if sample and noise is None:
            noise = torch.randn_like(mean)  # (B, C, h, w)
        z = mean + torch.exp(0.5 * logvar) * noise if sample else mean  # (B, C, h, w)
        x_hat = self.decoder(z)  # (B, 3, R, R)
        return TokenizerOutput(latent=z, reconstruction=x_hat, posterior_mean=mean, posterior_logvar=logvar)

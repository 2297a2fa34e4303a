"""The aligned tokenizer: foundation encoder E -> adapter A -> latent z -> decoder D.

Value ranges (the public contract):
- images in and out of `encode` / `decode` are float (B, 3, H, W) in [0, 1];
- the decoder itself predicts pixels in [-1, 1] (the LDM convention, so that the L1, perceptual and
  GAN losses see the usual range); `forward` returns that raw, unclamped prediction as
  `TokenizerOutput.reconstruction`, and `decode` maps it to [0, 1] and clamps.

`build_tokenizer` builds either this model or the `vae` baseline from the typed config and checks that
the latent grid times the decoder's upsampling factor gives `data.resolution`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from aligntok.config import DiscriminatorConfig, LatentConfig, TokenizerConfig
from aligntok.tokenizer.adapter import Adapter
from aligntok.tokenizer.decoder import Decoder
from aligntok.tokenizer.discriminator import PatchDiscriminator, patch_output_side
from aligntok.encoder.vit import EncoderDescription, FoundationEncoder
from aligntok.tokenizer.outputs import TokenizerOutput, to_unit
from aligntok.tokenizer.vae import VAEEncoder, VAETokenizer


class AlignedTokenizer(nn.Module):
    """Encoder + adapter + decoder: images (B, 3, H, W) in [0, 1] <-> deterministic latent z (B, C, h, w)."""

    kind = "aligned"

    def __init__(self, encoder: FoundationEncoder, adapter: Adapter, decoder: Decoder) -> None:
        super().__init__()
        if adapter.in_channels != encoder.width:
            raise ValueError(f"adapter input {adapter.in_channels} != encoder width {encoder.width}")
        if decoder.latent_channels != adapter.latent_channels:
            raise ValueError(f"decoder input {decoder.latent_channels} != latent {adapter.latent_channels}")
        if decoder.latent_size != encoder.grid_size:
            raise ValueError(f"decoder latent side {decoder.latent_size} != encoder grid {encoder.grid_size}")
        self.encoder = encoder
        self.adapter = adapter
        self.decoder = decoder
        self.latent_shape = (adapter.latent_channels, encoder.grid_size, encoder.grid_size)
        self.resolution = encoder.grid_size * decoder.upsampling_factor

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's conv_out.weight (for `adaptive_gan_weight`)."""
        return self.decoder.last_layer

    def modules_by_role(self) -> dict[str, nn.Module]:
        """{"encoder", "adapter", "decoder"}: every parameter belongs to exactly one role."""
        return {"encoder": self.encoder, "adapter": self.adapter, "decoder": self.decoder}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [0, 1] (any H, W: the encoder resizes) -> z (B, C, h, w)."""
        features = self.encoder(images)  # (B, D, h, w)
        return self.adapter(features)  # (B, C, h, w)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, C, h, w) -> images (B, 3, h*f, w*f) in [0, 1], clamped."""
        return to_unit(self.decoder(z))  # (B, 3, H, W)

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        """images: (B, 3, H, W) in [0, 1] -> latent (B, C, h, w), reconstruction (B, 3, R, R) in [-1, 1]."""
        z = self.encode(images)  # (B, C, h, w)
        x_hat = self.decoder(z)  # (B, 3, resolution, resolution), [-1, 1] unclamped
        return TokenizerOutput(latent=z, reconstruction=x_hat)


def _decoder(tokenizer_cfg: TokenizerConfig, latent_cfg: LatentConfig, latent_size: int) -> Decoder:
    d = tokenizer_cfg.decoder
    return Decoder(
        latent_channels=latent_cfg.channels,
        channels=d.channels,
        channel_mult=d.channel_mult,
        num_res_blocks=d.num_res_blocks,
        attn_resolutions=d.attn_resolutions,
        latent_size=latent_size,
    )


def build_tokenizer(
    tokenizer_cfg: TokenizerConfig,
    latent_cfg: LatentConfig,
    encoder: nn.Module | None,
    encoder_desc: EncoderDescription | Mapping[str, Any] | None,
    resolution: int,
    kind: str = "aligned",
) -> nn.Module:
    """The tokenizer of `kind` (a stage row's): `AlignedTokenizer` or the `VAETokenizer` baseline.

    Args:
        encoder: the timm ViT (or a `FoundationEncoder`) for `aligned`; ignored for `vae`.
        encoder_desc: its description (dict from the `encoder` stage or `EncoderDescription`); for `vae`,
            when given, the baseline's latent grid must equal the aligned tokenizer's.
        resolution: `data.resolution`, the side of the images the decoder must produce.

    Raises:
        ValueError: the latent grid times the decoder upsampling factor is not `resolution`.
    """
    mult = list(tokenizer_cfg.decoder.channel_mult)
    factor = 2 ** (len(mult) - 1)
    desc = EncoderDescription.coerce(encoder_desc) if encoder_desc is not None else None
    if desc is not None and desc.image_size % desc.patch_size:
        raise ValueError(f"encoder.image_size={desc.image_size} is not a multiple of patch {desc.patch_size}")
    hint = "change tokenizer.decoder.channel_mult, data.resolution or encoder.image_size"
    if kind == "vae":
        grid = resolution // factor
        if grid * factor != resolution:
            raise ValueError(
                f"data.resolution={resolution} is not divisible by the decoder's upsampling factor {factor} "
                f"(tokenizer.decoder.channel_mult={mult}); {hint}"
            )
        if desc is not None and desc.grid_size != grid:
            raise ValueError(
                f"the vae baseline's latent grid {grid} (data.resolution={resolution} / {factor} from "
                f"tokenizer.decoder.channel_mult={mult}) differs from the aligned tokenizer's "
                f"{desc.grid_size} "
                f"(encoder.image_size={desc.image_size} / patch {desc.patch_size}); {hint}"
            )
        d = tokenizer_cfg.decoder
        vae_encoder = VAEEncoder(
            latent_channels=latent_cfg.channels,
            channels=d.channels,
            channel_mult=d.channel_mult,
            num_res_blocks=d.num_res_blocks,
            attn_resolutions=d.attn_resolutions,
            resolution=resolution,
        )
        return VAETokenizer(vae_encoder, _decoder(tokenizer_cfg, latent_cfg, grid))
    if encoder is None or desc is None:
        raise ValueError("an aligned tokenizer needs the foundation encoder and its description")
    grid = desc.grid_size
    if grid * factor != resolution:
        raise ValueError(
            f"latent grid {grid} (encoder.image_size={desc.image_size} / patch {desc.patch_size}) x decoder "
            f"upsampling {factor} (tokenizer.decoder.channel_mult={mult}) = {grid * factor}, "
            f"but data.resolution={resolution}; {hint}"
        )
    foundation = encoder if isinstance(encoder, FoundationEncoder) else FoundationEncoder(encoder, desc)
    adapter = Adapter(foundation.width, latent_cfg.channels, tokenizer_cfg.adapter_hidden)
    return AlignedTokenizer(foundation, adapter, _decoder(tokenizer_cfg, latent_cfg, grid))


def build_discriminator(cfg: DiscriminatorConfig, resolution: int) -> PatchDiscriminator:
    """PatchGAN for `resolution`-sided images; raises ValueError when `layers` leaves no logit grid."""
    side = patch_output_side(resolution, cfg.layers)
    if side < 1:
        raise ValueError(
            f"tokenizer.discriminator.layers={cfg.layers} downsamples data.resolution={resolution} "
            f"to nothing (logit grid side {side}); use fewer layers"
        )
    return PatchDiscriminator(in_channels=3, channels=cfg.channels, layers=cfg.layers)

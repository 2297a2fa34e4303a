"""Fréchet distance on the frozen foundation encoder's features (FD_dinov2, Stein et al. 2023).

The features are the encoder's patch tokens after its final norm, mean-pooled over the grid: (B, D). The
encoder is the `encoder` stage's export (`encoder.safetensors` + `encoder.json`), run through
`FoundationEncoder`, which resizes (bicubic, antialiased) to its `image_size` and normalises. The metric is
named after the encoder (`fd_dinov2` for a DINOv2 ViT); the distance is `aligntok.eval.fid.frechet_distance`
(or `fid_from_features`) on these features, as FID is on Inception's. Stein et al. use the CLS token of a
full ViT-L/14; here the encoder may be truncated (its CLS token untrained for the cut depth), so the patch
tokens are pooled instead, as the tokenizer sees them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch


def metric_name(arch: str) -> str:
    """`fd_dinov2` for any DINOv2 architecture, else `fd_<arch>` with non-word characters as `_`."""
    return "fd_dinov2" if "dinov2" in arch else "fd_" + re.sub(r"\W+", "_", arch)


class EncoderFeatures:
    """Images (B, 3, H, W) in [0, 1] -> mean-pooled tokens (B, D) float64 of the exported encoder.

    Args:
        encoder_dir: the `encoder` stage's output folder.
    """

    def __init__(self, encoder_dir: Path, device: str | torch.device = "cpu") -> None:
        from aligntok.encoder import load_encoder
        from aligntok.fileio import sha256_file
        from aligntok.encoder.vit import FoundationEncoder

        vit, desc = load_encoder(Path(encoder_dir))
        self.net = FoundationEncoder(vit, desc).eval().to(device)
        self.device = torch.device(device)
        self.name = metric_name(desc.arch)
        self.resize = f"torch-bicubic-antialias-{desc.image_size}"
        self.description: dict[str, Any] = {
            "metric": self.name, "arch": desc.arch, "depth": desc.depth, "image_size": desc.image_size,
            "feature_dim": desc.feature_width, "resize": self.resize, "pooling": "mean over patch tokens",
            "weights_sha256": sha256_file(Path(encoder_dir) / "encoder.safetensors"),
        }

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.net(images.to(self.device))  # (B, D, h, w)
        return tokens.mean(dim=(2, 3)).double().cpu()  # (B, D)


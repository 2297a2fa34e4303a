"""The foundation encoder E: a timm ViT wrapped to take images in [0, 1] and return a patch-token grid.

The wrapper owns everything the ViT expects of its input, so callers never do it themselves:
resize to `image_size` (bicubic, antialiased; a multiple of the patch size) and the mean/std
normalisation the weights were trained with. It returns the patch tokens after the final norm,
CLS/register tokens dropped, as a grid (B, D, h, w) with h = w = image_size / patch_size.
`features` exposes intermediate block outputs by name for a perceptual distance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class EncoderDescription:
    """What the tokenizer needs to know about an encoder (the `encoder` stage's JSON description)."""

    arch: str
    depth: int
    feature_width: int
    patch_size: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def grid_size(self) -> int:
        """Side h of the token grid."""
        return self.image_size // self.patch_size

    @classmethod
    def coerce(cls, value: EncoderDescription | Mapping[str, Any]) -> EncoderDescription:
        """Accept a description or the dict written by the `encoder` stage (`normalisation: {mean, std}`)."""
        if isinstance(value, EncoderDescription):
            return value
        norm = value["normalisation"]
        return cls(
            arch=str(value["arch"]),
            depth=int(value["depth"]),
            feature_width=int(value["feature_width"]),
            patch_size=int(value["patch_size"]),
            image_size=int(value["image_size"]),
            mean=tuple(float(m) for m in norm["mean"]),  # type: ignore[arg-type]
            std=tuple(float(s) for s in norm["std"]),  # type: ignore[arg-type]
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "depth": self.depth,
            "feature_width": self.feature_width,
            "patch_size": self.patch_size,
            "image_size": self.image_size,
            "normalisation": {"mean": list(self.mean), "std": list(self.std)},
        }


class FoundationEncoder(nn.Module):
    """A timm ViT (first `description.depth` blocks): images (B, 3, H, W) in [0, 1] -> tokens (B, D, h, w).

    Args:
        vit: a timm `VisionTransformer` built with `dynamic_img_size=True, num_classes=0`; blocks beyond
            `description.depth` are removed (they would hold parameters that never get a gradient).
        description: arch, depth, feature_width, patch_size, image_size, mean/std.
    """

    def __init__(self, vit: nn.Module, description: EncoderDescription | Mapping[str, Any]) -> None:
        super().__init__()
        desc = EncoderDescription.coerce(description)
        if desc.image_size % desc.patch_size:
            raise ValueError(
                f"encoder.image_size={desc.image_size} is not a multiple of the patch size {desc.patch_size}"
            )
        blocks = vit.blocks
        if len(blocks) < desc.depth:
            raise ValueError(f"encoder.depth={desc.depth} but the {desc.arch} has {len(blocks)} blocks")
        if len(blocks) > desc.depth:
            vit.blocks = blocks[: desc.depth]
        width = getattr(vit, "embed_dim", desc.feature_width)
        if width != desc.feature_width:
            raise ValueError(f"encoder feature_width={desc.feature_width} but the module's width is {width}")
        patch = tuple(vit.patch_embed.patch_size)
        if patch != (desc.patch_size, desc.patch_size):
            raise ValueError(f"encoder patch_size={desc.patch_size} but the module's patch is {patch}")
        self.vit = vit
        self.description = desc
        self.grid_size = desc.grid_size
        self.register_buffer("mean", torch.tensor(desc.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(desc.std).view(1, 3, 1, 1), persistent=False)

    @property
    def width(self) -> int:
        """D, the token width."""
        return self.description.feature_width

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [0, 1] -> (B, 3, S, S) resized to image_size S and normalised."""
        assert images.ndim == 4 and images.shape[1] == 3, f"expected (B, 3, H, W), got {tuple(images.shape)}"
        size = self.description.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(
                images, size=(size, size), mode="bicubic", antialias=True, align_corners=False
            )  # (B, 3, S, S)
        return (images - self.mean) / self.std  # (B, 3, S, S)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [0, 1] -> patch tokens after the final norm (B, D, h, w)."""
        x = self.preprocess(images)  # (B, 3, S, S)
        tokens = self.vit.forward_features(x)  # (B, P + h*w, D), P prefix (CLS/register) tokens
        tokens = tokens[:, self.vit.num_prefix_tokens :]  # (B, h*w, D)
        B, N, D = tokens.shape
        h = self.grid_size
        assert N == h * h, f"expected {h}x{h} patch tokens, got {N}"
        return tokens.transpose(1, 2).reshape(B, D, h, h)  # (B, D, h, w)

    def features(self, images: torch.Tensor, blocks: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Intermediate block outputs (no final norm), by name: {"block<k>": (B, D, h, w)}, k = blocks run.

        Args:
            images: (B, 3, H, W) in [0, 1].
            blocks: 1-based block counts to return (default: every kept block, 1..depth).
        """
        depth = len(self.vit.blocks)
        blocks = list(range(1, depth + 1)) if blocks is None else sorted(blocks)
        if not blocks or blocks[0] < 1 or blocks[-1] > depth:
            raise ValueError(f"blocks must lie in 1..{depth}, got {blocks}")
        x = self.preprocess(images)  # (B, 3, S, S)
        maps = self.vit.forward_intermediates(
            x, indices=[k - 1 for k in blocks], intermediates_only=True, stop_early=True, output_fmt="NCHW"
        )  # list of (B, D, h, w), prefix tokens dropped
        return {f"block{k}": fmap for k, fmap in zip(blocks, maps, strict=True)}


def create_random_encoder(arch: str, depth: int, image_size: int) -> tuple[nn.Module, EncoderDescription]:
    """A randomly initialised timm ViT with `depth` blocks and its description (no weights are read).

    The position embedding is sized for `image_size`, as the `encoder` stage exports it.

    Build under `with torch.device("meta"):` to count parameters of a large arch without allocating them.
    """
    import timm

    kwargs: dict[str, Any] = {"pretrained": False, "depth": depth, "dynamic_img_size": True, "num_classes": 0,
                              "img_size": image_size}
    vit = timm.create_model(arch, **kwargs)
    cfg = vit.pretrained_cfg
    desc = EncoderDescription(
        arch=arch,
        depth=depth,
        feature_width=int(vit.embed_dim),
        patch_size=int(vit.patch_embed.patch_size[0]),
        image_size=image_size,
        mean=tuple(float(m) for m in cfg["mean"]),  # type: ignore[arg-type]
        std=tuple(float(s) for s in cfg["std"]),  # type: ignore[arg-type]
    )
    return vit, desc

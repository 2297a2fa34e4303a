"""The foundation encoder as a module: its timm ViT, its description, and the wrapper the tokenizer uses.

- `create_vit`: the one builder of the timm ViT (random init; the `encoder` stage fills in weights);
- `patch_tokens`: the one place that drops the prefix (CLS/register) tokens;
- `EncoderDescription`: what `encoder.json` says (architecture, normalisation, provenance);
- `FoundationEncoder`: the ViT wrapped to take images in [0, 1] and return a patch-token grid. It owns
  everything the ViT expects of its input, so callers never do it themselves: resize to `image_size`
  (bicubic, antialiased; a multiple of the patch size) and the mean/std normalisation the weights were
  trained with. It returns the patch tokens after the final norm as a grid (B, D, h, w) with
  h = w = image_size / patch_size; `features` exposes intermediate block outputs for a perceptual distance.

Where the weights come from (`encoder.source`), and the export and loading of the kept blocks, is
`aligntok.encoder.sources`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aligntok.errors import AligntokError


class EncoderSourceError(AligntokError, RuntimeError):
    """An encoder source or setting that cannot be used; the message says which and why."""


def create_vit(arch: str, depth: int | None = None, device: str | None = None,
               img_size: int | None = None) -> nn.Module:
    """The one builder of the encoder's timm ViT: `arch` randomly initialised (no head, dynamic image size),
    optionally truncated to `depth` blocks, its position embedding sized for `img_size` (default: the
    architecture's own), on `device` (default: the current default device, so that a caller's
    `with torch.device("meta"):` holds)."""
    import timm

    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, "dynamic_img_size": True}
    if depth is not None:
        kwargs["depth"] = depth
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        with torch.device(device) if device else contextlib.nullcontext():
            model = timm.create_model(arch, **kwargs)
    except Exception as exc:  # timm raises bare RuntimeError/TypeError for unknown names and kwargs
        raise EncoderSourceError(f"cannot build timm architecture '{arch}': {exc}") from None
    if not all(hasattr(model, attr) for attr in ("blocks", "patch_embed", "num_prefix_tokens")):
        raise EncoderSourceError(f"timm architecture '{arch}' is not a ViT with patch_embed and blocks")
    return model


def patch_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The one place that drops the ViT's prefix tokens: patch tokens after the final norm, prefix
    (CLS/register) tokens dropped.

    images: (B, 3, H, W), normalised with the description's mean/std, H and W multiples of
    the patch size. Returns (B, N, D) with N = (H / patch) * (W / patch), row-major.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    tokens = model.forward_features(images)  # (B, prefix + N, D)
    return tokens[:, model.num_prefix_tokens:]  # (B, N, D)


@dataclass(frozen=True)
class EncoderDescription:
    """An exported encoder, as the `encoder` stage's `encoder.json` describes it: the architecture the
    tokenizer needs, and where the weights came from (the provenance fields are None for an encoder built
    here rather than exported)."""

    arch: str
    depth: int
    feature_width: int
    patch_size: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str | None = None
    """`encoder.source` it was exported from."""
    total_depth: int | None = None
    """Blocks of the source (`depth` of them are kept)."""
    pos_embed_grid: tuple[int, int] | None = None
    num_params: int | None = None
    source_sha256: str | None = None

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
        grid = value.get("pos_embed_grid")
        return cls(
            arch=str(value["arch"]),
            depth=int(value["depth"]),
            feature_width=int(value["feature_width"]),
            patch_size=int(value["patch_size"]),
            image_size=int(value["image_size"]),
            mean=tuple(float(m) for m in norm["mean"]),  # type: ignore[arg-type]
            std=tuple(float(s) for s in norm["std"]),  # type: ignore[arg-type]
            source=value.get("source"),
            total_depth=value.get("total_depth"),
            pos_embed_grid=tuple(int(g) for g in grid) if grid is not None else None,  # type: ignore[arg-type]
            num_params=value.get("num_params"),
            source_sha256=value.get("source_sha256"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (`encoder.json`, and the `encoder` entry of a tokenizer.json); provenance when known."""
        full = {
            "arch": self.arch,
            "source": self.source,
            "depth": self.depth,
            "total_depth": self.total_depth,
            "feature_width": self.feature_width,
            "patch_size": self.patch_size,
            "image_size": self.image_size,
            "pos_embed_grid": list(self.pos_embed_grid) if self.pos_embed_grid is not None else None,
            "normalisation": {"mean": list(self.mean), "std": list(self.std)},
            "num_params": self.num_params,
            "source_sha256": self.source_sha256,
        }
        return {k: v for k, v in full.items() if v is not None}


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
        tokens = patch_tokens(self.vit, x)  # (B, h*w, D)
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
    vit = create_vit(arch, depth=depth, img_size=image_size)
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

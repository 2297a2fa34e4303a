"""PatchGAN discriminator (pix2pix / LDM `NLayerDiscriminator`): images -> a grid of real/fake logits.

Normalisation: GroupNorm by default, not the BatchNorm of pix2pix / LDM. BatchNorm makes each logit
depend on the rest of the batch, and the real and the fake batches go through the discriminator in
separate calls, so the statistics differ between them and between the D step and the G step. It also
needs SyncBatchNorm under DDP, breaks with the tiny per-device batches of the CPU default and keeps
running statistics in the checkpoint. GroupNorm has none of these problems. `norm="batch"` gives the
LDM layout exactly (BatchNorm, no conv bias before it) for comparison.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from aligntok.tokenizer.blocks import group_norm

KERNEL = 4
PADDING = 1


def _norm(kind: Literal["group", "batch"], channels: int) -> nn.Module:
    return group_norm(channels) if kind == "group" else nn.BatchNorm2d(channels)


def patch_output_side(side: int, layers: int) -> int:
    """Side of the logit grid for an input side: `layers` stride-2 convs, then two stride-1 convs (k4, p1)."""
    for _ in range(layers):
        side = (side + 2 * PADDING - KERNEL) // 2 + 1
    for _ in range(2):
        side = side + 2 * PADDING - KERNEL + 1
    return side


class PatchDiscriminator(nn.Module):
    """NLayerDiscriminator: `layers` stride-2 4x4 convs (widths channels * min(2**n, 8)), one stride-1 conv,
    then a 4x4 conv to one logit per patch. LeakyReLU(0.2) throughout; no norm after the first conv.

    Args:
        in_channels: 3 (RGB in [-1, 1]).
        channels: width of the first conv.
        layers: number of stride-2 convs (3: 256 -> 30x30 logits, 70x70 receptive field).
        norm: "group" (default, see module docstring) or "batch" (LDM).
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 64,
        layers: int = 3,
        norm: Literal["group", "batch"] = "group",
    ) -> None:
        super().__init__()
        bias = norm != "batch"  # a conv bias before BatchNorm is redundant (LDM drops it)
        seq: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, KERNEL, stride=2, padding=PADDING),
            nn.LeakyReLU(0.2),
        ]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [
                nn.Conv2d(channels * prev, channels * mult, KERNEL, stride, PADDING, bias=bias),
                _norm(norm, channels * mult),
                nn.LeakyReLU(0.2),
            ]
        seq.append(nn.Conv2d(channels * mult, 1, KERNEL, stride=1, padding=PADDING))
        self.main = nn.Sequential(*seq)
        self.layers = layers
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [-1, 1] -> logits (B, 1, h', w'), h' = patch_output_side(H, layers)."""
        assert images.ndim == 4, f"expected (B, 3, H, W), got {tuple(images.shape)}"
        return self.main(images)  # (B, 1, h', w')


def _init_weights(module: nn.Module) -> None:
    """pix2pix / LDM init: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)

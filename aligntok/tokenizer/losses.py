"""Tokenizer losses: pure functions of tensors, plus the `PerceptualLoss` selector.

Pixel tensors here are in the decoder's range [-1, 1] (see `aligntok.tokenizer.model`).
The reconstruction loss of every stage is
    L_rec = l1_loss(x, x_hat) + w_p * perceptual(x, x_hat) + gate * w_g * hinge_g_loss(D(x_hat)),
with gate = gan_weight_at(step, start), w_g = adaptive_gan_weight(...). Stage 2 adds
w_sp * semantic_preservation_loss(z, z_star); the VAE baseline adds a small multiple of
kl_loss(mean, logvar).
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ENCODER_FEATURE_DISTANCE = "encoder-feature-distance"
LPIPS_BACKBONES: tuple[tuple[str, str], ...] = (
    ("vgg", "vgg16-397923af.pth"),  # LDM / VA-VAE use LPIPS-VGG
    ("alex", "alexnet-owt-7be5be79.pth"),
)
"""(lpips `net`, torchvision checkpoint file in `<torch hub dir>/checkpoints`), in order of preference."""


def l1_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean absolute error. x, x_hat: (B, 3, H, W) -> scalar."""
    return (x - x_hat).abs().mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss 0.5 * (mean relu(1 - real) + mean relu(1 + fake)).

    logits_real, logits_fake: (B, 1, h', w') patch logits -> scalar.
    """
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss -mean(fake). logits_fake: (B, 1, h', w') -> scalar."""
    return -logits_fake.mean()


def adaptive_gan_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    base_weight: float,
    max_weight: float = 1e4,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """LDM's adaptive GAN weight: base * clamp(|grad_last rec| / (|grad_last g| + 1e-4), 0, max), detached.

    Balances the GAN gradient against the reconstruction gradient at the decoder's last layer.
    Both losses must still hold their graphs (they are differentiated with `retain_graph=True`).

    Args:
        rec_loss, g_loss: scalars that depend on `last_layer`.
        last_layer: the decoder's output conv weight (3, C, 3, 3).
        reduce: applied to both gradients before their norms; under DDP the mean over the ranks
            (`Placement.mean`), so that the weight is the global batch's, as one process computes it.
    Returns:
        a detached scalar tensor.
    """
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    if reduce is not None:
        rec_grad, g_grad = reduce(rec_grad), reduce(g_grad)
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach() * base_weight


def gan_weight_at(step: int, start_step: int) -> float:
    """1.0 from `start_step` on, 0.0 before (the GAN term is off while the decoder warms up)."""
    return 1.0 if step >= start_step else 0.0


def semantic_preservation_loss(z: torch.Tensor, z_star: torch.Tensor) -> torch.Tensor:
    """MSE between the latent z and the frozen stage-1 latent z_star (the target, detached).

    z, z_star: (B, C, h, w) -> scalar. No gradient reaches z_star.
    """
    return F.mse_loss(z, z_star.detach())


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)), summed over the latent dims of each sample, mean over the batch.

    mean, logvar: (B, C, h, w) -> scalar; per sample 0.5 * sum(mean^2 + exp(logvar) - 1 - logvar).
    """
    per_sample = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)  # (B,)
    return per_sample.mean()


def _unit_channels(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """(B, D, ...) -> the same, each position's D-vector scaled to unit length (LPIPS' normalisation)."""
    return features / torch.sqrt(features.pow(2).sum(dim=1, keepdim=True) + eps)


def encoder_feature_distance(
    feats_x: Mapping[str, torch.Tensor], feats_x_hat: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Perceptual distance over a frozen encoder's intermediate features (not LPIPS: no learned weights).

    For each layer: unit-normalise every token's channel vector, take the squared difference summed
    over channels (= 2 - 2 cos), average over tokens and batch; then average over layers.

    Args:
        feats_x, feats_x_hat: {name: (B, D, h, w)} with the same names and shapes.
    Returns:
        scalar in [0, 4].
    """
    if set(feats_x) != set(feats_x_hat) or not feats_x:
        raise ValueError(f"feature names differ or are empty: {sorted(feats_x)} vs {sorted(feats_x_hat)}")
    per_layer = []
    for name, fx in feats_x.items():
        diff = _unit_channels(fx) - _unit_channels(feats_x_hat[name])  # (B, D, h, w)
        per_layer.append(diff.pow(2).sum(dim=1).mean())  # scalar
    return torch.stack(per_layer).mean()


def find_lpips_backbone(hub_dir: str | Path | None = None) -> str | None:
    """The lpips backbone usable offline ("vgg" preferred, then "alex"), or None.

    Usable means: the `lpips` package is importable, its linear-layer weights (`weights/v0.1/<net>.pth`,
    shipped inside the package) are present, and the torchvision backbone checkpoint is already in the
    torch hub cache (`<hub_dir>/checkpoints`). Nothing is imported or downloaded.
    """
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):  # a broken install, or a module without a spec
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    checkpoints = Path(hub_dir if hub_dir is not None else torch.hub.get_dir()) / "checkpoints"
    for net, checkpoint in LPIPS_BACKBONES:
        if (package / "weights" / "v0.1" / f"{net}.pth").is_file() and (checkpoints / checkpoint).is_file():
            return net
    return None


class PerceptualLoss(nn.Module):
    """LPIPS when its weights are on disk (and `use_lpips`), else `encoder_feature_distance` on a frozen
    feature network.

    `name` says which: "lpips-vgg" (or "lpips-alex"), or `feature_name` ("efficientnet-lite0" for
    `aligntok.tokenizer.perceptual.EfficientNetFeatures`, "encoder-feature-distance" for the foundation encoder);
    log it with the metrics, since the scales differ. The network is frozen and stays in eval mode.

    Args:
        feature_encoder: a module with `features(images in [0, 1], blocks) -> {name: (B, D, h, w)}` (a
            `FoundationEncoder` or `EfficientNetFeatures`); deep-copied, so later fine-tuning of the
            tokenizer's own encoder does not move the loss. Required when lpips is not used.
        blocks: which encoder blocks to compare (default: all kept blocks).
        use_lpips: False forces the feature distance.
        feature_name: the name recorded for the feature distance.
    """

    def __init__(
        self,
        feature_encoder: nn.Module | None = None,
        blocks: Sequence[int] | None = None,
        use_lpips: bool = True,
        feature_name: str = ENCODER_FEATURE_DISTANCE,
    ) -> None:
        super().__init__()
        backbone = find_lpips_backbone() if use_lpips else None
        if backbone is not None:
            import lpips

            self.net: nn.Module = lpips.LPIPS(net=backbone, verbose=False)
            self.name = f"lpips-{backbone}"
        elif feature_encoder is not None:
            self.net = copy.deepcopy(feature_encoder)
            self.name = feature_name
        else:
            raise ValueError("lpips weights are not available offline and no feature_encoder was given")
        self.blocks = list(blocks) if blocks is not None else None
        self.net.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.net.eval()  # frozen network: never in training mode
        return self

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """x (target), x_hat (reconstruction): (B, 3, H, W) in [-1, 1] -> scalar; gradients flow to x_hat."""
        if self.name.startswith("lpips-"):
            return self.net(x_hat, x).mean()  # lpips takes [-1, 1]; (B, 1, 1, 1) -> scalar
        with torch.no_grad():
            feats_x = self.net.features((x + 1.0) / 2.0, self.blocks)  # {name: (B, D, h, w)}
        feats_x_hat = self.net.features((x_hat + 1.0) / 2.0, self.blocks)  # {name: (B, D, h, w)}
        return encoder_feature_distance(feats_x, feats_x_hat)


# VA-VAE's vision-foundation ("VF") alignment (Yao et al. 2025, "Reconstruction vs. Generation: Taming
# Optimization Dilemma in Latent Diffusion Models"): the latent z (B, C, h, w), projected by a trained
# 1x1 conv to the foundation width D, is pulled towards the frozen encoder's tokens f (B, D, h, w):
#     L_vf = w_vf * (vf_cosine_margin_loss(W z, f, m1) + vf_distance_matrix_loss(W z, f, m2)),
# VA-VAE's margins m1 = 0.5, m2 = 0.25 (tokenizer config `vavae_f16d32.yaml`); w_vf may be scaled by the
# gradient-norm ratio at the encoder's last layer (`adaptive_gan_weight` with max 1e8, VA-VAE's clamp).
VF_COS_MARGIN = 0.5
VF_DISTMAT_MARGIN = 0.25
VF_ADAPTIVE_MAX = 1e8
"""VA-VAE's upper clamp on the adaptive VF weight (the GAN's is 1e4)."""


def vf_cosine_margin_loss(z_proj: torch.Tensor, f: torch.Tensor, margin: float = VF_COS_MARGIN) -> torch.Tensor:
    """Marginal cosine similarity: mean over batch and positions of relu(1 - margin - cos(z'_ij, f_ij)).

    A position whose projected latent is within cosine 1 - margin of the encoder's token costs nothing.

    Args:
        z_proj: z' (B, D, h, w), the projected latent.
        f: (B, D, h, w), the frozen encoder's tokens on the same grid (the target: no gradient reaches it).
    Returns:
        scalar in [0, 2 - margin].
    """
    assert z_proj.ndim == 4 and z_proj.shape == f.shape, f"z' {tuple(z_proj.shape)} != f {tuple(f.shape)}"
    cos = F.cosine_similarity(z_proj, f.detach(), dim=1)  # (B, h, w)
    return F.relu(1.0 - margin - cos).mean()


def _self_similarity(features: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> cosine similarity between every pair of positions, (B, h*w, h*w)."""
    unit = F.normalize(features.flatten(2), dim=1)  # (B, D, N)
    return unit.transpose(1, 2) @ unit  # (B, N, N)


def vf_distance_matrix_loss(z_proj: torch.Tensor, f: torch.Tensor, margin: float = VF_DISTMAT_MARGIN) -> torch.Tensor:
    """Marginal distance matrix: per image, the positions' cosine-similarity matrices of z' and f, then
    mean over batch and all ordered pairs (i, j), i = j included as in VA-VAE, of relu(|S'_ij - S_ij| - margin).

    Only the similarity structure is compared, so the channel widths may differ.

    Args:
        z_proj: z' (B, D', h, w).
        f: (B, D, h, w), the target (no gradient reaches it).
    Returns:
        scalar in [0, 2 - margin].
    """
    assert z_proj.ndim == 4 and f.ndim == 4 and (z_proj.shape[0], *z_proj.shape[2:]) == (f.shape[0], *f.shape[2:]), (
        f"z' {tuple(z_proj.shape)} and f {tuple(f.shape)} differ in batch or grid"
    )
    diff = (_self_similarity(z_proj) - _self_similarity(f.detach())).abs()  # (B, N, N)
    return F.relu(diff - margin).mean()

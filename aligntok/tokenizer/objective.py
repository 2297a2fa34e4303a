"""The tokenizer's training objective: what one step of a tokenizer stage minimises.

`TokenizerObjective` composes L_rec = l1 + perceptual + w_g * GAN with semantic preservation to a frozen
snapshot of the stage-1 encoder and adapter (`SemanticTarget`, stage 2), the VAE's KL, and VA-VAE's
vision-foundation alignment (`VFAlignment`); the loss terms themselves are the pure functions of
`aligntok.tokenizer.losses`. The stage engine (`aligntok.tokenizer.stages`) builds it from a row and hands it to the
training loop, which calls it once per step."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from aligntok.config import TokenizerStageConfig
from aligntok.distributed import Placement
from aligntok.tokenizer.losses import (
    VF_ADAPTIVE_MAX,
    PerceptualLoss,
    adaptive_gan_weight,
    gan_weight_at,
    hinge_d_loss,
    hinge_g_loss,
    kl_loss,
    l1_loss,
    semantic_preservation_loss,
    vf_cosine_margin_loss,
    vf_distance_matrix_loss,
)
from aligntok.tokenizer.outputs import to_signed
from aligntok.train.loop import StepLosses


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """`module`'s parameters out of the graph for a while: gradients still flow through it to its input.

    The generator's GAN term goes through the discriminator, whose own gradients from that term are never
    used (its optimiser zeroes them); keeping them out of the graph also keeps its DDP from seeing a backward
    it did not run a forward for."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class TokenizerObjective:
    """L_rec = l1 + perceptual + w_g * GAN, plus semantic preservation (stage 2), KL (VAE) and VA-VAE's
    VF alignment (`vf`, when `losses.vf > 0`).

    Under several ranks (`place`) the trained modules run in DDP (the model, the discriminator and the VF
    head, each its own), each rank on its slice of the global batch; the adaptive weights use the gradients
    averaged over the ranks, and the VAE's posterior noise is drawn for the global batch from the CPU
    generator and sliced, so N ranks compute what one process computes on the whole batch. `channels_last`:
    the memory format the model runs in (the VAE's noise is drawn in it, as `torch.randn_like` of its
    posterior would)."""

    def __init__(self, model: nn.Module, cfg: TokenizerStageConfig, perceptual: PerceptualLoss | None,
                 discriminator: nn.Module | None, semantic_target: nn.Module | None,
                 vf: VFAlignment | None = None, place: Placement | None = None, channels_last: bool = False) -> None:
        self.model, self.w, self.perceptual = model, cfg.losses, perceptual
        self.discriminator, self.semantic_target, self.vf = discriminator, semantic_target, vf
        self.place, self.channels_last = place or Placement(), channels_last
        self.net = self.place.wrap(model)  # the forward (and backward) of the trained model
        self.critic = self.place.wrap(discriminator) if discriminator is not None else None
        if vf is not None:
            vf.head_forward = self.place.wrap(vf.head)

    def posterior_noise(self, rows: int) -> torch.Tensor:
        """eps (rows, C, h, w) on the device: this rank's rows of a standard normal draw for the global batch,
        from the default CPU generator (restored from checkpoints, the same on every rank)."""
        total = rows * self.place.world_size
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        eps = torch.randn_like(torch.empty((total, *self.model.latent_shape), memory_format=layout))
        return eps[self.place.rank_slice(total)].to(self.place.device)  # (rows, C, h, w)

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor], step: int) -> StepLosses:
        images, _ = batch  # (B, 3, R, R) in [0, 1]
        with self.place.autocast():
            return self._losses(images, step)

    def _losses(self, images: torch.Tensor, step: int) -> StepLosses:
        reduce = self.place.mean  # gradients of the global batch for the adaptive weights
        out = self.net(images, noise=self.posterior_noise(len(images))) if self.model.kind == "vae" \
            else self.net(images)
        x, x_hat = to_signed(images), out.reconstruction  # (B, 3, R, R) in [-1, 1]
        l1 = l1_loss(x, x_hat)
        rec = self.w.l1 * l1
        logs = {"l1": l1.item()}
        if self.perceptual is not None and self.w.perceptual > 0:
            p = self.perceptual(x, x_hat)
            rec = rec + self.w.perceptual * p
            logs["perceptual"] = p.item()
        total = rec
        if self.semantic_target is not None and self.w.semantic > 0:
            with torch.no_grad():
                z_star = self.semantic_target(images)  # (B, C, h, w), frozen stage-1 encoder + adapter
            sp = semantic_preservation_loss(out.latent, z_star)
            total = total + self.w.semantic * sp
            logs["semantic"] = sp.item()
        if out.posterior_mean is not None and self.w.kl > 0:
            kl = kl_loss(out.posterior_mean, out.posterior_logvar)
            total = total + self.w.kl * kl
            logs["kl"] = kl.item()
        if self.vf is not None and self.w.vf > 0:
            cos, distmat = self.vf(out.latent, images)  # the latent the decoder sees (VAE: the sample, as VA-VAE)
            vf = cos + distmat
            weight = (adaptive_gan_weight(rec, vf, latent_output_layer(self.model), self.w.vf, VF_ADAPTIVE_MAX,
                                          reduce=reduce) if self.w.vf_adaptive else self.w.vf)
            total = total + weight * vf
            logs |= {"vf_cos": cos.item(), "vf_distmat": distmat.item(), "vf_weight": float(weight)}
        aux: dict[str, torch.Tensor] = {}
        if self.discriminator is not None and gan_weight_at(step, self.w.gan_start) > 0:
            with frozen(self.discriminator):
                g = hinge_g_loss(self.discriminator(x_hat))
            weight = adaptive_gan_weight(rec, g, self.model.last_layer, self.w.gan, reduce=reduce)
            total = total + weight * g
            aux["discriminator"] = hinge_d_loss(self.critic(x), self.critic(x_hat.detach()))
            logs |= {"gan_g": g.item(), "gan_weight": float(weight)}
        return StepLosses(main=total, aux=aux, logs=logs)


class SemanticTarget(nn.Module):
    """A frozen snapshot of encoder + adapter: z* = A*(E*(x)) for the semantic preservation loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(model.encoder).requires_grad_(False).eval()
        self.adapter = copy.deepcopy(model.adapter).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> SemanticTarget:
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.encoder(images))  # (B, C, h, w)


class VFAlignment:
    """VA-VAE's VF loss (Yao et al. 2025): a trained 1x1 conv `head` projects the latent C -> D (no bias, as
    VA-VAE's `linear_proj`), and the frozen foundation encoder's tokens are the target.

    The head is a separate module, trained by the main optimiser and checkpointed as role "vf_head"; it is
    never part of the tokenizer, whose saved weights load as before. The target is the `encoder` stage's
    export, frozen even where the tokenizer fine-tunes its own copy. When the encoder's token grid differs
    from the latent grid, the tokens are resized to the latent's grid by adaptive average pooling.
    """

    def __init__(self, target: nn.Module, latent_channels: int, cos_margin: float, distmat_margin: float) -> None:
        self.target = target.requires_grad_(False).eval()
        self.head = nn.Conv2d(latent_channels, target.width, kernel_size=1, bias=False)
        self.head_forward: nn.Module = self.head
        """What runs the head: the head itself, or its DDP under several ranks (`TokenizerObjective`)."""
        self.cos_margin, self.distmat_margin = cos_margin, distmat_margin

    def __call__(self, latent: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent z (B, C, h, w), images (B, 3, R, R) in [0, 1] -> (cosine-margin, distance-matrix) losses."""
        with torch.no_grad():
            f = self.target(images)  # (B, D, h', w')
            if f.shape[-2:] != latent.shape[-2:]:
                f = nn.functional.adaptive_avg_pool2d(f, latent.shape[-2:])  # (B, D, h, w)
        z_proj = self.head_forward(latent)  # (B, D, h, w)
        return (vf_cosine_margin_loss(z_proj, f, self.cos_margin),
                vf_distance_matrix_loss(z_proj, f, self.distmat_margin))


def latent_output_layer(model: nn.Module) -> torch.Tensor:
    """Weight of the layer that outputs the latent, where `losses.vf_adaptive` balances the VF gradient
    against L_rec's (VA-VAE's `enc_last_layer`): the VAE encoder's conv_out, or the adapter's last linear."""
    return model.encoder.conv_out.weight if model.kind == "vae" else model.adapter.mlp.fc2.weight

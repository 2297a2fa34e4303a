"""LightningDiT: a diffusion transformer predicting the flow-matching velocity on the latent grid.

Layout follows DiT (Peebles & Xie) with the LightningDiT changes (Yao et al., VA-VAE): patch size 1,
RMSNorm, SwiGLU MLP, 2-D rotary position embedding in attention, optional QKNorm. Conditioning is
adaLN-Zero on (timestep embedding + class embedding); every modulation Linear and the output
Linear start at zero, so a fresh model outputs exactly zero.

Shapes: x (B, C, H, W) latent; t (B,) float in [0, 1] (1 = noise); y (B,) long in [0, num_classes],
where `num_classes` itself is the null class used for classifier-free guidance.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from timm.layers import SwiGLU
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from aligntok.config import DiTConfig

PRESETS: dict[str, dict[str, Any]] = {
    # T/1 is the CPU default: 1.3M parameters; forward + backward + AdamW at batch 64 on an 8x8x32 latent
    # ran 4.0 steps/s on 2 idle cores (width 192 x depth 6: 1.6 steps/s). S..XL follow DiT's sizes.
    "LightningDiT-T/1": dict(depth=4, hidden_size=128, num_heads=4, patch_size=1, mlp_ratio=4.0),
    "LightningDiT-S/1": dict(depth=12, hidden_size=384, num_heads=6, patch_size=1, mlp_ratio=4.0),
    "LightningDiT-B/1": dict(depth=12, hidden_size=768, num_heads=12, patch_size=1, mlp_ratio=4.0),
    "LightningDiT-L/1": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=1, mlp_ratio=4.0),
    "LightningDiT-XL/1": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=1, mlp_ratio=4.0),
}

TIME_SCALE = 1000.0
"""t in [0, 1] is multiplied by this before the sinusoidal embedding, so its frequencies cover the
same range as DiT's integer timesteps 0..999 (with t in [0, 1] the slow frequencies barely move)."""


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D), shift/scale (B, D) -> (B, N, D) = x * (1 + scale) + shift, as one fused op."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos absolute position embedding (MAE/DiT): (h*w, dim), row-major over (h, w)."""
    assert dim % 4 == 0, f"pos-embed width {dim} must be a multiple of 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")  # (h, w) each
    parts = []
    for pos in (rows.reshape(-1), cols.reshape(-1)):
        angle = pos[:, None] * omega[None]  # (h*w, dim/4)
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()  # (h*w, dim)


class TimestepEmbedder(nn.Module):
    """t (B,) in [0, 1] -> (B, D): sinusoidal frequency embedding then a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def frequency_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """t (B,) -> (B, dim) = [cos(t·f), sin(t·f)] over dim/2 geometric frequencies f in (1/max_period, 1]."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]  # (B, dim/2)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*(dim/2))
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # (B, dim)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.frequency_embedding(t * TIME_SCALE, self.frequency_size)  # (B, F)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """y (B,) -> (B, D), with row `num_classes` as the null (unconditional) class.

    In training, each label is replaced by the null class with probability `dropout_prob`;
    `force_drop` (B,) bool replaces chosen labels in any mode (used to test and to build CFG batches).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def token_drop(self, labels: torch.Tensor, force_drop: torch.Tensor | None) -> torch.Tensor:
        """labels (B,) -> (B,) with dropped entries set to the null class."""
        if force_drop is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob  # (B,)
        else:
            drop = force_drop.to(device=labels.device, dtype=torch.bool)  # (B,)
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)  # (B,)

    def forward(self, labels: torch.Tensor, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        if (self.training and self.dropout_prob > 0) or force_drop is not None:
            labels = self.token_drop(labels, force_drop)  # (B,)
        return self.embedding_table(labels)  # (B, D)


class RotaryEmbedding2D(nn.Module):
    """2-D RoPE over a (h, w) token grid, for heads of width `head_dim` (a multiple of 4).

    Channel pairs (i, i + head_dim/2) are rotated by an angle: the first head_dim/4 pairs by
    row · f_k, the last head_dim/4 by column · f_k, with f_k = theta^(-k / (head_dim/4)). Then
    <rope(q, p), rope(k, p')> depends on p - p' only. Tables are cached per (h, w, device, dtype).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        assert head_dim % 4 == 0, f"RoPE-2D needs head_dim divisible by 4, got {head_dim}"
        self.head_dim = head_dim
        self.theta = theta
        self._cache: dict[tuple[int, int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin tables, each (h*w, head_dim), tokens in row-major order. The sin table's first
        half is negated, so that `rotate` needs no negation: rot(x) = roll(x, d/2) * signed_sin."""
        key = (h, w, torch.device(device), dtype)
        if key not in self._cache:
            self._cache[key] = self._compute_tables(h, w, device, dtype)
        return self._cache[key]

    @torch.inference_mode(False)  # tables first built while sampling must still serve training
    def _compute_tables(self, h: int, w: int, device: torch.device, dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Angles in float64, so the tables are exact to the target dtype for large grids."""
        quarter = self.head_dim // 4
        freqs = self.theta ** (-torch.arange(quarter, dtype=torch.float64, device=device) / quarter)  # (d/4,)
        rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=device),
                                    torch.arange(w, dtype=torch.float64, device=device), indexing="ij")
        angles = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=1)  # (N, d/2)
        angles = torch.cat([angles, angles], dim=1)  # (N, d): pair (i, i + d/2) shares angle i
        sign = torch.cat([-torch.ones(self.head_dim // 2), torch.ones(self.head_dim // 2)]).to(device, torch.float64)
        return angles.cos().to(dtype), (angles.sin() * sign).to(dtype)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """x (..., N, d), cos/signed_sin (N, d) from `tables` -> (..., N, d): each pair (x_i, x_{i+d/2})
        rotated by its angle, [x_i cos - x_{i+d/2} sin, x_{i+d/2} cos + x_i sin], in three kernels."""
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)  # (..., N, d)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        cos, sin = self.tables(h, w, x.device, x.dtype)  # (N, d) each
        return self.rotate(x, cos, sin)  # (B, heads, N, d)


class Attention(nn.Module):
    """Multi-head self-attention with 2-D RoPE on q and k and optional QKNorm (RMSNorm per head)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        assert dim % num_heads == 0, f"width {dim} not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qk_norm = qk_norm
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.rope = RotaryEmbedding2D(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, d)
        qk, v = qkv[:2], qkv[2]  # (2, B, heads, N, d), (B, heads, N, d)
        if self.qk_norm:  # in float32: under bf16 autocast q, k are bf16 and the norm weights float32
            qk = torch.stack([self.q_norm(qk[0].float()), self.k_norm(qk[1].float())]).to(v.dtype)
        q, k = self.rope(qk, *grid).unbind(0)  # q and k rotated in one pass: (B, heads, N, d) each
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.proj(x)  # (B, N, D)


def swiglu_hidden(hidden_size: int, mlp_ratio: float) -> int:
    """LightningDiT's SwiGLU width: 2/3 of the plain MLP width, so the parameter count matches it."""
    return int(2 / 3 * int(hidden_size * mlp_ratio))


class LightningDiTBlock(nn.Module):
    """RMSNorm -> attention and RMSNorm -> SwiGLU, each shifted/scaled/gated by adaLN-Zero from c."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False) -> None:
        super().__init__()
        # the norms carry no affine weight: adaLN's (1 + scale) takes that role
        self.norm1 = nn.RMSNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm)
        self.norm2 = nn.RMSNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = SwiGLU(hidden_size, swiglu_hidden(hidden_size, mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=1))  # (B, D) each
        # gated residuals x + gate * f(x), each one fused op
        x = torch.addcmul(x, gate_msa.unsqueeze(1), self.attn(modulate(self.norm1(x), shift_msa, scale_msa), grid))
        return torch.addcmul(x, gate_mlp.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    """adaLN-modulated RMSNorm then Linear(D -> p*p*C), both modulation and output zero-initialised."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.RMSNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (B, D) each
        x = modulate(self.norm_final(x), shift, scale)  # (B, N, D)
        return self.linear(x)  # (B, N, p*p*C)


class LightningDiT(nn.Module):
    """Velocity model v_theta(z_t, t, y) on a (C, input_size, input_size) latent grid.

    Args:
        input_size: latent side H = W (a multiple of `patch_size`).
        in_channels: latent channels C (the output has the same shape as the input).
        num_classes: class count K; label K is the null class for classifier-free guidance.
        patch_size: p; tokens are (H/p)·(W/p).
        hidden_size, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP ratio.
        class_dropout: probability of replacing a label by the null class in training.
        qk_norm: RMSNorm on q and k per head (stabilises long runs).
    """

    def __init__(self, input_size: int, in_channels: int, num_classes: int, patch_size: int = 1,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 class_dropout: float = 0.1, qk_norm: bool = False) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"latent side {input_size} is not a multiple of patch size {patch_size}")
        self.input_size = input_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.grid = (input_size // patch_size, input_size // patch_size)
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout)
        # fixed absolute positions as LightningDiT keeps them next to RoPE; a buffer, not a parameter
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, *self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(
            [LightningDiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT init: xavier Linears, N(0, 0.02) embeddings, zero adaLN modulation and output layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [block.adaLN_modulation[-1] for block in self.blocks] + [
                self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        B, (h, w), p, C = x.shape[0], self.grid, self.patch_size, self.in_channels
        x = x.reshape(B, h, w, p, p, C)  # (B, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, p)
        return x.reshape(B, C, h * p, w * p)  # (B, C, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) in [0, 1], y (B,) long -> velocity (B, C, H, W).

        `force_drop` (B,) bool replaces the chosen labels by the null class in any mode.
        """
        expected = (self.in_channels, self.input_size, self.input_size)
        assert x.ndim == 4 and tuple(x.shape[1:]) == expected, f"expected (B, {expected}), got {tuple(x.shape)}"
        assert t.shape == (x.shape[0],) and y.shape == (x.shape[0],), (
            f"t and y must be (B,)=({x.shape[0]},), got {tuple(t.shape)} and {tuple(y.shape)}")
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(y, force_drop)  # (B, D)
        for block in self.blocks:
            x = block(x, c, self.grid)  # (B, N, D)
        x = self.final_layer(x, c)  # (B, N, p*p*C)
        return self.unpatchify(x)  # (B, C, H, W)


def build_dit(cfg: DiTConfig, latent_channels: int, latent_size: int, num_classes: int) -> LightningDiT:
    """The LightningDiT named by `cfg.preset`, over a (latent_channels, latent_size, latent_size) latent.

    Raises:
        ValueError: unknown `dit.preset` (the message lists the known names).
    """
    if cfg.preset not in PRESETS:
        raise ValueError(f"dit.preset={cfg.preset!r} is unknown; known presets: {', '.join(PRESETS)}")
    return LightningDiT(input_size=latent_size, in_channels=latent_channels, num_classes=num_classes,
                        class_dropout=cfg.class_dropout, qk_norm=cfg.qk_norm, **PRESETS[cfg.preset])

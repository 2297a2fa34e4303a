"""A FLUX-style text-conditioned DiT: velocity v_theta(z_t, t, caption) on the latent grid.

What FLUX.1 (Black Forest Labs, 2024; the MMDiT of SD3, Esser et al.) does: text tokens from T5 are projected
to the model width (`txt_in`), a pooled CLIP vector plus the timestep embedding form the modulation vector
(`vector_in`), then N "double-stream" blocks keep separate weights for the text and the image tokens (norms,
adaLN modulation, qkv, proj, MLP) but attend jointly over the concatenated [text; image] sequence, and 2N
"single-stream" blocks process the joined sequence with one set of weights, attention and MLP in parallel.
QK-norm (RMSNorm per head) everywhere; RoPE with position ids in which text tokens sit at 0 (no rotation).
The final layer reads the image tokens only.

What this one simplifies or changes:
- RMSNorm without affine weight instead of LayerNorm, SwiGLU (timm, 2/3 width, the same parameter count)
  instead of the GELU MLP, 2-D RoPE (`dit.RotaryEmbedding2D`) instead of FLUX's 3-axis one; text tokens get
  identity rows (cos 1, sin 0), exactly as FLUX's all-zero text position ids.
- The single-stream block is FLUX's parallel block, written unfused: attention and SwiGLU read the same
  modulated input and their outputs are summed under one gate. FLUX's fused linear1/linear2 compute the same
  function (linear2 of the concatenation = proj(attn) + fc2(mlp)); this form reuses timm's SwiGLU at the cost
  of one extra bias (D parameters) per block.
- Optional fixed sin-cos absolute positions on the image tokens, as LightningDiT keeps them next to RoPE.
- No guidance-distillation embedding (`guidance_in`): guidance here is true classifier-free guidance, trained
  with caption dropout to a learned null caption.
- Padded text tokens are masked as attention keys (FLUX attends to T5's padding); so what the padding holds,
  and how much of it there is, changes nothing in the output.

Null caption: one learned token `null_text` (1, d_text) and a learned `null_pooled` (d_text,). A dropped
sample's text becomes that token in position 0 (the rest of its row masked off) and its pooled vector
`null_pooled`; so the null path does not depend on L, and it is the same for every caption.

Shapes: x (B, C, H, W) latent; t (B,) in [0, 1] (1 = noise); text (B, L, d_text) float with L <= text_length;
mask (B, L) bool, True = real token; pooled (B, d_text).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from timm.layers import SwiGLU
from torch import nn
from torch.nn import functional as F

from aligntok.diffusion.dit import (
    FinalLayer,
    RotaryEmbedding2D,
    TimestepEmbedder,
    modulate,
    sincos_pos_embed_2d,
    swiglu_hidden,
)
from aligntok.diffusion.flow import sample

PRESETS_T2I: dict[str, dict[str, Any]] = {
    # Sizes from `count_parameters(name)`: a 32x32x32 latent and T5-XXL text (width 4096), as FLUX; with MiniLM's
    # width 384 each is smaller by 2·3712·(D + 1) (T: 1,295,304 on the toy 8x8x32 latent). Double:single = 1:2, as
    # FLUX.1's 19:38. T is the CPU toy: forward + backward + AdamW at batch 64 on an 8x8x32 latent with 32 text
    # tokens of width 384 ran 2.5 steps/s on 2 cores (LightningDiT-T/1 on the same machine: 2.8).
    "FluxDiT-T": dict(depth_double=1, depth_single=2, hidden_size=128, num_heads=4, patch_size=1,
                      mlp_ratio=4.0),  # 2,253,000
    "FluxDiT-S": dict(depth_double=4, depth_single=8, hidden_size=384, num_heads=6, patch_size=1,
                      mlp_ratio=4.0),  # 42,891,296
    "FluxDiT-B": dict(depth_double=4, depth_single=8, hidden_size=768, num_heads=12, patch_size=1,
                      mlp_ratio=4.0),  # 164,808,736
    "FluxDiT-L": dict(depth_double=8, depth_single=16, hidden_size=1024, num_heads=16, patch_size=1,
                      mlp_ratio=4.0),  # 566,999,712
    # FLUX.1's head width 128; 13 + 26 blocks at width 1536 land at 2.0B.
    "FluxDiT-2B": dict(depth_double=13, depth_single=26, hidden_size=1536, num_heads=12, patch_size=1,
                       mlp_ratio=4.0),  # 2,048,006,176
}


class QKV(nn.Module):
    """x (B, N, D) -> q, k, v (B, heads, N, d) each: one Linear, then RMSNorm per head on q and k (QK-norm)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        assert dim % num_heads == 0, f"width {dim} not divisible by {num_heads} heads"
        self.num_heads, self.head_dim, self.qk_norm = num_heads, dim // num_heads, qk_norm
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, h, N, d)
        if self.qk_norm:  # in float32, as dit.Attention: under bf16 autocast q, k are bf16, the weights float32
            q, k = self.q_norm(q.float()).to(v.dtype), self.k_norm(k.float()).to(v.dtype)  # (B, h, N, d) each
        return q, k, v


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                    attn_mask: torch.Tensor) -> torch.Tensor:
    """q, k, v (B, heads, S, d); rope = (cos, signed_sin) (S, d); attn_mask (B, 1, 1, S) bool, True = key may be
    attended -> (B, S, heads*d). Every query sees every allowed key (no causal part)."""
    B, H, S, d = q.shape
    cos, sin = (table.to(v.dtype) for table in rope)  # (S, d) each
    q, k = RotaryEmbedding2D.rotate(torch.stack([q, k]), cos, sin).unbind(0)  # (B, h, S, d) each
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, S, d)
    return x.transpose(1, 2).reshape(B, S, H * d)  # (B, S, D)


class DoubleStreamBlock(nn.Module):
    """FLUX's double-stream block: text and image keep their own norms, adaLN-Zero modulation, qkv, proj and
    SwiGLU; attention runs once over the joint [text; image] sequence."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True) -> None:
        super().__init__()
        hidden = swiglu_hidden(hidden_size, mlp_ratio)
        for stream in ("img", "txt"):  # img_mod, img_norm1, img_qkv, img_proj, img_norm2, img_mlp; txt_... alike
            setattr(self, f"{stream}_mod", nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size)))
            setattr(self, f"{stream}_norm1", nn.RMSNorm(hidden_size, eps=1e-6, elementwise_affine=False))
            setattr(self, f"{stream}_qkv", QKV(hidden_size, num_heads, qk_norm))
            setattr(self, f"{stream}_proj", nn.Linear(hidden_size, hidden_size))
            setattr(self, f"{stream}_norm2", nn.RMSNorm(hidden_size, eps=1e-6, elementwise_affine=False))
            setattr(self, f"{stream}_mlp", SwiGLU(hidden_size, hidden))

    def forward(self, txt: torch.Tensor, img: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                attn_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """txt (B, L, D), img (B, N, D), c (B, D), rope (L+N, d) tables, attn_mask (B, 1, 1, L+N) -> txt, img."""
        L = txt.shape[1]
        img_m = self.img_mod(c).chunk(6, dim=1)  # shift, scale, gate (attn), shift, scale, gate (mlp): (B, D) each
        txt_m = self.txt_mod(c).chunk(6, dim=1)  # (B, D) each
        q_i, k_i, v_i = self.img_qkv(modulate(self.img_norm1(img), img_m[0], img_m[1]))  # (B, h, N, d) each
        q_t, k_t, v_t = self.txt_qkv(modulate(self.txt_norm1(txt), txt_m[0], txt_m[1]))  # (B, h, L, d) each
        joint = [torch.cat(pair, dim=2) for pair in ((q_t, q_i), (k_t, k_i), (v_t, v_i))]  # (B, h, L+N, d) each
        attn = joint_attention(*joint, rope, attn_mask)  # (B, L+N, D)
        txt = torch.addcmul(txt, txt_m[2].unsqueeze(1), self.txt_proj(attn[:, :L]))  # (B, L, D)
        img = torch.addcmul(img, img_m[2].unsqueeze(1), self.img_proj(attn[:, L:]))  # (B, N, D)
        txt = torch.addcmul(txt, txt_m[5].unsqueeze(1),
                            self.txt_mlp(modulate(self.txt_norm2(txt), txt_m[3], txt_m[4])))  # (B, L, D)
        img = torch.addcmul(img, img_m[5].unsqueeze(1),
                            self.img_mlp(modulate(self.img_norm2(img), img_m[3], img_m[4])))  # (B, N, D)
        return txt, img


class SingleStreamBlock(nn.Module):
    """FLUX's parallel single-stream block on the joint sequence: one modulation (shift, scale, gate), one
    RMSNorm; attention and SwiGLU read the same input and x + gate * (proj(attn) + mlp)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True) -> None:
        super().__init__()
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 3 * hidden_size))
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.qkv = QKV(hidden_size, num_heads, qk_norm)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.mlp = SwiGLU(hidden_size, swiglu_hidden(hidden_size, mlp_ratio))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                attn_mask: torch.Tensor) -> torch.Tensor:
        """x (B, S, D), c (B, D), rope (S, d) tables, attn_mask (B, 1, 1, S) -> (B, S, D)."""
        shift, scale, gate = self.modulation(c).chunk(3, dim=1)  # (B, D) each
        h = modulate(self.norm(x), shift, scale)  # (B, S, D)
        out = self.proj(joint_attention(*self.qkv(h), rope, attn_mask)) + self.mlp(h)  # (B, S, D)
        return torch.addcmul(x, gate.unsqueeze(1), out)  # (B, S, D)


class TextConditionedDiT(nn.Module):
    """Velocity model v_theta(z_t, t, caption) on a (C, input_size, input_size) latent grid, FLUX layout.

    Args:
        input_size: latent side H = W (a multiple of `patch_size`).
        in_channels: latent channels C (the output has the same shape as the input).
        text_width: d_text, the width of the text encoder's tokens and pooled vector.
        text_length: the most text tokens a caption may have (L <= text_length).
        patch_size: p; image tokens are (H/p)·(W/p).
        hidden_size, num_heads, mlp_ratio: transformer width D, heads, MLP ratio (SwiGLU at 2/3 of it).
        depth_double, depth_single: double-stream then single-stream blocks (depth_single >= 1, so the
            text stream of the last double block feeds something).
        caption_dropout: probability that a caption is replaced by the null caption in training when
            `force_drop` is not given.
        qk_norm: RMSNorm per head on q and k (FLUX always uses it).
        pos_embed: add fixed 2-D sin-cos positions to the image tokens (LightningDiT does; FLUX does not).
    """

    def __init__(self, input_size: int, in_channels: int, text_width: int, text_length: int, patch_size: int = 1,
                 hidden_size: int = 1536, depth_double: int = 13, depth_single: int = 26, num_heads: int = 12,
                 mlp_ratio: float = 4.0, caption_dropout: float = 0.1, qk_norm: bool = True,
                 pos_embed: bool = True) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"latent side {input_size} is not a multiple of patch size {patch_size}")
        if depth_double < 0 or depth_single < 1:
            raise ValueError(f"need depth_double >= 0 and depth_single >= 1, got {depth_double}, {depth_single}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        self.input_size, self.in_channels, self.patch_size = input_size, in_channels, patch_size
        self.text_width, self.text_length = text_width, text_length
        self.caption_dropout = caption_dropout
        self.grid = (input_size // patch_size, input_size // patch_size)
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.txt_in = nn.Linear(text_width, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.vector_in = nn.Sequential(nn.Linear(text_width, hidden_size), nn.SiLU(),
                                       nn.Linear(hidden_size, hidden_size))
        self.null_text = nn.Parameter(torch.zeros(1, text_width))  # (1, d_text): the null caption's one token
        self.null_pooled = nn.Parameter(torch.zeros(text_width))  # (d_text,)
        pos = sincos_pos_embed_2d(hidden_size, *self.grid)[None] if pos_embed else None  # (1, N, D)
        self.register_buffer("pos_embed", pos, persistent=False)
        self.rope = RotaryEmbedding2D(hidden_size // num_heads)
        self.double_blocks = nn.ModuleList(
            [DoubleStreamBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth_double)])
        self.single_blocks = nn.ModuleList(
            [SingleStreamBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth_single)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT init: xavier Linears and patch conv, N(0, 0.02) timestep MLP and null caption, zero adaLN
        modulation (every block and the final layer) and zero output Linear, so a fresh model outputs 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.null_text, std=0.02)
        nn.init.normal_(self.null_pooled, std=0.02)
        zero = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        zero += [m[-1] for block in self.double_blocks for m in (block.img_mod, block.txt_mod)]
        zero += [block.modulation[-1] for block in self.single_blocks]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def drop_captions(self, text: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor,
                      force_drop: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Replace dropped captions by the null caption: text (B, L, d_text), mask (B, L), pooled (B, d_text)
        -> the same shapes. `force_drop` (B,) bool chooses them in any mode; without it, in training, each is
        dropped with probability `caption_dropout` (global RNG); in eval, none."""
        B, L, _ = text.shape
        if force_drop is not None:
            drop = force_drop.to(device=text.device, dtype=torch.bool)  # (B,)
        elif self.training and self.caption_dropout > 0:
            drop = torch.rand(B, device=text.device) < self.caption_dropout  # (B,)
        else:
            return text, mask, pooled
        null_mask = torch.arange(L, device=mask.device) == 0  # (L,): the null token sits in position 0
        text = torch.where(drop[:, None, None], self.null_text.to(text.dtype).expand(L, -1), text)  # (B, L, d_text)
        mask = torch.where(drop[:, None], null_mask, mask)  # (B, L)
        pooled = torch.where(drop[:, None], self.null_pooled.to(pooled.dtype), pooled)  # (B, d_text)
        return text, mask, pooled

    def joint_rope(self, L: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin (L+N, d) float32 for the [text; image] sequence: identity rows for the L text tokens
        (FLUX's zero text position ids), 2-D RoPE rows for the image grid."""
        cos, sin = self.rope.tables(*self.grid, device, torch.float32)  # (N, d) each
        cos = torch.cat([cos.new_ones(L, cos.shape[1]), cos])  # (L+N, d)
        sin = torch.cat([sin.new_zeros(L, sin.shape[1]), sin])  # (L+N, d)
        return cos, sin

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        B, (h, w), p, C = x.shape[0], self.grid, self.patch_size, self.in_channels
        x = x.reshape(B, h, w, p, p, C)  # (B, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, p)
        return x.reshape(B, C, h * p, w * p)  # (B, C, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
                pooled: torch.Tensor, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) in [0, 1], text (B, L, d_text), mask (B, L) bool (True = real token),
        pooled (B, d_text), force_drop (B,) bool or None -> velocity (B, C, H, W).

        `force_drop` replaces the chosen captions by the null caption in any mode (CFG's unconditional half).
        """
        B = x.shape[0]
        expected = (self.in_channels, self.input_size, self.input_size)
        assert x.ndim == 4 and tuple(x.shape[1:]) == expected, f"x: expected (B, {expected}), got {tuple(x.shape)}"
        assert t.shape == (B,), f"t: expected (B,)=({B},), got {tuple(t.shape)}"
        assert text.ndim == 3 and text.shape[0] == B and text.shape[2] == self.text_width, (
            f"text: expected (B={B}, L, d_text={self.text_width}), got {tuple(text.shape)}")
        L = text.shape[1]
        assert 1 <= L <= self.text_length, f"text: {L} tokens, the model was built for 1..{self.text_length}"
        assert mask.shape == (B, L) and mask.dtype == torch.bool, (
            f"mask: expected (B, L)=({B}, {L}) bool, got {tuple(mask.shape)} {mask.dtype}")
        assert pooled.shape == (B, self.text_width), (
            f"pooled: expected (B, d_text)=({B}, {self.text_width}), got {tuple(pooled.shape)}")
        assert force_drop is None or force_drop.shape == (B,), (
            f"force_drop: expected (B,)=({B},), got {tuple(force_drop.shape)}")
        dtype = self.txt_in.weight.dtype
        text, mask, pooled = self.drop_captions(text.to(dtype), mask, pooled.to(dtype), force_drop)
        # zeroed so that padding holding anything, even inf or nan, stays out of the masked attention's sums
        text = text.masked_fill(~mask[..., None], 0.0)  # (B, L, d_text)
        img = self.x_embedder(x).flatten(2).transpose(1, 2)  # (B, N, D)
        if self.pos_embed is not None:
            img = img + self.pos_embed  # (B, N, D)
        txt = self.txt_in(text)  # (B, L, D)
        c = self.t_embedder(t) + self.vector_in(pooled)  # (B, D)
        rope = self.joint_rope(L, x.device)  # (L+N, d) each
        keys = torch.cat([mask, mask.new_ones(B, img.shape[1])], dim=1)  # (B, L+N): real text and every image token
        attn_mask = keys[:, None, None, :]  # (B, 1, 1, L+N)
        for block in self.double_blocks:
            txt, img = block(txt, img, c, rope, attn_mask)  # (B, L, D), (B, N, D)
        joint = torch.cat([txt, img], dim=1)  # (B, L+N, D)
        for block in self.single_blocks:
            joint = block(joint, c, rope, attn_mask)  # (B, L+N, D)
        out = self.final_layer(joint[:, L:], c)  # (B, N, p*p*C): image tokens only
        return self.unpatchify(out)  # (B, C, H, W)


def build_t2i_dit(preset: str, latent_channels: int, latent_size: int, text_width: int, text_length: int,
                  caption_dropout: float = 0.1, qk_norm: bool = True) -> TextConditionedDiT:
    """The TextConditionedDiT named by `preset` (a key of PRESETS_T2I) over a (latent_channels, latent_size,
    latent_size) latent, for captions of up to `text_length` tokens of width `text_width`.

    Raises:
        ValueError: unknown `preset` (the message lists the known names).
    """
    if preset not in PRESETS_T2I:
        raise ValueError(f"t2i preset {preset!r} is unknown; known presets: {', '.join(PRESETS_T2I)}")
    return TextConditionedDiT(input_size=latent_size, in_channels=latent_channels, text_width=text_width,
                              text_length=text_length, caption_dropout=caption_dropout, qk_norm=qk_norm,
                              **PRESETS_T2I[preset])


def count_parameters(preset: str, latent_channels: int = 32, latent_size: int = 32, text_width: int = 4096,
                     text_length: int = 512, qk_norm: bool = True) -> int:
    """Parameters of `preset`, built on the meta device (no memory, no init cost). The defaults are a 32x32x32
    latent and T5-XXL text (width 4096); the text length does not change the count (text has no positions)."""
    with torch.device("meta"):
        model = build_t2i_dit(preset, latent_channels, latent_size, text_width, text_length, qk_norm=qk_norm)
    return sum(p.numel() for p in model.parameters())


class _CaptionRows(nn.Module):
    """`flow.sample`'s label interface over a batch of captions: label i is caption row i, label -1 (the
    "null class") is the null caption, passed to the model as `force_drop`."""

    num_classes = -1

    def __init__(self, model: TextConditionedDiT, text: torch.Tensor, mask: torch.Tensor,
                 pooled: torch.Tensor) -> None:
        super().__init__()
        self.model, self.text, self.mask, self.pooled = model, text, mask, pooled
        self.train(model.training)  # so that `sample` restores the model's own mode

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """z (b, C, H, W), t (b,), y (b,) long caption rows or -1 -> velocity (b, C, H, W)."""
        drop = y < 0  # (b,)
        rows = y.clamp(min=0)  # (b,)
        return self.model(z, t, self.text[rows], self.mask[rows], self.pooled[rows], force_drop=drop)


@torch.no_grad()
def sample_text(model: TextConditionedDiT, text: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor,
                latent_shape: tuple[int, int, int], steps: int, cfg_scale: float = 1.0, seed: int = 0,
                method: Literal["euler", "heun"] = "euler", timestep_shift: float = 1.0,
                interval: tuple[float, float] | None = None) -> torch.Tensor:
    """Generate latents (B, C, H, W) for captions text (B, L, d_text), mask (B, L), pooled (B, d_text).

    `flow.sample` with the captions as its labels, so the conventions are its own: noise drawn on the CPU from
    `torch.Generator().manual_seed(seed)` then moved to the model's device; `euler_sample`/`heun_sample` on
    `time_grid(steps, timestep_shift)`; CFG v_uncond + cfg_scale·(v_cond - v_uncond), the unconditional half
    with the null caption (force_drop), both halves in one forward of 2B, only for t inside `interval`
    (t = 1 is noise; None = everywhere); cfg_scale 1 is one conditional forward of B per step. The model runs in
    eval mode and is put back in its previous mode.
    """
    device = next(model.parameters()).device
    captions = _CaptionRows(model, text.to(device), mask.to(device), pooled.to(device))
    rows = torch.arange(text.shape[0], device=device)  # (B,)
    return sample(captions, rows, latent_shape, steps, cfg_scale=cfg_scale, interval=interval, seed=seed,
                  method=method, timestep_shift=timestep_shift)

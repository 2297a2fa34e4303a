"""CLIP's text transformer (Radford et al. 2021): token + learned position embeddings, pre-LN layers of
causal self-attention and a quick-GELU MLP, a final LayerNorm. Module names follow Hugging Face's
`CLIPTextModel` (without its `text_model.` prefix, which is removed at load), so its `model.safetensors`
loads without renaming.

`model_type` "clip_text_model" (a `CLIPTextModel` / `CLIPTextModelWithProjection` save) or "clip" (a whole
`CLIPModel`: its `text_config` is read and the vision tower, both projections and `logit_scale` are left
out). The pooled vector is the final-LN state at the end-of-text token (`eos` pooling), the last real token
of a CLIP tokenizer's output; the `text_projection` of a `*WithProjection` save is not applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aligntok.text.layers import activation, check_width, key_padding_mask, merge_heads, split_heads
from aligntok.text.weights import check_arange, split_ignored, strip_prefix, value

IGNORED_PREFIXES = ("embeddings.position_ids", "text_projection.", "vision_model.", "visual_projection.",
                    "logit_scale")


@dataclass(frozen=True)
class ClipTextConfig:
    """The text tower's architecture; the defaults are Hugging Face's `CLIPTextConfig` defaults (ViT-B/32)."""

    vocab_size: int
    width: int
    layers: int
    heads: int
    mlp_width: int
    max_positions: int
    eps: float
    act: str

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> "ClipTextConfig":
        if config.get("model_type") == "clip":
            config = value(config, "text_config", dict)
        made = cls(vocab_size=value(config, "vocab_size", int, 49408), width=value(config, "hidden_size", int, 512),
                   layers=value(config, "num_hidden_layers", int, 12),
                   heads=value(config, "num_attention_heads", int, 8),
                   mlp_width=value(config, "intermediate_size", int, 2048),
                   max_positions=value(config, "max_position_embeddings", int, 77),
                   eps=value(config, "layer_norm_eps", float, 1e-5), act=value(config, "hidden_act", str, "quick_gelu"))
        check_width(made.width, made.heads, "hidden_size / num_attention_heads")
        activation(made.act, "hidden_act")
        return made


class ClipTextEmbeddings(nn.Module):
    def __init__(self, cfg: ClipTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, L, d)


class ClipAttention(nn.Module):
    def __init__(self, cfg: ClipTextConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(p(x), self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, L, Dh)
        return self.out_proj(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)))  # (B, L, d)


class ClipMLP(nn.Module):
    def __init__(self, cfg: ClipTextConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)
        self.act = activation(cfg.act, "hidden_act")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, L, d)


class ClipLayer(nn.Module):
    def __init__(self, cfg: ClipTextConfig) -> None:
        super().__init__()
        self.self_attn = ClipAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = ClipMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), attn_mask)  # (B, L, d)
        return x + self.mlp(self.layer_norm2(x))  # (B, L, d)


class ClipStack(nn.Module):
    def __init__(self, cfg: ClipTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(cfg) for _ in range(cfg.layers))


class ClipText(nn.Module):
    """CLIP's text transformer: (input_ids, mask) -> final-LN hidden states (B, L, d)."""

    kind = "clip"
    default_pooling = "eos"

    def __init__(self, cfg: ClipTextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = ClipTextEmbeddings(cfg)
        self.encoder = ClipStack(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> "ClipText":
        return cls(ClipTextConfig.from_hf(config))

    @staticmethod
    def adapt_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """(the file's tensors under this module's names, the keys left out as unused)."""
        state = strip_prefix(state, "text_model.", "embeddings.token_embedding.weight")
        check_arange(state, "embeddings.position_ids")
        return split_ignored(state, IGNORED_PREFIXES)

    @property
    def width(self) -> int:
        return self.cfg.width

    @property
    def layers(self) -> int:
        return self.cfg.layers

    @property
    def max_positions(self) -> int | None:
        return self.cfg.max_positions

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, L) int64, mask (B, L) bool (True = real token; right padding) -> (B, L, d).
        `token_type_ids` is accepted for the common signature and unused."""
        length = input_ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()  # (L, L)
        attn_mask = causal & key_padding_mask(mask)  # (B, 1, L, L)
        x = self.embeddings(input_ids)  # (B, L, d)
        for layer in self.encoder.layers:
            x = layer(x, attn_mask)  # (B, L, d)
        return self.final_layer_norm(x)  # (B, L, d)

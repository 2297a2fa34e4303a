"""The T5 encoder (Raffel et al. 2020): token embeddings without positions, pre-norm layers of self-attention
with a bucketed relative position bias (computed by the first layer, shared by all) and a ReLU or gated-GELU
feed-forward, RMS LayerNorm (no mean, no bias) throughout, a final RMS norm. Attention scores are not
scaled by 1/sqrt(d_kv) (T5 folds that into its initialisation).

Module names follow Hugging Face's `T5EncoderModel`, so its `model.safetensors` loads without renaming. The
embedding is stored as `shared.weight` and/or its tied copy `encoder.embed_tokens.weight` (both, when
present, must be equal); a whole `T5Model` / `T5ForConditionalGeneration` save loads too, its `decoder.*`
and `lm_head.*` left out. `model_type` "t5" (v1.0 ReLU and v1.1 / Flan gated-GELU) and "mt5" (the same
architecture); not "umt5", whose every layer has its own position bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aligntok.text.layers import TextEncoderError, activation, additive_mask, merge_heads, split_heads
from aligntok.text.weights import split_ignored, value

IGNORED_PREFIXES = ("decoder.", "lm_head.")
TIED = "encoder.embed_tokens.weight"


@dataclass(frozen=True)
class T5Config:
    """The encoder's architecture read from a Hugging Face `config.json` (`model_type` "t5" or "mt5")."""

    vocab_size: int
    width: int
    head_width: int
    mlp_width: int
    layers: int
    heads: int
    buckets: int
    max_distance: int
    eps: float
    act: str
    gated: bool

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> "T5Config":
        act, gated = _feed_forward(value(config, "feed_forward_proj", str, "relu"))
        return cls(vocab_size=value(config, "vocab_size", int), width=value(config, "d_model", int),
                   head_width=value(config, "d_kv", int), mlp_width=value(config, "d_ff", int),
                   layers=value(config, "num_layers", int), heads=value(config, "num_heads", int),
                   buckets=value(config, "relative_attention_num_buckets", int, 32),
                   max_distance=value(config, "relative_attention_max_distance", int, 128),
                   eps=value(config, "layer_norm_epsilon", float, 1e-6), act=act, gated=gated)


def _feed_forward(name: str) -> tuple[str, bool]:
    """Hugging Face's reading of `feed_forward_proj`: "[gated-]<act>", and "gated-gelu" means the tanh GELU."""
    parts = name.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise TextEncoderError(f"config.json: feed_forward_proj={name!r} is not '<act>' or 'gated-<act>'")
    act = "gelu_new" if name == "gated-gelu" else parts[-1]
    activation(act, "feed_forward_proj")
    return act, len(parts) == 2


def relative_position_bucket(relative: torch.Tensor, buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 buckets of `relative` = key position - query position (any shape, int64): half the
    buckets per direction, exact below buckets/4, logarithmic up to `max_distance`, then the last bucket."""
    half = buckets // 2
    bucket = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    # clamp keeps log() finite where the exact branch is taken anyway
    far = exact + (torch.log(distance.clamp(min=exact).float() / exact) / math.log(max_distance / exact)
                   * (half - exact)).long()
    return bucket + torch.where(distance < exact, distance, far.clamp(max=half - 1))


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool) -> None:
        super().__init__()
        self.cfg = cfg
        inner = cfg.heads * cfg.head_width
        self.q = nn.Linear(cfg.width, inner, bias=False)
        self.k = nn.Linear(cfg.width, inner, bias=False)
        self.v = nn.Linear(cfg.width, inner, bias=False)
        self.o = nn.Linear(inner, cfg.width, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.buckets, cfg.heads)

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        """(1, H, L, L): the learned bias of each (query, key) distance bucket."""
        positions = torch.arange(length, device=device)  # (L,)
        relative = positions[None, :] - positions[:, None]  # (L, L) key - query
        bucket = relative_position_bucket(relative, self.cfg.buckets, self.cfg.max_distance)  # (L, L)
        return self.relative_attention_bias(bucket).permute(2, 0, 1).unsqueeze(0)  # (1, H, L, L)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(p(x), self.cfg.heads) for p in (self.q, self.k, self.v))  # (B, H, L, Dh)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # (B, H, L, Dh)
        return self.o(merge_heads(out))  # (B, L, d)


class T5SelfAttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_bias)
        self.layer_norm = nn.RMSNorm(cfg.width, eps=cfg.eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)  # (B, L, d)


class T5DenseActDense(nn.Module):
    """wo(act(wi x)), or gated: wo(act(wi_0 x) * wi_1 x)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.gated = cfg.gated
        if cfg.gated:
            self.wi_0 = nn.Linear(cfg.width, cfg.mlp_width, bias=False)
            self.wi_1 = nn.Linear(cfg.width, cfg.mlp_width, bias=False)
        else:
            self.wi = nn.Linear(cfg.width, cfg.mlp_width, bias=False)
        self.wo = nn.Linear(cfg.mlp_width, cfg.width, bias=False)
        self.act = activation(cfg.act, "feed_forward_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))  # (B, L, d_ff)
        return self.wo(hidden)  # (B, L, d)


class T5FeedForwardLayer(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseActDense(cfg)
        self.layer_norm = nn.RMSNorm(cfg.width, eps=cfg.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))  # (B, L, d)


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList([T5SelfAttentionLayer(cfg, has_relative_bias), T5FeedForwardLayer(cfg)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.layer[1](self.layer[0](x, bias))  # (B, L, d)


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.block = nn.ModuleList(T5Block(cfg, has_relative_bias=i == 0) for i in range(cfg.layers))
        self.final_layer_norm = nn.RMSNorm(cfg.width, eps=cfg.eps)


class T5Encoder(nn.Module):
    """The T5 encoder stack: (input_ids, mask) -> final-norm hidden states (B, L, d)."""

    kind = "t5"
    default_pooling = "mean"

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.width)
        self.encoder = T5Stack(cfg)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> "T5Encoder":
        return cls(T5Config.from_hf(config))

    @staticmethod
    def adapt_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """(the file's tensors under this module's names, the keys left out as unused)."""
        state, ignored = split_ignored(state, IGNORED_PREFIXES)
        if TIED in state:
            tied = state.pop(TIED)
            if "shared.weight" in state and not torch.equal(state["shared.weight"], tied):
                raise TextEncoderError(f"shared.weight and its tied copy {TIED} differ")
            state.setdefault("shared.weight", tied)
            ignored = sorted([*ignored, TIED])
        return state, ignored

    @property
    def width(self) -> int:
        return self.cfg.width

    @property
    def layers(self) -> int:
        return self.cfg.layers

    @property
    def max_positions(self) -> int | None:
        return None  # relative positions: no table bounds the length

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, L) int64, mask (B, L) bool (True = real token) -> (B, L, d).
        `token_type_ids` is accepted for the common signature and unused."""
        x = self.shared(input_ids)  # (B, L, d)
        first = self.encoder.block[0].layer[0].SelfAttention
        bias = first.position_bias(input_ids.shape[1], input_ids.device)  # (1, H, L, L)
        bias = bias + additive_mask(mask, x.dtype)  # (B, H, L, L)
        for block in self.encoder.block:
            x = block(x, bias)  # (B, L, d)
        return self.encoder.final_layer_norm(x)  # (B, L, d)

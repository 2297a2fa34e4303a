"""BERT as a text encoder: word + position + token-type embeddings and LayerNorm, then post-LN layers of
bidirectional self-attention and a GELU MLP (Devlin et al. 2019). Module names follow Hugging Face's
`BertModel`, so its `model.safetensors` loads without renaming.

Unused by a text encoder and left out at load: `pooler.*` (the next-sentence-prediction pooler; the
sentence embedding is pooled from the hidden states instead), `cls.*` (pre-training heads) and the constant
`embeddings.position_ids` buffer of older saves. A `bert.` prefix (a `BertFor*` save) is removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aligntok.text.layers import TextEncoderError, activation, check_width, key_padding_mask, merge_heads, split_heads
from aligntok.text.weights import check_arange, split_ignored, strip_prefix, value

IGNORED_PREFIXES = ("pooler.", "cls.", "embeddings.position_ids")


@dataclass(frozen=True)
class BertConfig:
    """The architecture read from a Hugging Face `config.json` (`model_type` "bert")."""

    vocab_size: int
    width: int
    layers: int
    heads: int
    mlp_width: int
    max_positions: int
    type_vocab_size: int
    eps: float
    act: str

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> "BertConfig":
        embedding = value(config, "position_embedding_type", str, "absolute")
        if embedding != "absolute":
            raise TextEncoderError(f"config.json: position_embedding_type={embedding!r} is not supported "
                                   f"(only 'absolute')")
        made = cls(vocab_size=value(config, "vocab_size", int), width=value(config, "hidden_size", int),
                   layers=value(config, "num_hidden_layers", int), heads=value(config, "num_attention_heads", int),
                   mlp_width=value(config, "intermediate_size", int),
                   max_positions=value(config, "max_position_embeddings", int),
                   type_vocab_size=value(config, "type_vocab_size", int, 2),
                   eps=value(config, "layer_norm_eps", float, 1e-12), act=value(config, "hidden_act", str, "gelu"))
        check_width(made.width, made.heads, "hidden_size / num_attention_heads")
        activation(made.act, "hidden_act")
        return made


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.width)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.width)
        self.LayerNorm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)  # (B, L, d)
        return self.LayerNorm(x + self.position_embeddings(positions))  # (B, L, d)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.query = nn.Linear(cfg.width, cfg.width)
        self.key = nn.Linear(cfg.width, cfg.width)
        self.value = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(proj(x), self.heads) for proj in (self.query, self.key, self.value))  # (B, H, L, Dh)
        return merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask))  # (B, L, d)


class ResidualNorm(nn.Module):
    """`LayerNorm(dense(x) + residual)`: the post-LN end of each BERT sub-layer (`*.output`)."""

    def __init__(self, width_in: int, width: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(width_in, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)  # (B, L, d)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.add_module("self", BertSelfAttention(cfg))  # Hugging Face's name for it: `attention.self.query`
        self.output = ResidualNorm(cfg.width, cfg.width, cfg.eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self._modules["self"](x, attn_mask), x)  # (B, L, d)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.width, cfg.mlp_width)
        self.act = activation(cfg.act, "hidden_act")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))  # (B, L, mlp_width)


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = ResidualNorm(cfg.mlp_width, cfg.width, cfg.eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, attn_mask)  # (B, L, d)
        return self.output(self.intermediate(x), x)  # (B, L, d)


class BertStack(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.layers))


class Bert(nn.Module):
    """The BERT encoder: (input_ids, mask) -> last hidden states (B, L, d)."""

    kind = "bert"
    default_pooling = "mean"
    """Without a sentence-transformers pooling config beside the weights: the masked mean."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertStack(cfg)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> "Bert":
        return cls(BertConfig.from_hf(config))

    @staticmethod
    def adapt_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """(the file's tensors under this module's names, the keys left out as unused)."""
        state = strip_prefix(state, "bert.", "embeddings.word_embeddings.weight")
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
        """input_ids (B, L) int64, mask (B, L) bool (True = real token), token_type_ids (B, L) or None (all 0)
        -> last hidden states (B, L, d); padded positions hold values that carry no meaning."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)  # (B, L, d)
        attn_mask = key_padding_mask(mask)  # (B, 1, 1, L)
        for layer in self.encoder.layer:
            x = layer(x, attn_mask)  # (B, L, d)
        return x

"""Pieces the text transformers share: the text-encoder errors, activations by their Hugging Face names,
head splitting, and padding masks for `scaled_dot_product_attention`."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from aligntok.errors import AligntokError


class TextEncoderError(AligntokError, ValueError):
    """A text-encoder source, its files or an `encode` input is unusable; the message names which."""


class TextWeightsMissing(TextEncoderError, FileNotFoundError):
    """The files of a text-encoder source are not installed or not at the given path."""


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)  # OpenAI CLIP's sigmoid approximation of GELU


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # the exact (erf) GELU: BERT's, and Hugging Face's "gelu"
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}
"""Activation functions by the names Hugging Face configs give them."""


def activation(name: str, key: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation called `name` in config key `key`; an unknown name fails naming the key."""
    if name not in ACTIVATIONS:
        raise TextEncoderError(f"config.json: {key}={name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def check_width(width: int, heads: int, key: str) -> int:
    """The per-head width; fails when `width` does not split into `heads` heads."""
    if heads <= 0 or width % heads:
        raise TextEncoderError(f"config.json: {key}: width {width} does not split into {heads} heads")
    return width // heads


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H * Dh) -> (B, H, L, Dh)."""
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, Dh) -> (B, L, H * Dh)."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


def key_padding_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool, True = real token -> (B, 1, 1, L) bool for SDPA: every query attends to real keys only."""
    return mask[:, None, None, :]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) bool -> (B, 1, 1, L): 0 at real keys, the dtype's minimum at padding, to add to a score bias."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)  # (B, L)
    return bias.masked_fill(~mask, torch.finfo(dtype).min)[:, None, None, :]  # (B, 1, 1, L)

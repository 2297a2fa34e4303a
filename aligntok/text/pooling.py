"""The sentence vector of a text encoder: hidden states (B, L, d) and mask (B, L) -> pooled (B, d).

A pooling is named `<mode>` or `<mode>+l2` (then L2-normalised, as sentence-transformers' `Normalize`):
- `mean`: the mean over real tokens (sentence-transformers' `pooling_mode_mean_tokens`; T5 encoders);
- `cls`: the first token (`pooling_mode_cls_token`);
- `max`: the per-channel maximum over real tokens (`pooling_mode_max_tokens`);
- `eos`: the last real token, the end-of-text token a CLIP tokenizer appends (CLIP's pooled output).

A folder saved by sentence-transformers says its pooling in `modules.json` and `1_Pooling/config.json`;
`sentence_transformers_pooling` reads it, and fails on a pipeline it cannot reproduce (a `Dense` head,
weighted-mean or last-token pooling) rather than pooling differently.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from aligntok.text.layers import TextEncoderError
from aligntok.text.weights import read_json

MODES = ("mean", "cls", "max", "eos")
_ST = "sentence_transformers.models."
_ST_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}
_ST_UNSUPPORTED = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


def check_pooling(name: str) -> str:
    mode, _, suffix = name.partition("+")
    if mode not in MODES or suffix not in ("", "l2"):
        raise TextEncoderError(f"pooling {name!r}: expected one of {list(MODES)}, optionally with '+l2'")
    return name


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """hidden (B, L, d), mask (B, L) bool (every row with at least one real token) -> pooled (B, d)."""
    mode, _, suffix = check_pooling(pooling).partition("+")
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    if mode == "mean":
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, d)
    elif mode == "cls":
        pooled = hidden[:, 0]  # (B, d)
    elif mode == "max":
        pooled = hidden.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)  # (B, d)
    else:
        last = mask.sum(1).clamp(min=1) - 1  # (B,) the last real position
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, d)
    return F.normalize(pooled, p=2, dim=-1) if suffix == "l2" else pooled  # (B, d)


def sentence_transformers_pooling(folder: Path, width: int) -> str | None:
    """The pooling a sentence-transformers folder declares, or None when `folder` has no `modules.json`."""
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return None
    modules = read_json(modules_path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise TextEncoderError(f"{modules_path}: expected a list of modules")
    kinds = [str(m.get("type", "")).removeprefix(_ST) for m in modules]
    if unknown := [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]:
        raise TextEncoderError(f"{modules_path}: module(s) {unknown} are not supported (only Transformer, "
                               f"Pooling, Normalize): the pooled vector would not be the model's")
    if kinds[:1] != ["Transformer"] or kinds.count("Pooling") != 1 or kinds.index("Pooling") != 1:
        raise TextEncoderError(f"{modules_path}: expected Transformer, Pooling[, Normalize], got {kinds}")
    if modules[0].get("path", "") != "":
        raise TextEncoderError(f"{modules_path}: the Transformer lives in {modules[0]['path']!r}, not in the "
                               f"folder itself; point file: at that subfolder")
    config_path = folder / str(modules[1].get("path", "1_Pooling")) / "config.json"
    config = read_json(config_path)
    if config.get("word_embedding_dimension", width) != width:
        raise TextEncoderError(f"{config_path}: word_embedding_dimension {config['word_embedding_dimension']} "
                               f"is not the model's width {width}")
    if used := [key for key in _ST_UNSUPPORTED if config.get(key)]:
        raise TextEncoderError(f"{config_path}: {used} not supported (only {sorted(_ST_MODES)})")
    modes = [mode for key, mode in _ST_MODES.items() if config.get(key)]
    if len(modes) != 1:
        raise TextEncoderError(f"{config_path}: expected exactly one of {sorted(_ST_MODES)} true, got {modes}")
    return modes[0] + ("+l2" if "Normalize" in kinds else "")

"""A Hugging Face model folder as the text encoders read it: `config.json` values by key (typed, the key
named when missing or wrong) and `model.safetensors` loaded into a module exactly.

`load_exact` is strict: after the architecture's own renames (a `bert.` or `text_model.` prefix) and the
keys it declares unused (BERT's next-sentence pooler, a T5 decoder, CLIP's vision tower), every tensor of
the file must fill a parameter of the module and every parameter must be filled, at the same shape. The
error lists the missing, unexpected and wrong-shape keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import torch

from aligntok.errors import one_line
from aligntok.text.layers import TextEncoderError, TextWeightsMissing

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)

T = TypeVar("T")
_MISSING: Any = object()


def check_model_dir(folder: Path, spec: str) -> None:
    """`folder` must hold config.json, model.safetensors and tokenizer.json."""
    if not folder.is_dir():
        raise TextWeightsMissing(f"text encoder '{spec}': {folder} is not a folder (expected one holding "
                                 f"{', '.join(MODEL_FILES)})")
    if missing := [name for name in MODEL_FILES if not (folder / name).is_file()]:
        raise TextWeightsMissing(f"text encoder '{spec}': {folder} lacks {', '.join(missing)} "
                                 f"(a Hugging Face model folder holds {', '.join(MODEL_FILES)})")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TextEncoderError(f"{path}: not readable JSON ({one_line(exc)})") from None


def value(config: dict[str, Any], key: str, kind: type[T], default: T = _MISSING) -> T:
    """`config[key]` checked to be a `kind` (an int is accepted for a float); the key is named when absent
    (and no default) or of the wrong type."""
    if key not in config or config[key] is None:
        if default is _MISSING:
            raise TextEncoderError(f"config.json: missing key {key!r}")
        return default
    got = config[key]
    if kind is float and isinstance(got, int) and not isinstance(got, bool):
        got = float(got)
    if not isinstance(got, kind) or (kind is int and isinstance(got, bool)):
        raise TextEncoderError(f"config.json: {key}={got!r} is not a {kind.__name__}")
    return got


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on the CPU, floating ones as float32 (outputs are float32)."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise TextEncoderError(f"{path}: not a readable safetensors file ({one_line(exc)})") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def strip_prefix(state: dict[str, torch.Tensor], prefix: str, anchor: str) -> dict[str, torch.Tensor]:
    """Drop `prefix` from every key that has it when `prefix + anchor` is a key (a checkpoint saved from a
    wrapper model, `BertForMaskedLM` -> `bert.*`), else return `state` as it is."""
    if prefix + anchor not in state:
        return state
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def split_ignored(state: dict[str, torch.Tensor], prefixes: tuple[str, ...],
                  ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the tensors to load, the sorted keys starting with one of `prefixes`, which are left out)."""
    ignored = sorted(k for k in state if k.startswith(prefixes))
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}, ignored


def check_arange(state: dict[str, torch.Tensor], key: str) -> None:
    """A stored `position_ids` buffer (older Hugging Face saves) must be the plain 0..N-1 it always was."""
    if key in state:
        ids = state[key].reshape(-1)
        if not torch.equal(ids, torch.arange(ids.numel(), dtype=ids.dtype)):
            raise TextEncoderError(f"{key} is not 0..{ids.numel() - 1}: custom position ids are not supported")


def load_exact(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Fill every parameter and buffer of `module` from `state`, strictly, taking the tensors themselves
    (`assign=True`: no second copy of the weights).

    Raises a `TextEncoderError` that names the missing, unexpected and wrong-shape keys (first 8 of each)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} (model {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise TextEncoderError(
            f"{source}: the weights do not fit {type(module).__name__}: {len(missing)} missing {missing[:8]}, "
            f"{len(unexpected)} unexpected {unexpected[:8]}, {len(wrong)} wrong shape {wrong[:8]}")
    module.load_state_dict(state, strict=True, assign=True)

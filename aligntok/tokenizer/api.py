"""`Tokenizer`: the public, load-and-use face of a trained tokenizer.

A tokenizer folder holds `tokenizer.safetensors` (weights) and `tokenizer.json` (everything
needed to rebuild the module: kind, model config, latent config, encoder description,
resolution). `Tokenizer.load` takes such a folder, its safetensors file, or a registry URI
(`models:/aligntok-tokenizer@stage3`).

Value ranges: `encode` takes images (B, 3, H, W) float in [0, 1] (any H, W: the encoder resizes
to its input size) and returns latents (B, C, h, w); `decode` returns images (B, 3, R, R) in [0, 1].
Both run in batches of `batch_size` under `torch.no_grad()`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from aligntok.config import LatentConfig, TokenizerConfig
from aligntok.errors import AligntokError, one_line
from aligntok.fileio import atomic_write_text
from aligntok.fileio import atomic_save_safetensors

WEIGHTS = "tokenizer.safetensors"
CONFIG = "tokenizer.json"
FORMAT = "aligntok-tokenizer/1"


def save_tokenizer_folder(folder: Path, model: torch.nn.Module, description: dict[str, Any]) -> None:
    """Write weights + JSON description (each atomically)."""
    atomic_save_safetensors(model.state_dict(), folder / WEIGHTS, {"format": FORMAT})
    atomic_write_text(folder / CONFIG, json.dumps({"format": FORMAT, **description}, indent=2) + "\n")


def build_from_description(description: dict[str, Any]) -> torch.nn.Module:
    """An untrained module with the architecture a tokenizer.json describes."""
    from aligntok.encoder.vit import EncoderDescription, create_random_encoder
    from aligntok.tokenizer.model import build_tokenizer

    # "kind" sat inside "tokenizer" in descriptions written before the stage rows carried it
    tokenizer_cfg = TokenizerConfig.model_validate({k: v for k, v in description["tokenizer"].items() if k != "kind"})
    kind = description.get("kind", description["tokenizer"].get("kind", "aligned"))
    if kind not in ("aligned", "vae"):
        raise ValueError(f"kind: {kind!r} is neither 'aligned' nor 'vae'")
    latent_cfg = LatentConfig.model_validate(description["latent"])
    desc = EncoderDescription.coerce(description["encoder"])
    vit = None
    if kind == "aligned":
        vit, _ = create_random_encoder(desc.arch, desc.depth, desc.image_size)
    return build_tokenizer(tokenizer_cfg, latent_cfg, vit, desc, int(description["resolution"]), kind=kind)


def download(uri: str) -> Path:
    """A registered model's artifacts folder; an unknown name, alias or run is an `AligntokError`."""
    from mlflow.exceptions import MlflowException

    from aligntok.ops.tracking import download_model_files

    try:
        return download_model_files(uri)
    except MlflowException as exc:
        raise AligntokError(f"{uri}: cannot fetch the model: {one_line(exc)}") from None


def read_description(path: Path, expected_format: str) -> dict[str, Any]:
    """The JSON sidecar of a model folder; unreadable JSON or another format is an `AligntokError`."""
    try:
        description = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise AligntokError(f"{path}: cannot read the model description: {one_line(exc)}") from None
    found = description.get("format") if isinstance(description, dict) else type(description).__name__
    if found != expected_format:
        raise AligntokError(f"{path}: format {found!r}, expected {expected_format!r}")
    return description


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """Load a safetensors file into `module`; a corrupt file, or weights of another architecture than the
    description beside it says, is an `AligntokError` naming the file."""
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise AligntokError(f"{path}: cannot read the weights: {one_line(exc)}") from None
    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    problems = [f"{len(names)} {what} (first {names[0]})" for what, names in
                (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)) if names]
    if problems:
        raise AligntokError(f"{path}: the tensors do not fit the architecture its description gives: "
                            + ", ".join(problems))
    module.load_state_dict(state)


def resolve_folder(source: str | Path) -> Path:
    """A tokenizer folder from a folder, its safetensors/json file, or a `models:/` / `runs:/` URI."""
    text = str(source)
    if text.startswith(("models:/", "runs:/")):
        return download(text)
    path = Path(text)
    folder = path.parent if path.suffix in {".safetensors", ".json"} else path
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{source}: not a tokenizer folder (needs {WEIGHTS} and {CONFIG})")
    return folder


class Tokenizer:
    """A trained tokenizer in eval mode: `encode` images to latents and `decode` them back."""

    def __init__(self, model: torch.nn.Module, description: dict[str, Any], batch_size: int = 64) -> None:
        self.model = model.eval()
        self.description = description
        self.batch_size = batch_size

    @classmethod
    def load(cls, source: str | Path, device: str | torch.device = "cpu", batch_size: int = 64) -> Tokenizer:
        folder = resolve_folder(source)
        description = read_description(folder / CONFIG, FORMAT)
        try:
            model = build_from_description(description)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # RuntimeError: timm's unknown arch
            raise AligntokError(f"{folder / CONFIG}: cannot build the tokenizer it describes: {one_line(exc)}") \
                from None
        load_weights(model, folder / WEIGHTS)
        return cls(model.to(device), description, batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w)."""
        return tuple(self.model.latent_shape)  # type: ignore[return-value]

    @property
    def resolution(self) -> int:
        return int(self.description["resolution"])

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> latents (B, C, h, w)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encode expects images (B, 3, H, W), got {tuple(images.shape)}")
        chunks = [self.model.encode(part.to(self.device).float()).float() for part in images.split(self.batch_size)]
        return torch.cat(chunks).cpu()  # float32 also under bf16 autocast

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, C, h, w) -> images (B, 3, R, R) in [0, 1]."""
        if latents.ndim != 4 or tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"decode expects latents (B, {self.latent_shape}), got {tuple(latents.shape)}")
        chunks = [self.model.decode(part.to(self.device).float()).float() for part in latents.split(self.batch_size)]
        return torch.cat(chunks).cpu()  # float32 also under bf16 autocast

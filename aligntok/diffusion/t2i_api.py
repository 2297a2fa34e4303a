"""A trained text-to-image model as one object: prompts in, images out.

`TextToImageModel.load(folder or models:/aligntok-t2i@...)` builds the text-conditioned DiT its `t2i.json`
describes, its latent statistics, its tokenizer and the frozen text encoder named by the description (whose
weights' sha256 must match the one recorded at training time: a different encoder would give features the
model never saw).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from aligntok.config import SampleConfig
from aligntok.diffusion import api
from aligntok.diffusion.latents import LatentNormalizer
from aligntok.errors import AligntokError, one_line
from aligntok.text.features import TextBatch
from aligntok.tokenizer.api import Tokenizer, load_weights, read_description

WEIGHTS, CONFIG, FORMAT = "t2i.safetensors", "t2i.json", "aligntok-t2i/1"
"""A model folder: these two, stats.json (latent statistics) and tokenizer/ (the tokenizer it decodes with)."""


def resolve_folder(source: str | Path) -> Path:
    """A text-to-image model folder from a folder or a `models:/` / `runs:/` URI (artifacts re-assembled)."""
    return api.resolve_folder(source, WEIGHTS, CONFIG, kind="text-to-image model")


def assemble_folder(artifacts: Path) -> Path:
    """A registered model's artifacts folder (files by their own names) -> the model folder layout."""
    return api.assemble_folder(artifacts, WEIGHTS, CONFIG)


class TextToImageModel:
    def __init__(self, dit: torch.nn.Module, normalizer: LatentNormalizer, tokenizer: Tokenizer, text_encoder: Any,
                 description: dict[str, Any]) -> None:
        self.dit, self.normalizer, self.tokenizer = dit.eval(), normalizer, tokenizer
        self.text_encoder, self.description = text_encoder, description

    @classmethod
    def load(cls, source: str | Path, device: str | torch.device = "cpu") -> TextToImageModel:
        from aligntok.diffusion.t2i_dit import build_t2i_dit
        from aligntok.text import load_text_encoder

        folder = resolve_folder(source)
        description = read_description(folder / CONFIG, FORMAT)
        try:
            SampleConfig.model_validate(description["sample"])
            C, h, _ = description["latent_shape"]
            cfg = description["t2i"]
            dit = build_t2i_dit(cfg["preset"], C, h, int(description["text_width"]), int(description["text_length"]),
                                caption_dropout=cfg["caption_dropout"], qk_norm=cfg["qk_norm"])
            encoder_spec = description["text_encoder"]
        except (KeyError, TypeError, ValueError) as exc:
            raise AligntokError(f"{folder / CONFIG}: cannot build the model it describes: {one_line(exc)}") from None
        load_weights(dit, folder / WEIGHTS)
        text_encoder = load_text_encoder(encoder_spec["source"], max_length=int(description["text_length"]),
                                         device=device)
        found = text_encoder.description().get("sha256")
        if found != encoder_spec.get("sha256"):
            raise AligntokError(f"{folder / CONFIG}: trained with text encoder {encoder_spec['source']} of sha256 "
                                f"{encoder_spec.get('sha256')}, but that source now has sha256 {found}")
        normalizer = LatentNormalizer.load(folder / "stats.json")
        return cls(dit.to(device), normalizer, Tokenizer.load(folder / "tokenizer", device=device), text_encoder,
                   description)

    def encode_prompts(self, prompts: list[str]) -> TextBatch:
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise AligntokError(f"prompts must be a non-empty list of non-empty strings, got {prompts!r}")
        features = self.text_encoder.encode(prompts)
        return TextBatch(tokens=features.tokens.float(), mask=features.mask, pooled=features.pooled.float())

    @torch.no_grad()
    def generate_from_text(self, text: TextBatch, steps: int | None = None, cfg_scale: float | None = None,
                           seed: int = 0) -> torch.Tensor:
        """Encoded captions (B of them) -> images (B, 3, R, R) in [0, 1] on the CPU."""
        from aligntok.diffusion.t2i_dit import sample_text

        defaults = self.description["sample"]
        device = next(self.dit.parameters()).device
        z = sample_text(self.dit, text.tokens.to(device), text.mask.to(device), text.pooled.to(device),
                        tuple(self.description["latent_shape"]), steps=steps or defaults["steps"],
                        cfg_scale=defaults["cfg_scale"] if cfg_scale is None else cfg_scale, seed=seed,
                        method=defaults["method"], timestep_shift=defaults.get("timestep_shift", 1.0),
                        interval=tuple(defaults["cfg_interval"]) if defaults.get("cfg_interval") else None)
        return self.normalizer.decode(self.tokenizer, z).cpu()

    def generate(self, prompts: list[str], steps: int | None = None, cfg_scale: float | None = None,
                 seed: int = 0) -> torch.Tensor:
        """Prompts (B,) -> images (B, 3, R, R) in [0, 1] (defaults from the model's `sample` settings)."""
        return self.generate_from_text(self.encode_prompts(prompts), steps, cfg_scale, seed)

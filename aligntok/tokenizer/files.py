"""`aligntok encode` / `aligntok decode`: image files <-> a latents file."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from aligntok.config import DataConfig
from aligntok.errors import AligntokError, one_line
from aligntok.tokenizer.api import Tokenizer

MAX_PIXELS: int = DataConfig.model_fields["max_pixels"].default
"""Default pixel limit of an input image (data.max_pixels' default, PIL's own bomb limit)."""


def read_image(path: Path, side: int, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """An image file -> (3, side, side) float in [0, 1] (RGB, shorter side resized, centre crop).

    The size is checked from the header, before a pixel is decoded: a decompression bomb is an
    `AligntokError`, as is any file PIL cannot read.
    """
    try:
        with warnings.catch_warnings():  # PIL warns between 1x and 2x its limit; the check below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
        with opened as image:
            width, height = image.size
            if width * height > max_pixels:
                raise AligntokError(f"{path}: too large: {width}x{height} = {width * height} pixels "
                                    f"> max_pixels {max_pixels}")
            image = ImageOps.exif_transpose(image).convert("RGB")
            image = ImageOps.fit(image, (side, side), method=Image.Resampling.BICUBIC)
    except Image.DecompressionBombError as exc:  # over 2x PIL's limit: refused by Image.open itself
        raise AligntokError(f"{path}: too large: {one_line(exc)}") from None
    except (OSError, ValueError) as exc:
        raise AligntokError(f"{path}: cannot read image: {one_line(exc)}") from None
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0


def encode_files(model: str, images: list[Path], out: Path, max_pixels: int = MAX_PIXELS) -> int:
    tokenizer = Tokenizer.load(model)
    batch = torch.stack([read_image(p, tokenizer.resolution, max_pixels) for p in images])  # (B, 3, R, R)
    latents = tokenizer.encode(batch)  # (B, C, h, w)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.contiguous()}, str(out),
              metadata={"files": json.dumps([str(p) for p in images]), "model": model})
    return len(images)


def read_latents(path: Path) -> tuple[torch.Tensor, list[str]]:
    """A file written by `encode_files` -> latents (B, C, h, w) and the image file names (may be empty)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            latents = handle.get_tensor("latents")
            names = json.loads((handle.metadata() or {}).get("files", "[]"))
    except (OSError, SafetensorError, ValueError) as exc:  # ValueError: bad JSON in the metadata
        raise AligntokError(f"{path}: not a latents file from `aligntok encode`: {one_line(exc)}") from None
    if not isinstance(names, list):
        raise AligntokError(f"{path}: metadata 'files' is {type(names).__name__}, expected a list of names")
    return latents, [str(name) for name in names]


def decode_file(model: str, latents_path: Path, out_dir: Path) -> list[Path]:
    tokenizer = Tokenizer.load(model)
    latents, names = read_latents(latents_path)  # (B, C, h, w)
    if latents.ndim != 4 or tuple(latents.shape[1:]) != tokenizer.latent_shape:
        raise AligntokError(f"{latents_path}: latents {tuple(latents.shape)}, but the tokenizer {model} decodes "
                            f"(B, {', '.join(map(str, tokenizer.latent_shape))})")
    images = tokenizer.decode(latents)  # (B, 3, R, R) in [0, 1]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, image in enumerate(images):
        stem = Path(names[index]).stem if index < len(names) else f"{index:06d}"
        path = out_dir / f"{stem}.png"
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(path)
        written.append(path)
    return written

"""`aligntok encode` / `aligntok decode`: image files <-> a latents file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import save_file

from aligntok.errors import AligntokError
from aligntok.tokenizer.api import Tokenizer


def read_image(path: Path, side: int) -> torch.Tensor:
    """An image file -> (3, side, side) float in [0, 1] (RGB, shorter side resized, centre crop)."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            image = ImageOps.fit(image, (side, side), method=Image.Resampling.BICUBIC)
    except (OSError, ValueError) as exc:
        raise AligntokError(f"{path}: cannot read image: {exc}") from None
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0


def encode_files(model: str, images: list[Path], out: Path) -> int:
    tokenizer = Tokenizer.load(model)
    batch = torch.stack([read_image(p, tokenizer.resolution) for p in images])  # (B, 3, R, R)
    latents = tokenizer.encode(batch)  # (B, C, h, w)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.contiguous()}, str(out),
              metadata={"files": json.dumps([str(p) for p in images]), "model": model})
    return len(images)


def decode_file(model: str, latents_path: Path, out_dir: Path) -> list[Path]:
    tokenizer = Tokenizer.load(model)
    with safe_open(str(latents_path), framework="pt") as handle:
        latents = handle.get_tensor("latents")
        names = json.loads((handle.metadata() or {}).get("files", "[]"))
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

"""`aligntok sample`: a grid of class-conditional (or, with --prompt, text-conditioned) samples plus the individual
images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aligntok.diffusion.api import DiffusionModel


def write_samples(model: str, classes: list[int] | None, per_class: int, steps: int | None,
                  cfg_scale: float | None, seed: int, out: Path) -> list[Path]:
    """Rows = repeats, columns = classes. Returns the paths of the individual images."""
    diffusion = DiffusionModel.load(model)
    classes = list(range(len(diffusion.classes))) if not classes else classes
    labels = torch.tensor(classes).repeat(per_class)  # (per_class * K,)
    images = diffusion.generate(labels, steps=steps, cfg_scale=cfg_scale, seed=seed)  # (B, 3, R, R)
    names = [f"{label:03d}_" + str(diffusion.classes[label]).replace("/", "-").replace(" ", "_")
             for label in labels.tolist()]
    return _write_grid(images, names, len(classes), out)


def write_prompt_samples(model: str, prompts: list[str], per_prompt: int, steps: int | None, cfg_scale: float | None,
                         seed: int, out: Path) -> list[Path]:
    """Rows = repeats, columns = prompts, from a text-to-image model folder or `models:/` URI. Returns the paths of
    the individual images (named after their prompt)."""
    from aligntok.diffusion.t2i_api import TextToImageModel

    t2i = TextToImageModel.load(model)
    repeated = [p for _ in range(per_prompt) for p in prompts]  # row-major: one row per repeat
    images = t2i.generate(repeated, steps=steps, cfg_scale=cfg_scale, seed=seed)  # (B, 3, R, R)
    names = [f"{i % len(prompts):03d}_" + "".join(c if c.isalnum() else "_" for c in text.lower())[:60]
             for i, text in enumerate(repeated)]
    return _write_grid(images, names, len(prompts), out)


def _write_grid(images: torch.Tensor, names: list[str], columns: int, out: Path) -> list[Path]:
    """`out`: the grid of images (B, 3, R, R), `columns` per row; and each image as `out/<row>_<name>.png`."""
    from torchvision.utils import make_grid

    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_to_uint8(make_grid(images, nrow=columns, padding=2, pad_value=1.0))).save(out)
    folder = out.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (name, image) in enumerate(zip(names, images)):
        path = folder / f"{index // columns:03d}_{name}.png"
        Image.fromarray(_to_uint8(image)).save(path)
        written.append(path)
    return written


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    return (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

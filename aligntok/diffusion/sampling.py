"""`aligntok sample`: a grid of class-conditional samples plus the individual images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aligntok.diffusion.api import DiffusionModel


def write_samples(model: str, classes: list[int] | None, per_class: int, steps: int | None,
                  cfg_scale: float | None, seed: int, out: Path) -> list[Path]:
    """Rows = repeats, columns = classes. Returns the paths of the individual images."""
    from torchvision.utils import make_grid

    diffusion = DiffusionModel.load(model)
    classes = list(range(len(diffusion.classes))) if not classes else classes
    labels = torch.tensor(classes).repeat(per_class)  # (per_class * K,)
    images = diffusion.generate(labels, steps=steps, cfg_scale=cfg_scale, seed=seed)  # (B, 3, R, R)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images, nrow=len(classes), padding=2, pad_value=1.0)
    Image.fromarray(_to_uint8(grid)).save(out)
    folder = out.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    names = diffusion.classes
    written = []
    for index, (label, image) in enumerate(zip(labels.tolist(), images)):
        name = str(names[label]).replace("/", "-").replace(" ", "_")
        path = folder / f"{index // len(classes):03d}_{label:03d}_{name}.png"
        Image.fromarray(_to_uint8(image)).save(path)
        written.append(path)
    return written


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    return (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

"""Inference with a trained class-conditional DiT: `generate` (labels -> images: the flow ODE from noise, then
de-normalise and decode with the tokenizer) and `sample_grid` (the class-by-repeat grid the trainer logs to MLflow).
The registered model (`aligntok.diffusion.api.DiffusionModel`) and the trainer both sample through here, so
inference never imports the trainer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from aligntok.config import Params
from aligntok.diffusion.flow import sample
from aligntok.diffusion.latents import LatentSet
from aligntok.tokenizer.api import Tokenizer

GRID_CLASSES, GRID_PER_CLASS, GRID_CHUNK = 10, 4, 64
"""The snapshot grid logged during training: at most 10 classes (evenly spaced over the classes) x 4 samples,
sampled in chunks of 64, so that rank 0 is back in the next step's all-reduce in seconds at any class count;
`evaluate` measures the model on thousands of samples."""


def sample_grid(model: torch.nn.Module, latents: LatentSet, tokenizer: Tokenizer, params: Params,
                per_class: int = GRID_PER_CLASS, seed: int = 0) -> np.ndarray:
    """A (rows = per_class, columns = classes) grid of decoded class-conditional samples: (H, W, 3) uint8, over
    at most `GRID_CLASSES` classes spread evenly, generated in chunks of `GRID_CHUNK` (chunk i seeded seed + i)."""
    from torchvision.utils import make_grid

    classes = latents.num_classes
    shown = torch.linspace(0, classes - 1, min(classes, GRID_CLASSES)).round().long().unique()  # (K,)
    labels = shown.repeat(per_class)  # (per_class * K,)
    images = torch.cat([generate(model, latents.normalizer, tokenizer, chunk, params.sample.steps,
                                 params.sample.cfg_scale, params.sample.cfg_interval, seed + index,
                                 params.sample.method, params.sample.timestep_shift)
                        for index, chunk in enumerate(labels.split(GRID_CHUNK))])
    grid = make_grid(images, nrow=len(shown), padding=2, pad_value=1.0)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def generate(model: torch.nn.Module, normalizer: Any, tokenizer: Tokenizer, labels: torch.Tensor, steps: int,
             cfg_scale: float, interval: list[float] | None, seed: int, method: str = "euler",
             timestep_shift: float = 1.0) -> torch.Tensor:
    """Class labels (B,) -> images (B, 3, R, R) in [0, 1]: ODE from noise, then de-normalise and decode."""
    was_training = model.training
    model.eval()
    z = sample(model, labels, (model.in_channels, model.input_size, model.input_size), steps=steps,
               cfg_scale=cfg_scale, interval=tuple(interval) if interval else None, seed=seed, method=method,
               timestep_shift=timestep_shift)
    model.train(was_training)
    return normalizer.decode(tokenizer, z)

"""The tiny model shared by the tests that train: a 2-block encoder at 56 px (4x4 latent grid,
4 channels) and a small decoder for 16x16 images, plus the one-thread fixture."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from aligntok.config import Params

TINY_MODEL = {
    "encoder": {"depth": 2, "image_size": 56},  # 4x4 latent grid
    "latent": {"channels": 4},
    "data": {"resolution": 16},
    "tokenizer": {"decoder": {"channels": 16, "channel_mult": [1, 2, 2], "num_res_blocks": 1},
                  "discriminator": {"channels": 8, "layers": 2}},
    "runtime": {"compile": False},  # compiling costs ~1 min, far more than these few steps
    # the default rows of stages 2 and 3, starting with a fresh critic: a test's stage 1 (QUICK_STAGE1) may train
    # none to carry over
    **{row: {**getattr(Params(), row).model_dump(mode="json"), "carry_discriminator": False}
       for row in ("align_perceptual", "refine_decoder")},
}
QUICK_STAGE1 = {"train": ["adapter", "decoder"], "steps": 2, "batch_size": 4, "lr": 1e-3, "val_images": 2,
                "losses": {"gan": 0.0, "perceptual": 0.0}}
"""A 2-step stage 1 without GAN or perceptual terms: just enough tokenizer to cache latents with."""


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, two threads that wait on each other make
    these tiny convolutions up to 100x slower (results are the same either way)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(root: Path) -> tuple[Path, Path]:
    """The tiny dataset and the tiny model's exported encoder under `root`: (data folder, encoder folder)."""
    from aligntok.config import EncoderConfig
    from aligntok.encoder import export_encoder
    from support.shards import write_dataset

    data = write_dataset(root / "data")
    export_encoder(EncoderConfig(**TINY_MODEL["encoder"]), root / "encoder")
    return data, root / "encoder"

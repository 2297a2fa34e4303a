"""The presets in configs/: the paper-scale one is the paper's whole recipe, nothing left at the CPU default."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import yaml
from aligntok.config import TOKENIZER_STAGES, Params, load_params
from aligntok.diffusion.dit import build_dit

from support.paths import REPO

PAPER = REPO / "configs" / "imagenet256.yaml"


def test_paper_preset_spells_out_every_section_and_every_row_key() -> None:
    raw = yaml.safe_load(PAPER.read_text())
    default = Params().to_dict()
    assert set(raw) == set(default), f"left at the embedded default: {sorted(set(default) - set(raw))}"
    for section in (*TOKENIZER_STAGES, "cache_latents", "dit", "train_dit", "sample", "evaluate", "text", "t2i",
                    "train_t2i", "evaluate_t2i", "promote", "runtime"):
        missing = set(default[section]) - set(raw[section])
        assert not missing, f"{section}: {sorted(missing)} fall back to the embedded default"


def test_paper_preset_is_the_paper_recipe() -> None:
    p = load_params(PAPER)
    assert (p.dit.preset, p.dit.qk_norm, p.dit.class_dropout) == ("LightningDiT-XL/1", True, 0.1)
    assert (p.train_dit.steps, p.train_dit.batch_size) == (80_000, 1024)  # 64 epochs
    assert p.cache_latents.max_images is None  # every training image
    assert p.align_perceptual.train == ["encoder", "adapter", "decoder"] and p.align_perceptual.losses.semantic == 1.0
    assert p.align_perceptual.encoder_lr_scale == 0.1 and p.align_perceptual.ema_decay == 0.999
    # the stage-2 EMA must have forgotten the stage-1 weights it starts from
    assert p.align_perceptual.ema_decay ** p.align_perceptual.steps < 1e-3
    assert p.refine_decoder.train == ["decoder"]
    # the baseline is trained with the same reconstruction losses as the aligned stages (an even comparison)
    for name in ("l1", "perceptual", "gan"):
        assert getattr(p.vae_baseline.losses, name) == getattr(p.align_latent.losses, name), name
    assert p.sample.method == "euler" and p.sample.cfg_scale == 10.0 and p.sample.cfg_interval is not None
    assert p.evaluate.gen_samples == p.evaluate.recon_images == 50_000  # FID-50K


def test_paper_preset_model_sizes() -> None:
    p = load_params(PAPER)
    grid = p.encoder.image_size // 14
    with torch.device("meta"):
        dit = build_dit(p.dit, p.latent.channels, grid, num_classes=1000)
    params = sum(t.numel() for t in dit.parameters())
    assert 660e6 < params < 690e6, params  # LightningDiT-XL/1, ~675M


def _leaves(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, value) for every value a parsed YAML mapping sets (a list or an empty mapping is one value)."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    else:
        yield path, node


@pytest.mark.parametrize("preset", ["imagenet256.yaml", "tiny.yaml"])
def test_every_preset_loads(preset: str) -> None:
    """Each key the preset sets is what the loaded Params hold, by value: none dropped, renamed or overridden."""
    raw = yaml.safe_load((REPO / "configs" / preset).read_text())
    loaded = load_params(REPO / "configs" / preset).to_dict()
    wrong = {}
    for path, value in _leaves(raw):
        node: Any = loaded
        for key in path:
            node = node.get(key, "<missing>") if isinstance(node, dict) else "<missing>"
        if node != value:
            wrong[".".join(path)] = (value, node)
    assert wrong == {}, f"{preset}: set -> loaded: {wrong}"
    assert loaded != Params().to_dict()  # the preset changes something: it is not the embedded default


IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000
"""ImageNet-1k's train images and its official val split (50 per class)."""


def test_paper_preset_reads_imagenet_train_and_the_official_val_as_its_own_source() -> None:
    p = load_params(PAPER)
    assert p.data.source == "imagefolder:/datasets/imagenet/train"
    assert p.data.val_source == "imagefolder:/datasets/imagenet/val"  # not a val_fraction split of train
    assert p.runtime.loader_workers == 8


def test_paper_preset_draws_no_more_images_than_its_splits_hold() -> None:
    """With a val source, val is those 50,000 images: every count drawn from it must fit (the 1% split of train
    the preset used to take held ~12,800, fewer than the 50,000 reconstructions it asked for)."""
    p = load_params(PAPER)
    assert p.data.val_source is not None
    from_val = {"evaluate.recon_images": p.evaluate.recon_images,
                "evaluate.probe_val_images": p.evaluate.probe_val_images,
                **{f"{row}.val_images": p.stage(row).val_images for row in TOKENIZER_STAGES}}
    from_train = {"evaluate.reference_images": p.evaluate.reference_images,
                  "evaluate.probe_train_images": p.evaluate.probe_train_images}
    assert {key: n for key, n in from_val.items() if n > IMAGENET_VAL} == {}
    assert {key: n for key, n in from_train.items() if n > IMAGENET_TRAIN} == {}
    assert p.evaluate.recon_images == IMAGENET_VAL  # rFID on the whole official val, as the paper reports it

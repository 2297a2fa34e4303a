"""The `fid_reference` stage: features of the reference images, computed once and cached by DVC.

It extracts the Inception features of the first `evaluate.reference_images` training images (the gFID and
precision/recall reference) and of the first `evaluate.recon_images` validation images (the rFID reference),
plus the frozen foundation encoder's mean-pooled features of both (the FD_dinov2 references). It reruns only
when the data, the encoder or these counts change. Under several ranks, batch i runs on rank i mod W and rank 0
writes the features in batch order: the files are those of one process.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from aligntok.config import EvaluateConfig, RuntimeConfig
from aligntok.data.loader import ImageSet, load_split, require_validated
from aligntok.distributed import Placement, map_batches, placed
from aligntok.eval.fid import FeatureStats
from aligntok.eval.fd_encoder import EncoderFeatures
from aligntok.eval.inception import InceptionFeatures
from aligntok.fileio import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

REFERENCE_FILES = {"train": "train_inception.npz", "val": "val_inception.npz",
                   "train_encoder": "train_encoder.npz", "val_encoder": "val_encoder.npz"}


def batches(images: ImageSet, count: int, batch_size: int) -> Iterator[torch.Tensor]:
    """The first `count` images of a split, (B, 3, R, R) in [0, 1], in stored order."""
    for start in range(0, count, batch_size):
        yield images.batch(torch.arange(start, min(start + batch_size, count)))[0]


def batch_at(images: ImageSet, index: int, count: int, batch_size: int) -> torch.Tensor:
    """Batch `index` of `batches(images, count, batch_size)`: (B, 3, R, R) in [0, 1]."""
    start = index * batch_size
    return images.batch(torch.arange(start, min(start + batch_size, count)))[0]


def batch_count(count: int, batch_size: int) -> int:
    return -(-count // batch_size)


def build_reference(data_dir: Path, encoder_dir: Path, out_dir: Path, cfg: EvaluateConfig,
                    progress: bool = True, validation: Path | None = None,
                    runtime: RuntimeConfig | None = None) -> dict[str, Any]:
    """Inception and encoder features of the reference images (`fid_reference` stage); with `validation`,
    refuses shards whose validation report failed. `runtime`: the placement and fast paths (default:
    `RuntimeConfig()`). Returns the summary (rank 0; other ranks {})."""
    if validation is not None:
        require_validated(validation)
    fast = runtime or RuntimeConfig()
    with placed(fast) as place:
        return _build(data_dir, encoder_dir, out_dir, cfg, progress, fast, place)


def _build(data_dir: Path, encoder_dir: Path, out_dir: Path, cfg: EvaluateConfig, progress: bool,
           fast: RuntimeConfig, place: Placement) -> dict[str, Any]:
    inception = InceptionFeatures(device=place.device, channels_last=fast.channels_last, backend=fast.fid_backend)
    encoder = EncoderFeatures(encoder_dir, device=place.device)
    summary: dict[str, Any] = {"manifest_sha256": sha256_file(data_dir / "manifest.parquet"),
                               "inception": inception.description, "inception_backend": inception.backend,
                               "encoder": encoder.description}
    for split, count in (("train", cfg.reference_images), ("val", cfg.recon_images)):
        images = load_split(data_dir, split, limit=count, progress=progress and place.is_main,
                            decode_threads=fast.decode_threads)
        n, size = len(images), cfg.batch_size

        def features(index: int) -> dict[str, torch.Tensor]:
            x = place.to_device(batch_at(images, index, n, size))  # (B, 3, R, R)
            return {"inception": inception(x), "encoder": encoder(x)}  # (B, 2048), (B, D) float64

        found = map_batches(features, ("inception", "encoder"), batch_count(n, size), place,
                            f"{split} reference features", progress,
                            rows=lambda i: min(size, n - i * size))
        summary[f"{split}_images"] = n
        if found is None:
            continue
        for kind, feats in found.items():
            name = REFERENCE_FILES[split if kind == "inception" else f"{split}_encoder"]
            stats = FeatureStats.from_features(feats.numpy(), source=f"{data_dir.name}/{split}: first {n}",
                                               resize=inception.resize if kind == "inception" else encoder.resize,
                                               network=inception.name if kind == "inception" else encoder.name)
            stats.save(out_dir / name, features=feats.numpy().astype(np.float32))
    if not place.is_main:
        return {}
    atomic_write_text(out_dir / "reference.json", json.dumps(summary, indent=2) + "\n")
    log.info("reference features: %d training and %d validation images -> %s",
             summary["train_images"], summary["val_images"], out_dir)
    return summary


def load_reference(reference_dir: Path, cfg: EvaluateConfig) -> dict[str, Any]:
    summary = json.loads((reference_dir / "reference.json").read_text())
    if summary["train_images"] != cfg.reference_images or summary["val_images"] != cfg.recon_images:
        raise ValueError(f"{reference_dir}: built for {summary['train_images']} training / {summary['val_images']} "
                         f"validation images, params ask {cfg.reference_images} / {cfg.recon_images}; "
                         "rerun the fid_reference stage")
    return summary | {key: FeatureStats.load(reference_dir / name) for key, name in REFERENCE_FILES.items()}

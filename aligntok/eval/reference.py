"""The `fid_reference` stage: features of the reference images, computed once and cached by DVC.

It extracts the Inception features of the first `evaluate.reference_images` training images (the gFID and
precision/recall reference) and of the first `evaluate.recon_images` validation images (the rFID reference),
plus the frozen foundation encoder's mean-pooled features of both (the FD_dinov2 references). It reruns only
when the data, the encoder or these counts change. Under several ranks, batch i runs on rank i mod W and rank 0
folds the features in batch order (`aligntok.eval.stream`): the files are those of one process.

Memory stays bounded: the features stream into float64 means and covariances (`FeatureAccumulator`); the
vectors themselves are kept and saved for the training Inception features (the precision/recall reference,
`reference_images` x 2048 float32) and for the other three sets only up to `FEATURES_KEPT` vectors (beyond
that the FD uses the saved mean and covariance). The counts are checked against the ingest folder's
`dataset.json` before any network is loaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from aligntok.config import EvaluateConfig, RuntimeConfig
from aligntok.data.loader import load_split, require_validated
from aligntok.data.reader import EncodedImages, read_dataset_info
from aligntok.distributed import Placement, placed
from aligntok.errors import AligntokError
from aligntok.eval.fid import FEATURES_KEPT, FeatureAccumulator, FeatureStats
from aligntok.eval.fd_encoder import EncoderFeatures
from aligntok.eval.inception import InceptionFeatures
from aligntok.eval.stream import stream_batches
from aligntok.fileio import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

REFERENCE_FILES = {"train": "train_inception.npz", "val": "val_inception.npz",
                   "train_encoder": "train_encoder.npz", "val_encoder": "val_encoder.npz"}


def batches(images: EncodedImages, count: int, batch_size: int) -> Iterator[torch.Tensor]:
    """The first `count` images of a split, (B, 3, R, R) in [0, 1], in stored order."""
    for start in range(0, count, batch_size):
        yield images.batch(torch.arange(start, min(start + batch_size, count)))[0]


def batch_at(images: EncodedImages, index: int, count: int, batch_size: int) -> torch.Tensor:
    """Batch `index` of `batches(images, count, batch_size)`: (B, 3, R, R) in [0, 1]."""
    start = index * batch_size
    return images.batch(torch.arange(start, min(start + batch_size, count)))[0]


def batch_count(count: int, batch_size: int) -> int:
    return -(-count // batch_size)


class CountError(AligntokError, ValueError):
    """An evaluation count the data cannot supply, or a reference built for other counts."""


class MissingReferenceError(AligntokError, FileNotFoundError):
    """No `fid_reference` output where `evaluate` looks for it."""


def check_counts(data_dir: Path, wanted: Iterable[tuple[str, str, int]]) -> None:
    """Refuse, in one line naming each params key, counts (key, split, images) that exceed the split sizes in
    the ingest folder's `dataset.json`; called when a stage starts, before any network is loaded."""
    info, where = read_dataset_info(data_dir), Path(data_dir) / "dataset.json"
    counts = info.get("counts") or {}
    problems = []
    for key, split, count in wanted:
        held = counts.get(split)
        if held is None:
            problems.append(f"{key}: {count} asked, but {where} gives no {split!r} count (rerun `aligntok ingest`)")
        elif count > int(held):
            problems.append(f"{key}: {count} asked, the {split} split holds {int(held)} images ({where})")
    if problems:
        raise CountError("; ".join(problems))


def reference_counts(cfg: EvaluateConfig) -> list[tuple[str, str, int]]:
    """The (params key, split, images) that `fid_reference` reads."""
    return [("evaluate.reference_images", "train", cfg.reference_images),
            ("evaluate.recon_images", "val", cfg.recon_images)]


def build_reference(data_dir: Path, encoder_dir: Path, out_dir: Path, cfg: EvaluateConfig,
                    progress: bool = True, validation: Path | None = None,
                    runtime: RuntimeConfig | None = None) -> dict[str, Any]:
    """Inception and encoder features of the reference images (`fid_reference` stage); with `validation`,
    refuses shards whose validation report failed, and counts the splits cannot supply (`CountError`) before
    any network is loaded. `runtime`: the placement and fast paths (default: `RuntimeConfig()`). Returns the
    summary (rank 0; other ranks {})."""
    if validation is not None:
        require_validated(validation)
    check_counts(data_dir, reference_counts(cfg))
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
        images = load_split(data_dir, split, limit=count, decode_threads=fast.decode_threads)
        n, size = len(images), cfg.batch_size  # n == count: checked against dataset.json at the start

        def features(index: int) -> dict[str, torch.Tensor]:
            x = place.to_device(batch_at(images, index, n, size))  # (B, 3, R, R)
            return {"inception": inception(x), "encoder": encoder(x)}  # (B, 2048), (B, D) float64

        # the training Inception features are the precision/recall reference: kept whole
        sinks = {"inception": FeatureAccumulator(keep=n if split == "train" else FEATURES_KEPT),
                 "encoder": FeatureAccumulator()}
        stream_batches(features, sinks, batch_count(n, size), place, f"{split} reference features", progress,
                       rows=lambda i: min(size, n - i * size))
        summary[f"{split}_images"] = n
        if not place.is_main:
            continue
        for kind, sink in sinks.items():
            name = REFERENCE_FILES[split if kind == "inception" else f"{split}_encoder"]
            stats = sink.stats(source=f"{data_dir.name}/{split}: first {n}",
                               resize=inception.resize if kind == "inception" else encoder.resize,
                               network=inception.name if kind == "inception" else encoder.name)
            stats.save(out_dir / name, features=None if stats.features is None else stats.features.astype(np.float32))
    if not place.is_main:
        return {}
    atomic_write_text(out_dir / "reference.json", json.dumps(summary, indent=2) + "\n")
    log.info("reference features: %d training and %d validation images -> %s",
             summary["train_images"], summary["val_images"], out_dir)
    return summary


def load_reference(reference_dir: Path, cfg: EvaluateConfig) -> dict[str, Any]:
    """The `fid_reference` summary and its four `FeatureStats` (`train`, `val`, `train_encoder`,
    `val_encoder`); a folder built for other counts is a `CountError`."""
    path = reference_dir / "reference.json"
    if not path.is_file():
        raise MissingReferenceError(f"{path}: not found; run the fid_reference stage first")
    summary = json.loads(path.read_text())
    if summary["train_images"] != cfg.reference_images or summary["val_images"] != cfg.recon_images:
        raise CountError(f"{reference_dir}: built for {summary['train_images']} training / {summary['val_images']} "
                         f"validation images, params ask {cfg.reference_images} / {cfg.recon_images}; "
                         "rerun the fid_reference stage")
    return summary | {key: FeatureStats.load(reference_dir / name) for key, name in REFERENCE_FILES.items()}

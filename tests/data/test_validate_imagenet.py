"""The paper preset's validation thresholds against ImageNet-1k's class counts.

`class_share_balanced` reads only the manifest's labels (and dataset.json's classes), so these tests write an
ImageNet-sized manifest.parquet + dataset.json + rejected.csv, read them back with `load_dataset` and run that
expectation in GX, without any image or shard.

The exact per-class train counts of ImageNet-1k are not available offline, so the train counts here are a
distribution with ImageNet's published figures: 1000 classes, 1,281,167 images, smallest class 732, largest
1300 (most classes have 1300), and the official val split of 50 per class.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aligntok.config import ValidateConfig, load_params
from aligntok.data.validate.dataset import Dataset, load_dataset
from aligntok.data.validate.expectations import _balance_checks, run_expectations
from aligntok.data.validate.frames import _classes_frame

from support.paths import REPO

CLASSES, TRAIN_IMAGES, SMALLEST, LARGEST, VAL_PER_CLASS = 1000, 1_281_167, 732, 1300, 50


def imagenet_train_counts() -> np.ndarray:
    """(1000,) per-class train counts: 934 classes of 1300 and a ramp of 66 from 732 up, summing to 1,281,167."""
    ramp = np.round(np.linspace(SMALLEST, LARGEST - 1, CLASSES - 934)).astype(np.int64)
    short = TRAIN_IMAGES - 934 * LARGEST - int(ramp.sum())
    ramp[1 : 1 + abs(short)] += np.sign(short)  # spread the rounding over the ramp, its ends untouched
    return np.sort(np.concatenate([ramp, np.full(934, LARGEST)]))


def write_manifest(root: Path, train_counts: np.ndarray) -> Dataset:
    """manifest.parquet (train rows, then 50 val rows per class), dataset.json and rejected.csv as ingest
    writes them, read back by `load_dataset`. The manifest holds the columns the class frame reads (label,
    with split and class_name), not the per-image ones (key, sha256, ...), which do not enter the check."""
    root.mkdir(parents=True, exist_ok=True)
    classes = [f"n{label:08d}" for label in range(len(train_counts))]
    every_class = np.arange(len(train_counts))
    labels = np.concatenate([np.repeat(every_class, train_counts), np.repeat(every_class, VAL_PER_CLASS)])  # (N,)
    train = int(train_counts.sum())
    is_val = np.concatenate([np.zeros(train, np.int8), np.ones(labels.size - train, np.int8)])  # (N,)
    table = pa.table({
        "split": pa.DictionaryArray.from_arrays(is_val, ["train", "val"]).cast(pa.string()),
        "label": labels,
        "class_name": pa.DictionaryArray.from_arrays(labels.astype(np.int32), classes).cast(pa.string()),
    })
    pq.write_table(table, root / "manifest.parquet")
    counts = {"inputs": int(labels.size), "train": train, "val": int(labels.size) - train, "rejected": 0}
    meta = {"classes": classes, "resolution": 256, "shards": {"train": [], "val": []}, "counts": counts,
            "params": {"min_side": 64, "max_pixels": 89_478_485, "val_fraction": 0.01,
                       "val_source": "imagefolder:/datasets/imagenet/val"}}
    (root / "dataset.json").write_text(json.dumps(meta))
    (root / "rejected.csv").write_text('"path","reason"\n')
    return load_dataset(root)


def class_balance(dataset: Dataset, cfg: ValidateConfig) -> tuple[bool, object]:
    (result,) = run_expectations({"classes": _classes_frame(dataset)}, _balance_checks(dataset, cfg))
    return result.success, result.observed


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return write_manifest(tmp_path_factory.mktemp("imagenet"), imagenet_train_counts())


def test_the_counts_have_imagenets_published_shape() -> None:
    counts = imagenet_train_counts()
    assert (counts.size, counts.min(), counts.max(), counts.sum()) == (CLASSES, SMALLEST, LARGEST, TRAIN_IMAGES)
    assert (counts == LARGEST).sum() > CLASSES // 2  # most classes have 1300


def test_the_paper_preset_passes_imagenets_class_counts(imagenet: Dataset) -> None:
    preset = load_params(REPO / "configs" / "imagenet256.yaml").validate_
    assert len(imagenet.manifest) == TRAIN_IMAGES + CLASSES * VAL_PER_CLASS
    success, observed = class_balance(imagenet, preset)
    assert success, observed
    # with margin: the smallest class (782 images with its val) could lose 10% more and still pass
    mean = len(imagenet.manifest) / CLASSES
    assert mean / ((SMALLEST + VAL_PER_CLASS) * 0.9) < preset.max_class_imbalance


def test_the_old_bound_of_1_5_fails_on_imagenet(imagenet: Dataset) -> None:
    """1.5 bounds each class's count/mean (both ways), not max/min: ImageNet's smallest class is 1331.167/782
    = 1.70 below the mean (train alone: 1281.167/732 = 1.75), and max/min would be 1350/782 = 1.73."""
    success, observed = class_balance(imagenet, ValidateConfig(max_class_imbalance=1.5))
    assert not success
    assert observed["unexpected_count"] == int((imagenet_train_counts() + VAL_PER_CLASS < 1331.167 / 1.5).sum())
    assert any(row.get("class_name") == "n00000000" for row in observed["unexpected"])  # the 732-image class


def test_the_preset_still_fails_a_class_under_half_the_mean(tmp_path: Path) -> None:
    counts = imagenet_train_counts()
    counts[-1] = 550  # 600 with its val images: the mean (1330.4) is 2.2 times that
    preset = load_params(REPO / "configs" / "imagenet256.yaml").validate_
    success, observed = class_balance(write_manifest(tmp_path, counts), preset)
    assert not success and observed["unexpected_count"] == 1

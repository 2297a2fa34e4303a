"""Small datasets in the ingest contract format, for validation tests.

`write_dataset` writes a valid dataset directory (WebDataset shards, `manifest.parquet`,
`rejected.csv`, `dataset.json`) of random-noise RGB images; the `edit_*` helpers then break
one thing at a time. Records are ordered by (label, index); per class the first
`val_per_class` records go to the val split, the rest to train.
"""

from __future__ import annotations

import hashlib
import json
from io import BytesIO
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from PIL import Image

from aligntok.config import DataConfig
from aligntok.data.shards import INDEX_FORMAT, index_name, iter_records, write_index

CLASSES = ("tshirt", "trouser", "pullover")
RESOLUTION = 16
ORIGINAL_SIDE = 28
"""Original (pre-resize) side written to the manifest: above `MIN_SIDE`, below `MAX_PIXELS`."""
MIN_SIDE = 16
MAX_PIXELS = 10_000

Sample = dict[str, Any]


def encode_image(image: Image.Image | np.ndarray, fmt: str = "PNG") -> bytes:
    """Encode an image (or an array through `Image.fromarray`) to bytes."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def noise_image(rng: np.random.Generator, side: int = RESOLUTION) -> np.ndarray:
    """A random RGB image: (side, side, 3) uint8."""
    return rng.integers(0, 256, (side, side, 3), dtype=np.uint8)


def record_key(label: int, index: int) -> str:
    return hashlib.sha256(f"{label}:{index}".encode()).hexdigest()[:16]


def write_dataset(
    root: Path,
    *,
    per_class: tuple[int, ...] = (10, 10, 10),
    val_per_class: int = 2,
    n_rejected: int = 1,
    train_shard_size: int = 12,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> Path:
    """Write a valid dataset to `root` (default: 24 train records in 2 shards, 6 val in 1)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = [
        _record(label, i, i < val_per_class, noise_image(rng))
        for label, n in enumerate(per_class)
        for i in range(n)
    ]
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    shards = {
        "train": _write_split(root, "train", train, train_shard_size),
        "val": _write_split(root, "val", val, max(len(val), 1)),
    }
    write_manifest(root, pd.DataFrame([{k: v for k, v in r.items() if k != "png"} for r in records]))
    _write_rejected(root, n_rejected)
    params = DataConfig(
        source="imagefolder:/raw", resolution=RESOLUTION, val_fraction=val_fraction,
        min_side=MIN_SIDE, max_pixels=MAX_PIXELS,
    )  # fmt: skip
    meta = {
        "source": params.source,
        "classes": list(CLASSES),
        "resolution": RESOLUTION,
        "image_format": "png",
        "counts": {
            "inputs": len(records) + n_rejected,
            "train": len(train),
            "val": len(val),
            "rejected": n_rejected,
        },
        "shards": shards,
        "index": {"format": INDEX_FORMAT, "records": {
            split: [len(read_shard(root / name)) for name in names] for split, names in shards.items()}},
        "params": params.model_dump(mode="json"),
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


def _record(label: int, index: int, is_val: bool, image: np.ndarray) -> dict[str, Any]:
    png = encode_image(image)
    return {
        "key": record_key(label, index),
        "source_path": f"/raw/{CLASSES[label]}/{index:04d}.png",
        "split": "val" if is_val else "train",
        "label": label,
        "class_name": CLASSES[label],
        "width": ORIGINAL_SIDE,
        "height": ORIGINAL_SIDE,
        "mode": "L",
        "sha256": hashlib.sha256(png).hexdigest(),
        "shard": "",
        "png": png,
    }


def _write_split(root: Path, split: str, records: list[dict[str, Any]], size: int) -> list[str]:
    """Write `records` in shards of `size`; fill in each record's `shard`."""
    names = []
    for start in range(0, len(records), size):
        name = f"{split}-{len(names):06d}.tar"
        chunk = records[start : start + size]
        for r in chunk:
            r["shard"] = name
        write_shard(root / name, [_sample(r) for r in chunk])
        write_index(root / name)  # as ingest does
        names.append(name)
    return names


def _sample(record: dict[str, Any]) -> Sample:
    meta = {k: record[k] for k in ("key", "source_path", "label", "class_name", "sha256")}
    return {
        "__key__": record["key"],
        "png": record["png"],
        "cls": str(record["label"]).encode("ascii"),
        "json": json.dumps(meta).encode(),
    }


def _write_rejected(root: Path, n: int) -> None:
    reason = "shorter side 8 < min_side 16"
    rows = [{"path": f"/raw/tiny/{i:04d}.png", "reason": reason} for i in range(n)]
    pd.DataFrame(rows, columns=["path", "reason"]).to_csv(root / "rejected.csv", index=False)


# ---------------------------------------------------------------------------- reading and editing


def write_manifest(root: Path, manifest: pd.DataFrame) -> None:
    manifest.to_parquet(root / "manifest.parquet", index=False)


def read_manifest(root: Path) -> pd.DataFrame:
    return pd.read_parquet(root / "manifest.parquet")


def write_shard(path: Path, samples: list[Sample]) -> None:
    from webdataset.writer import TarWriter

    with TarWriter(str(path), encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)


def read_shard(path: Path) -> list[Sample]:
    """The records of a shard as dicts of bytes, keyed by extension plus `__key__` (the project's reader)."""
    return [
        {k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")}
        for s in iter_records(path)
    ]


def edit_manifest(root: Path, edit: Callable[[pd.DataFrame], pd.DataFrame | None]) -> None:
    """Apply `edit` to the manifest (in place, or return a new frame) and write it back."""
    manifest = read_manifest(root)
    write_manifest(root, _returned_or(edit(manifest), manifest))


def edit_meta(root: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Apply `edit` in place to the parsed dataset.json and write it back."""
    meta = json.loads((root / "dataset.json").read_text())
    edit(meta)
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))


def edit_shard(root: Path, name: str, edit: Callable[[list[Sample]], list[Sample] | None]) -> None:
    """Apply `edit` to the samples of shard `name` (in place, or return a new list); rewrite it."""
    samples = read_shard(root / name)
    write_shard(root / name, _returned_or(edit(samples), samples))
    try:
        write_index(root / name)  # the index follows the edit, as a re-ingest would write it
    except ValueError:  # a record the edit broke (no image or label) cannot be indexed
        (root / index_name(name)).unlink(missing_ok=True)


def edit_record(root: Path, key: str, edit: Callable[[Sample], None]) -> None:
    """Apply `edit` in place to the shard record `key` (found through the manifest's `shard`)."""
    name = read_manifest(root).set_index("key").loc[key, "shard"]

    def apply(samples: list[Sample]) -> None:
        edit(next(s for s in samples if s["__key__"] == key))

    edit_shard(root, name, apply)


def set_json(sample: Sample, **fields: Any) -> None:
    """Update fields of a record's `.json` member."""
    meta = json.loads(sample["json"])
    meta.update(fields)
    sample["json"] = json.dumps(meta).encode()


def _returned_or(returned: Any, original: Any) -> Any:
    return original if returned is None else returned

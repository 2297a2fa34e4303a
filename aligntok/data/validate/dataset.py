"""The ingest contract as read for validation: `dataset.json`, `manifest.parquet`, `rejected.csv`, and one
pass over each shard (record count, the first records decoded). Reading never judges: what is wrong becomes
a row of a frame for the expectations; only a missing or malformed contract file raises."""

from __future__ import annotations

import json
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from aligntok.data.captions import CaptionScheme, control_character, is_held_out, parse_caption
from aligntok.data.shards import CAPTION_KEY, NO_LABEL, iter_records, record_image_key, record_label
from aligntok.errors import AligntokError

MANIFEST_COLUMNS = (
    "key", "source_path", "split", "label", "class_name",
    "width", "height", "mode", "sha256", "shard",
)  # fmt: skip
REJECTED_COLUMNS = ("path", "reason")
SPLITS = ("train", "val")
REQUIRED_META_KEYS = (
    "classes", "resolution", "shards",
    "counts.inputs", "counts.train", "counts.val", "counts.rejected",
    "params.min_side", "params.max_pixels", "params.val_fraction",
)  # fmt: skip
SAMPLE_COLUMNS = (
    "shard", "key", "decoded", "error", "height", "width", "channels", "dtype", "min", "max",
    "label", "json_consistent", "in_manifest", "manifest_label", "manifest_shard",
)  # fmt: skip
SHARD_COLUMNS = ("shard", "split", "exists", "readable", "records", "error")
CAPTION_COLUMNS = (
    "shard", "split", "key", "utf8", "chars", "stripped", "control", "label",
    "in_scheme", "caption_label", "held_out_in_train",
)  # fmt: skip
"""One row per record with a caption (every record of every shard, not only the decoded ones). The last
three are filled for a dataset whose captions follow a scheme (`dataset.json` `caption_scheme`)."""


class DatasetFormatError(AligntokError, ValueError):
    """A contract file exists but cannot be read as the ingest contract describes."""


@dataclass(frozen=True)
class Dataset:
    """The contract files of one dataset directory, read but not yet checked."""

    data_dir: Path
    meta: dict[str, Any]
    manifest: pd.DataFrame
    rejected: pd.DataFrame

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def shards(self) -> dict[str, list[str]]:
        return {split: list(names) for split, names in self.meta["shards"].items()}

    @property
    def declared_captions(self) -> dict[str, int]:
        """Records with a caption per split, as dataset.json declares them (none: an uncaptioned dataset)."""
        declared = self.meta.get("captions") or {}
        return {split: int(declared.get(split) or 0) for split in SPLITS}

    @property
    def caption_scheme(self) -> CaptionScheme | None:
        """The scheme the captions follow (`dataset.json` `caption_scheme`), None for found captions."""
        described = self.meta.get("caption_scheme")
        if described is None:
            return None
        try:
            return CaptionScheme.from_json(described)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DatasetFormatError(f"{self.data_dir / 'dataset.json'}: malformed 'caption_scheme' "
                                     f"({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class ShardScan:
    """One pass over a shard: record count, read error, decoded leading records."""

    shard: str
    split: str
    exists: bool
    readable: bool | None
    records: int | None
    error: str | None
    samples: list[dict[str, Any]]
    captions: list[dict[str, Any]]


def load_dataset(data_dir: Path) -> Dataset:
    """Read the contract files; raise naming the file that is missing or malformed."""
    paths = {name: data_dir / name for name in ("dataset.json", "manifest.parquet", "rejected.csv")}
    for name, path in paths.items():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: {name} not found; is {data_dir} an ingest output?")
    meta = _read_meta(paths["dataset.json"])
    try:
        manifest = pd.read_parquet(paths["manifest.parquet"])
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DatasetFormatError(f"{paths['manifest.parquet']}: not readable: {exc}") from exc
    return Dataset(data_dir, meta, manifest, _read_rejected(paths["rejected.csv"]))


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DatasetFormatError(f"{path}: not valid JSON: {exc}") from exc
    for dotted in REQUIRED_META_KEYS:
        node: Any = meta
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise DatasetFormatError(f"{path}: missing key {dotted!r}")
            node = node[part]
    if not isinstance(meta["classes"], list):  # empty for a dataset without class labels (captions only)
        raise DatasetFormatError(f"{path}: 'classes' must be a list")
    if not isinstance(meta["shards"], dict):
        raise DatasetFormatError(f"{path}: 'shards' must map split names to shard file names")
    return meta


def _read_rejected(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:  # not even a header: rejected_columns reports it
        return pd.DataFrame()


def manifest_index(manifest: pd.DataFrame) -> dict[str, tuple[Any, Any]]:
    """key -> (label, shard) of the first manifest row with that key."""
    if "key" not in manifest.columns:
        return {}
    rows = manifest.drop_duplicates("key")
    labels = rows["label"].tolist() if "label" in rows else [None] * len(rows)
    shards = rows["shard"].tolist() if "shard" in rows else [None] * len(rows)
    keys = rows["key"].tolist()
    return {k: (lab, sh) for k, lab, sh in zip(keys, labels, shards) if isinstance(k, str)}


def scan_shard(
    path: Path, split: str, n: int, index: dict[str, tuple[Any, Any]], scheme: CaptionScheme | None = None
) -> ShardScan:
    """Count the records of one shard, decode its first `n` (deterministic, no shuffle) and describe the caption
    of every record that has one (parsed by `scheme` when given)."""
    if not path.is_file():
        return ShardScan(path.name, split, False, None, None, "missing", [], [])
    samples: list[dict[str, Any]] = []
    captions: list[dict[str, Any]] = []
    records = 0
    try:
        for sample in iter_records(path):
            if records < n:
                samples.append(_sample_row(path.name, sample, index))
            if CAPTION_KEY in sample:
                captions.append(_caption_row(path.name, split, sample, scheme))
            records += 1
    except Exception as exc:  # any read failure is a finding about this shard, not a crash
        return ShardScan(path.name, split, True, False, None, describe_error(exc), samples, captions)
    return ShardScan(path.name, split, True, True, records, None, samples, captions)


def _caption_row(shard: str, split: str, sample: dict[str, Any], scheme: CaptionScheme | None) -> dict[str, Any]:
    """One row of the captions frame: what the caption rules look at, never the text itself (frames stay small)."""
    data: bytes = sample[CAPTION_KEY]
    try:
        text, utf8 = data.decode("utf-8"), True
    except UnicodeDecodeError:
        text, utf8 = data.decode("utf-8", "replace"), False
    try:
        label: int | None = record_label(sample)
    except ValueError:  # a malformed .cls: sample_decodes reports it
        label = None
    row: dict[str, Any] = dict.fromkeys(CAPTION_COLUMNS)
    row.update(shard=shard, split=split, key=sample["__key__"], utf8=utf8, chars=len(text.strip()),
               stripped=text == text.strip(), control=control_character(text) is not None,
               label=None if label == NO_LABEL else label)
    if scheme is not None:
        parsed = parse_caption(text, scheme)
        row.update(in_scheme=parsed is not None, caption_label=None if parsed is None else parsed[1],
                   held_out_in_train=parsed is not None and split == "train" and is_held_out(*parsed, scheme))
    return row


def _sample_row(shard: str, sample: dict[str, Any], index: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """One row of the samples frame; a decode failure fills `error`, never raises."""
    key = sample["__key__"]
    row: dict[str, Any] = dict.fromkeys(SAMPLE_COLUMNS)
    row.update(shard=shard, key=key, decoded=False, in_manifest=key in index)
    if key in index:
        row["manifest_label"], row["manifest_shard"] = index[key]
    label: int | None = None
    try:
        row.update(_image_stats(_read_image(sample)))
        label = record_label(sample)
        row["label"] = None if label == NO_LABEL else label
        row["decoded"] = True
    except Exception as exc:  # PIL raises many types for a damaged image
        row["error"] = describe_error(exc)
    row["json_consistent"] = _json_consistent(sample, key, label)
    return row


def _read_image(sample: dict[str, Any]) -> np.ndarray:
    """The stored image as an array, without any mode conversion: (H, W) or (H, W, C)."""
    with Image.open(BytesIO(sample[record_image_key(sample)])) as image:
        image.load()
        return np.asarray(image)


def _image_stats(array: np.ndarray) -> dict[str, Any]:
    return {
        "height": array.shape[0],
        "width": array.shape[1],
        "channels": 1 if array.ndim == 2 else array.shape[2],
        "dtype": str(array.dtype),
        "min": float(array.min()),
        "max": float(array.max()),
    }


def _json_consistent(sample: dict[str, Any], key: str, label: int | None) -> bool:
    """The `.json` member parses and names the record's own key and `.cls` label (null without one)."""
    try:
        meta = json.loads(sample["json"])
    except (KeyError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("key") != key:
        return False
    if label == NO_LABEL:
        return meta.get("label") is None
    return label is None or meta.get("label") == label


def describe_error(exc: BaseException) -> str:
    # webdataset appends stream objects to args; the first argument is the message.
    message = exc.args[0] if exc.args else ""
    return f"{type(exc).__name__}: {message}"

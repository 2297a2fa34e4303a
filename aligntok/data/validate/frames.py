"""The pandas frames the expectations run on (one per row of the table in the package docstring), and the
declared-versus-observed counts of the report."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from aligntok.data.validate.dataset import CAPTION_COLUMNS, SAMPLE_COLUMNS, SHARD_COLUMNS, SPLITS, Dataset, ShardScan

SHARE_DIGITS = 12
"""Shares and their bounds are rounded so that an exact-boundary share is not lost to float error."""


def build_frames(dataset: Dataset, scans: list[ShardScan]) -> dict[str, pd.DataFrame]:
    """Every frame the expectations run on, by name."""
    captions = _captions_frame(scans)
    return {
        "manifest": _manifest_frame(dataset, set(captions["key"])),
        "classes": _classes_frame(dataset),
        "rejected": dataset.rejected,
        "totals": _totals_frame(dataset),
        "splits": _splits_frame(dataset, scans),
        "shards": pd.DataFrame(
            [{c: getattr(s, c) for c in SHARD_COLUMNS} for s in scans], columns=list(SHARD_COLUMNS)
        ),
        "samples": _samples_frame(scans),
        "captions": captions,
    }


def _manifest_frame(dataset: Dataset, captioned: set[str]) -> pd.DataFrame:
    """The manifest plus `pixels` (original width*height), the class name its label implies, and whether each
    record has a label or a caption (`captioned`: the keys of the shard records with one)."""
    frame = dataset.manifest.copy()
    if {"width", "height"} <= set(frame.columns):
        frame["pixels"] = frame["width"] * frame["height"]
    if "label" in frame.columns:
        frame["expected_class_name"] = [_class_name(dataset.classes, v) for v in frame["label"]]
    if {"label", "key"} <= set(frame.columns):
        frame["labelled_or_captioned"] = frame["label"].notna() | frame["key"].isin(captioned)
    return frame


def _class_name(classes: list[str], label: Any) -> str | None:
    if isinstance(label, (int, float, np.number)) and not isinstance(label, bool):
        if float(label).is_integer() and 0 <= label < len(classes):
            return classes[int(label)]
    return None


def _labels(manifest: pd.DataFrame) -> pd.Series:
    """Integer-valued labels of the manifest (others are reported by `label_in_range`)."""
    if "label" not in manifest.columns:
        return pd.Series([], dtype="int64")
    labels = pd.to_numeric(manifest["label"], errors="coerce").dropna()
    return labels[labels == labels.round()].astype("int64")


def _classes_frame(dataset: Dataset) -> pd.DataFrame:
    """One row per class of dataset.json, zero-image classes included: count and share."""
    k = len(dataset.classes)
    counts = _labels(dataset.manifest).value_counts().reindex(range(k), fill_value=0)
    total = int(counts.sum())
    shares = [round(int(c) / total, SHARE_DIGITS) if total else 0.0 for c in counts]
    return pd.DataFrame(
        {"label": range(k), "class_name": dataset.classes, "count": counts.tolist(), "share": shares}
    )


def _totals_frame(dataset: Dataset) -> pd.DataFrame:
    accepted, rejected = len(dataset.manifest), len(dataset.rejected)
    return pd.DataFrame(
        [{
            "inputs": dataset.meta["counts"]["inputs"],
            "accepted": accepted,
            "rejected": rejected,
            "accepted_plus_rejected": accepted + rejected,
        }]
    )  # fmt: skip


def _splits_frame(dataset: Dataset, scans: list[ShardScan]) -> pd.DataFrame:
    """Per split: manifest rows and shard records (unknown when a shard is missing or unreadable)."""
    manifest = dataset.manifest
    split_column = manifest["split"] if "split" in manifest.columns else pd.Series([], dtype=object)
    val_fraction = dataset.meta["params"]["val_fraction"]
    rows = []
    for split in SPLITS:
        own = [s for s in scans if s.split == split]
        known = all(s.records is not None for s in own)
        required = split == "train" or val_fraction > 0
        manifest_rows = int((split_column == split).sum())
        rows.append({
            "split": split,
            "shards": len(own),
            "manifest_rows": manifest_rows,
            # null (not checked) for a split that may be empty
            "required_manifest_rows": manifest_rows if required else None,
            "shard_records": sum(s.records or 0 for s in own) if known else None,
            "captions": sum(len(s.captions) for s in own) if known else None,
            "declared_captions": dataset.declared_captions[split],
        })  # fmt: skip
    return pd.DataFrame(rows)


def _captions_frame(scans: list[ShardScan]) -> pd.DataFrame:
    frame = pd.DataFrame([row for s in scans for row in s.captions], columns=list(CAPTION_COLUMNS))
    for column in ("chars", "label", "caption_label"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    return frame


def _samples_frame(scans: list[ShardScan]) -> pd.DataFrame:
    frame = pd.DataFrame([row for s in scans for row in s.samples], columns=list(SAMPLE_COLUMNS))
    for column in ("height", "width", "channels", "min", "max", "label", "manifest_label"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    return frame


def observed_counts(dataset: Dataset, frames: dict[str, pd.DataFrame]) -> dict[str, Any]:
    splits = frames["splits"].set_index("split")
    return {
        "declared": dataset.meta["counts"],
        "observed": {
            "manifest_rows": len(dataset.manifest),
            "rejected_rows": len(dataset.rejected),
            "splits": {
                s: {
                    "manifest_rows": int(row.manifest_rows),
                    "shard_records": None if pd.isna(row.shard_records) else int(row.shard_records),
                }
                for s, row in splits.iterrows()
            },
            "shards": len(frames["shards"]),
            "sampled_records": len(frames["samples"]),
            "captions": {split: int((frames["captions"]["split"] == split).sum()) for split in SPLITS},
        },
    }

"""The `text_features` stage: every distinct caption of the ingest folder, encoded once by the frozen text encoder.

Captions repeat (templates on Fashion-MNIST; duplicates on LAION), so the cache holds one row per distinct
caption and a map from each record key to its row:

- `captions.json`: `format`, the encoder's `description()`, `max_length`, `width`, `captions` (the distinct
  captions, row order), `records` (split -> {record key: row}), `counts`, and `skipped` (a reason, when the
  dataset has no captions: the text-to-image stages then record that they did not run);
- `tokens.npy` (U, L, d) float16, `mask.npy` (U, L) bool, `pooled.npy` (U, d) float32: mapped, not loaded,
  by `TextFeatureSet`, so a trainer's memory does not grow with the caption count.

At LAION scale U is about the record count: 1M captions x 77 tokens x 4,096 (T5-XXL) in float16 is ~630 GB,
which is why large text-to-image runs encode text on the fly instead; at MiniLM's 16 x 384 it is ~12 GB.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aligntok.config import TextConfig
from aligntok.errors import AligntokError
from aligntok.fileio import atomic_write_text

log = logging.getLogger(__name__)

FORMAT = "aligntok-text-features/1"
INDEX = "captions.json"
ARRAYS = {"tokens": np.float16, "mask": np.bool_, "pooled": np.float32}
RERUN = "rerun `aligntok text_features` (dvc repro text_features)"


def split_captions(data_dir: Path, split: str) -> dict[str, str]:
    """Record key -> caption of one split of an ingest folder (records without a caption are left out)."""
    from aligntok.data.reader import read_dataset_info
    from aligntok.data.shards import shard_captions

    info = read_dataset_info(data_dir)
    captions: dict[str, str] = {}
    for name in info.get("shards", {}).get(split) or []:
        captions.update(shard_captions(Path(data_dir) / name))
    return captions


def cache_text_features(data_dir: Path, out_dir: Path, cfg: TextConfig, device: str | torch.device = "cpu",
                        progress: bool = True) -> dict[str, Any]:
    """Encode the distinct captions of the train and val splits into `out_dir`; returns the counts written."""
    from tqdm import tqdm

    from aligntok.text import load_text_encoder

    by_split = {split: split_captions(Path(data_dir), split) for split in ("train", "val")}
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {split: len(captions) for split, captions in by_split.items()}
    if not counts["train"]:
        reason = f"{data_dir}: no training record has a caption (a `.txt` member); the text-to-image stages skip"
        log.warning("text_features: %s", reason)
        for name in ARRAYS:
            (out_dir / f"{name}.npy").unlink(missing_ok=True)
        atomic_write_text(out_dir / INDEX, json.dumps({"format": FORMAT, "skipped": reason, "counts": counts,
                                                       "captions": [], "records": {}}, indent=2) + "\n")
        return {"skipped": reason, **counts}
    distinct = sorted({c for captions in by_split.values() for c in captions.values()})
    row = {caption: i for i, caption in enumerate(distinct)}
    encoder = load_text_encoder(cfg.source, max_length=cfg.max_length, device=device)
    U, L, d = len(distinct), cfg.max_length, encoder.width
    arrays = {name: np.lib.format.open_memmap(out_dir / f"{name}.npy.tmp", mode="w+", dtype=dtype, shape=shape)
              for (name, dtype), shape in zip(ARRAYS.items(), [(U, L, d), (U, L), (U, d)])}
    with tqdm(total=U, desc="text_features", unit="caption", disable=not progress) as bar:
        for first in range(0, U, cfg.batch_size):
            chunk = distinct[first:first + cfg.batch_size]
            features = encoder.encode(chunk)
            stop = first + len(chunk)
            arrays["tokens"][first:stop] = features.tokens.float().cpu().numpy()  # (b, L, d)
            arrays["mask"][first:stop] = features.mask.cpu().numpy()  # (b, L)
            arrays["pooled"][first:stop] = features.pooled.float().cpu().numpy()  # (b, d)
            bar.update(len(chunk))
    full = int(arrays["mask"][:, -1].sum())  # captions that fill every position: truncated, or exactly L tokens
    for name in list(arrays):
        arrays.pop(name).flush()
        (out_dir / f"{name}.npy.tmp").replace(out_dir / f"{name}.npy")
    if full:
        log.warning("text_features: %d of %d captions fill all %d tokens and may be truncated (text.max_length)",
                    full, U, L)
    index = {"format": FORMAT, "encoder": encoder.description(), "max_length": L, "width": d,
             "counts": {**counts, "distinct": U}, "filled_to_max_length": full, "captions": distinct,
             "records": {split: {key: row[c] for key, c in sorted(captions.items())}
                         for split, captions in by_split.items()}}
    atomic_write_text(out_dir / INDEX, json.dumps(index, indent=1) + "\n")
    log.info("text_features: %d distinct captions of %d train / %d val records, (L, d) = (%d, %d) -> %s",
             U, counts["train"], counts["val"], L, d, out_dir)
    return {"distinct": U, **counts}


@dataclass
class TextBatch:
    """Text conditioning of a batch: tokens (B, L, d) float32, mask (B, L) bool, pooled (B, d) float32."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


class TextFeatureSet:
    """The `text_features` cache, mapped: caption rows by record key, and batches of their features."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        path = self.folder / INDEX
        try:
            self.index = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise AligntokError(f"{path}: cannot read the text feature index ({exc}); {RERUN}") from None
        if self.index.get("format") != FORMAT:
            raise AligntokError(f"{path}: format {self.index.get('format')!r}, expected {FORMAT!r}; {RERUN}")
        self.skipped: str | None = self.index.get("skipped")
        self.arrays: dict[str, np.ndarray] = {}
        if self.skipped is None:
            for name, dtype in ARRAYS.items():
                try:
                    self.arrays[name] = np.load(self.folder / f"{name}.npy", mmap_mode="r")
                except (OSError, ValueError) as exc:
                    raise AligntokError(f"{self.folder / (name + '.npy')}: cannot map it ({exc}); {RERUN}") from None
                if self.arrays[name].dtype != dtype or len(self.arrays[name]) != len(self.captions):
                    raise AligntokError(f"{self.folder / (name + '.npy')}: {self.arrays[name].dtype} "
                                        f"{self.arrays[name].shape} does not match {len(self.captions)} captions; "
                                        f"{RERUN}")

    @property
    def captions(self) -> list[str]:
        return list(self.index.get("captions", []))

    @property
    def width(self) -> int:
        return int(self.index["width"])

    @property
    def max_length(self) -> int:
        return int(self.index["max_length"])

    @property
    def encoder(self) -> dict[str, Any]:
        return dict(self.index.get("encoder", {}))

    def rows(self, split: str, keys: list[str]) -> np.ndarray:
        """Caption rows (N,) int64 of records `keys` of `split`; an AligntokError names a key without one."""
        table = self.index.get("records", {}).get(split, {})
        missing = [k for k in keys if k not in table]
        if missing:
            raise AligntokError(f"{self.folder / INDEX}: {len(missing)} {split} records have no caption, e.g. "
                                f"{missing[0]!r}; the latent cache and the text features come from different data; "
                                f"{RERUN}")
        return np.fromiter((table[k] for k in keys), dtype=np.int64, count=len(keys))

    def gather(self, rows: np.ndarray | torch.Tensor) -> TextBatch:
        """Rows (B,) -> their features on the CPU (float32 tokens, bool mask, float32 pooled)."""
        index = np.asarray(rows, dtype=np.int64).reshape(-1)  # (B,)
        order = np.argsort(index, kind="stable")  # read the maps in file order, then put back
        tokens = np.empty((index.size, *self.arrays["tokens"].shape[1:]), dtype=np.float32)  # (B, L, d)
        tokens[order] = self.arrays["tokens"][index[order]]
        return TextBatch(tokens=torch.from_numpy(tokens),
                         mask=torch.from_numpy(np.ascontiguousarray(self.arrays["mask"][index])),  # (B, L)
                         pooled=torch.from_numpy(np.ascontiguousarray(self.arrays["pooled"][index])))  # (B, d)

"""Random access to the ingest shards, in memory that does not grow with the split.

`ShardReader` serves record i of a split from the shards themselves: `dataset.json`'s per-shard record
counts (`index.records`) say which shard holds it, the shard's `.idx` (`aligntok.data.shards.index_shard`)
says where its image bytes lie, and the tar is mapped (`mmap`), so a record costs one slice of the page
cache. A process holds the per-shard counts, and for each shard it touched a map and its index (also
mapped): nothing per record. Every rank and every `DataLoader` worker of a node maps the same files, so one
copy in the page cache serves them all.

A location is an ingest folder or the URL of one (`https://`, `http://`, `s3://`): remote shards and
their indexes are fetched into the local shard cache on first use (`aligntok.data.remote.fetch_to_cache`,
`$ALIGNTOK_SHARD_CACHE`) and mapped from there.

A shard that is missing, truncated (shorter than its index says) or whose index disagrees with
`dataset.json` stops the reader with one line naming the file, when the shard is first opened.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import mmap
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from aligntok.data.shards import INDEX_FORMAT, index_name
from aligntok.errors import AligntokError, one_line

log = logging.getLogger(__name__)

DATASET = "dataset.json"
REMOTE_SCHEMES = ("http://", "https://", "s3://")


class ShardError(AligntokError, ValueError):
    """A shard or its index is missing, truncated or disagrees with dataset.json."""


def is_remote(location: str | Path) -> bool:
    return str(location).startswith(REMOTE_SCHEMES)


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded image bytes -> (3, H, W) uint8 RGB."""
    array = np.array(Image.open(io.BytesIO(data)).convert("RGB"))  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1)


class EncodedImages(ABC):
    """A sequence of encoded images with labels; subclasses say where record i's bytes come from.

    `decode_threads` >= 2 decodes a batch's images on that many threads (`runtime.decode_threads`): Pillow
    releases the GIL while it decodes, so the threads run on separate cores. The batch is the same either way.
    """

    decode_threads: int = 0
    _pool: ThreadPoolExecutor | None = None

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def record_bytes(self, index: int) -> bytes:
        """The encoded image of record `index`."""

    @abstractmethod
    def record_labels(self, indices: torch.Tensor) -> torch.Tensor:
        """Labels (B,) int64 of records `indices` (B,)."""

    def batch_uint8(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> images (B, 3, R, R) uint8, labels (B,) int64."""
        chosen = [self.record_bytes(int(i)) for i in indices]
        if self.decode_threads >= 2 and len(chosen) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="aligntok-decode")
            decoded = list(self._pool.map(decode_image, chosen))
        else:
            decoded = [decode_image(data) for data in chosen]
        return torch.stack(decoded), self.record_labels(indices)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> images (B, 3, R, R) float in [0, 1] (`torch.get_default_dtype()`), labels (B,)."""
        images, labels = self.batch_uint8(indices)
        return images.to(torch.get_default_dtype()).div_(255.0), labels

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pool": None}  # a thread pool does not cross into a worker process


class ShardReader(EncodedImages):
    """The first `limit` records (all: None) of one split of an ingest folder, mapped from its shards."""

    def __init__(self, location: str | Path, split: str, limit: int | None = None, decode_threads: int = 0,
                 cache_dir: Path | None = None) -> None:
        self.location, self.split, self.decode_threads = location, split, decode_threads
        self.info = read_dataset_info(location)
        self.root = _local_root(location, cache_dir, self.info)
        names = self.info.get("shards", {}).get(split) or []
        if not names:
            raise ShardError(f"{_where(location)}: no {split!r} shards in {DATASET}")
        counts = (self.info.get("index") or {}).get("records", {}).get(split)
        if (self.info.get("index") or {}).get("format") != INDEX_FORMAT or counts is None:
            raise ShardError(f"{_where(location)}: {DATASET} has no {INDEX_FORMAT} record index for {split!r} "
                             "(written by an older ingest); rerun `aligntok ingest`")
        if len(counts) != len(names) or sum(counts) != int(self.info["counts"][split]):
            raise ShardError(f"{_where(location)}: {DATASET} index lists {sum(counts)} {split} records in "
                             f"{len(counts)} shards, counts/shards say {self.info['counts'][split]} in {len(names)}")
        self.names = list(names)
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # (S + 1,)
        total = int(self.starts[-1])
        self.size = total if limit is None else min(int(limit), total)
        self._open: dict[int, tuple[mmap.mmap, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.size

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_open": {}}  # maps are reopened in the process that reads

    def head(self, count: int) -> ShardReader:
        """The first `count` records of this split (a new reader over the same files)."""
        head = object.__new__(ShardReader)
        head.__dict__.update(self.__getstate__())
        head.size = min(int(count), self.size)
        return head

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.size:
            raise IndexError(f"record {index} is outside the {self.size} records of {self.split}")
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return shard, index - int(self.starts[shard])

    def _shard(self, shard: int) -> tuple[mmap.mmap, np.ndarray]:
        if shard not in self._open:
            self._open[shard] = self._map(shard)
        return self._open[shard]

    def _map(self, shard: int) -> tuple[mmap.mmap, np.ndarray]:
        name = self.names[shard]
        tar, idx = (self._file(n) for n in (name, index_name(name)))
        expected = int(self.starts[shard + 1] - self.starts[shard])
        try:
            index = np.load(idx, mmap_mode="r", allow_pickle=False)
            fields = index.dtype.names or ()
            if not {"key", "offset", "size", "label"} <= set(fields):
                raise ValueError(f"fields {list(fields)}")
        except (OSError, ValueError) as exc:
            raise ShardError(f"{idx}: not a record index ({one_line(exc)}); rerun `aligntok ingest`") from None
        if len(index) != expected:
            raise ShardError(f"{idx}: indexes {len(index)} records, {DATASET} says {expected}; rerun `aligntok ingest`")
        size = tar.stat().st_size
        needed = int((index["offset"] + index["size"]).max()) if len(index) else 0
        if size < needed:
            raise ShardError(f"{tar}: truncated shard ({size} bytes, its records need {needed}); "
                             "rerun `aligntok ingest`")
        with open(tar, "rb") as stream:
            mapped = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) if size else mmap.mmap(-1, 1)
        return mapped, index

    def _file(self, name: str) -> Path:
        if is_remote(self.location):
            from aligntok.data.remote import fetch_to_cache

            try:
                return fetch_to_cache(f"{str(self.location).rstrip('/')}/{name}", self.root)
            except AligntokError:
                raise
            except Exception as exc:  # network or storage errors: one line naming the URL
                raise ShardError(f"{self.location}/{name}: cannot fetch ({one_line(exc)})") from None
        path = Path(self.root) / name
        if not path.is_file():
            raise ShardError(f"{path}: shard file listed in {DATASET} is missing; rerun `aligntok ingest`")
        return path

    def record_bytes(self, index: int) -> bytes:
        shard, position = self._locate(index)
        mapped, rows = self._shard(shard)
        offset, size = int(rows["offset"][position]), int(rows["size"][position])
        return mapped[offset:offset + size]

    def record_labels(self, indices: torch.Tensor) -> torch.Tensor:
        labels = []
        for i in indices.tolist():
            shard, position = self._locate(int(i))
            labels.append(int(self._shard(shard)[1]["label"][position]))
        return torch.tensor(labels, dtype=torch.int64)

    def key(self, index: int) -> str:
        shard, position = self._locate(index)
        return self._shard(shard)[1]["key"][position].decode("utf-8")

    @property
    def labels(self) -> torch.Tensor:
        """Every label of the set (N,) int64, read from the shard indexes (8 bytes a record)."""
        return torch.from_numpy(np.concatenate([
            np.asarray(self._shard(s)[1]["label"], dtype=np.int64) for s in self._shards_used()])[: self.size])

    @property
    def keys(self) -> list[str]:
        """Every record key of the set, in order (built on request: evaluation and tests, not training)."""
        keys = [k.decode("utf-8") for s in self._shards_used() for k in self._shard(s)[1]["key"]]
        return keys[: self.size]

    def _shards_used(self) -> range:
        return range(int(np.searchsorted(self.starts, self.size, side="left")) if self.size else 0)

    def close(self) -> None:
        for mapped, _ in self._open.values():
            mapped.close()
        self._open.clear()


def read_dataset_info(location: str | Path) -> dict[str, Any]:
    """The `dataset.json` of an ingest folder (or of its URL: read fresh, never from the cache; its sha256 is
    added as `_sha256`, which names the folder of the shard cache)."""
    if is_remote(location):
        from aligntok.data.remote import open_stream

        url = f"{str(location).rstrip('/')}/{DATASET}"
        try:
            with open_stream(url) as stream:
                raw = stream.read()
            return {**json.loads(raw), "_sha256": hashlib.sha256(raw).hexdigest()}
        except AligntokError:
            raise
        except Exception as exc:
            raise ShardError(f"{url}: cannot read ({one_line(exc)})") from None
    path = Path(location) / DATASET
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; run `aligntok ingest` (DVC stage `ingest`) first")
    return json.loads(path.read_text())


def _local_root(location: str | Path, cache_dir: Path | None, info: dict[str, Any]) -> Path:
    """Where the shards are mapped from: the folder itself, or for a URL the shard cache's folder of this very
    dataset.json (a re-ingest to the same URL writes another dataset.json, so it is never served stale files)."""
    if not is_remote(location):
        return Path(location)
    from aligntok.data.remote import cache_root

    return (Path(cache_dir) if cache_dir is not None else cache_root()) / info["_sha256"][:16]


def _where(location: str | Path) -> str:
    return str(location) if is_remote(location) else str(Path(location) / DATASET)


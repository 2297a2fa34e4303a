"""The latent cache: every training image and its horizontal flip, encoded once by the tokenizer.

`cache_latents` writes `latents-NNNNNN.safetensors` shards (shard i holds records
[i·shard_size, (i+1)·shard_size) of the train split, in shard order) and `stats.json`, the
per-channel mean/std over all cached latents (both views). A shard whose metadata says it is
complete is skipped, so a killed run redoes only unfinished shards; with `ALIGNTOK_RETRAIN=1`
(`aligntok.train.checkpoint.RETRAIN_ENV`, set by the pipeline flow for a forced stage) every shard is
re-encoded (and atomically replaced). Under W ranks, rank r encodes a
contiguous run of latent shards (`rank_shards`), reading only the ingest shards that hold their
records (located by dataset.json's per-shard record counts); each rank computes the (count, mean, M2)
of its shards' views, and rank 0 merges them in shard order after a barrier, the same merges in the
same order as one process: `stats.json` is byte-identical at any world size.

Shard file: tensors `latent` (n, C, h, w) float32, `latent_flip` (n, C, h, w) float32 (the
latent of `torch.flip(image, dims=[-1])`), `label` (n,) int64; metadata (strings) `format`,
`index`, `count`, `keys` (JSON list of record keys), `tokenizer_sha256`. A safetensors file is a
fixed layout (header length, JSON header with each tensor's byte span, raw bytes), so the tensors
are read in place.

`LatentNormalizer` is the one place that normalises and de-normalises latents; diffusion code
decodes only through `LatentNormalizer.decode`, which de-normalises first (forgetting that step
gives FID ~130). `load_latents` checks every shard's header and returns a `LatentSet` that maps the
shards read-only (`numpy.memmap`) and gathers each batch's rows from them: process memory does not
grow with the cache, and one copy in the page cache serves every rank of a node. Its batches are
normalised and a pure function of (seed, step).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from aligntok.config import CacheLatentsConfig, RuntimeConfig
from aligntok.data.loader import ImageSet, batch_indices, iter_shard, require_validated, step_generator
from aligntok.data.reader import read_dataset_info
from aligntok.data.shards import INDEX_FORMAT, count_records
from aligntok.distributed import Placement, placed
from aligntok.errors import AligntokError, one_line
from aligntok.fileio import atomic_write_text, sha256_file
from aligntok.tokenizer.api import WEIGHTS, Tokenizer, resolve_folder
from aligntok.train.checkpoint import RETRAIN_ENV, atomic_save_safetensors, retrain_requested

log = logging.getLogger(__name__)

FORMAT = "aligntok-latents/1"
STATS = "stats.json"
SHARD_PATTERN = re.compile(r"^latents-(\d{6})\.safetensors$")
MIN_STD = 1e-6
"""Floor on a channel's std, so a dead channel normalises to 0 instead of NaN."""


def shard_name(index: int) -> str:
    return f"latents-{index:06d}.safetensors"


@dataclass
class CacheSummary:
    """What one `cache_latents` call did (on this rank)."""

    out_dir: Path
    images: int
    """Records in the whole cache (each cached twice: plain and flipped)."""
    shards: int
    encoded: list[int] = field(default_factory=list)
    """Shard indices this call encoded."""
    skipped: list[int] = field(default_factory=list)
    """Shard indices of this rank found complete and left alone."""
    removed: list[str] = field(default_factory=list)
    """Stale files removed (shards beyond the new count)."""
    encoded_images: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    """Encodes per second, both views counted."""
    stats_written: bool = False


# ---------------------------------------------------------------------------- writing the cache


def cache_latents(tokenizer: str | Path, data_dir: Path, out_dir: Path, cfg: CacheLatentsConfig,
                  progress: bool = True, validation: Path | None = None,
                  runtime: RuntimeConfig | None = None) -> CacheSummary:
    """Encode the first `cfg.max_images` train records of an ingest folder (and their flips) into
    latent shards under `out_dir`; rank 0 then writes `stats.json`.

    `tokenizer` is a tokenizer folder, its safetensors file or a `models:/` URI. `runtime`: the placement
    (`runtime.device`; several ranks when launched so). `validation`: the shards' validation.json, which
    must say success (None: no check).
    """
    if validation is not None:
        require_validated(validation)
    with placed(runtime or RuntimeConfig()) as place:
        return _cache(tokenizer, Path(data_dir), Path(out_dir), cfg, progress, place)


def rank_shards(num_shards: int, rank: int, world_size: int) -> range:
    """The latent shards rank `rank` of `world_size` encodes: a contiguous run, ranks in shard order."""
    if not 0 <= rank < world_size:
        raise AligntokError(f"rank {rank} is outside world size {world_size}")
    return range(rank * num_shards // world_size, (rank + 1) * num_shards // world_size)


Partial = tuple[int, torch.Tensor, torch.Tensor]
"""(count, mean (C,), M2 (C,)) of one view of one shard, float64: what `merge_partials` combines."""


def _cache(tokenizer: str | Path, data_dir: Path, out_dir: Path, cfg: CacheLatentsConfig, progress: bool,
           place: Placement) -> CacheSummary:
    rank, world_size = place.rank, place.world_size
    retrain = retrain_requested()
    info, total = _train_records(data_dir, cfg.max_images)
    num_shards = math.ceil(total / cfg.shard_size)
    try:
        folder = resolve_folder(tokenizer)
    except FileNotFoundError as exc:
        raise AligntokError(str(exc)) from None
    tokenizer_sha = sha256_file(folder / WEIGHTS)
    model = Tokenizer.load(folder, device=place.device, batch_size=cfg.batch_size)

    out_dir.mkdir(parents=True, exist_ok=True)
    summary = CacheSummary(out_dir=out_dir, images=total, shards=num_shards)
    if place.is_main:
        (out_dir / STATS).unlink(missing_ok=True)  # rewritten below, once the shards are final
        summary.removed = _remove_stale(out_dir, num_shards)
        if retrain and _existing_shards(out_dir):
            log.warning("cache_latents: %s=1: re-encoding all %d shards in %s (the %d there are replaced)",
                        RETRAIN_ENV, num_shards, out_dir, len(_existing_shards(out_dir)))
    place.barrier()  # nobody writes a shard while rank 0 tidies the folder

    mine = rank_shards(num_shards, rank, world_size)
    sizes = {i: min(cfg.shard_size, total - i * cfg.shard_size) for i in mine}
    # metadata-only check first (for the bar's total); the record keys are checked as they stream by
    pending = {i for i in mine
               if retrain or not _shard_complete(out_dir / shard_name(i), i, sizes[i], tokenizer_sha)}
    bar = tqdm(total=2 * sum(sizes[i] for i in pending), unit="img", disable=not progress,
               desc=f"cache latents (rank {rank}/{world_size})" if world_size > 1 else "cache latents")
    start = time.perf_counter()
    partials: list[tuple[int, list[Partial]]] = []
    first_record = mine.start * cfg.shard_size
    chunks = _chunks(data_dir, info, first_record, min(total, mine.stop * cfg.shard_size), cfg.shard_size) \
        if len(mine) else iter(())
    for index, (keys, encoded, labels) in zip(mine, chunks):
        path = out_dir / shard_name(index)
        if not retrain and _shard_complete(path, index, len(keys), tokenizer_sha, keys):
            summary.skipped.append(index)
            with safe_open(str(path), framework="pt") as handle:
                views = [handle.get_tensor(view) for view in ("latent", "latent_flip")]
        else:
            if index not in pending:  # right count but other records: re-encode after all
                bar.total += 2 * len(keys)
            views = _encode_shard(model, path, index, keys, encoded, labels, cfg.batch_size, tokenizer_sha, bar)
            summary.encoded.append(index)
            summary.encoded_images += len(keys)
        partials.append((index, [view_partial(z) for z in views]))
    bar.close()
    summary.seconds = time.perf_counter() - start
    summary.images_per_s = 2 * summary.encoded_images / summary.seconds if summary.encoded_images else 0.0
    log.info("cache_latents rank %d/%d: encoded %d shards (%d images + flips), skipped %d of its %d shards "
             "in %.1f s (%.1f images/s, both views) -> %s", rank, world_size, len(summary.encoded),
             summary.encoded_images, len(summary.skipped), len(mine), summary.seconds,
             summary.images_per_s, out_dir)
    everyone = _gather_partials(partials, place)
    if place.is_main:
        _write_stats(out_dir, num_shards, everyone, info, str(tokenizer), tokenizer_sha, tuple(model.latent_shape))
        summary.stats_written = True
    return summary


def _gather_partials(partials: list[tuple[int, list[Partial]]], place: Placement) -> list[tuple[int, list[Partial]]]:
    """Every rank's per-shard partial statistics on rank 0, in shard order (after a barrier: all shards written)."""
    if not place.distributed:
        return partials
    gathered: list[Any] = [None] * place.world_size
    torch.distributed.all_gather_object(gathered, partials)
    return sorted((entry for part in gathered for entry in part), key=lambda entry: entry[0])


def _train_records(data_dir: Path, max_images: int | None) -> tuple[dict[str, Any], int]:
    """dataset.json and how many train records the cache takes."""
    if not data_dir.is_dir():
        raise AligntokError(f"{data_dir}: ingest folder not found; run `aligntok ingest` first")
    try:
        info = read_dataset_info(data_dir)
    except FileNotFoundError as exc:
        raise AligntokError(str(exc)) from None
    available = int(info.get("counts", {}).get("train", 0))
    if not info.get("shards", {}).get("train") or available == 0:
        raise AligntokError(f"{data_dir / 'dataset.json'}: the train split is empty (no shards or 0 records)")
    return info, available if max_images is None else min(max_images, available)


def _records(data_dir: Path, info: dict[str, Any], first: int, stop: int) -> Iterator[tuple[str, bytes, int]]:
    """Train records [first, stop) in shard order, opening only the ingest shards that hold them. The records
    per shard come from dataset.json's record index (`index.records.train`, written by ingest); without one (an
    older ingest) they are counted from the tar headers, without reading the images."""
    import tarfile

    names = info["shards"]["train"]
    counts = _indexed_counts(data_dir, info)
    offset = 0
    for position_of_shard, name in enumerate(names):
        if offset >= stop:
            return
        seen = None
        try:
            count = counts[position_of_shard] if counts is not None else count_records(data_dir / name)
            if offset + count > first:
                seen = 0
                for position, record in enumerate(iter_shard(data_dir / name)):
                    seen = position + 1
                    if first <= offset + position < stop:
                        yield record
        except (tarfile.TarError, OSError, ValueError) as exc:
            raise AligntokError(f"{data_dir / name}: damaged shard ({type(exc).__name__}: {one_line(exc)}); "
                                "rerun `aligntok ingest`") from None
        if counts is not None and seen is not None and seen != count:  # the index places later records wrong
            raise AligntokError(f"{data_dir / name}: holds {seen} records, the index in "
                                f"{data_dir / 'dataset.json'} says {count}; rerun `aligntok ingest`")
        offset += count
    if offset < stop:
        raise AligntokError(f"{data_dir}: train shards hold {offset} records, dataset.json says "
                            f"{info['counts']['train']}")


def _indexed_counts(data_dir: Path, info: dict[str, Any]) -> list[int] | None:
    """The train records of each train shard from dataset.json's record index, or None when it has none."""
    index = info.get("index") or {}
    counts = (index.get("records") or {}).get("train") if index.get("format") == INDEX_FORMAT else None
    if counts is None:
        return None
    names = info["shards"]["train"]
    if (not isinstance(counts, list) or len(counts) != len(names)
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)):
        raise AligntokError(f"{data_dir / 'dataset.json'}: index.records.train is not one record count per "
                            f"train shard ({len(names)} shards); rerun `aligntok ingest`")
    return counts


def _chunks(data_dir: Path, info: dict[str, Any], first: int, stop: int,
            size: int) -> Iterator[tuple[list[str], list[bytes], list[int]]]:
    """Records [first, stop) grouped by latent shard: (keys, image bytes, labels), `size` records each."""
    chunk: tuple[list[str], list[bytes], list[int]] = ([], [], [])
    for key, data, label in _records(data_dir, info, first, stop):
        chunk[0].append(key)
        chunk[1].append(data)
        chunk[2].append(label)
        if len(chunk[0]) == size:
            yield chunk
            chunk = ([], [], [])
    if chunk[0]:
        yield chunk


def _shard_complete(path: Path, index: int, count: int, tokenizer_sha: str,
                    keys: list[str] | None = None) -> bool:
    """True when `path` holds `count` records (these `keys`, if given), encoded by this tokenizer."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception:  # truncated or foreign file: re-encode it
        return False
    return (meta.get("format") == FORMAT and meta.get("index") == str(index)
            and meta.get("count") == str(count) and meta.get("tokenizer_sha256") == tokenizer_sha
            and (keys is None or meta.get("keys") == json.dumps(keys)))


def _encode_shard(model: Tokenizer, path: Path, index: int, keys: list[str], encoded: list[bytes],
                  labels: list[int], batch_size: int, tokenizer_sha: str, bar: tqdm) -> list[torch.Tensor]:
    """Encode one shard's images and their flips, in batches from the shard's start, and write it; returns the
    two views (n, C, h, w) as written."""
    images = ImageSet(encoded=encoded, labels=torch.tensor(labels, dtype=torch.int64), keys=keys)
    plain, flipped = [], []
    with torch.no_grad():
        for batch in torch.arange(len(images)).split(batch_size):
            x, _ = images.batch(batch)  # (B, 3, H, W) in [0, 1]
            plain.append(model.encode(x))  # (B, C, h, w)
            flipped.append(model.encode(torch.flip(x, dims=[-1])))  # (B, C, h, w)
            bar.update(2 * len(batch))
    tensors = {"latent": torch.cat(plain).float(), "latent_flip": torch.cat(flipped).float(),
               "label": images.labels}
    metadata = {"format": FORMAT, "index": str(index), "count": str(len(keys)), "keys": json.dumps(keys),
                "tokenizer_sha256": tokenizer_sha}
    atomic_save_safetensors(tensors, path, metadata)
    return [tensors["latent"], tensors["latent_flip"]]


def _existing_shards(out_dir: Path) -> dict[int, Path]:
    found = {}
    for path in out_dir.iterdir():
        match = SHARD_PATTERN.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def _remove_stale(out_dir: Path, num_shards: int) -> list[str]:
    """Remove shards beyond the new count and temporaries of killed runs (rank 0, before anyone writes)."""
    removed = []
    for index, path in sorted(_existing_shards(out_dir).items()):
        if index >= num_shards:
            path.unlink()
            removed.append(path.name)
    for path in out_dir.glob(".latents-*.safetensors.tmp-*"):
        path.unlink(missing_ok=True)
        removed.append(path.name)
    if removed:
        log.info("cache_latents: removed %d stale files from %s", len(removed), out_dir)
    return removed


# ---------------------------------------------------------------------------- statistics


def view_partial(z: torch.Tensor) -> Partial:
    """(count, mean, M2) per channel of latents z (n, C, h, w), in float64."""
    values = z.double().transpose(0, 1).reshape(z.shape[1], -1)  # (C, n·h·w)
    mean = values.mean(dim=1)
    return values.shape[1], mean, ((values - mean[:, None]) ** 2).sum(dim=1)


def merge_partials(partials: list[Partial]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Chan et al.'s pairwise merge, left to right -> mean (C,), unbiased std (C,), number of values."""
    count, mean, m2 = 0, None, None
    for n_b, mean_b, m2_b in partials:
        if mean is None:
            count, mean, m2 = n_b, mean_b, m2_b
            continue
        delta = mean_b - mean
        total = count + n_b
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + delta ** 2 * (count * n_b / total)
        count = total
    if mean is None or count < 2:
        raise AligntokError("too few cached values to compute channel statistics")
    return mean, (m2 / (count - 1)).sqrt(), count


def channel_stats(out_dir: Path, names: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean and std (unbiased, like `torch.std`) over the `latent` and `latent_flip`
    tensors of the given shards, merged shard by shard in float64 (Chan et al.), so memory holds one
    shard at a time. -> mean (C,), std (C,), number of latents (two per record)."""
    partials, latents = [], 0
    for name in names:
        with safe_open(str(out_dir / name), framework="pt") as handle:
            for view in ("latent", "latent_flip"):
                z = handle.get_tensor(view)  # (n, C, h, w)
                latents += z.shape[0]
                partials.append(view_partial(z))
    try:
        mean, std, _ = merge_partials(partials)
    except AligntokError as exc:
        raise AligntokError(f"{out_dir}: {exc}") from None
    return mean, std, latents


def _write_stats(out_dir: Path, num_shards: int, partials: list[tuple[int, list[Partial]]], info: dict[str, Any],
                 source: str, tokenizer_sha: str, latent_shape: tuple[int, int, int]) -> None:
    names = [shard_name(i) for i in range(num_shards)]
    if [index for index, _ in partials] != list(range(num_shards)):
        raise AligntokError(f"cache_latents: statistics of shards {[i for i, _ in partials]} gathered, "
                            f"expected 0..{num_shards - 1}")
    start = time.perf_counter()
    mean, std, values = merge_partials([p for _, views in partials for p in views])
    count = values // (latent_shape[1] * latent_shape[2])  # latents: two per record
    classes = list(info.get("classes", []))
    stats = {"format": FORMAT, "mean": mean.tolist(), "std": std.tolist(), "count": count,
             "images": count // 2, "latent_shape": list(latent_shape), "tokenizer": source,
             "tokenizer_sha256": tokenizer_sha, "num_classes": len(classes), "classes": classes,
             "shards": names}
    atomic_write_text(out_dir / STATS, json.dumps(stats, indent=2) + "\n")
    log.info("cache_latents: %s over %d latents (%d shards) in %.1f s: mean |mu| %.3f, std in [%.3f, %.3f]",
             STATS, count, num_shards, time.perf_counter() - start, mean.abs().mean(), std.min(), std.max())


# ---------------------------------------------------------------------------- normalisation


class LatentNormalizer:
    """Per-channel normalisation of latents (B, C, h, w) with the cache's mean and std.

    The only place latents are normalised or de-normalised; `decode` de-normalises first.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        if mean.ndim != 1 or mean.shape != std.shape:
            raise ValueError(f"mean and std must both be (C,), got {tuple(mean.shape)} and {tuple(std.shape)}")
        self.mean = mean.float()  # (C,)
        self.std = std.float().clamp_min(MIN_STD)  # (C,)

    @classmethod
    def load(cls, path: str | Path) -> LatentNormalizer:
        """From a `stats.json` (or the cache folder holding it)."""
        stats = read_stats(path)
        return cls(torch.tensor(stats["mean"], dtype=torch.float64), torch.tensor(stats["std"], dtype=torch.float64))

    @property
    def channels(self) -> int:
        return self.mean.shape[0]

    def _broadcast(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.ndim != 4 or z.shape[1] != self.channels:
            raise ValueError(f"expected latents (B, {self.channels}, h, w), got {tuple(z.shape)}")
        shape = (1, self.channels, 1, 1)
        return self.mean.to(z).view(shape), self.std.to(z).view(shape)

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) raw latents -> (B, C, h, w) with per-channel mean 0, std 1 over the cache."""
        mean, std = self._broadcast(z)
        return (z - mean) / std

    def denormalise(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) normalised latents -> (B, C, h, w) raw tokenizer latents."""
        mean, std = self._broadcast(z)
        return z * std + mean

    def decode(self, tokenizer: Tokenizer, z_normalised: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, h, w) -> images (B, 3, R, R) in [0, 1]: de-normalise, then decode."""
        if tuple(tokenizer.latent_shape)[0] != self.channels:
            raise AligntokError(f"tokenizer latent {tuple(tokenizer.latent_shape)} does not match the "
                                f"{self.channels} channels of these latent statistics")
        return tokenizer.decode(self.denormalise(z_normalised))


def read_stats(path: str | Path) -> dict[str, Any]:
    """The parsed `stats.json` of a latent cache (the file or its folder)."""
    path = Path(path)
    path = path / STATS if path.is_dir() else path
    if not path.is_file():
        raise AligntokError(f"{path}: latent statistics not found; run `cache_latents` first")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------- loading

VIEWS = ("latent", "latent_flip")
TENSORS = {"latent": ("F32", np.dtype("<f4")), "latent_flip": ("F32", np.dtype("<f4")),
           "label": ("I64", np.dtype("<i8"))}
"""A latent shard's tensors: name -> (safetensors dtype, numpy dtype; safetensors is little-endian)."""
HEADER_LIMIT = 100_000_000
"""The largest safetensors header the safetensors library itself accepts (bytes)."""
SPARE_FILES = 1024
"""File descriptors kept free besides one per mapped shard (sockets, NCCL, checkpoints, logs)."""
RERUN = "rerun `cache_latents`"


@dataclass(frozen=True)
class ShardLayout:
    """Where one latent shard's tensors lie in its file. A safetensors file is a fixed layout: an 8-byte
    little-endian header length, the JSON header (each tensor's `dtype`, `shape`, `data_offsets`), then the
    tensors' raw bytes."""

    path: Path
    records: int
    offsets: dict[str, int]
    """Tensor name -> byte offset of its first element in the file."""
    size: int
    """Bytes of the file the tensors need (the file may be longer, never shorter)."""


def read_layout(path: Path, latent_shape: tuple[int, int, int]) -> ShardLayout:
    """Parse and check a latent shard's header (reading no tensor data): `latent` and `latent_flip` (n, C, h, w)
    float32 with (C, h, w) = `latent_shape`, `label` (n,) int64, all inside the file. A missing, truncated or
    mismatched shard raises a one-line `AligntokError` naming it."""
    if not path.is_file():
        raise AligntokError(f"{path}: listed in {STATS} but missing; {RERUN}")
    size = path.stat().st_size
    try:
        with path.open("rb") as stream:
            head = stream.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
            length = int.from_bytes(head, "little")
            if length > min(size - 8, HEADER_LIMIT):
                raise ValueError(f"its header length says {length} bytes, the file holds {size}")
            header = json.loads(stream.read(length))
        if not isinstance(header, dict):
            raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
    except (OSError, ValueError) as exc:  # JSON and UTF-8 decoding errors are ValueErrors
        raise AligntokError(f"{path}: not a readable latent shard ({one_line(exc)}); {RERUN}") from None
    start, offsets, needed = 8 + length, {}, 8 + length
    latent = header.get("latent")
    first_dim = latent.get("shape") if isinstance(latent, dict) else None
    records = first_dim[0] if isinstance(first_dim, list) and first_dim else None
    if not isinstance(records, int) or records < 0:
        raise AligntokError(f"{path}: no 'latent' tensor (n, {', '.join(map(str, latent_shape))}) in its "
                            f"header; {RERUN}")
    for name, (dtype, array_dtype) in TENSORS.items():
        entry = header.get(name)
        shape = [records, *latent_shape] if name in VIEWS else [records]
        if not isinstance(entry, dict) or entry.get("dtype") != dtype or entry.get("shape") != shape:
            found = f"{entry.get('dtype')} {entry.get('shape')}" if isinstance(entry, dict) else "absent"
            raise AligntokError(f"{path}: tensor {name!r} is {found}, expected {dtype} {shape} ({STATS} latent "
                                f"shape {list(latent_shape)}); {RERUN}")
        bounds = entry.get("data_offsets")
        nbytes = math.prod(shape) * array_dtype.itemsize
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, int) for b in bounds)
                and bounds[1] - bounds[0] == nbytes and bounds[0] >= 0):
            raise AligntokError(f"{path}: tensor {name!r} has data_offsets {bounds}, expected a span of "
                                f"{nbytes} bytes; {RERUN}")
        offsets[name] = start + bounds[0]
        needed = max(needed, start + bounds[1])
    if size < needed:
        raise AligntokError(f"{path}: truncated shard ({size} bytes, its header needs {needed}); {RERUN}")
    return ShardLayout(path=path, records=records, offsets=offsets, size=needed)


class LatentSet:
    """The cached latents, read in place from the shards: plain and flipped views (N, C, h, w) float32 and
    labels (N,) int64, gathered per batch.

    Holds each shard's `ShardLayout`, the cumulative record counts `starts` (S + 1,) int64 and, for each shard a
    batch touched, read-only `numpy.memmap`s of its three tensors; never a copy of the cache. The maps are the
    page cache's pages, so every rank and worker of a node that maps the cache shares one copy; they are opened
    on first use, and a pickled set (a `DataLoader` worker, a spawned rank) carries no maps and re-opens them.
    """

    def __init__(self, shards: list[ShardLayout], latent_shape: tuple[int, int, int], normalizer: LatentNormalizer,
                 classes: list[str] | None = None) -> None:
        self.shards = list(shards)
        self.starts = np.zeros(len(self.shards) + 1, dtype=np.int64)  # (S + 1,)
        self.starts[1:] = np.cumsum([s.records for s in self.shards], dtype=np.int64)
        self._latent_shape = tuple(int(d) for d in latent_shape)
        self.normalizer = normalizer
        self.classes = list(classes or [])
        self._maps: dict[int, dict[str, np.memmap]] = {}
        self._num_classes: int | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __repr__(self) -> str:
        return (f"LatentSet({len(self)} records of {self.latent_shape} (+ flips) in {len(self.shards)} shards, "
                f"{len(self._maps)} mapped)")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}  # maps are re-opened in the process that reads, not copied

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self._latent_shape  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        """The classes the labels index: the cache's class names, or (none listed) the largest label + 1."""
        if self._num_classes is None:
            self._num_classes = len(self.classes) or int(self.labels().max()) + 1
        return self._num_classes

    def views(self, shard: int) -> dict[str, np.memmap]:
        """Shard `shard`'s tensors as read-only maps of its file: latent, latent_flip (n, C, h, w), label (n,)."""
        maps = self._maps.get(shard)
        if maps is None:
            layout = self.shards[shard]
            try:
                raw = np.memmap(layout.path, dtype=np.uint8, mode="r")  # (bytes,): one descriptor per shard
            except (OSError, ValueError) as exc:
                raise AligntokError(f"{layout.path}: cannot map the latent shard ({one_line(exc)}); {RERUN}") from None
            if raw.shape[0] < layout.size:  # shortened since load_latents checked it
                raise AligntokError(f"{layout.path}: truncated shard ({raw.shape[0]} bytes, its header needs "
                                    f"{layout.size}); {RERUN}")
            maps = {}
            for name, (_, dtype) in TENSORS.items():
                shape = (layout.records, *self.latent_shape) if name in VIEWS else (layout.records,)
                first = layout.offsets[name]
                maps[name] = raw[first:first + math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)
            self._maps[shard] = maps
        return maps

    def labels(self) -> torch.Tensor:
        """Every record's label (N,) int64, from the label maps (8 bytes a record; no latent is read)."""
        parts = [self.views(s)["label"] for s in range(len(self.shards))]
        return torch.from_numpy(np.concatenate(parts) if parts else np.empty(0, dtype=np.int64))

    def gather(self, indices: torch.Tensor, flips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """indices (B,), flips (B,) bool -> normalised latents (B, C, h, w) float32, labels (B,) int64, on the CPU.

        Sample i is `latent_flip[indices[i]]` where `flips[i]`, else `latent[indices[i]]`: the requests are
        grouped by (shard, view), each group's rows read from the maps in file order and put back in request
        order, so only the B rows asked for are read."""
        index = indices.detach().cpu().numpy().astype(np.int64).reshape(-1)  # (B,)
        flip = flips.detach().cpu().numpy().astype(bool).reshape(-1)  # (B,)
        if flip.shape != index.shape:
            raise ValueError(f"indices {tuple(indices.shape)} and flips {tuple(flips.shape)} must both be (B,)")
        n = len(self)
        index = np.where(index < 0, index + n, index)  # negative indices count from the end, as in torch
        if index.size and (index.min() < 0 or index.max() >= n):
            bad = int(indices.reshape(-1)[int(np.argmax((index < 0) | (index >= n)))])
            raise IndexError(f"index {bad} is out of bounds for the {n} cached latents")
        shard = np.searchsorted(self.starts, index, side="right") - 1  # (B,)
        row = index - self.starts[shard]  # (B,) within its shard
        z = np.empty((index.size, *self.latent_shape), dtype=np.float32)  # (B, C, h, w)
        y = np.empty(index.size, dtype=np.int64)  # (B,)
        group = shard * 2 + flip  # (B,): one group per (shard, view)
        order = np.lexsort((row, group))  # (B,): by group, then by row
        for part in np.split(order, np.flatnonzero(np.diff(group[order])) + 1):
            if part.size:
                maps = self.views(int(shard[part[0]]))
                z[part] = maps[VIEWS[int(flip[part[0]])]][row[part]]
                y[part] = maps["label"][row[part]]
        return self.normalizer.normalise(torch.from_numpy(z)), torch.from_numpy(y)

    def batch(self, indices: torch.Tensor, flip_generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """indices (B,) -> (z (B, C, h, w) normalised, y (B,)); each sample's view (plain or
        flipped) is drawn with probability 1/2 from `flip_generator`."""
        flips = torch.rand(indices.shape[0], generator=flip_generator) < 0.5  # (B,)
        return self.gather(indices, flips)

    def batch_for_step(self, step: int, batch_size: int, seed: int, rank: int = 0,
                       world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of step `step`'s global batch of `batch_size` samples:
        (z (batch_size / world_size, C, h, w) normalised, y). The global batch (indices and flips)
        depends on (seed, step) only, so resume and DDP see exactly the same data."""
        if batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(f"batch size {batch_size} must split evenly over {world_size} ranks "
                             f"(rank {rank})")
        indices = batch_indices(len(self), batch_size, seed, step)  # (batch_size,)
        flip_generator = step_generator(seed, step, "flip")
        flips = torch.rand(batch_size, generator=flip_generator) < 0.5  # (batch_size,)
        part = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        return self.gather(indices[part], flips[part])


def load_latents(cache_dir: str | Path) -> LatentSet:
    """The cache as a `LatentSet` mapped from its shards: every shard `stats.json` lists is checked (header,
    dtypes, shapes against `stats.json`, file size) and read in place, per batch; no latent is read here."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise AligntokError(f"{cache_dir}: latent cache folder not found; run `cache_latents` first")
    stats = read_stats(cache_dir)
    try:
        latent_shape = tuple(int(d) for d in stats["latent_shape"])
        names, images = list(stats["shards"]), int(stats["images"])
        if len(latent_shape) != 3:
            raise ValueError(f"latent_shape {stats['latent_shape']} is not (C, h, w)")
    except (KeyError, TypeError, ValueError) as exc:
        raise AligntokError(f"{cache_dir / STATS}: {one_line(exc)}; {RERUN}") from None
    shards = [read_layout(cache_dir / name, latent_shape) for name in names]  # type: ignore[arg-type]
    held = sum(s.records for s in shards)
    if held != images:
        raise AligntokError(f"{cache_dir}: shards hold {held} x {list(latent_shape)}, {STATS} says "
                            f"{images} x {list(latent_shape)}; {RERUN}")
    _allow_open_files(len(shards))
    log.info("mapped %d cached latents %s (+ flips) in %d shards from %s", held, latent_shape, len(shards), cache_dir)
    return LatentSet(shards, latent_shape, LatentNormalizer.load(cache_dir / STATS),  # type: ignore[arg-type]
                     list(stats.get("classes", [])))


def _allow_open_files(shards: int) -> None:
    """Raise this process's soft open-file limit, up to the hard one, so that a map of every shard fits: each
    `mmap` keeps a file descriptor, and ImageNet's cache is ~1,300 shards against a common default of 1,024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = shards + SPARE_FILES
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    log.info("latent cache: open-file limit raised from %d to %d for %d shard maps", soft, target, shards)
    if target < needed:
        log.warning("latent cache: %d shards to map but at most %d open files (hard limit); raise `ulimit -n` "
                    "or use larger `cache_latents.shard_size`", shards, hard)

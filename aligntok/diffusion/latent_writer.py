"""Writing the latent cache (the `cache_latents` stage): every training image and its horizontal flip,
encoded once by the tokenizer, in the shard format that `aligntok.diffusion.latents` reads.

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
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from aligntok.config import CacheLatentsConfig, RuntimeConfig
from aligntok.data.loader import ImageSet, iter_shard, require_validated
from aligntok.data.reader import read_dataset_info
from aligntok.data.shards import INDEX_FORMAT, count_records
from aligntok.diffusion.latents import FORMAT, SHARD_PATTERN, STATS, shard_name
from aligntok.distributed import Placement, placed
from aligntok.errors import AligntokError, one_line
from aligntok.fileio import atomic_write_text, sha256_file
from aligntok.tokenizer.api import WEIGHTS, Tokenizer, resolve_folder
from aligntok.train.checkpoint import RETRAIN_ENV, retrain_requested
from aligntok.fileio import atomic_save_safetensors

log = logging.getLogger(__name__)


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

"""The latent cache, read: every training image and its horizontal flip, encoded once by the tokenizer
(written by `aligntok.diffusion.latent_writer.cache_latents`, the `cache_latents` stage).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aligntok.data.loader import batch_indices, step_generator
from aligntok.errors import AligntokError, one_line
from aligntok.tokenizer.api import Tokenizer

log = logging.getLogger(__name__)

FORMAT = "aligntok-latents/1"
STATS = "stats.json"
SHARD_PATTERN = re.compile(r"^latents-(\d{6})\.safetensors$")
MIN_STD = 1e-6
"""Floor on a channel's std, so a dead channel normalises to 0 instead of NaN."""


def shard_name(index: int) -> str:
    return f"latents-{index:06d}.safetensors"


# ---------------------------------------------------------------------------- writing the cache


# ---------------------------------------------------------------------------- statistics


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

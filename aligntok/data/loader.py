"""Training batches from the ingest shards.

The tokenizer stages map a split's shards (`load_split`, `aligntok.data.reader.ShardReader`: process memory
does not grow with the split), decode only the images of each batch, and draw each step's batch from a
generator seeded by (seed, step); `StepBatches` builds them in `DataLoader` workers. A batch is therefore a pure function of the step: a resumed
run sees exactly the batches an uninterrupted run would have seen, and ranks under DDP can take
disjoint slices of the same global batch. Every stage that reads the shards first passes the
validation gate, `require_validated`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aligntok.data.reader import EncodedImages, ShardReader
from aligntok.data.shards import iter_records, record_image_key, record_label
from aligntok.errors import AligntokError

log = logging.getLogger(__name__)


@dataclass
class ImageSet(EncodedImages):
    """N encoded images held in memory (one latent shard's worth in `cache_latents`; small sets in tests),
    labels (N,) int64 and record keys. Training and evaluation read `ShardReader`s instead (`load_split`)."""

    encoded: list[bytes]
    labels: torch.Tensor
    keys: list[str]
    decode_threads: int = 0
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.keys)

    def record_bytes(self, index: int) -> bytes:
        return self.encoded[index]

    def record_labels(self, indices: torch.Tensor) -> torch.Tensor:
        return self.labels[indices]

    def head(self, count: int) -> ImageSet:
        """The first `count` images."""
        return ImageSet(self.encoded[:count], self.labels[:count], self.keys[:count], self.decode_threads)


def iter_shard(path: Path) -> Iterator[tuple[str, bytes, int]]:
    """Yield (key, image bytes, label) from one shard, in stored order (`aligntok.data.shards`)."""
    for record in iter_records(path):
        try:
            yield record["__key__"], record[record_image_key(record)], record_label(record)
        except ValueError as exc:
            raise ValueError(f"{path}: record {record['__key__']!r}: {exc}") from None


def load_split(data_dir: str | Path, split: str, limit: int | None = None, decode_threads: int = 0) -> ShardReader:
    """The `split` records of an ingest folder (or its URL), the first `limit` if given, mapped for random
    access (`aligntok.data.reader.ShardReader`: nothing is read until a batch asks for it, so opening a split
    needs no progress bar); batches are decoded on `decode_threads` threads (0 or 1: in the calling thread)."""
    reader = ShardReader(data_dir, split, limit=limit, decode_threads=decode_threads)
    log.info("mapped %d %s records of %d shards in %s", len(reader), split, len(reader.names), data_dir)
    return reader


class StepSampler(torch.utils.data.Sampler[list[int]]):
    """This rank's slice of each step's batch, `batch_indices(n, batch_size, seed, step)[rank_slice]`, for steps
    `start`, `start + 1`, ... `stop - 1`: the `DataLoader`'s batch sampler. The indices depend on (seed, step)
    only, so which worker builds a batch, and when, never changes what it holds."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, part: slice = slice(None)) -> None:
        self.n, self.batch_size, self.seed, self.start, self.stop, self.part = n, batch_size, seed, start, stop, part

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield batch_indices(self.n, self.batch_size, self.seed, step)[self.part].tolist()


class _Batches(torch.utils.data.Dataset):
    """The DataLoader's dataset: a batch of indices -> (images (B, 3, R, R) `dtype` in [0, 1], labels (B,))."""

    def __init__(self, images: EncodedImages, dtype: torch.dtype) -> None:
        self.images, self.dtype = images, dtype

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.images.batch_uint8(torch.tensor(indices, dtype=torch.int64))
        if torch.utils.data.get_worker_info() is None:
            return images.to(self.dtype).div_(255.0), labels
        # in a worker: convert straight into shared memory, which is how the batch travels to the main process
        # (a private tensor would be copied there once more); the same values as the line above
        storage = torch.empty(0, dtype=self.dtype).untyped_storage()._new_shared(
            images.numel() * torch.empty(0, dtype=self.dtype).element_size())
        out = torch.empty(0, dtype=self.dtype).set_(storage).view(images.shape)
        return out.copy_(images).div_(255.0), labels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.__getitems__([index])
        return images[0], labels[0]


def _whole_batch(batch: Any) -> Any:
    return batch  # `_Batches.__getitems__` already returns the collated batch


class StepBatches:
    """`batches(step)` for the training loop, built by a `torch.utils.data.DataLoader` over the mapped shards.

    `step -> (images (b, 3, R, R) float in [0, 1], labels (b,))`, this rank's slice (`part`) of the step's
    global batch: exactly `images.batch(batch_indices(len(images), batch_size, seed, step)[part])`. `workers`
    processes decode batches ahead (`runtime.loader_workers`; 0: in the calling process), into pinned memory
    when `pin_memory`. The loader starts at the first step asked for (a resumed run's step) and runs in step
    order; a step out of that order restarts it there, so any call order gives the same batches.
    """

    def __init__(self, images: EncodedImages, batch_size: int, seed: int, steps: int, part: slice = slice(None),
                 workers: int = 0, pin_memory: bool = False) -> None:
        self.images, self.batch_size, self.seed, self.steps, self.part = images, batch_size, seed, steps, part
        self.workers, self.pin_memory = workers, pin_memory
        self.dtype = torch.get_default_dtype()  # what the workers convert to: the caller's, whatever theirs is
        self._iterator: Iterator[Any] | None = None
        self._next = -1

    def _start(self, step: int) -> None:
        self.close()
        sampler = StepSampler(len(self.images), self.batch_size, self.seed, step, max(step + 1, self.steps), self.part)
        loader = torch.utils.data.DataLoader(
            _Batches(self.images, self.dtype), batch_sampler=sampler, num_workers=self.workers,
            collate_fn=_whole_batch, pin_memory=self.pin_memory, persistent_workers=False,
            prefetch_factor=4 if self.workers else None,
            generator=torch.Generator().manual_seed(self.seed))  # its own: a loader draws its workers' base
        # seed when it starts, which from the global generator would shift every later global draw (and resumes)
        self._iterator, self._next = iter(loader), step

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iterator is None or step != self._next:
            self._start(step)
        self._next += 1
        return next(self._iterator)  # type: ignore[arg-type]

    def close(self) -> None:
        """Stop the workers (the loop calls this when it ends; a later call restarts them)."""
        if self._iterator is not None and hasattr(self._iterator, "_shutdown_workers"):
            self._iterator._shutdown_workers()
        self._iterator = None


STREAMS = ("batch", "flip", "flow")
"""The per-step random streams of training: which samples (`batch`), which view of each (`flip`), and the
flow-matching draws (`flow`: t, noise, label dropout)."""


def step_generator(seed: int, step: int, stream: str) -> torch.Generator:
    """The CPU generator of one random stream of one training step: a pure function of (seed, step, stream).

    Every per-step draw comes from here, so a resumed run and every DDP rank see the same numbers, and
    no two (seed, step, stream) share a generator (for steps below 1,000,003).
    """
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; known: {list(STREAMS)}")
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * len(STREAMS) + STREAMS.index(stream))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The indices of step `step`'s batch: uniform without replacement within the batch."""
    generator = step_generator(seed, step, "batch")
    return torch.randperm(n, generator=generator)[:batch_size] if batch_size <= n else \
        torch.randint(n, (batch_size,), generator=generator)


class ValidationGateError(AligntokError, RuntimeError):
    """The shards' validation report is missing, unreadable or says failed: training on them is refused."""


def require_validated(report: Path) -> dict:
    """Read the `validate` stage's `validation.json`; raise a one-line error unless it says success.

    Every stage that reads the shards calls this first, so a stage run on its own
    (`dvc repro --single-item`) does not train on shards whose validation failed.
    """
    report = Path(report)
    if not report.is_file():
        raise ValidationGateError(f"{report}: validation report not found; run `aligntok validate` "
                                  f"(DVC stage `validate`) on the shards first, or pass --validation PATH")
    try:
        content = json.loads(report.read_text())
        success = content["success"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValidationGateError(f"{report}: not a validation report ({type(exc).__name__}: {exc}); "
                                  f"rerun `aligntok validate`") from None
    if success is not True:
        failed = ", ".join(map(str, content.get("failed") or [])) or "none named"
        raise ValidationGateError(f"{report}: validation of {content.get('data_dir', 'the shards')} failed "
                                  f"(expectations: {failed}); fix the data or the expectations and rerun "
                                  f"`aligntok validate`")
    return content

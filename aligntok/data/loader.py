"""Training batches from the ingest shards.

The tokenizer stages read one split's encoded images into memory (a few hundred bytes to a
few hundred KB each), decode only the images of each batch, and draw each step's batch from a
generator seeded by (seed, step). A batch is therefore a pure function of the step: a resumed
run sees exactly the batches an uninterrupted run would have seen, and ranks under DDP can take
disjoint slices of the same global batch. Every stage that reads the shards first passes the
validation gate, `require_validated`.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from aligntok.data.shards import iter_records, record_image_key, record_label
from aligntok.errors import AligntokError

log = logging.getLogger(__name__)


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded image bytes -> (3, H, W) uint8 RGB."""
    array = np.array(Image.open(io.BytesIO(data)).convert("RGB"))  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1)


@dataclass
class ImageSet:
    """N encoded images (decoded per batch), labels (N,) int64 and record keys.

    `decode_threads` >= 2 decodes a batch's images on that many threads (`runtime.decode_threads`): Pillow
    releases the GIL while it decodes, so the threads run on separate cores. The batch is the same either way.
    """

    encoded: list[bytes]
    labels: torch.Tensor
    keys: list[str]
    decode_threads: int = 0
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.keys)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> images (B, 3, R, R) float in [0, 1], labels (B,)."""
        chosen = [self.encoded[int(i)] for i in indices]
        if self.decode_threads >= 2 and len(chosen) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="aligntok-decode")
            decoded = list(self._pool.map(decode_image, chosen))
        else:
            decoded = [decode_image(data) for data in chosen]
        images = torch.stack(decoded)  # (B, 3, R, R) uint8
        return images.to(torch.get_default_dtype()).div_(255.0), self.labels[indices]  # float32 unless changed


def read_dataset_info(data_dir: Path) -> dict:
    path = data_dir / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; run `aligntok ingest` (DVC stage `ingest`) first")
    return json.loads(path.read_text())


def iter_shard(path: Path) -> Iterator[tuple[str, bytes, int]]:
    """Yield (key, image bytes, label) from one shard, in stored order (`aligntok.data.shards`)."""
    for record in iter_records(path):
        try:
            yield record["__key__"], record[record_image_key(record)], record_label(record)
        except ValueError as exc:
            raise ValueError(f"{path}: record {record['__key__']!r}: {exc}") from None


def load_split(data_dir: Path, split: str, limit: int | None = None, progress: bool = True,
               decode_threads: int = 0) -> ImageSet:
    """Read the `split` shards of an ingest folder (the first `limit` records, if given); batches are decoded
    on `decode_threads` threads (0 or 1: in the calling thread)."""
    info = read_dataset_info(data_dir)
    shards = info["shards"].get(split) or []
    if not shards:
        raise ValueError(f"{data_dir}: no {split!r} shards in dataset.json")
    total = info["counts"][split] if limit is None else min(limit, info["counts"][split])
    encoded: list[bytes] = []
    labels: list[int] = []
    keys: list[str] = []
    bar = tqdm(total=total, desc=f"read {split}", unit="img", disable=not progress, leave=False)
    for shard in shards:
        for key, data, label in iter_shard(data_dir / shard):
            if len(keys) == total:
                break
            encoded.append(data)
            labels.append(label)
            keys.append(key)
            bar.update()
    bar.close()
    if len(keys) != total:
        raise ValueError(f"{data_dir}: {split} shards hold {len(keys)} records, dataset.json says {total}")
    log.info("read %d %s images from %d shards (%.1f MB encoded)", total, split, len(shards),
             sum(map(len, encoded)) / 1e6)
    return ImageSet(encoded=encoded, labels=torch.tensor(labels, dtype=torch.int64), keys=keys,
                    decode_threads=decode_threads)


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

"""`ingest`: a data source to train/val WebDataset shards, a manifest and a rejection list.

Outputs in OUT_DIR (a contract: the validate stage reads them):

- `train-000000.tar`, ..., `val-000000.tar`, ...: shards of at most `shard_max_count` samples
  and `shard_max_bytes` bytes of file (a shard always takes at least one sample). A sample
  is `<key>.cls` (label, ASCII decimal), `<key>.json` ({key, source_path, label, class_name,
  sha256}), `<key>.png` or `<key>.jpg` (RGB, resolution²) and, for an input with a caption,
  `<key>.txt` (the caption, UTF-8); `key` is the first 16 hex digits of the sha256 of the
  source bytes. A captioned input without a label has no `.cls`, and null `label` and
  `class_name` in its `.json` (`aligntok.data.shards.NO_LABEL` in the index). Tar headers
  are fixed (USTAR, mtime 0, uid/gid 0, user/group `aligntok`, mode 0444), so a re-run
  writes byte-identical files.
- `train-000000.idx`, ...: each shard's record index (key, offset and size of the image bytes, label;
  `aligntok.data.shards.index_shard`), read back from the written tar, for random access.
- `manifest.parquet`: one row per accepted image, in shard order (train, then val); `label` and
  `class_name` are null for a captioned image without a label.
- `rejected.csv`: `path,reason`, one row per rejected input, sorted by path, every field
  quoted (a name may hold a comma, quote, `\\r` or `\\n`). A path that is not valid UTF-8
  is rejected (reason `unsupported name`) and written with each undecodable byte as
  `\\xNN` and each backslash doubled: `codecs.escape_decode` gives its bytes back.
- `dataset.json`: source, classes, resolution, image format, counts, shard names, the records of each
  shard (`index.records`), `captions` (records with a caption per split, `{train: n, val: m}`), params,
  and for a source whose captions follow a scheme (`fashion-mnist-captioned`) that scheme as
  `caption_scheme` (`aligntok.data.captions.CaptionScheme.describe`: palette, garments, templates,
  held-out pairs), so that evaluation reads them from the data.

Captions: an input's caption (`SourceItem.caption`) is stripped and rejected, with the input, when it is
not valid UTF-8, empty, longer than `caption_max_chars` or holds a control character other than
whitespace (`aligntok.data.captions.normalise_caption`; the reason starts `caption ...`). An input needs a
label or a caption: without either it is rejected (`no label`), as before captions existed.

How it runs:
1. One streaming pass reads every input of the source, in the source's order, and a pool
   of `workers` spawned processes hashes, probes, decodes, converts, resizes and encodes
   it (ordered, at most a few chunks in flight). Accepted outputs are appended to a spool
   file; only their metadata stays in memory.
2. Exact duplicates (same sha256) keep the copy with the smallest source path. Each image
   gets its split from a hash of (seed, sha256) and its place from another, so neither
   depends on enumeration order or on `workers`. An input whose source forces its split
   (`SourceItem.split`: a held-out caption pair goes to val) goes there instead; with
   `data.val_source` set, an input forced into the other source's split is rejected
   (`held out of ...`), so that neither split takes what it must not.
3. Shards are planned from the exact sizes, then written from the spool by the same pool,
   one shard per task.

With `data.val_source` set (ImageNet's official val folder), the split comes from the source
instead: `source` is read whole into train, then `val_source` whole into val, and `val_fraction`
is not used. The two must have the same classes (names, in label order): checked before the pass
when both sources know them up front (image folders), after it otherwise (`webdataset:`), and an
`IngestError` names both sources and the first class that differs. Source paths then carry their
split, `train:<path>` and `val:<path>`, so that no two inputs share a name. Exact duplicates
within one source keep the smallest path as above; an image in both sources keeps its val copy
(the benchmark stays whole and no val image is trained on): the train copy is rejected as
`duplicate of val:<path>`, and their number is logged.

Everything is built in `OUT_DIR/.partial` and moved in at the end, the manifest and
`dataset.json` last (the old ones are deleted first), so a manifest on disk never names an
incomplete shard; stale shards of an earlier run are removed. OUT_DIR must be new, empty
or hold only these outputs: anything else makes `ingest` refuse rather than mix. It must
not be (or lie inside) a folder the source reads. While `ingest` runs it holds
`OUT_DIR/.ingest.lock` (`aligntok.locks.file_lock`, the file holding its pid): a second `ingest` into
the same folder fails at once naming that pid, and a lock left by a run that died is taken over.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import re
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NamedTuple, TypeVar

from tqdm import tqdm

from aligntok.config import DataConfig
from aligntok.data.captions import normalise_caption
from aligntok.data.images import ImagePolicy, ProcessedImage, process_image
from aligntok.data.shards import (CAPTION_KEY, ENCODED_EXTENSION, INDEX_FORMAT, ShardTask, index_name, plan_shards,
                                  tar_size, write_shard)
from aligntok.data.sources import IngestError, Source, SourceItem, open_source
from aligntok.locks import LockBusy, LockError, file_lock

__all__ = ["IngestError", "IngestSummary", "ingest", "plan_shards", "split_of", "tar_size"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
MANIFEST, REJECTED, DATASET = "manifest.parquet", "rejected.csv", "dataset.json"
SHARD_NAME = re.compile(r"^(train|val)-\d{6}\.(tar|idx)$")
"""A shard or its record index (`aligntok.data.shards.index_shard`)."""
STAGING, SPOOL, LOCK = ".partial", "spool.bin", ".ingest.lock"
_MAX_CHUNK = 32  # inputs per pool task: amortises IPC for 28×28 images
_KEEP_FIRST = {"val": 0, "train": 1, None: 1}
"""Rank of a duplicate's copy by the split its source feeds: a val source's copy is kept over a train one."""
UNSUPPORTED_NAME = "unsupported name: not valid UTF-8 (written with \\xNN for each undecodable byte, \\\\ for \\)"

_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass(frozen=True)
class IngestSummary:
    """What one `ingest` call did. `shards` maps split to the shard paths written."""

    source: str
    out_dir: Path
    classes: list[str]
    inputs: int
    train: int
    val: int
    rejected: int
    seconds: float
    images_per_s: float
    shards: dict[str, list[Path]]
    captions: dict[str, int] = field(default_factory=dict)
    """Accepted records with a caption, per split."""


class _Outcome(NamedTuple):
    """A worker's answer for one input: the image, or the reason it was rejected unread."""

    source_path: str
    label: int | None
    image: ProcessedImage | None
    reason: str | None
    caption: str | None = None
    """Normalised."""
    split: str | None = None
    """The split the source forces, if any."""


class _Copy(NamedTuple):
    """One accepted copy of an image; the copies of a sha256 sort by (rank, path), the first is kept."""

    rank: int
    path: str
    label: int | None
    source_split: str
    """The split of the source it came from (`data.val_source`), "" when one source is split by hash."""
    caption: str | None
    forced: str | None


@dataclass(slots=True)
class _Record:
    """An accepted image: its metadata and where its encoded bytes sit in the spool."""

    source_path: str
    label: int | None
    image: ProcessedImage  # without the encoded bytes: those live in the spool
    offset: int
    length: int
    split: str = ""
    shard: str = ""
    caption: str | None = None

    @property
    def key(self) -> str:
        return self.image.sha256[:16]


@dataclass
class _Collected:
    """Result of the pass: accepted images by sha256 (with every copy's path), and rejections."""

    inputs: int = 0
    records: dict[str, _Record] = field(default_factory=dict)
    copies: dict[str, list[_Copy]] = field(default_factory=dict)
    """sha256 -> every copy; the smallest (rank, path) is kept (`_KEEP_FIRST`)."""
    rejected: list[tuple[str, str]] = field(default_factory=list)


def ingest(
    source: str, out_dir: Path, cfg: DataConfig, progress: bool = True, limit: int | None = None
) -> IngestSummary:
    """Ingest `source` (a `DataConfig.source` spec) into shards in `out_dir`; see the module doc.

    With `cfg.val_source` set, `source` becomes the train split and `cfg.val_source` the val
    split. `limit` keeps only the first `limit` inputs of each source (for tests and benchmarks).
    Raises `IngestError` for a missing or empty source, an unknown scheme, a val source whose
    classes differ from the train source's, an unusable `out_dir`, one that another `ingest`
    holds, or an unknown name in `cfg.formats`.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    _check_formats(cfg.formats)
    inputs = _open_inputs(source, cfg)
    for _, src in inputs:
        _check_out_dir(out_dir, src)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _locked(out_dir):
        _check_out_dir_contents(out_dir)
        staging = _fresh_staging(out_dir)
        try:
            with _Pool(cfg.workers) as pool:
                summary = _ingest_into(inputs, source, out_dir, staging, cfg, pool, progress, limit, start)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    log.info(
        "ingest %s: %d inputs -> %d train, %d val, %d rejected in %.1f s (%.0f images/s); %d+%d shards in %s",
        source if cfg.val_source is None else f"{source} (train) + {cfg.val_source} (val)", summary.inputs,
        summary.train, summary.val, summary.rejected, summary.seconds,
        summary.images_per_s, len(summary.shards["train"]), len(summary.shards["val"]), out_dir,
    )  # fmt: skip
    if any(summary.captions.values()):
        log.info("ingest %s: captions on %d train and %d val records", source, summary.captions["train"],
                 summary.captions["val"])
    if summary.train + summary.val == 0:
        log.warning("ingest %s: no input was accepted; see %s", source, out_dir / REJECTED)
    return summary


def _ingest_into(
    inputs: list[tuple[str | None, Source]], source: str, out_dir: Path, staging: Path, cfg: DataConfig,
    pool: _Pool, progress: bool, limit: int | None, start: float,
) -> IngestSummary:  # fmt: skip
    collected = _Collected()
    with open(staging / SPOOL, "w+b") as spool:
        for split, src in inputs:
            _collect(src, split, ImagePolicy.from_config(cfg), cfg.caption_max_chars, pool, spool, progress, limit,
                     collected)
    records, rejected = _resolve_duplicates(collected)
    classes = _input_classes(inputs, source, cfg)
    records, shard_names = _write_all_shards(records, classes, staging, cfg, pool, progress)
    (staging / SPOOL).unlink()
    counts = _checked_counts(collected.inputs, records, rejected)
    captions = {split: sum(r.caption is not None for r in records if r.split == split) for split in SPLITS}
    scheme = next((s.describe() for _, src in inputs if (s := src.caption_scheme()) is not None), None)
    _log_rejections(rejected)
    _write_rejected(rejected, staging / REJECTED)
    _write_manifest(records, classes, staging / MANIFEST)
    _write_dataset_json(source, classes, counts, shard_names, Counter(r.shard for r in records), cfg,
                        staging / DATASET, captions, scheme)
    _publish(staging, out_dir, [out for names in shard_names.values() for name in names
                                for out in (name, index_name(name))])
    seconds = time.perf_counter() - start
    return IngestSummary(
        source=source, out_dir=out_dir, classes=classes, inputs=counts["inputs"], train=counts["train"],
        val=counts["val"], rejected=counts["rejected"], seconds=seconds,
        images_per_s=counts["inputs"] / max(seconds, 1e-9),
        shards={split: [out_dir / name for name in names] for split, names in shard_names.items()},
        captions=captions,
    )  # fmt: skip


def _checked_counts(inputs: int, records: list[_Record], rejected: list[tuple[str, str]]) -> dict[str, int]:
    """{inputs, train, val, rejected}, asserting that every input was accounted for."""
    val = sum(record.split == "val" for record in records)
    counts = {"inputs": inputs, "train": len(records) - val, "val": val, "rejected": len(rejected)}
    if inputs != counts["train"] + counts["val"] + counts["rejected"]:
        raise AssertionError(f"ingest lost inputs: {counts}")
    return counts


def _open_inputs(source: str, cfg: DataConfig) -> list[tuple[str | None, Source]]:
    """The sources to read, each with the split it feeds (None: split by `val_fraction`).

    With `cfg.val_source`, refuses a val source that is the train source itself, or whose classes
    (when both are known before reading) differ from it.
    """
    if cfg.val_source is None:
        return [(None, open_source(source, cfg))]
    if cfg.val_source == source:
        raise IngestError(f"data.val_source {source!r} is data.source itself; name the separate validation "
                          "source, or set data.val_source to null to split data.source by data.val_fraction")
    inputs: list[tuple[str | None, Source]] = [("train", open_source(source, cfg)),
                                               ("val", open_source(cfg.val_source, cfg))]
    if all(src.classes() for _, src in inputs):  # image folders know theirs now: fail before the long pass
        _input_classes(inputs, source, cfg)
    return inputs


def _input_classes(inputs: list[tuple[str | None, Source]], source: str, cfg: DataConfig) -> list[str]:
    """The train source's class names; `IngestError` naming both sources and the first class that differs
    when a val source has other classes."""
    classes = inputs[0][1].classes()
    if len(inputs) == 1:
        return classes
    val = inputs[1][1].classes()
    if val != classes:
        first = next((i for i, (a, b) in enumerate(zip(classes, val)) if a != b), min(len(classes), len(val)))
        ours = repr(classes[first]) if first < len(classes) else "no class"
        theirs = repr(val[first]) if first < len(val) else "no class"
        raise IngestError(
            f"data.val_source {cfg.val_source} has other classes than data.source {source}: label {first} is "
            f"{theirs} in the val source, {ours} in the train source ({len(val)} vs {len(classes)} classes)"
        )
    return classes


def split_of(sha256: str, seed: int, val_fraction: float) -> str:
    """`val` iff sha256(f"{seed}:split:{sha256}") read as a number in [0, 1) is below `val_fraction`."""
    digest = hashlib.sha256(f"{seed}:split:{sha256}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def _write_order(record: _Record, seed: int) -> str:
    return hashlib.sha256(f"{seed}:order:{record.image.sha256}".encode()).hexdigest()


# --- output folder ----------------------------------------------------------------------------


def _check_formats(formats: list[str]) -> None:
    """Refuse a `data.formats` name that Pillow has no reader for."""
    from PIL import Image

    Image.init()
    unknown = [name for name in formats if name not in Image.OPEN]
    if unknown:
        raise IngestError(
            f"data.formats: Pillow cannot read {', '.join(unknown)}; it reads {', '.join(sorted(Image.OPEN))}"
        )


def _check_out_dir(out_dir: Path, src: Source) -> None:
    """Refuse an `out_dir` that is a file, or is or lies inside a folder the source reads."""
    if out_dir.exists() and not out_dir.is_dir():
        raise IngestError(f"{out_dir}: output path exists and is not a folder")
    for folder in src.folders():
        if out_dir.resolve().is_relative_to(folder.resolve()):
            raise IngestError(f"{out_dir}: output folder is or lies inside the source folder {folder}")


@contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """Hold `out_dir`'s lock while the body runs: `aligntok.locks.file_lock` on `LOCK`, which holds our pid.

    A second holder fails at once with `IngestError` naming the pid in the file. A lock file left by a run that
    died holds no flock (the kernel drops it with the process) and is taken over; a link planted at `LOCK` is
    not followed (`IngestError`).
    """
    path = out_dir / LOCK

    def take_over(previous: str) -> None:
        log.warning("%s: taking over the lock of pid %s, which no longer holds it", path, previous)

    with ExitStack() as held:
        try:
            held.enter_context(file_lock(path, holder=str(os.getpid()), what="this ingest folder",
                                         on_take_over=take_over))
        except LockBusy as exc:
            raise IngestError(
                f"{out_dir}: another ingest (pid {exc.holder}) is writing this folder (lock {path}); "
                "wait for it to finish or use another folder"
            ) from None
        except LockError as exc:
            raise IngestError(str(exc)) from None
        yield


def _check_out_dir_contents(out_dir: Path) -> None:
    """Refuse an `out_dir` that holds anything but ingest outputs."""
    ours = {MANIFEST, REJECTED, DATASET, STAGING, LOCK}
    unrelated = sorted(p.name for p in out_dir.iterdir() if p.name not in ours and not SHARD_NAME.match(p.name))
    if unrelated:
        shown = ", ".join(unrelated[:5]) + (", ..." if len(unrelated) > 5 else "")
        raise IngestError(
            f"{out_dir}: refusing to write into a folder that holds files other than ingest outputs ({shown}); "
            "use a new or empty folder"
        )


def _fresh_staging(out_dir: Path) -> Path:
    staging = out_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)  # left over from an interrupted run
    staging.mkdir(parents=True)
    return staging


def _publish(staging: Path, out_dir: Path, shard_names: list[str]) -> None:
    """Move the finished outputs from `staging` into `out_dir`, manifest and dataset.json last."""
    for name in (DATASET, MANIFEST):
        (out_dir / name).unlink(missing_ok=True)
    keep = set(shard_names)
    for stale in out_dir.iterdir():
        if SHARD_NAME.match(stale.name) and stale.name not in keep:
            stale.unlink()
    for name in [*shard_names, REJECTED, MANIFEST, DATASET]:
        os.replace(staging / name, out_dir / name)
    staging.rmdir()


# --- the pass over the source -----------------------------------------------------------------


def _process_item(item: SourceItem, policy: ImagePolicy, caption_max_chars: int) -> _Outcome:
    """Worker entry point (module level, so spawned workers can unpickle it)."""
    if not _is_utf8(item.source_path):  # no manifest, shard or table could store it as it is
        return _Outcome(item.source_path, item.label, None, UNSUPPORTED_NAME)
    if item.data is None:
        return _Outcome(item.source_path, item.label, None, item.reason or "unreadable")
    caption = None
    if item.caption is not None:
        caption, reason = normalise_caption(item.caption, caption_max_chars)
        if reason is not None:  # before decoding: a caption costs less to judge than an image
            return _Outcome(item.source_path, item.label, None, reason)
    return _Outcome(item.source_path, item.label, process_image(item.data, policy), None, caption, item.split)


def _collect(
    src: Source, split: str | None, policy: ImagePolicy, caption_max_chars: int, pool: _Pool, spool: IO[bytes],
    progress: bool, limit: int | None, collected: _Collected,
) -> None:  # fmt: skip
    """Run every input of `src` through the policy into `collected`: spool accepted images, group copies
    by sha256. A `split` (a source of its own) goes with each input and prefixes its path, `val:<path>`."""
    items: Iterable[SourceItem] = src if limit is None else itertools.islice(src, limit)
    total = src.count()
    if total is not None and limit is not None:
        total = min(total, limit)
    work = functools.partial(_process_item, policy=policy, caption_max_chars=caption_max_chars)
    desc = "ingest" if split is None else f"ingest {split}"
    with tqdm(total=total, unit="img", desc=desc, disable=not progress, smoothing=0.1) as bar:
        for outcome in pool.imap(work, items, total):
            collected.inputs += 1
            _add(collected, outcome, split, spool)
            bar.update()


def _add(collected: _Collected, outcome: _Outcome, split: str | None, spool: IO[bytes]) -> None:
    image = outcome.image
    path = outcome.source_path if split is None else f"{split}:{outcome.source_path}"
    if image is None or image.encoded is None or (outcome.label is None and outcome.caption is None):
        reason = outcome.reason or (image.reason if image is not None else None) or "no label"
        collected.rejected.append((path, reason))
        return
    if split is not None and outcome.split not in (None, split):
        collected.rejected.append((path, f"held out of {split}: the source puts it in {outcome.split}, and "
                                         f"data.val_source makes this source {split} only"))
        return
    copy = _Copy(_KEEP_FIRST[split], path, outcome.label, split or "", outcome.caption, outcome.split)
    if image.sha256 in collected.records:  # identical bytes give identical output: keep the path only
        collected.copies[image.sha256].append(copy)
        return
    offset = spool.tell()
    spool.write(image.encoded)
    meta = ProcessedImage(image.sha256, image.width, image.height, image.mode, None, None)
    collected.records[image.sha256] = _Record(path, outcome.label, meta, offset, len(image.encoded))
    collected.copies[image.sha256] = [copy]


def _resolve_duplicates(collected: _Collected) -> tuple[list[_Record], list[tuple[str, str]]]:
    """Keep one copy of each sha256, reject the others: a val source's copy first, then the smallest path.
    The kept copy brings its label, caption and split."""
    records, rejected, val_copies = [], list(collected.rejected), 0
    for sha, record in collected.records.items():
        kept, *duplicates = sorted(collected.copies[sha], key=lambda copy: (copy.rank, copy.path))
        record.source_path, record.label, record.caption = kept.path, kept.label, kept.caption
        record.split = kept.source_split or kept.forced or ""
        rejected.extend((copy.path, f"duplicate of {record.source_path}") for copy in duplicates)
        val_copies += sum(copy.source_split != kept.source_split for copy in duplicates)
        records.append(record)
    if len({record.key for record in records}) != len(records):
        raise AssertionError("two different images share a 16-hex-digit key prefix")
    if val_copies:
        log.info("%d train images are exact copies of val images: dropped from train (rejected.csv: "
                 "'duplicate of val:...')", val_copies)
    return records, sorted(rejected)


class _Pool:
    """Ordered maps over `workers` spawned processes, or in this process when `workers` is 0.

    Spawned (not forked) workers are safe whatever threads the caller runs; a worker that
    dies raises `BrokenProcessPool` instead of hanging.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        context = multiprocessing.get_context("spawn")
        self._executor = ProcessPoolExecutor(workers, mp_context=context) if workers else None

    def __enter__(self) -> _Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def imap(self, fn: Callable[[_T], _R], items: Iterable[_T], total: int | None = None) -> Iterator[_R]:
        """`map(fn, items)` in order, reading `items` at most a few chunks ahead of the results.

        (`Pool.imap` and `Executor.map` would read all of `items` up front.)
        """
        if self._executor is None:
            yield from map(fn, items)
            return
        chunksize = max(1, min(_MAX_CHUNK, (total or 10**9) // (8 * self.workers)))
        iterator, pending = iter(items), deque[Future[list[_R]]]()
        while chunk := list(itertools.islice(iterator, chunksize)):
            pending.append(self._executor.submit(_map_chunk, fn, chunk))
            if len(pending) >= 4 * self.workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def _map_chunk(fn: Callable[[_T], _R], chunk: list[_T]) -> list[_R]:
    return [fn(item) for item in chunk]


# --- shards -----------------------------------------------------------------------------------


def _write_all_shards(
    records: list[_Record], classes: list[str], staging: Path, cfg: DataConfig, pool: _Pool, progress: bool
) -> tuple[list[_Record], dict[str, list[str]]]:
    """Plan each split's shards (records in seeded order) and write them in the pool.

    Sets `record.split` and `record.shard`; returns the records in written order (train
    shards, then val shards) and the shard names per split.
    """
    image_key = ENCODED_EXTENSION[cfg.image_format]
    tasks: list[ShardTask] = []
    written: list[_Record] = []
    names: dict[str, list[str]] = {split: [] for split in SPLITS}
    for record in records:  # a record of a source of its own (data.val_source), or a held-out one, has its split
        record.split = record.split or split_of(record.image.sha256, cfg.seed, cfg.val_fraction)
    for split in SPLITS:
        chosen = sorted((r for r in records if r.split == split), key=lambda r: _write_order(r, cfg.seed))
        written.extend(chosen)
        samples = [(r.key, r.offset, r.length, _small_entries(r, classes)) for r in chosen]
        sizes = [tar_size([length, *map(len, small.values())]) for _, _, length, small in samples]
        plan = plan_shards(sizes, cfg.shard_max_count, cfg.shard_max_bytes)
        for index, group in itertools.groupby(zip(plan, chosen, samples, strict=True), key=lambda t: t[0]):
            names[split].append(f"{split}-{index:06d}.tar")
            members = list(group)
            for _, record, _ in members:
                record.shard = names[split][-1]
            tasks.append(ShardTask(staging / names[split][-1], staging / SPOOL, image_key, [m[2] for m in members]))
    with tqdm(total=len(records), unit="img", desc="shards", disable=not progress) as bar:
        for count in pool.imap(write_shard, tasks):
            bar.update(count)
    return written, names


def _small_entries(record: _Record, classes: list[str]) -> dict[str, bytes]:
    """`cls` (unless the record has no label), `json` and `txt` (if it has a caption)."""
    meta = {
        "key": record.key, "source_path": record.source_path, "label": record.label,
        "class_name": _class_name(record, classes), "sha256": record.image.sha256,
    }  # fmt: skip
    entries = {"json": json.dumps(meta).encode("utf-8")}
    if record.label is not None:
        entries["cls"] = str(record.label).encode("ascii")
    if record.caption is not None:
        entries[CAPTION_KEY] = record.caption.encode("utf-8")
    return entries


def _class_name(record: _Record, classes: list[str]) -> str | None:
    return None if record.label is None else classes[record.label]


# --- tables -----------------------------------------------------------------------------------


def _write_manifest(records: list[_Record], classes: list[str], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [("key", pa.string()), ("source_path", pa.string()), ("split", pa.string()), ("label", pa.int64()),
         ("class_name", pa.string()), ("width", pa.int64()), ("height", pa.int64()), ("mode", pa.string()),
         ("sha256", pa.string()), ("shard", pa.string())]
    )  # fmt: skip
    columns = {
        "key": [r.key for r in records],
        "source_path": [r.source_path for r in records],
        "split": [r.split for r in records],
        "label": [r.label for r in records],
        "class_name": [_class_name(r, classes) for r in records],
        "width": [r.image.width for r in records],
        "height": [r.image.height for r in records],
        "mode": [r.image.mode for r in records],
        "sha256": [r.image.sha256 for r in records],
        "shard": [r.shard for r in records],
    }
    pq.write_table(pa.table(columns, schema=schema), path)


def _write_rejected(rejected: list[tuple[str, str]], path: Path) -> None:
    """`path,reason` rows, every field quoted; paths by `escape_name`, reasons made printable."""
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream, lineterminator="\n", quoting=csv.QUOTE_ALL)
        writer.writerow(["path", "reason"])
        writer.writerows((escape_name(name), _utf8(reason)) for name, reason in rejected)


def escape_name(name: str) -> str:
    """`name` itself when it is valid UTF-8; otherwise, losslessly, each undecodable byte as `\\xNN`
    and each backslash doubled (`codecs.escape_decode(result.encode())[0]` is the name's bytes)."""
    if _is_utf8(name):
        return name
    try:
        raw = name.encode("utf-8", "surrogateescape")  # what `os` and `tarfile` decoded it from
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "surrogatepass")
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _utf8(text: str) -> str:
    return text if _is_utf8(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _write_dataset_json(
    source: str, classes: list[str], counts: dict[str, int], shards: dict[str, list[str]], records: Counter[str],
    cfg: DataConfig, path: Path, captions: dict[str, int], caption_scheme: dict | None,
) -> None:
    description: dict = {
        "source": source,
        "classes": classes,
        "resolution": cfg.resolution,
        "image_format": cfg.image_format,
        "counts": counts,
        "shards": shards,
        "index": {"format": INDEX_FORMAT, "records": {split: [records[name] for name in names]
                                                       for split, names in shards.items()}},
        "captions": captions,
        "params": {**cfg.model_dump(mode="json"), "source": source},  # the source actually ingested
    }
    if caption_scheme is not None:
        description["caption_scheme"] = caption_scheme
    path.write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")


def _log_rejections(rejected: list[tuple[str, str]]) -> None:
    if rejected:
        reasons = Counter(re.split(r":| of | '", reason)[0] for _, reason in rejected)
        log.info("rejected %d inputs: %s (see %s)", len(rejected), dict(reasons.most_common()), REJECTED)

"""The project's own shards: their format, their writer (`plan_shards`, `write_shard`, which `ingest` runs)
and their one reader (`validate`, the training loader and `cache_latents` read through it).

A shard is a tar of records, members sorted by extension:

- `<key>.cls`: the class label, ASCII decimal; absent for a record without a label (a captioned image that
  belongs to no class: img2dataset data), which then needs a `.txt`;
- `<key>.json`: {key, source_path, label, class_name, sha256} (`label`/`class_name` null without a label);
- `<key>.png` (or `.jpg`): the image;
- `<key>.txt`: the caption, UTF-8, stripped (`aligntok.data.captions.normalise_caption`); absent without one.

Records are grouped by key exactly as webdataset's loader groups them, so what validation checks is what a
WebDataset consumer sees. Input shards (`data.source: webdataset:...`) are untrusted and read by the hardened reader in
`aligntok.data.tar_reader` instead.

Beside each shard `NAME.tar`, ingest writes its record index `NAME.idx` (`index_shard`): a NumPy `.npy`
structured array, one row per record in stored order, `key` (bytes), `offset` and `size` (int64: where the
record's image bytes lie in the tar) and `label` (int64; `NO_LABEL`, -1, for a record without one). The
random-access reader
(`aligntok.data.reader`) maps the tar and slices `[offset, offset + size)` instead of parsing it.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

INDEX_SUFFIX = ".idx"
"""`train-000000.tar` -> `train-000000.idx`."""
INDEX_FORMAT = "aligntok-index/1"

ENCODED_EXTENSION = {"png": "png", "jpeg": "jpg"}
"""The entry name of a record's image for each `data.image_format` (what ingest writes)."""

NO_LABEL = -1
"""The label of a record that has none (a captioned record without `.cls`) in the index and `record_label`."""
CAPTION_KEY = "txt"
"""The entry of a record's caption."""

SHARD_IMAGE_KEYS = (*ENCODED_EXTENSION.values(), "jpeg")
"""The entries read as a record's image, in this order: what ingest writes, then `jpeg` (webdataset's other
name for a JPEG entry)."""


def iter_records(path: Path) -> Iterator[dict[str, Any]]:
    """The records of one shard in stored order: {"__key__": key, "__url__": shard name, entry: bytes, ...}."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with Path(path).open("rb") as stream:
        files = ({**f, "__url__": Path(path).name} for f in tar_file_iterator(stream))
        yield from group_by_keys(files)


def count_records(path: Path) -> int:
    """The records of one shard, counted from its tar headers (the members' data are skipped, not read):
    consecutive members with the same key make one record, as `iter_records` groups them."""
    import tarfile

    from webdataset.tariterators import base_plus_ext

    records, last = 0, None
    with tarfile.open(Path(path), "r:") as tar:
        for member in tar:
            prefix, _ = base_plus_ext(member.name)
            if member.isfile() and prefix is not None and prefix != last:
                records, last = records + 1, prefix
    return records


def record_image_key(record: dict[str, Any]) -> str:
    """The entry holding the record's image; ValueError naming the entries when there is none."""
    key = next((k for k in SHARD_IMAGE_KEYS if k in record), None)
    if key is None:
        members = sorted(k for k in record if not k.startswith("__"))
        raise ValueError(f"no {'/'.join('.' + k for k in ENCODED_EXTENSION.values())} member (members: {members})")
    return key


def record_label(record: dict[str, Any]) -> int:
    """The record's class label (its `.cls` entry), `NO_LABEL` for a captioned record without one; ValueError
    when it has neither."""
    if "cls" not in record:
        if CAPTION_KEY in record:
            return NO_LABEL
        raise ValueError("no .cls member")
    return int(record["cls"].decode("ascii").strip())


def shard_captions(path: Path) -> dict[str, str]:
    """Record key -> caption of one shard, from its `.txt` members only (the image data are skipped, not read);
    records without a caption are left out. ValueError naming the record for a caption that is not UTF-8."""
    import tarfile

    from webdataset.tariterators import base_plus_ext

    captions: dict[str, str] = {}
    with tarfile.open(Path(path), "r:") as tar:
        for member in tar:
            prefix, ext = base_plus_ext(member.name)
            if not member.isfile() or prefix is None or ext != CAPTION_KEY:
                continue
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            try:
                captions[prefix] = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{Path(path).name}: record {prefix!r}: caption is not UTF-8 ({exc})") from None
    return captions


def index_name(shard_name: str) -> str:
    """The index file of a shard: `train-000000.tar` -> `train-000000.idx`."""
    return shard_name.removesuffix(".tar") + INDEX_SUFFIX


def index_shard(path: Path) -> np.ndarray:
    """The record index of one shard, from its tar headers and `.cls` entries (image data are not read):
    a structured array (n,) of `key`, `offset`, `size`, `label`, records grouped as `iter_records` groups them
    (`label` is `NO_LABEL` for a captioned record without `.cls`).
    ValueError naming the record when one has no image, or neither a label nor a caption."""
    import tarfile

    from webdataset.tariterators import base_plus_ext

    rows: list[tuple[bytes, int, int, int]] = []
    current: dict[str, Any] | None = None

    def close(record: dict[str, Any] | None) -> None:
        if record is None:
            return
        try:
            image = record_image_key(record)
            label = record_label(record)
        except ValueError as exc:
            raise ValueError(f"{Path(path).name}: record {record['__key__']!r}: {exc}") from None
        offset, size = record[image]
        rows.append((record["__key__"].encode("utf-8"), offset, size, label))

    with tarfile.open(Path(path), "r:") as tar:
        for member in tar:
            prefix, ext = base_plus_ext(member.name)
            if not member.isfile() or prefix is None:
                continue
            if current is None or prefix != current["__key__"]:
                close(current)
                current = {"__key__": prefix}
            if ext == "cls":
                current["cls"] = tar.extractfile(member).read()  # type: ignore[union-attr]
            else:
                current[ext] = (member.offset_data, member.size)
        close(current)
    width = max((len(key) for key, *_ in rows), default=1)
    return np.array(rows, dtype=[("key", f"S{width}"), ("offset", "<i8"), ("size", "<i8"), ("label", "<i8")])


def write_index(shard: Path) -> int:
    """Index `shard` (`index_shard`) into its `.idx` file beside it; returns its record count."""
    index = index_shard(shard)
    with open(shard.with_name(index_name(shard.name)), "wb") as stream:
        np.save(stream, index, allow_pickle=False)
    return len(index)


class ShardTask(NamedTuple):
    """One shard to write: (key, spool offset, length, small entries) per sample, in order."""

    path: Path
    spool: Path
    image_key: str
    samples: list[tuple[str, int, int, dict[str, bytes]]]


def tar_size(entry_sizes: Iterable[int]) -> int:
    """Bytes that entries of these sizes take in a tar: a 512-byte header each, data padded to 512."""
    return sum(tarfile.BLOCKSIZE + _round_up(size, tarfile.BLOCKSIZE) for size in entry_sizes)


def plan_shards(sample_sizes: list[int], max_count: int, max_bytes: int) -> list[int]:
    """Shard index of each sample (sizes from `tar_size`), filling shards in order.

    A shard closes at `max_count` samples or before a sample that would make the file
    (end-of-archive blocks and padding to 10240-byte records included) exceed `max_bytes`;
    a sample larger than that alone still gets a shard of its own.
    """
    shard, count, offset, plan = 0, 0, 0, []
    for size in sample_sizes:
        file_size = _round_up(offset + size + 2 * tarfile.BLOCKSIZE, tarfile.RECORDSIZE)
        if count and (count >= max_count or file_size > max_bytes):
            shard, count, offset = shard + 1, 0, 0
        plan.append(shard)
        count, offset = count + 1, offset + size
    return plan


def _round_up(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def write_shard(task: ShardTask) -> int:
    """Write one shard (USTAR, fixed headers, entries sorted by extension); returns its sample count."""
    with open(task.spool, "rb") as spool, tarfile.open(task.path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, offset, length, small in task.samples:
            spool.seek(offset)
            entries = {task.image_key: spool.read(length), **small}
            for ext in sorted(entries):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(entries[ext]), 0, 0o444
                info.uname = info.gname = "aligntok"
                tar.addfile(info, io.BytesIO(entries[ext]))
    if write_index(task.path) != len(task.samples):  # the index is read back from what was written
        raise AssertionError(f"{task.path}: index does not match the {len(task.samples)} samples written")
    return len(task.samples)

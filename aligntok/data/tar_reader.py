"""Reading WebDataset tar shards defensively: samples grouped by key, only the entries ingest uses read, and
nothing larger than a limit.

`tar_samples(tar, max_bytes)` groups a streamed tar's regular members into `TarSample`s by webdataset's key
rule (the base name up to its first dot), skips metadata members (`__...__`), and reads only the entries in
`KEPT_ENTRIES` (the image entries, `cls`/`label`, `json`, `txt`). A sample with two entries of one name,
more than `MAX_SAMPLE_ENTRIES` entries or a kept entry above `max_bytes` gets a rejection reason instead of its
bytes. A shard must end at a proper end-of-archive block: a streamed `TarFile` otherwise stops quietly at a cut
or damaged header, and the samples after it would be lost without a word (`tarfile.ReadError` instead).
`aligntok.data.sources.WebDatasetSource` turns the samples into ingest's inputs.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from aligntok.data.images import SAMPLE_IMAGE_ENTRIES

_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's sample key / entry split
_METADATA_MEMBER = re.compile(r"__[^/]*__($|/)")  # skipped, as webdataset does
KEPT_ENTRIES = frozenset({*SAMPLE_IMAGE_ENTRIES, "cls", "label", "json", "txt"})
MAX_SAMPLE_ENTRIES = 1_000  # a sample with more entries than this is malformed (bounds the memory per sample)


@dataclass
class TarSample:
    """The entries of one sample that ingest uses (others are only named), or why it is rejected."""

    key: str
    entries: dict[str, bytes] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)
    reason: str | None = None


def tar_samples(tar: tarfile.TarFile, max_bytes: int) -> Iterator[TarSample]:
    """Group a tar stream's members into samples by key (webdataset's rule: up to the first dot of
    the base name), reading only the entries ingest uses and none larger than `max_bytes`."""
    current: TarSample | None = None
    for member in tar:
        tar.members = []  # a streamed TarFile would otherwise keep every header
        if not member.isreg() or _METADATA_MEMBER.match(member.name):
            continue
        match = _KEY_AND_EXTENSION.match(member.name)
        if match is None:
            yield TarSample(member.name, reason="not a sample: a tar member without an extension")
            continue
        key, name = match.group(1), match.group(2).lower()
        if current is None or key != current.key:
            if current is not None:
                yield current
            current = TarSample(key)
        _add_entry(current, name, member, tar, max_bytes)
    _check_archive_end(tar)
    if current is not None:
        yield current


def _check_archive_end(tar: tarfile.TarFile) -> None:
    """Raise `tarfile.ReadError` unless the members ended at an end-of-archive block with only zeros after it.

    A streamed `TarFile` ends its members quietly at a missing, cut or damaged header (past
    the first one), so a shard cut at a member boundary or with a corrupt header would
    otherwise lose its remaining samples without a word. `tar.offset` is where the header
    that ended the members starts: a whole block was read there unless the data ran out.
    """
    stream = tar.fileobj
    assert stream is not None
    if stream.tell() - tar.offset != tarfile.BLOCKSIZE:
        raise tarfile.ReadError("unexpected end of data: no end-of-archive block")
    while chunk := stream.read(tarfile.RECORDSIZE):
        if chunk.count(0) != len(chunk):
            raise tarfile.ReadError("a damaged member header (or data after the end-of-archive block)")


def _add_entry(sample: TarSample, name: str, member: tarfile.TarInfo, tar: tarfile.TarFile, max_bytes: int) -> None:
    if sample.reason is not None:
        return
    if name in sample.names:
        sample.reason = f"malformed sample: two '{name}' entries"
    elif len(sample.names) >= MAX_SAMPLE_ENTRIES:
        sample.reason = f"malformed sample: more than {MAX_SAMPLE_ENTRIES} entries"
    elif name in KEPT_ENTRIES and member.size > max_bytes:
        sample.reason = f"too large: '{name}' entry of {member.size} bytes > max_input_bytes {max_bytes}"
    elif name in KEPT_ENTRIES:
        stream = tar.extractfile(member)
        assert stream is not None  # a regular member
        sample.entries[name] = stream.read()
    if sample.reason is None:
        sample.names.add(name)
    else:
        sample.entries.clear()

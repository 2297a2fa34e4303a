"""Source fingerprints: a cheap, deterministic description of what `ingest` would read.

The `snapshot` stage writes `fingerprint(cfg)` as JSON (`data/source.json`) on every `dvc repro`
(`always_changed`), and `ingest` depends on that file: a source that gained, lost or changed an input
reruns ingest and everything after it, an unchanged one writes the same bytes and DVC skips them all.

Per source (`data.source`, and `data.val_source` when set), in `aligntok.data.sources`' syntax:

- `fashion-mnist`: the sha256 and size of each of its four `.gz` files (about 30 MB, read whole).
- `fashion-mnist-captioned`: the same files, and the captioning scheme (`aligntok.data.captions.SCHEME`: its
  format, palette, garments, templates and held-out pairs) in `captions`, both in its digest: a change to
  the scheme reruns ingest as new data would.
- `imagefolder:PATH`: a digest of the listing of every entry that ingest considers (the same walk:
  links to folders are not followed, a folder that cannot be listed is one entry). One line per entry,
  `[relative path, size, mtime_ns, note]` as JSON (so any file name is unambiguous), the note being
  empty for a plain file, `link to TARGET` for a link to a file (size and mtime are its target's), or
  the reason ingest will reject the entry with. The digest is sha256 over the lines in path order; only
  the digest, the entry count and the total bytes are kept, never the listing (ImageNet has 1.3 M files).
- `webdataset:URL`: the expanded shard list, in ingest's order, each with what identifies its version
  cheaply: size and mtime_ns of a local file, ETag/Content-Length/Last-Modified of an HTTP(S) HEAD,
  ETag/ContentLength of S3's `head_object` (`aligntok.data.remote.object_info`).

Contents are not hashed beyond Fashion-MNIST's files: a file rewritten with the same size and mtime goes
unnoticed, as it does for `make` and `rsync`. The result holds nothing about the run (no time, no host),
and `to_json` sorts keys, so an unchanged source gives identical bytes. A missing or unreadable
source is an `IngestError` of one line naming the path or URL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from aligntok.config import DataConfig
from aligntok.data.remote import RemoteError, object_info, s3_client
from aligntok.data.captions import SCHEME
from aligntok.data.sources import FASHION_MNIST_FILES, FASHION_MNIST_SOURCES, SOURCE_SYNTAX, FashionMNIST, \
    IngestError, _local_path, _reason, _shard_urls, _walk
from aligntok.fileio import sha256_file

FORMAT = "aligntok-source-fingerprint/1"
"""The `format` of the JSON; a change in what is described changes it (and so reruns ingest once)."""
HEAD_WORKERS = 16
"""Concurrent HEAD / head_object requests for remote shards (a few thousand shards take seconds, not minutes)."""

log = logging.getLogger(__name__)


def fingerprint(cfg: DataConfig, progress: bool = False) -> dict[str, Any]:
    """The description of `cfg.source` and `cfg.val_source` (None when unset), and a `digest` over both."""
    sources = {"source": describe(cfg.source, cfg, progress),
               "val_source": describe(cfg.val_source, cfg, progress) if cfg.val_source else None}
    return {"format": FORMAT, **sources, "digest": _digest(sources)}


def to_json(described: dict[str, Any]) -> str:
    """A `fingerprint` as the JSON text the `snapshot` stage writes: sorted keys, ending in a newline."""
    return json.dumps(described, indent=2, sort_keys=True) + "\n"


def describe(spec: str, cfg: DataConfig, progress: bool = False) -> dict[str, Any]:
    """One source's description: `spec`, `kind`, `file_count`, `total_bytes`, `digest` and the kind's details."""
    if spec in FASHION_MNIST_SOURCES:
        described = _fashion_mnist(spec, Path(cfg.fashion_mnist_dir))
        if spec == "fashion-mnist-captioned":
            captions = SCHEME.describe()
            described.update(captions=captions, digest=_digest({"files": described["files"], "captions": captions}))
        return described
    scheme, _, rest = spec.partition(":")
    if scheme == "imagefolder" and rest:
        return _image_folder(spec, Path(rest), progress)
    if scheme == "webdataset" and rest:
        return _webdataset(spec, rest, progress)
    raise IngestError(f"unknown source {spec!r}: expected {SOURCE_SYNTAX}")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=True).encode("ascii")).hexdigest()


def _fashion_mnist(spec: str, folder: Path) -> dict[str, Any]:
    FashionMNIST(folder)  # its check and its message (the Debian package to install) for missing files
    files = {}
    for name in sorted(name for pair in FASHION_MNIST_FILES for name in pair):
        path = folder / name
        try:
            files[name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        except OSError as exc:
            raise IngestError(f"{path}: cannot read this Fashion-MNIST file ({_reason(exc)})") from None
    return {"spec": spec, "kind": spec, "folder": str(folder), "files": files, "file_count": len(files),
            "total_bytes": sum(f["size"] for f in files.values()), "digest": _digest(files)}


def _image_folder(spec: str, root: Path, progress: bool) -> dict[str, Any]:
    if not root.is_dir():
        raise IngestError(f"{root}: image folder not found" if not root.exists() else f"{root}: not a folder")
    log.info("listing %s", root)
    entries = _walk(root, os.path.realpath(root))  # ingest's walk: the same entries, links treated alike
    digest, total = hashlib.sha256(), 0
    for relative, reason in tqdm(entries, desc="snapshot", unit="file", disable=not progress, smoothing=0.1):
        line, size = _entry_line(root, relative, reason)
        digest.update(line.encode("ascii") + b"\n")
        total += size
    return {"spec": spec, "kind": "imagefolder", "file_count": len(entries), "total_bytes": total,
            "digest": digest.hexdigest()}


def _entry_line(root: Path, relative: str, reason: str | None) -> tuple[str, int]:
    """(the entry's listing line, its bytes counted in `total_bytes`: a file's or a file link's target's, else 0)."""
    path = os.path.join(root, relative)
    note = reason or ""
    try:
        info = os.lstat(path)
        if reason is None and stat.S_ISLNK(info.st_mode):
            note = f"link to {os.readlink(path)}"
            try:
                info = os.stat(path)
            except OSError as exc:
                note += f" (unreadable: {_reason(exc)})"
    except OSError as exc:  # gone since the walk, or its folder lost permissions
        return json.dumps([relative, None, None, f"unreadable: {_reason(exc)}"]), 0
    size = info.st_size if stat.S_ISREG(info.st_mode) else 0
    return json.dumps([relative, info.st_size, info.st_mtime_ns, note]), size


def _webdataset(spec: str, url: str, progress: bool) -> dict[str, Any]:
    urls = _shard_urls(url)  # ingest's expansion and checks (schemes, local shards that must exist)
    client = s3_client() if any(shard.lower().startswith("s3:") for shard in urls) else None  # one for all
    with ThreadPoolExecutor(max_workers=HEAD_WORKERS) as pool, \
            tqdm(total=len(urls), desc="snapshot", unit="shard", disable=not progress) as bar:
        shards = []
        for shard in pool.map(lambda shard: _shard(shard, client), urls):  # in ingest's order
            shards.append(shard)
            bar.update()
    silent = [s["url"] for s in shards if not {"etag", "size", "last_modified"} & set(s)]
    if silent:
        log.warning("%d shards (e.g. %s) come without an ETag, a size or a Last-Modified: a change to them goes "
                    "unnoticed",
                    len(silent), silent[0])
    return {"spec": spec, "kind": "webdataset", "shards": shards, "file_count": len(shards),
            "total_bytes": sum(s.get("size", 0) for s in shards), "digest": _digest(shards)}


def _shard(url: str, client: Any) -> dict[str, Any]:
    local = _local_path(url)
    if local is None:
        try:
            return {"url": url, **object_info(url, client)}
        except RemoteError as exc:  # already one line naming the URL
            raise IngestError(str(exc)) from None
    try:
        info = os.stat(local)
    except OSError as exc:
        raise IngestError(f"{url}: cannot read this shard ({_reason(exc)})") from None
    if not stat.S_ISREG(info.st_mode):
        raise IngestError(f"{url}: not a file")
    return {"url": url, "size": info.st_size, "mtime_ns": info.st_mtime_ns}


def summary(described: dict[str, Any]) -> str:
    """One line about a `fingerprint`: files, bytes and digest prefix of each source."""
    parts = []
    for role in ("source", "val_source"):
        if (source := described.get(role)) is not None:
            unit = "shards" if source["kind"] == "webdataset" else "files"
            parts.append(f"{role} {source['spec']}: {source['file_count']:,} {unit}, {source['total_bytes']:,} bytes")
    return "; ".join(parts) + f"; digest {described['digest'][:12]}"

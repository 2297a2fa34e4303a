"""Input enumeration: every input of a data source, with its bytes, label and source path.

A source spec (the syntax of `DataConfig.source`) names one of four sources:

- `fashion-mnist`: the four idx `.gz` files in `DataConfig.fashion_mnist_dir`; each image
  becomes a binary PGM (`P5`) file in memory, so its sha256 depends on the pixels alone.
  Source paths look like `train-images-idx3-ubyte.gz#12345`.
- `fashion-mnist-captioned`: the same files and paths; each image is tinted in a palette colour
  and becomes a binary PPM (`P6`) file with its caption and class label (`aligntok.data.captions`);
  an image of a held-out (colour, class) pair comes with `split="val"`.
- `imagefolder:PATH`: one subfolder per class (ImageNet layout); labels are indices of the
  sorted class-folder names. Every non-folder entry under PATH is an input, in sorted
  relative-path order; ones that cannot be images are yielded with a rejection reason
  (file at the root or in a hidden root folder, unknown extension, unreadable, larger
  than `max_input_bytes`). Hidden root folders (`.git`, `.ipynb_checkpoints`) are not
  classes. Links never lead out of PATH: a link to a file is read only when it resolves
  inside PATH, a link to a folder is never followed (it is an input rejected with its
  target, so a class folder that links to a sibling is not counted twice), and a folder
  that cannot be listed is an input rejected with the reason.
  Captions are sidecar files: `<stem>.txt` beside an image `<stem>.<image extension>`, UTF-8,
  is that image's caption; such a `.txt` is read with its image (the same link and size
  rules) and is not an input of its own (a `.txt` without an image still is, rejected by its
  extension). A captioned image may lie at the root of PATH, outside any class folder: it
  then has no label (and PATH needs no class folder at all). Top-level folders stay classes
  whether their images have captions or not, so img2dataset's `files` output (numbered
  folders) would make its folders classes: read its default `webdataset` output instead.
- `webdataset:URL`: existing shards: a local folder of `.tar` files, a path, a brace
  pattern, `file://`, `http(s)://` or `s3://` URLs, and nothing else. Shards are read
  here, streamed (tarfile over a local file, or `aligntok.data.remote.open_stream`:
  urllib for HTTP(S), boto3's `get_object` for S3 at `$ALIGNTOK_DATA_S3_ENDPOINT_URL`,
  the key taken literally), never through webdataset's `gopen`, whose `pipe:` URLs and
  `GOPEN_REWRITE` rules run shell commands, nor through a CLI. The image is the first
  entry named in `SAMPLE_IMAGE_ENTRIES` (`aligntok.data.images`), the label comes from
  `cls` (or `label`), and the class name from the sample's `json` `class_name` when
  present, else `str(label)`. The `txt` entry (UTF-8) is the caption, as img2dataset
  writes it; a sample with a caption needs no label (img2dataset writes none), one
  without still does, and a label that is there must be valid either way. A sample with
  an entry larger than `max_input_bytes` or a label above `max_label` is rejected
  unread; a shard that cannot be fetched or is not a readable tar stops the ingest with
  a one-line error naming its URL.

Sources yield `SourceItem`s lazily, so nothing but the current file is held in memory. Captions come as text
decoded with `surrogateescape` (`aligntok.data.captions.decode_caption`): ingest judges them, naming what is wrong.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import stat
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Protocol

import numpy as np

from aligntok.errors import AligntokError
from aligntok.config import DataConfig
from aligntok.data import captions as cap
from aligntok.data.images import IMAGE_EXTENSIONS, SAMPLE_IMAGE_ENTRIES
from aligntok.data.remote import RemoteError, local_path, open_stream
from aligntok.data.tar_reader import TarSample, tar_samples

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_MNIST_FILES = (
    ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
)
WEBDATASET_SCHEMES = ("file", "http", "https", "s3")
"""URL schemes a `webdataset:` shard may have (besides a plain local path)."""
_ALLOWED_SHARDS = "a local path, file://, http://, https:// or s3://"
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
CAPTION_SUFFIX = ".txt"
"""A caption: a sample's `txt` entry, an image folder's sidecar `<stem>.txt`."""


class IngestError(AligntokError, ValueError):
    """A source or output folder that cannot be ingested; the message names the path or value."""


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One input. `data` is None when the input is rejected by `reason` before being read.

    `caption` is the input's caption as read (None: it has none); an input needs a label or a caption.
    `split` forces the split it goes to (`train`/`val`; None: the seeded `val_fraction` draw decides)."""

    source_path: str
    label: int | None
    data: bytes | None
    reason: str | None = None
    caption: str | None = None
    split: str | None = None


class Source(Protocol):
    """An iterable of `SourceItem`s in a fixed order, with class names by label."""

    spec: str

    def __iter__(self) -> Iterator[SourceItem]: ...

    def count(self) -> int | None:
        """Number of inputs, when known without reading them (for the progress bar)."""

    def classes(self) -> list[str]:
        """Class names in label order (complete once iteration has finished)."""

    def folders(self) -> list[Path]:
        """Local folders the inputs are read from (an output folder must lie outside them)."""

    def caption_scheme(self) -> cap.CaptionScheme | None:
        """The scheme a source's captions are made by (`aligntok.data.captions`), None for found captions."""


FASHION_MNIST_SOURCES = ("fashion-mnist", "fashion-mnist-captioned")
SOURCE_SYNTAX = "'fashion-mnist', 'fashion-mnist-captioned', 'imagefolder:<path>' or 'webdataset:<url>'"


def open_source(spec: str, cfg: DataConfig) -> Source:
    """Parse a source spec and open the source; raises `IngestError` with the spec at fault."""
    if spec in FASHION_MNIST_SOURCES:
        return FashionMNIST(Path(cfg.fashion_mnist_dir), captioned=spec == "fashion-mnist-captioned")
    scheme, _, rest = spec.partition(":")
    if scheme == "imagefolder" and rest:
        return ImageFolder(Path(rest), cfg.max_input_bytes)
    if scheme == "webdataset" and rest:
        return WebDatasetSource(rest, cfg.max_input_bytes, cfg.max_label)
    raise IngestError(f"unknown source {spec!r}: expected {SOURCE_SYNTAX}")


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


class FashionMNIST:
    """The 70,000 Fashion-MNIST images (train then t10k), as 28×28 greyscale PGM files, or with `captioned` as
    tinted RGB PPM files with their captions (`aligntok.data.captions`)."""

    def __init__(self, folder: Path, captioned: bool = False) -> None:
        self.spec = "fashion-mnist-captioned" if captioned else "fashion-mnist"
        self.folder = folder
        self.captioned = captioned
        missing = [name for pair in FASHION_MNIST_FILES for name in pair if not (folder / name).is_file()]
        if missing:
            raise IngestError(
                f"{folder}: Fashion-MNIST files missing ({', '.join(missing)}); install them with "
                "`apt-get install dataset-fashion-mnist` (`make setup` does) or set data.fashion_mnist_dir"
            )

    def count(self) -> int:
        return sum(_idx_shape(self.folder / images)[0] for images, _ in FASHION_MNIST_FILES)

    def classes(self) -> list[str]:
        return list(FASHION_MNIST_CLASSES)

    def folders(self) -> list[Path]:
        return [self.folder]

    def caption_scheme(self) -> cap.CaptionScheme | None:
        return cap.SCHEME if self.captioned else None

    def __iter__(self) -> Iterator[SourceItem]:
        for images_name, labels_name in FASHION_MNIST_FILES:
            images = _read_idx(self.folder / images_name, ndim=3)  # (N, 28, 28) uint8
            labels = _read_idx(self.folder / labels_name, ndim=1)  # (N,) uint8
            if len(images) != len(labels):
                raise IngestError(f"{self.folder / labels_name}: {len(labels)} labels for {len(images)} images")
            size = b"%d %d\n255\n" % (images.shape[2], images.shape[1])
            for index, (pixels, label) in enumerate(zip(images, labels, strict=True)):
                path = f"{images_name}#{index}"
                if self.captioned:
                    yield _captioned_item(path, pixels, int(label), b"P6\n" + size)
                else:
                    yield SourceItem(path, int(label), b"P5\n" + size + pixels.tobytes())


def _captioned_item(path: str, pixels: np.ndarray, label: int, header: bytes) -> SourceItem:
    """One captioned Fashion-MNIST input: pixels (28, 28) uint8 tinted by their colour, as a PPM, with its caption."""
    colour = cap.colour_for(pixels)
    caption = cap.caption_for(colour, label, cap.template_for(pixels))
    split = "val" if cap.is_held_out(colour, label) else None
    return SourceItem(path, label, header + cap.tint(pixels, colour).tobytes(), caption=caption, split=split)


def _idx_shape(path: Path) -> tuple[int, ...]:
    with gzip.open(path, "rb") as stream:
        head = stream.read(4)
        if len(head) < 4 or head[:2] != b"\0\0" or head[2] != 0x08:
            raise IngestError(f"{path}: not an idx file of unsigned bytes (magic {head!r})")
        dims = stream.read(4 * head[3])
    return tuple(int.from_bytes(dims[i : i + 4], "big") for i in range(0, len(dims), 4))


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    shape = _idx_shape(path)
    if len(shape) != ndim:
        raise IngestError(f"{path}: expected {ndim} dimensions, found {len(shape)}")
    with gzip.open(path, "rb") as stream:
        raw = stream.read()
    values = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(shape)):
        raise IngestError(f"{path}: holds {values.size} values, header says {shape}")
    return values.reshape(shape)


# --- image folders ----------------------------------------------------------------------------


class ImageFolder:
    """An ImageNet-layout folder: `PATH/<class>/**/<file>`; every entry under PATH is an input, but for the
    caption sidecars (`<stem>.txt` beside an image), read with their image."""

    def __init__(self, root: Path, max_input_bytes: int) -> None:
        self.spec = f"imagefolder:{root}"
        self.root = root
        self.max_input_bytes = max_input_bytes
        if not root.is_dir():
            raise IngestError(f"{root}: image folder not found" if not root.exists() else f"{root}: not a folder")
        self._real_root = os.path.realpath(root)
        try:
            with os.scandir(root) as listing:
                top = list(listing)
        except OSError as exc:
            raise IngestError(f"{root}: cannot list the image folder ({_reason(exc)})") from None
        self._classes = sorted(e.name for e in top if _is_folder(e) and not e.name.startswith("."))
        entries = _walk(root, self._real_root)
        if not entries:
            raise IngestError(f"{root}: image folder is empty (no files)")
        self._sidecars = _sidecars(entries)
        self._entries = [(path, reason) for path, reason in entries if path not in self._sidecars]
        captioned_at_root = any("/" not in path and self._sidecar(path) for path, _ in self._entries)
        if not self._classes and not captioned_at_root:
            links = sorted(e.name for e in top if e.is_symlink() and os.path.isdir(e.path))
            hint = f"; links to folders are not followed ({len(links)}, e.g. {links[0]!r})" if links else ""
            raise IngestError(f"{root}: no class folders; expected one subfolder per class (ImageNet layout){hint}")
        self._labels = {name: label for label, name in enumerate(self._classes)}

    def count(self) -> int:
        return len(self._entries)

    def classes(self) -> list[str]:
        return list(self._classes)

    def folders(self) -> list[Path]:
        return [self.root]

    def caption_scheme(self) -> None:
        return None

    def __iter__(self) -> Iterator[SourceItem]:
        for relative, reason in self._entries:
            yield self._item(relative, reason)

    def _item(self, relative: str, reason: str | None) -> SourceItem:
        parts = PurePosixPath(relative).parts
        label = self._labels.get(parts[0]) if len(parts) > 1 else None
        sidecar = self._sidecar(relative)
        if reason is not None:
            return SourceItem(relative, label, None, reason)
        if label is None and not (sidecar and len(parts) == 1):
            return SourceItem(relative, None, None, "not in a class folder")
        suffix = PurePosixPath(relative).suffix
        if suffix.lower().removeprefix(".") not in IMAGE_EXTENSIONS:
            return SourceItem(relative, label, None, f"unsupported extension '{suffix}'")
        caption = None
        if sidecar:
            text, reason = _read_inside(os.path.join(self.root, sidecar), self._real_root, self.max_input_bytes)
            if text is None:
                return SourceItem(relative, label, None, f"caption unreadable: {reason} ({sidecar})")
            caption = cap.decode_caption(text)
        data, reason = _read_inside(os.path.join(self.root, relative), self._real_root, self.max_input_bytes)
        return SourceItem(relative, label, data, reason, caption=caption)

    def _sidecar(self, relative: str) -> str | None:
        """The caption file of an image entry, None when it has none (or is no image)."""
        sidecar = _sidecar_of(relative) if _is_image_name(relative) else None
        return sidecar if sidecar in self._sidecars else None


def _is_image_name(relative: str) -> bool:
    return PurePosixPath(relative).suffix.lower().removeprefix(".") in IMAGE_EXTENSIONS


def _sidecar_of(image: str) -> str:
    """The caption sidecar an image entry would have: `a/b.c.png` -> `a/b.c.txt`."""
    return image.removesuffix(PurePosixPath(image).suffix) + CAPTION_SUFFIX


def _sidecars(entries: list[tuple[str, str | None]]) -> frozenset[str]:
    """The `.txt` entries that are the caption of an image entry beside them (only plain entries: one with a
    rejection reason, a link to a folder say, stays an input). Holds the `.txt` paths only, not the listing."""
    texts = {path for path, reason in entries if reason is None and path.endswith(CAPTION_SUFFIX)}
    if not texts:
        return frozenset()
    used = set()
    for path, _ in entries:
        if _is_image_name(path) and (sidecar := _sidecar_of(path)) in texts:
            used.add(sidecar)
    return frozenset(used)


def _is_folder(entry: os.DirEntry[str]) -> bool:
    """A real folder (not a link to one); False when the entry cannot even be examined."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _walk(root: Path, real_root: str) -> list[tuple[str, str | None]]:
    """(relative POSIX path, rejection reason or None) of every non-folder entry under `root`, sorted.

    Iterative, so any depth works. Links are not followed: a link to a folder is an entry
    with its reason, any other link is judged when read. A folder that cannot be listed
    is an entry with its reason, so that nothing under `root` vanishes unreported.
    """
    entries: list[tuple[str, str | None]] = []
    pending = [""]
    while pending:
        relative = pending.pop()
        try:
            with os.scandir(os.path.join(root, relative)) as listing:
                children = list(listing)
        except OSError as exc:
            if not relative:
                raise IngestError(f"{root}: cannot list the image folder ({_reason(exc)})") from None
            entries.append((relative, f"unreadable folder: {_reason(exc)}"))
            continue
        for child in children:
            path = f"{relative}/{child.name}" if relative else child.name
            if _is_folder(child):
                pending.append(path)
            elif child.is_symlink() and os.path.isdir(child.path):
                entries.append((path, _folder_link_reason(child.path, real_root)))
            else:
                entries.append((path, None))
    return sorted(entries)


def _inside(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _folder_link_reason(link: str, real_root: str) -> str:
    real = os.path.realpath(link)
    if not _inside(real, real_root):
        return f"outside the source folder: links to {real}"
    target = os.path.relpath(real, real_root)
    return f"link to a folder: not followed (its target {target!r} is read under its own path)"


def _read_inside(path: str, real_root: str, max_bytes: int) -> tuple[bytes | None, str | None]:
    """(bytes, None), or (None, reason) for a broken link, a link out of `real_root`, a FIFO, a
    file over `max_bytes`, a permission error... The file is opened by its resolved path
    without following links, so a link swapped in after the check is refused, not read."""
    try:
        info = os.stat(path)
    except OSError as exc:
        return None, f"unreadable: {_reason(exc)}"
    real = os.path.realpath(path)
    if not _inside(real, real_root):
        return None, f"outside the source folder: links to {real}"
    if not stat.S_ISREG(info.st_mode):
        return None, "unreadable: not a regular file"
    if info.st_size > max_bytes:
        return None, f"too large: {info.st_size} bytes > max_input_bytes {max_bytes}"
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as stream:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None, "unreadable: not a regular file"
            data = stream.read(max_bytes + 1)
    except OSError as exc:
        return None, f"unreadable: {_reason(exc)}"
    if len(data) > max_bytes:  # grew since the stat
        return None, f"too large: more than max_input_bytes {max_bytes} bytes"
    return data, None


# --- WebDataset shards ------------------------------------------------------------------------


class WebDatasetSource:
    """Samples of existing WebDataset shards, in shard order then tar order."""

    def __init__(self, url: str, max_input_bytes: int, max_label: int) -> None:
        self.spec = f"webdataset:{url}"
        self.urls = _shard_urls(url)
        self.max_input_bytes = max_input_bytes
        self.max_label = max_label
        self._names: dict[int, str] = {}

    def count(self) -> None:
        return None

    def classes(self) -> list[str]:
        size = max(self._names, default=-1) + 1
        return [self._names.get(label, str(label)) for label in range(size)]

    def folders(self) -> list[Path]:
        local = (_local_path(url) for url in self.urls)
        return sorted({path.parent for path in local if path is not None})

    def caption_scheme(self) -> None:
        return None

    def __iter__(self) -> Iterator[SourceItem]:
        for url in self.urls:
            try:
                with _open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                    for sample in tar_samples(tar, self.max_input_bytes):
                        yield self._item(url, sample)
            except RemoteError as exc:  # already one line naming the URL
                raise IngestError(str(exc)) from None
            except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
                raise IngestError(f"{url}: cannot read this tar shard ({_describe(exc)})") from None

    def _item(self, url: str, sample: TarSample) -> SourceItem:
        path = f"{url}#{sample.key}"
        if sample.reason is not None:
            return SourceItem(path, None, None, sample.reason)
        image_key = next((key for key in SAMPLE_IMAGE_ENTRIES if key in sample.entries), None)
        if image_key is None:
            keys = ", ".join(sorted(sample.names))
            reason = f"not an image: no {'/'.join(SAMPLE_IMAGE_ENTRIES)} entry (has: {keys})"
            return SourceItem(path, None, None, reason)
        raw_caption = sample.entries.get("txt")
        caption = None if raw_caption is None else cap.decode_caption(raw_caption)
        label, reason = _sample_label(sample.entries, self.max_label, required=caption is None)
        if label is not None:
            self._names.setdefault(label, _sample_class_name(sample.entries) or str(label))
        data = sample.entries[image_key] if reason is None else None
        return SourceItem(path, label, data, reason, caption=caption)


def _describe(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__


def _sample_label(entries: dict[str, bytes], max_label: int, required: bool = True) -> tuple[int | None, str | None]:
    """(label, None), or (None, why not); a missing label is no fault unless `required` (a sample without a
    caption). A label that is there but malformed is one either way."""
    raw = entries.get("cls", entries.get("label"))
    if raw is None:
        return None, "no label: sample has no 'cls' or 'label' entry" if required else None
    try:
        label = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None, f"no label: 'cls' is not a decimal integer: {raw[:20]!r}"
    if label < 0:
        return None, f"no label: negative label {label}"
    if label > max_label:
        return None, f"no label: label {label} > max_label {max_label}"
    return label, None


def _sample_class_name(entries: dict[str, bytes]) -> str | None:
    try:
        name = json.loads(entries["json"]).get("class_name")
    except (KeyError, ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(name, str) or len(name) > 1_000:
        return None
    try:
        name.encode("utf-8")  # JSON may carry lone surrogates, which no table can store
    except UnicodeEncodeError:
        return None
    return name


def _shard_urls(url: str) -> list[str]:
    """Shard URLs of a `webdataset:` spec: allowed schemes only; local shards must exist (checked up front)."""
    from webdataset.shardlists import expand_urls

    if not _URL_SCHEME.match(url) and Path(url).is_dir():
        urls = sorted(str(path) for path in Path(url).iterdir() if path.name.endswith((".tar", ".tar.gz", ".tgz")))
        if not urls:
            raise IngestError(f"{url}: no .tar shards in this folder")
        return urls
    urls = expand_urls(url)
    for shard in urls:
        local = _local_path(shard)  # refuses any other scheme
        if local is not None and not local.is_file():
            raise IngestError(f"{shard}: shard not found (from webdataset:{url})")
    return urls


def _local_path(url: str) -> Path | None:
    """The file a local shard URL names, None for a remote one (`aligntok.data.remote.local_path`); `IngestError`
    for a scheme other than `WEBDATASET_SCHEMES` or a `file://` URL of another host."""
    found = _URL_SCHEME.match(url)
    scheme = found.group(0)[:-1].lower() if found else None
    if scheme is not None and scheme not in WEBDATASET_SCHEMES:
        raise IngestError(f"{url}: URL scheme '{scheme}:' is not allowed for shards; use {_ALLOWED_SHARDS}")
    try:
        return local_path(url)
    except RemoteError as exc:
        raise IngestError(f"{exc}; use {_ALLOWED_SHARDS}") from None


@contextmanager
def _open_shard(url: str) -> Iterator[IO[bytes]]:
    """A binary stream of one shard: a local file, or a remote object streamed by `aligntok.data.remote`."""
    local = _local_path(url)
    if local is not None:
        with open(local, "rb") as stream:
            yield stream
    else:
        with open_stream(url) as stream:
            yield stream

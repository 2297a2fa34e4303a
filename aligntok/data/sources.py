"""Input enumeration: every input of a data source, with its bytes, label and source path.

A source spec (the syntax of `DataConfig.source`) names one of three sources:

- `fashion-mnist`: the four idx `.gz` files in `DataConfig.fashion_mnist_dir`; each image
  becomes a binary PGM (`P5`) file in memory, so its sha256 depends on the pixels alone.
  Source paths look like `train-images-idx3-ubyte.gz#12345`.
- `imagefolder:PATH`: one subfolder per class (ImageNet layout); labels are indices of the
  sorted class-folder names. Every non-folder entry under PATH is an input, in sorted
  relative-path order; ones that cannot be images are yielded with a rejection reason
  (file at the root or in a hidden root folder, unknown extension, unreadable). Hidden
  root folders (`.git`, `.ipynb_checkpoints`) are not classes.
- `webdataset:URL`: existing shards (a local folder of `.tar` files, a path, a brace
  pattern or any URL webdataset opens). The image is the first of the jpg/jpeg/png/webp/
  bmp/tif/tiff entries, the label comes from `cls` (or `label`), and the class name from
  the sample's `json` `class_name` when present, else `str(label)`.

Sources yield `SourceItem`s lazily, so nothing but the current file is held in memory.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import numpy as np

from aligntok.errors import AligntokError
from aligntok.config import DataConfig
from aligntok.data.images import IMAGE_EXTENSIONS

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_MNIST_FILES = (
    ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
)
WEBDATASET_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class IngestError(AligntokError, ValueError):
    """A source or output folder that cannot be ingested; the message names the path or value."""


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One input. `data` is None when the input is rejected by `reason` before being read."""

    source_path: str
    label: int | None
    data: bytes | None
    reason: str | None = None


class Source(Protocol):
    """An iterable of `SourceItem`s in a fixed order, with class names by label."""

    spec: str

    def __iter__(self) -> Iterator[SourceItem]: ...

    def count(self) -> int | None:
        """Number of inputs, when known without reading them (for the progress bar)."""

    def classes(self) -> list[str]:
        """Class names in label order (complete once iteration has finished)."""


def open_source(spec: str, cfg: DataConfig) -> Source:
    """Parse a source spec and open the source; raises `IngestError` with the spec at fault."""
    if spec == "fashion-mnist":
        return FashionMNIST(Path(cfg.fashion_mnist_dir))
    scheme, _, rest = spec.partition(":")
    if scheme == "imagefolder" and rest:
        return ImageFolder(Path(rest))
    if scheme == "webdataset" and rest:
        return WebDatasetSource(rest)
    raise IngestError(f"unknown source {spec!r}: expected 'fashion-mnist', 'imagefolder:<path>' or 'webdataset:<url>'")


class FashionMNIST:
    """The 70,000 Fashion-MNIST images (train then t10k), as 28×28 greyscale PGM files."""

    def __init__(self, folder: Path) -> None:
        self.spec = "fashion-mnist"
        self.folder = folder
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

    def __iter__(self) -> Iterator[SourceItem]:
        for images_name, labels_name in FASHION_MNIST_FILES:
            images = _read_idx(self.folder / images_name, ndim=3)  # (N, 28, 28) uint8
            labels = _read_idx(self.folder / labels_name, ndim=1)  # (N,) uint8
            if len(images) != len(labels):
                raise IngestError(f"{self.folder / labels_name}: {len(labels)} labels for {len(images)} images")
            header = b"P5\n%d %d\n255\n" % (images.shape[2], images.shape[1])
            for index, (pixels, label) in enumerate(zip(images, labels, strict=True)):
                yield SourceItem(f"{images_name}#{index}", int(label), header + pixels.tobytes())


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


class ImageFolder:
    """An ImageNet-layout folder: `PATH/<class>/**/<file>`; every file under PATH is an input."""

    def __init__(self, root: Path) -> None:
        self.spec = f"imagefolder:{root}"
        self.root = root
        if not root.is_dir():
            raise IngestError(f"{root}: image folder not found" if not root.exists() else f"{root}: not a folder")
        self._classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        self._files = sorted(_walk_files(root))
        if not self._files:
            raise IngestError(f"{root}: image folder is empty (no files)")
        if not self._classes:
            raise IngestError(f"{root}: no class folders; expected one subfolder per class (ImageNet layout)")
        self._labels = {name: label for label, name in enumerate(self._classes)}

    def count(self) -> int:
        return len(self._files)

    def classes(self) -> list[str]:
        return list(self._classes)

    def __iter__(self) -> Iterator[SourceItem]:
        for relative in self._files:
            yield self._item(relative)

    def _item(self, relative: str) -> SourceItem:
        parts = PurePosixPath(relative).parts
        label = self._labels.get(parts[0]) if len(parts) > 1 else None
        if label is None:
            return SourceItem(relative, None, None, "not in a class folder")
        suffix = PurePosixPath(relative).suffix
        if suffix.lower() not in IMAGE_EXTENSIONS:
            return SourceItem(relative, label, None, f"unsupported extension '{suffix}'")
        data, reason = _read_regular_file(self.root / relative)
        return SourceItem(relative, label, data, reason)


def _walk_files(root: Path) -> Iterator[str]:
    """Relative POSIX paths of every non-folder entry under `root` (following folder links once)."""
    visited: set[str] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:  # a link cycle or a second link to the same folder
            subfolders[:] = []
            continue
        visited.add(real)
        for name in files:
            yield Path(folder, name).relative_to(root).as_posix()


def _read_regular_file(path: Path) -> tuple[bytes | None, str | None]:
    """(bytes, None), or (None, reason) for a broken link, a FIFO, a permission error..."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None, "unreadable: not a regular file"
        return path.read_bytes(), None
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}"


class WebDatasetSource:
    """Samples of existing WebDataset shards, in shard order then tar order."""

    def __init__(self, url: str) -> None:
        self.spec = f"webdataset:{url}"
        self.urls = _shard_urls(url)
        self._names: dict[int, str] = {}

    def count(self) -> None:
        return None

    def classes(self) -> list[str]:
        size = max(self._names, default=-1) + 1
        return [self._names.get(label, str(label)) for label in range(size)]

    def __iter__(self) -> Iterator[SourceItem]:
        from webdataset.tariterators import tarfile_samples  # imports torch: only when used

        for sample in tarfile_samples([{"url": url} for url in self.urls]):
            yield self._item(sample)

    def _item(self, sample: dict[str, Any]) -> SourceItem:
        path = f"{sample['__url__']}#{sample['__key__']}"
        image_key = next((key for key in WEBDATASET_IMAGE_KEYS if key in sample), None)
        if image_key is None:
            keys = ", ".join(sorted(k for k in sample if not k.startswith("__")))
            reason = f"not an image: no {'/'.join(WEBDATASET_IMAGE_KEYS)} entry (has: {keys})"
            return SourceItem(path, None, None, reason)
        label, reason = _sample_label(sample)
        if label is not None:
            self._names.setdefault(label, _sample_class_name(sample) or str(label))
        return SourceItem(path, label, sample[image_key] if reason is None else None, reason)


def _sample_label(sample: dict[str, Any]) -> tuple[int | None, str | None]:
    raw = sample.get("cls", sample.get("label"))
    if raw is None:
        return None, "no label: sample has no 'cls' or 'label' entry"
    try:
        label = int(bytes(raw).decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None, f"no label: 'cls' is not a decimal integer: {bytes(raw)[:20]!r}"
    return (label, None) if label >= 0 else (None, f"no label: negative label {label}")


def _sample_class_name(sample: dict[str, Any]) -> str | None:
    try:
        name = json.loads(sample["json"]).get("class_name")
    except (KeyError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def _shard_urls(url: str) -> list[str]:
    """Shard URLs of a `webdataset:` spec; local shards must exist (checked up front)."""
    from webdataset.shardlists import expand_urls

    if not _URL_SCHEME.match(url) and Path(url).is_dir():
        urls = sorted(str(path) for path in Path(url).iterdir() if path.name.endswith((".tar", ".tar.gz", ".tgz")))
        if not urls:
            raise IngestError(f"{url}: no .tar shards in this folder")
        return urls
    urls = expand_urls(url)
    for shard in urls:
        if not _URL_SCHEME.match(shard) and not Path(shard).is_file():
            raise IngestError(f"{shard}: shard not found (from webdataset:{url})")
    return urls

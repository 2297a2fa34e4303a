"""Small file helpers shared by the stages: content hashes, atomic and durable writes, and the one safetensors
writer (`atomic_save_safetensors`: same content, same bytes). torch and safetensors are imported only by it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest (`hashlib` algorithm name) of a file, read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file (the project's content hash)."""
    return file_digest(path, "sha256")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary name beside `path`, then rename it over `path`:
    readers see the old file or the whole new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(path: Path, write: Callable[[Path], None]) -> None:
    """`atomic_write` whose data reach the disk before the rename, and whose rename reaches it after."""

    def write_synced(tmp: Path) -> None:
        write(tmp)
        _fsync(tmp)

    atomic_write(path, write_synced)
    if os.name == "posix":  # a directory cannot be opened for fsync on Windows
        _fsync(path.parent)


def canonicalise_header(path: Path) -> None:
    """Sort the metadata keys in a safetensors file's JSON header, in place.

    safetensors writes `__metadata__` in hash-map order, which changes from one process to the next:
    the same tensors and metadata gave different bytes (and DVC hashes) on every run. The header
    keeps its length (padded with spaces, as the format allows), so only the header is rewritten.
    """
    with open(path, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        if len(header.get("__metadata__") or {}) < 2:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # the writer escaped less than json does: the same keys and values, longer
            raise ValueError(f"{path}: canonical safetensors header ({len(text)} bytes) exceeds the "
                             f"written one ({size} bytes)")
        handle.seek(8)
        handle.write(text.ljust(size, b" "))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Save `tensors` (moved to the CPU, contiguous) with `metadata`: atomically, durably, and as the same
    bytes for the same content (metadata keys sorted)."""
    from safetensors.torch import save_file

    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def write(tmp: Path) -> None:
        save_file(flat, str(tmp), metadata=metadata)
        canonicalise_header(tmp)

    durable_write(path, write)

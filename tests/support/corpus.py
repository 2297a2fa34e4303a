"""A small image folder of awkward inputs, for testing `aligntok ingest` end to end.

`build_bad_corpus(root)` writes three class folders (`apple`, `banana`, `cherry`) and two
stray files under `root`: a good image in every PIL mode an image folder can hold (1, L,
LA, P with transparency, PA, RGB, RGBA, CMYK, I;16, I, F, YCbCr, LAB, an animated GIF, a
JPEG with EXIF orientation 6, a hidden file, a nested one) and every kind of bad input
(empty, text named .jpg, truncated JPEG/PNG, too small, decompression bomb, exact
duplicate, unknown extension, file outside a class folder). It returns the expected
rejection-reason prefix per relative path (None: accepted); `GOOD_IMAGES` gives the
original mode and (width, height) after EXIF orientation of each accepted file.

Builders of hostile inputs for `test_ingest_hostile.py` sit at the end (`png_bomb`,
`ico_container`, `write_tar`).
"""

from __future__ import annotations

import io
import shutil
import struct
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ALPHA_SIZE = (64, 64)
"""Size of the images with transparency: their left half is fully transparent."""

GOOD_IMAGES: dict[str, tuple[str, int, int]] = {
    "apple/mode_1.png": ("1", 40, 30),
    "apple/mode_L.png": ("L", 40, 30),
    "apple/mode_LA.png": ("LA", *ALPHA_SIZE),
    "apple/mode_P_transparent.png": ("P", *ALPHA_SIZE),
    "apple/mode_PA.tif": ("PA", *ALPHA_SIZE),
    "apple/mode_RGB.png": ("RGB", 40, 30),
    "apple/mode_RGBA.png": ("RGBA", *ALPHA_SIZE),
    "apple/mode_CMYK.jpg": ("CMYK", 40, 30),
    "apple/mode_I16.png": ("I;16", 40, 30),
    "banana/mode_I.tif": ("I", 40, 30),
    "banana/mode_F.tif": ("F", 40, 30),
    "banana/mode_YCbCr.tif": ("YCbCr", 40, 30),
    "banana/mode_LAB.tif": ("LAB", 40, 30),
    "banana/exif_orientation_6.jpg": ("RGB", 24, 48),  # stored 48x24, displayed rotated
    "banana/animated.gif": ("P", 40, 30),
    "banana/.hidden.png": ("RGB", 36, 36),
    "banana/nested/deeper/grey.jpg": ("L", 50, 20),
}

BAD_INPUTS: dict[str, str] = {
    "banana/zz_copy_of_rgb.png": "duplicate of apple/mode_RGB.png",
    "cherry/empty.jpg": "empty file",
    "cherry/text.jpg": "not an image: ",
    "cherry/truncated.jpg": "truncated: ",
    "cherry/truncated.png": "truncated: ",
    "cherry/small.png": "too small: 10x40, shorter side < min_side 16",
    "cherry/bomb.png": "too large: 30000x30000 = 900000000 pixels > max_pixels",
    "cherry/notes.txt": "unsupported extension '.txt'",
    "cherry/.DS_Store": "unsupported extension ''",
    "stray.png": "not in a class folder",
    "README": "not in a class folder",
}


def build_bad_corpus(root: Path) -> dict[str, str | None]:
    """Write the corpus under `root`; returns {relative path: expected reason prefix or None}."""
    writers: dict[str, Callable[[Path], None]] = {
        "apple/mode_1.png": lambda p: _save(_grey(40, 30, seed=27).point(lambda v: 255 * (v > 127)).convert("1"), p),
        "apple/mode_L.png": lambda p: _save(_grey(40, 30), p),
        "apple/mode_LA.png": lambda p: _save(_half_transparent(_grey(*ALPHA_SIZE, seed=28)), p),
        "apple/mode_P_transparent.png": _write_palette_transparent,
        "apple/mode_PA.tif": lambda p: _save(_half_transparent(_rgb(*ALPHA_SIZE, seed=25).convert("P")), p),
        "apple/mode_RGB.png": lambda p: _save(_rgb(40, 30), p),
        "apple/mode_RGBA.png": lambda p: _save(_half_transparent(_rgb(*ALPHA_SIZE, seed=26)), p),
        "apple/mode_CMYK.jpg": lambda p: _save(_rgb(40, 30, seed=24).convert("CMYK"), p, quality=95),
        "apple/mode_I16.png": lambda p: _save(_array_image(40, 30, np.uint16, 65535, "I;16", seed=20), p),
        "banana/mode_I.tif": lambda p: _save(_array_image(40, 30, np.int32, 65535, "I", seed=21), p),
        "banana/mode_F.tif": lambda p: _save(Image.fromarray(_noise(30, 40, seed=7)), p),
        "banana/mode_YCbCr.tif": lambda p: _save(_rgb(40, 30, seed=22).convert("YCbCr"), p),
        "banana/mode_LAB.tif": lambda p: _save(_rgb(40, 30, seed=23).convert("LAB"), p),
        "banana/exif_orientation_6.jpg": _write_exif_rotated,
        "banana/animated.gif": _write_animated_gif,
        "banana/.hidden.png": lambda p: _save(_rgb(36, 36, seed=3), p),
        "banana/nested/deeper/grey.jpg": lambda p: _save(_grey(50, 20, seed=29), p, quality=90),
        "cherry/empty.jpg": lambda p: p.write_bytes(b""),
        "cherry/text.jpg": lambda p: p.write_text("This is not a JPEG, just some text.\n"),
        "cherry/truncated.jpg": lambda p: p.write_bytes(_truncated(_rgb(64, 64, seed=4), "JPEG")),
        "cherry/truncated.png": lambda p: p.write_bytes(_truncated(_rgb(64, 64, seed=5), "PNG")),
        "cherry/small.png": lambda p: _save(_rgb(10, 40, seed=6), p),
        "cherry/bomb.png": lambda p: p.write_bytes(png_bomb(30000, 30000)),
        "cherry/notes.txt": lambda p: p.write_text("notes\n"),
        "cherry/.DS_Store": lambda p: p.write_bytes(b"\0\0\0\1Bud1"),
        "stray.png": lambda p: _save(_rgb(40, 30, seed=8), p),
        "README": lambda p: p.write_text("a corpus of awkward images\n"),
    }
    for relative, write in writers.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    shutil.copyfile(root / "apple/mode_RGB.png", root / "banana/zz_copy_of_rgb.png")
    return {**{path: None for path in GOOD_IMAGES}, **BAD_INPUTS}


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of `width`×`height` zeros: tiny on disk, huge decoded."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    rows_per_step = 1000
    body = b"".join(compressor.compress(row * min(rows_per_step, height - y)) for y in range(0, height, rows_per_step))
    body += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _noise(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((height, width), dtype=np.float32)  # (H, W) in [0, 1)


def _rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)  # (H, W, 3)
    return Image.fromarray(pixels, mode="RGB")


def _grey(width: int, height: int, seed: int = 1) -> Image.Image:
    return Image.fromarray((_noise(height, width, seed) * 255).astype(np.uint8), mode="L")


def _array_image(width: int, height: int, dtype: type, top: int, mode: str, seed: int) -> Image.Image:
    values = (_noise(height, width, seed) * top).astype(dtype)  # (H, W)
    image = Image.fromarray(values)  # uint16 -> I;16, int32 -> I
    assert image.mode == mode, image.mode
    return image


def _half_transparent(image: Image.Image) -> Image.Image:
    """Add an alpha band: 0 on the left half, 255 on the right."""
    alpha = np.zeros((image.height, image.width), dtype=np.uint8)
    alpha[:, image.width // 2 :] = 255
    image = image.copy()
    image.putalpha(Image.fromarray(alpha, mode="L"))
    return image


def _write_palette_transparent(path: Path) -> None:
    """A P image whose left half uses palette entry 0, declared transparent."""
    indices = np.random.default_rng(9).integers(1, 256, ALPHA_SIZE[::-1], dtype=np.uint8)
    indices[:, : ALPHA_SIZE[0] // 2] = 0
    image = Image.fromarray(indices, mode="L").convert("P")
    image.putpalette(np.random.default_rng(10).integers(0, 256, 768, dtype=np.uint8).tobytes())
    image.save(path, transparency=0)


def _write_exif_rotated(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    _rgb(48, 24, seed=11).save(path, quality=90, exif=exif.tobytes())


def _write_animated_gif(path: Path) -> None:
    frames = [_rgb(40, 30, seed=seed).convert("P") for seed in (12, 13)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _truncated(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    data = buffer.getvalue()
    return data[: len(data) // 2]


def _save(image: Image.Image, path: Path, **options: object) -> None:
    image.save(path, **options)


def ico_container(png: bytes) -> bytes:
    """A Windows icon holding `png` as its one image, written by hand: ICONDIR + ICONDIRENTRY + PNG.

    The entry claims 256×256 (0 means 256); Pillow reads the real size from the PNG inside.
    """
    icondir = struct.pack("<HHH", 0, 1, 1)  # reserved, type 1 (icon), one image
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), len(icondir) + 16)
    return icondir + entry + png


def noise_png(seed: int, size: int = 20) -> bytes:
    """A `size`×`size` RGB PNG of seeded noise (distinct seeds give distinct files)."""
    buffer = io.BytesIO()
    _rgb(size, size, seed=seed).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A plain tar of `(name, bytes)` members, in order (for hand-made WebDataset shards)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

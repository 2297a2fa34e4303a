"""Per-image policy: probe the header, decode, convert to RGB, resize, encode.

`process_image` is the unit of work the ingest pool runs: bytes in, either an
encoded `resolution`×`resolution` RGB image or a rejection reason out. Reasons
start with a short stable prefix (`empty file`, `not an image`, `unreadable`,
`truncated`, `too large`, `too small`, `unsupported mode`) so that reports can
group them.

The size checks read the header only: a decompression bomb is rejected before a
single pixel is decoded. Only the formats named in `DataConfig.formats` are opened
(a file in any other is rejected with its format named), and PIL's own bomb guard
stays on at `max_pixels` while we work (its warning made an error), so that an
image nested in a container that PIL decodes while opening it (the PNG inside an
ICO) is refused from its header too.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from aligntok.config import DataConfig

IMAGE_EXTENSIONS = ("jpg", "jpeg", "jfif", "png", "webp", "bmp", "gif", "tif", "tiff", "pgm", "ppm", "pbm", "pnm")
"""The image extensions of inputs (lower case, no dot): the file suffixes an image folder may hold; a file
with any other is rejected by name. Which formats are then opened is `data.formats`."""

SAMPLE_IMAGE_ENTRIES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
"""The entries of an input WebDataset sample that can be its image (a subset of `IMAGE_EXTENSIONS`), in the
order the image is chosen; a sample with none of them is rejected, and its other entries are never read."""

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class Rejected(Exception):
    """An input that the policy refuses; `str(exc)` is the reason written to rejected.csv."""


@dataclass(frozen=True)
class ImagePolicy:
    """The parts of `DataConfig` that decide what happens to one image (picklable, for workers)."""

    resolution: int
    min_side: int
    max_pixels: int
    background: int
    image_format: str
    jpeg_quality: int
    formats: tuple[str, ...]
    """Pillow format names that may be opened."""

    @classmethod
    def from_config(cls, cfg: DataConfig) -> ImagePolicy:
        return cls(
            cfg.resolution, cfg.min_side, cfg.max_pixels, cfg.background, cfg.image_format, cfg.jpeg_quality,
            tuple(cfg.formats),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class ProcessedImage:
    """What the policy made of one input.

    `width`/`height` are the original size after EXIF orientation (0 unless decoded), `mode`
    the original PIL mode ("" when the header could not be read). `encoded` is the output
    image when accepted, `reason` the rejection reason otherwise (exactly one is set).
    """

    sha256: str
    width: int
    height: int
    mode: str
    encoded: bytes | None
    reason: str | None


def process_image(data: bytes, policy: ImagePolicy) -> ProcessedImage:
    """Hash, probe, decode, convert, resize and encode one image file's bytes."""
    sha = hashlib.sha256(data).hexdigest()
    width = height = 0
    mode = ""
    try:
        with _strict_pil(policy.max_pixels):
            image = probe(data, policy)
            mode = image.mode
            image = decode(image)
            width, height = image.size
            encoded = encode(resize_crop(to_rgb(image, policy.background), policy.resolution), policy)
    except Rejected as exc:
        return ProcessedImage(sha, width, height, mode, None, str(exc))
    except Exception as exc:  # noqa: BLE001 - one odd file must never stop a whole ingest
        return ProcessedImage(sha, width, height, mode, None, _describe_failure(exc))
    return ProcessedImage(sha, width, height, mode, encoded, None)


@contextmanager
def _strict_pil(max_pixels: int) -> Iterator[None]:
    """PIL's bomb guard on at `max_pixels` (its warning an error, not only beyond 2x); truncated files refused."""
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = max_pixels, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def probe(data: bytes, policy: ImagePolicy) -> Image.Image:
    """Open `data` lazily (header only) and apply the format and size limits; raises `Rejected`.

    Only `size` and `mode` are read here: even `getexif()` decodes a whole PNG. Both
    limits hold whatever the EXIF orientation, so the sizes are the stored ones.
    Call it inside `_strict_pil`, which guards images nested in containers.
    """
    if not data:
        raise Rejected("empty file")
    try:
        image = open_allowed(data, policy.formats)
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        pixels = _bomb_pixels(exc)
        raise Rejected(f"too large: an embedded image of {pixels} > max_pixels {policy.max_pixels}") from None
    except Exception as exc:  # noqa: BLE001 - any header failure is a rejection, never a crash
        raise Rejected(_describe_failure(exc)) from None
    width, height = image.size
    if width * height > policy.max_pixels:
        raise Rejected(f"too large: {width}x{height} = {width * height} pixels > max_pixels {policy.max_pixels}")
    if min(width, height) < policy.min_side:
        raise Rejected(f"too small: {width}x{height}, shorter side < min_side {policy.min_side}")
    return image


def open_allowed(data: bytes, formats: tuple[str, ...]) -> Image.Image:
    """`Image.open(data, formats=formats)`, less its check of the outer image's size (`probe` makes it,
    naming the size); the same plugins, tried in the same order, with the same errors skipped.

    Raises `Rejected` naming the format when only a format outside `formats` recognises
    the header: such a file is never handed to its plugin.
    """
    Image.init()
    prefix = data[:16]
    for name in Image.ID:
        if name in formats and _accepts(name, prefix):
            try:
                return Image.OPEN[name][0](io.BytesIO(data), "")
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue  # as `Image.open`: not this format after all
    named = next((name for name in Image.ID if name not in formats and _accepts(name, prefix, guess=False)), None)
    if named is not None:
        raise Rejected(f"unsupported format: {named} (data.formats: {', '.join(formats)})")
    raise Rejected(f"not an image: unknown format, starts with {data[:8]!r}")


def _accepts(name: str, prefix: bytes, guess: bool = True) -> bool:
    """Whether the plugin `name` recognises `prefix`; plugins without a check are tried iff `guess`."""
    accept = Image.OPEN[name][1]
    if accept is None:
        return guess
    result = accept(prefix)
    return bool(result) and not isinstance(result, str)  # a string is PIL's "no, with a warning"


def _bomb_pixels(exc: Exception) -> str:
    found = re.search(r"\((\d+) pixels\)", str(exc))
    return f"{found.group(1)} pixels" if found else "unknown size"


def decode(image: Image.Image) -> Image.Image:
    """Decode the first frame and apply the EXIF orientation; raises `Rejected`."""
    try:
        image.seek(0)
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # noqa: BLE001 - decoder errors come in many types
        raise Rejected(_describe_failure(exc)) from None


def _describe_failure(exc: Exception) -> str:
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"too large: an embedded image of {_bomb_pixels(exc)} > max_pixels {Image.MAX_IMAGE_PIXELS}"
    message = re.sub(r" at 0x[0-9a-fA-F]+", "", str(exc)) or type(exc).__name__
    prefix = "truncated" if "truncat" in message.lower() else "unreadable"
    return f"{prefix}: {message}"


def to_rgb(image: Image.Image, background: int) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited over `background` grey."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(to_uint8(np.asarray(image), mode), mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        mode = "PA"
    try:
        if mode in _ALPHA_MODES:
            return _composite(image.convert("RGBA"), background)
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise Rejected(f"unsupported mode: {image.mode} ({exc})") from None


def _composite(rgba: Image.Image, background: int) -> Image.Image:
    base = Image.new("RGBA", rgba.size, (background, background, background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale high-bit-depth grey (`I;16*`, `I`, `F`) to 0..255.

    `I;16*` is 16-bit: divided by 257 (65535 -> 255). `I` and `F` carry no fixed range,
    so it is inferred from the values: `F` within 0..1 is multiplied by 255; values
    within 0..255 are kept; `I` within 0..65535 is treated as 16-bit; anything else
    (negative, or beyond those ranges) is min-max stretched to 0..255.
    """
    values = values.astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        scaled = values / 257.0
    elif mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif low >= 0.0 and high <= 255.0:
        scaled = values
    elif mode == "I" and low >= 0.0 and high <= 65535.0:
        scaled = values / 257.0
    else:
        scaled = (values - low) * (255.0 / max(high - low, 1e-12))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def resize_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution` (bicubic, antialiased) and centre-crop a square.

    Done as one resample of the central square, which is the same map as
    "resize then crop" without rounding the intermediate size.
    """
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    box = (left, top, left + side, top + side)
    return image.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)


def encode(image: Image.Image, policy: ImagePolicy) -> bytes:
    """Encode an RGB image as PNG or JPEG (deterministic for a given Pillow build).

    The source's metadata is dropped: its ICC profile, EXIF or transparency colour
    would be wrong for the converted pixels (and PNG would copy them over).
    """
    image.info = {}
    buffer = io.BytesIO()
    if policy.image_format == "png":
        # zlib level 1: half the encode time of the default 6 at 256², files ~5% larger
        image.save(buffer, format="PNG", compress_level=1)
    else:
        image.save(buffer, format="JPEG", quality=policy.jpeg_quality)
    return buffer.getvalue()

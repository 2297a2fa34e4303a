"""Captions: the captioned Fashion-MNIST (the embedded text-to-image data) and the rules every caption obeys.

**The captioned Fashion-MNIST** (`data.source: fashion-mnist-captioned`) is made from the 70,000 raw
Fashion-MNIST images (bright garments on black, 28×28 uint8) by pure functions of the pixels, so every read
gives the same images and captions:

- the colour is a `PALETTE` name chosen by the sha256 of the pixel bytes (`colour_for`: its first 8 bytes),
  the caption template by another part of the same hash (`template_for`: bytes 8..16);
- `tint` paints the garment in that colour, `rgb = round(v / 255 * colour)`: the black background stays
  black, and the colour can be read back from a generated image's foreground chromaticity;
- `caption_for(colour, label, template)` writes the caption ("a red sandal", "a photo of an ankle boot in
  blue"...), `parse_caption` reads (colour, label) back, `prompt` is the canonical form used for evaluation;
- the `HELD_OUT` (colour, class) pairs never reach the train split (ingest forces them into val), so a model's
  agreement on them measures composition, not memory.

`SCHEME` bundles these constants; its `describe()` is written into `dataset.json` (`caption_scheme`) and the
source fingerprint, so evaluation reads them from the data (`CaptionScheme.from_json`) and a change to the
palette, garments, templates or held-out pairs changes the fingerprint and reruns ingest. The constants here
are the source of truth; `SCHEME_FORMAT` names the scheme's version.

**Caption rules** (every source; ingest rejects a caption that breaks them, validation checks them again):
`normalise_caption` strips surrounding whitespace and refuses text that is not valid UTF-8, is empty after
stripping, holds a control character other than the whitespace ones (`\\t \\n \\v \\f \\r`), or is longer than
`data.caption_max_chars` characters (code points).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from functools import cached_property
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

SCHEME_FORMAT = "aligntok-captioned-fashion-mnist/1"
"""Version of the captioning scheme; bump it when a rule (not a constant) of this module changes."""

PALETTE: Mapping[str, tuple[int, int, int]] = MappingProxyType({
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 96, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
})  # fmt: skip
"""Colour name -> RGB of a full-brightness garment pixel. Saturated, and far apart as chromaticities (RGB over
its largest channel: every pair differs by at least 1 in one channel); white leaves the image as it was."""

GARMENTS = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
"""The caption noun of each Fashion-MNIST class, by label (`aligntok.data.sources.FASHION_MNIST_CLASSES`)."""

PLURAL_GARMENTS = frozenset({"trousers"})
"""Nouns that take no article ("red trousers", not "a red trousers")."""

TEMPLATES = (
    "{a} {colour} {garment}",
    "a photo of {a} {colour} {garment}",
    "{a} {garment} in {colour}",
    "a picture of {a} {colour} {garment}",
    "{a} {colour} {garment} on a black background",
)
"""Caption templates; `{a}` is "a", "an" or nothing (`PLURAL_GARMENTS`). The first is the canonical prompt."""

HELD_OUT = (("red", 5), ("blue", 8), ("green", 3), ("yellow", 4))
"""(colour, class label) pairs kept out of the train split: red sandal, blue bag, green dress, yellow coat
(four distinct garments, four distinct colours)."""

CAPTION_WHITESPACE = frozenset("\t\n\v\f\r")
"""Control characters a caption may hold (inside it; `normalise_caption` strips them at its ends)."""


@dataclass(frozen=True)
class CaptionScheme:
    """The captioning constants as one value: what `dataset.json` records and `parse_caption` uses."""

    palette: Mapping[str, tuple[int, int, int]]
    garments: tuple[str, ...]
    templates: tuple[str, ...]
    held_out: tuple[tuple[str, int], ...]
    format: str = SCHEME_FORMAT

    def describe(self) -> dict[str, Any]:
        """JSON-ready: {format, palette: {name: [r, g, b]}, garments, templates, held_out: [[colour, label]]}."""
        return {"format": self.format, "palette": {name: list(rgb) for name, rgb in self.palette.items()},
                "garments": list(self.garments), "templates": list(self.templates),
                "held_out": [[colour, label] for colour, label in self.held_out]}

    @classmethod
    def from_json(cls, described: Mapping[str, Any]) -> CaptionScheme:
        """The scheme of a `describe()` (e.g. `dataset.json`'s `caption_scheme`); KeyError/ValueError if malformed."""
        palette = {str(name): tuple(int(v) for v in rgb) for name, rgb in described["palette"].items()}
        if any(len(rgb) != 3 for rgb in palette.values()):
            raise ValueError("caption scheme: every palette colour needs 3 channels")
        return cls(MappingProxyType(palette), tuple(map(str, described["garments"])),  # type: ignore[arg-type]
                   tuple(map(str, described["templates"])),
                   tuple((str(c), int(g)) for c, g in described["held_out"]), str(described["format"]))

    @cached_property
    def _patterns(self) -> tuple[re.Pattern[str], ...]:
        colours = "|".join(sorted(map(re.escape, self.palette), key=len, reverse=True))
        garments = "|".join(sorted(map(re.escape, self.garments), key=len, reverse=True))
        pieces = {"{a}": r"(?:an? )?", "{colour}": f"(?P<colour>{colours}) ", "{garment}": f"(?P<garment>{garments}) "}
        patterns = []
        for template in self.templates:
            words = template.split(" ")
            regex = "".join(pieces.get(word, re.escape(word) + " ") for word in words)
            patterns.append(re.compile(regex.removesuffix(" ")))
        return tuple(patterns)


SCHEME = CaptionScheme(PALETTE, GARMENTS, TEMPLATES, HELD_OUT)
"""The scheme of this module's constants."""


# ------------------------------------------------------------------------------------- the captioned images


def _digest(pixels: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).digest()


def colour_for(pixels: np.ndarray, scheme: CaptionScheme = SCHEME) -> str:
    """The palette colour of an image: sha256 of its pixel bytes, first 8 bytes, modulo the palette size."""
    names = list(scheme.palette)
    return names[int.from_bytes(_digest(pixels)[:8], "big") % len(names)]


def template_for(pixels: np.ndarray, scheme: CaptionScheme = SCHEME) -> int:
    """The template index of an image: the same sha256, bytes 8..16, modulo the template count."""
    return int.from_bytes(_digest(pixels)[8:16], "big") % len(scheme.templates)


def tint(pixels: np.ndarray, colour: str, scheme: CaptionScheme = SCHEME) -> np.ndarray:
    """Grey garment on black (H, W) uint8 -> the garment in `colour` (H, W, 3) uint8: rgb = round(v / 255 * colour)."""
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"tint expects a (H, W) uint8 image, got {pixels.shape} {pixels.dtype}")
    rgb = np.asarray(scheme.palette[colour], dtype=np.uint32)  # (3,)
    return ((pixels[..., None].astype(np.uint32) * rgb + 127) // 255).astype(np.uint8)  # (H, W, 3)


def is_held_out(colour: str, label: int, scheme: CaptionScheme = SCHEME) -> bool:
    """Whether (colour, label) is a pair kept out of the train split."""
    return (colour, int(label)) in scheme.held_out


def caption_for(colour: str, label: int, template_index: int, scheme: CaptionScheme = SCHEME) -> str:
    """The caption of a `colour` garment of class `label` in template `template_index`."""
    if colour not in scheme.palette:
        raise ValueError(f"unknown colour {colour!r}; the palette has {', '.join(scheme.palette)}")
    garment, template = scheme.garments[label], scheme.templates[template_index]
    following = colour if "{a} {colour}" in template else garment
    article = "" if garment in PLURAL_GARMENTS else ("an" if following[0] in "aeiou" else "a")
    return " ".join(template.format(a=article, colour=colour, garment=garment).split())


def prompt(colour: str, label: int, scheme: CaptionScheme = SCHEME) -> str:
    """The canonical evaluation prompt, template 0: "a {colour} {garment}"."""
    return caption_for(colour, label, 0, scheme)


def parse_caption(text: str, scheme: CaptionScheme = SCHEME) -> tuple[str, int] | None:
    """(colour, label) of a caption written by `caption_for` (case and spacing aside); None for any other text."""
    words = " ".join(text.lower().split())
    for pattern in scheme._patterns:
        found = pattern.fullmatch(words)
        if found is not None:
            return found.group("colour"), scheme.garments.index(found.group("garment"))
    return None


# ------------------------------------------------------------------------------------------ caption rules


def is_utf8(text: str) -> bool:
    """Whether `text` encodes as UTF-8 (text decoded with `surrogateescape` from bad bytes does not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def control_character(text: str) -> str | None:
    """The first control character of `text` other than `CAPTION_WHITESPACE`, or None."""
    return next((c for c in text if unicodedata.category(c) == "Cc" and c not in CAPTION_WHITESPACE), None)


def normalise_caption(text: str, max_chars: int) -> tuple[str | None, str | None]:
    """(the caption stripped, None), or (None, the rejection reason): `caption not valid UTF-8`, `caption empty`,
    `caption has a control character: U+XXXX`, `caption too long: N characters > caption_max_chars M`."""
    if not is_utf8(text):
        return None, "caption not valid UTF-8"
    caption = text.strip()
    if not caption:
        return None, "caption empty (nothing but whitespace)"
    control = control_character(caption)
    if control is not None:
        return None, f"caption has a control character: U+{ord(control):04X}"
    if len(caption) > max_chars:
        return None, f"caption too long: {len(caption)} characters > caption_max_chars {max_chars}"
    return caption, None


def decode_caption(data: bytes) -> str:
    """A caption file's or entry's bytes as text: UTF-8, a leading byte-order mark dropped; bytes that are not UTF-8
    are kept as surrogates (`surrogateescape`), so that `normalise_caption` rejects them by name."""
    return data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")

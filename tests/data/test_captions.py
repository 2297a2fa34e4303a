"""Captions: the captioned Fashion-MNIST (`aligntok.data.captions`, source `fashion-mnist-captioned`), captions of
`webdataset:` and `imagefolder:` inputs through ingest, shards and the GX validation."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import itertools
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from aligntok.config import DataConfig, ValidateConfig
from aligntok.data import captions as cap
from aligntok.data.fingerprint import fingerprint
from aligntok.data.ingest import ingest
from aligntok.data.reader import ShardReader
from aligntok.data.shards import NO_LABEL, index_shard, shard_captions
from aligntok.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, open_source
from aligntok.data.validate import format_summary, validate_dataset
from support.corpus import write_tar
from support.shards import edit_record, read_manifest

FMNIST = Path(DataConfig().fashion_mnist_dir)
needs_fmnist = pytest.mark.skipif(not FMNIST.is_dir(),
                                  reason=f"{FMNIST} absent (apt-get install dataset-fashion-mnist)")
PAIRS = {(colour, label) for colour in cap.PALETTE for label in range(len(cap.GARMENTS))}


def noise_jpeg(seed: int, size: int = 20) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def shard_members(folder: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} over every output shard of an ingest folder."""
    members: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return members


def rejected(folder: Path) -> list[list[str]]:
    with open(folder / "rejected.csv", newline="") as stream:
        return list(csv.reader(stream))[1:]


def all_captions(folder: Path, split: str) -> dict[str, str]:
    info = json.loads((folder / "dataset.json").read_text())
    return {k: v for name in info["shards"][split] for k, v in shard_captions(folder / name).items()}


# --- the pure functions -----------------------------------------------------------------------


def test_parse_caption_inverts_caption_for_every_template_colour_and_class() -> None:
    written = set()
    for colour, label, template in itertools.product(cap.PALETTE, range(10), range(len(cap.TEMPLATES))):
        caption = cap.caption_for(colour, label, template)
        assert cap.parse_caption(caption) == (colour, label), caption
        assert cap.parse_caption(f"  {caption.upper()} ") == (colour, label)  # case and spacing aside
        written.add(caption)
    assert len(written) == len(PAIRS) * len(cap.TEMPLATES)  # no two (pair, template) share a caption
    for other in ("", "a purple dress", "a red dress and a coat", "red", "a photo of a dog"):
        assert cap.parse_caption(other) is None


def test_captions_are_natural_and_the_prompt_is_template_zero() -> None:
    assert cap.caption_for("red", 5, 0) == cap.prompt("red", 5) == "a red sandal"
    assert cap.caption_for("blue", 9, 2) == "an ankle boot in blue"
    assert cap.caption_for("white", 1, 1) == "a photo of white trousers"  # plural: no article
    assert cap.caption_for("yellow", 0, 3) == "a picture of a yellow t-shirt"
    assert len(cap.GARMENTS) == len(FASHION_MNIST_CLASSES) == 10
    with pytest.raises(ValueError, match="unknown colour 'purple'"):
        cap.caption_for("purple", 0, 0)


def test_held_out_pairs_are_four_distinct_garments_and_colours() -> None:
    assert len(cap.HELD_OUT) == 4
    assert len({c for c, _ in cap.HELD_OUT}) == 4 and len({g for _, g in cap.HELD_OUT}) == 4
    assert all(c in cap.PALETTE and c != "white" and 0 <= g < 10 for c, g in cap.HELD_OUT)
    assert cap.is_held_out("red", 5) and not cap.is_held_out("red", 4)


def test_palette_is_saturated_and_far_apart_as_chromaticities() -> None:
    rgb = np.array(list(cap.PALETTE.values()), dtype=float)  # (5, 3)
    chroma = rgb / rgb.max(axis=1, keepdims=True)
    distances = np.linalg.norm(chroma[:, None] - chroma[None], axis=-1)[np.triu_indices(len(rgb), 1)]
    assert distances.min() >= 1.0
    assert cap.PALETTE["white"] == (255, 255, 255)


def test_tint_keeps_the_background_black_and_colours_the_garment() -> None:
    pixels = np.zeros((28, 28), np.uint8)
    pixels[5:20, 8:18] = 255
    pixels[20:24, 8:18] = 100
    for colour, rgb in cap.PALETTE.items():
        out = cap.tint(pixels, colour)  # (28, 28, 3)
        assert out.shape == (28, 28, 3) and out.dtype == np.uint8
        assert np.all(out[pixels == 0] == 0)
        assert np.all(out[pixels == 255] == rgb)
        assert np.all(out[pixels == 100] == np.round(np.array(rgb) * 100 / 255))
    assert np.array_equal(cap.tint(pixels, "white"), np.repeat(pixels[..., None], 3, axis=2))  # the plain image
    with pytest.raises(ValueError, match=r"\(H, W\) uint8"):
        cap.tint(pixels.astype(np.float32), "red")


def test_colour_and_template_come_from_two_parts_of_the_content_hash() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (200, 28, 28), dtype=np.uint8)
    names = list(cap.PALETTE)
    for pixels in images[:20]:
        digest = hashlib.sha256(pixels.tobytes()).digest()
        assert cap.colour_for(pixels) == names[int.from_bytes(digest[:8], "big") % 5]
        assert cap.template_for(pixels) == int.from_bytes(digest[8:16], "big") % len(cap.TEMPLATES)
        assert cap.colour_for(pixels.copy()) == cap.colour_for(pixels)
    assert len(Counter(cap.colour_for(p) for p in images)) == 5
    assert len(Counter(cap.template_for(p) for p in images)) == len(cap.TEMPLATES)


def test_normalise_caption_strips_and_names_what_is_wrong() -> None:
    assert cap.normalise_caption("  a red\tdress\n", 100) == ("a red\tdress", None)
    assert cap.normalise_caption(cap.decode_caption(b"\xef\xbb\xbfcaf\xc3\xa9"), 100) == ("café", None)  # BOM dropped
    assert cap.normalise_caption(cap.decode_caption(b"caf\xe9"), 100) == (None, "caption not valid UTF-8")
    assert cap.normalise_caption(" \n\t ", 100) == (None, "caption empty (nothing but whitespace)")
    assert cap.normalise_caption("a\x00b", 100) == (None, "caption has a control character: U+0000")
    assert cap.normalise_caption("bell\x07", 100) == (None, "caption has a control character: U+0007")
    assert cap.normalise_caption("x" * 101, 100) == (None, "caption too long: 101 characters > caption_max_chars 100")
    assert cap.normalise_caption("é" * 100, 100) == ("é" * 100, None)  # characters, not bytes


def test_the_scheme_round_trips_through_json() -> None:
    described = json.loads(json.dumps(cap.SCHEME.describe()))
    assert described["format"] == cap.SCHEME_FORMAT and described["held_out"] == [list(p) for p in cap.HELD_OUT]
    again = cap.CaptionScheme.from_json(described)
    assert again.describe() == cap.SCHEME.describe()
    assert cap.parse_caption("a yellow coat", again) == ("yellow", 4)


# --- the captioned Fashion-MNIST source -------------------------------------------------------


@needs_fmnist
def test_captioned_source_is_deterministic_and_tinted() -> None:
    cfg = DataConfig()
    first = list(itertools.islice(open_source("fashion-mnist-captioned", cfg), 300))
    second = list(itertools.islice(open_source("fashion-mnist-captioned", cfg), 300))
    assert first == second
    plain = list(itertools.islice(open_source("fashion-mnist", cfg), 300))
    for item, grey in zip(first, plain, strict=True):
        assert (item.source_path, item.label) == (grey.source_path, grey.label)
        pixels = np.asarray(Image.open(io.BytesIO(grey.data)))  # (28, 28)
        image = Image.open(io.BytesIO(item.data))
        assert (image.format, image.mode, image.size) == ("PPM", "RGB", (28, 28))
        colour = cap.colour_for(pixels)
        assert np.array_equal(np.asarray(image), cap.tint(pixels, colour))
        assert item.caption == cap.caption_for(colour, item.label, cap.template_for(pixels))
        assert item.split == ("val" if cap.is_held_out(colour, item.label) else None)
    assert any(item.split == "val" for item in first)


@pytest.fixture(scope="module")
def captioned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not FMNIST.is_dir():
        pytest.skip(f"{FMNIST} absent")
    out = tmp_path_factory.mktemp("captioned") / "shards"
    cfg = DataConfig(workers=2, max_images=3000, shard_max_count=1000)
    ingest("fashion-mnist-captioned", out, cfg, progress=False, limit=cfg.max_images)
    return out


def test_held_out_pairs_go_to_val_only_and_every_other_pair_is_trained_on(captioned: Path) -> None:
    manifest = pq.read_table(captioned / "manifest.parquet").to_pylist()
    assert len(manifest) == 3000
    labels = {row["key"]: row["label"] for row in manifest}
    seen = {}
    for split in ("train", "val"):
        pairs = [cap.parse_caption(text) for text in all_captions(captioned, split).values()]
        assert None not in pairs
        seen[split] = set(pairs)
        for key, text in all_captions(captioned, split).items():
            assert cap.parse_caption(text)[1] == labels[key]  # the caption names the record's class
    held = set(cap.HELD_OUT)
    assert seen["train"] == PAIRS - held
    assert held <= seen["val"]
    info = json.loads((captioned / "dataset.json").read_text())
    assert info["captions"] == {"train": info["counts"]["train"], "val": info["counts"]["val"]}
    assert info["caption_scheme"] == cap.SCHEME.describe()
    assert info["source"] == "fashion-mnist-captioned" and info["classes"] == list(FASHION_MNIST_CLASSES)


def test_captioned_shards_hold_rgb_images_with_their_caption(captioned: Path) -> None:
    members = shard_members(captioned)
    key, record = next(iter(members.items()))
    assert set(record) == {"cls", "json", "png", "txt"}
    image = np.asarray(Image.open(io.BytesIO(record["png"])))  # (32, 32, 3)
    colour, label = cap.parse_caption(record["txt"].decode())
    assert int(record["cls"]) == label
    if colour != "white":  # the foreground takes the colour: its brightest pixel is the palette's chromaticity
        brightest = image.reshape(-1, 3)[image.max(axis=2).argmax()].astype(float)
        rgb = np.array(cap.PALETTE[colour], dtype=float)
        assert np.abs(brightest / brightest.max() - rgb / rgb.max()).max() < 0.2


def test_gx_passes_on_the_captioned_dataset_and_fails_on_a_held_out_pair_in_train(
    captioned: Path, tmp_path: Path
) -> None:
    report = validate_dataset(captioned, ValidateConfig(), report_dir=tmp_path / "report")
    assert report.success, format_summary(report)
    names = [r.name for r in report.results]
    for name in ("caption_utf8", "caption_not_empty", "caption_length", "caption_no_control", "held_out_not_in_train",
                 "caption_in_scheme", "caption_matches_label", "class_share_balanced"):
        assert name in names
    assert report.skipped == {}
    # a train sandal recaptioned "a red sandal": a held-out pair in train
    broken = tmp_path / "broken"
    shutil.copytree(captioned, broken)
    manifest = read_manifest(broken)
    key = manifest.loc[(manifest["split"] == "train") & (manifest["label"] == 5), "key"].iloc[0]
    edit_record(broken, key, lambda sample: sample.update(txt=b"a red sandal"))
    report = validate_dataset(broken, ValidateConfig(), report_dir=tmp_path / "report")
    assert report.failed == ["held_out_not_in_train"], format_summary(report)
    observed = next(r.observed for r in report.results if r.name == "held_out_not_in_train")
    assert observed["unexpected"][0]["key"] == key
    # an empty caption smuggled into a shard
    edit_record(broken, key, lambda sample: sample.update(txt=b""))
    report = validate_dataset(broken, ValidateConfig(), report_dir=tmp_path / "report")
    assert set(report.failed) == {"caption_not_empty", "caption_length", "caption_in_scheme"}, format_summary(report)
    assert "FAIL  caption_not_empty " in (tmp_path / "report/validation.txt").read_text()


@needs_fmnist
def test_with_a_val_source_a_held_out_train_input_is_rejected(tmp_path: Path) -> None:
    cfg = DataConfig(workers=0, val_source="fashion-mnist")  # same classes; PGM vs PPM: no duplicates
    summary = ingest("fashion-mnist-captioned", tmp_path / "out", cfg, progress=False, limit=400)
    items = list(itertools.islice(open_source("fashion-mnist-captioned", cfg), 400))
    held = sorted(f"train:{i.source_path}" for i in items if i.split == "val")
    rows = rejected(tmp_path / "out")
    assert held and [path for path, _ in rows] == held
    assert all(reason.startswith("held out of train: the source puts it in val") for _, reason in rows)
    assert (summary.train, summary.val) == (400 - len(held), 400)
    assert all(cap.parse_caption(t) not in cap.HELD_OUT for t in all_captions(tmp_path / "out", "train").values())


def test_the_fingerprint_names_the_captioning_scheme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "fmnist"
    folder.mkdir()
    for name in (n for pair in FASHION_MNIST_FILES for n in pair):
        (folder / name).write_bytes(gzip.compress(name.encode(), mtime=0))

    def described(spec: str) -> dict:
        return fingerprint(DataConfig(source=spec, fashion_mnist_dir=str(folder)))["source"]

    plain, captioned = described("fashion-mnist"), described("fashion-mnist-captioned")
    assert "captions" not in plain and captioned["captions"] == cap.SCHEME.describe()
    assert captioned["files"] == plain["files"] and captioned["digest"] != plain["digest"]
    assert described("fashion-mnist-captioned") == captioned
    other = cap.CaptionScheme(cap.PALETTE, cap.GARMENTS, cap.TEMPLATES[:2], cap.HELD_OUT)
    monkeypatch.setattr("aligntok.data.fingerprint.SCHEME", other)
    assert described("fashion-mnist-captioned")["digest"] != captioned["digest"]


# --- found captions: webdataset and image folders ----------------------------------------------


def img2dataset_shard(path: Path, captions: list[bytes], start: int = 0) -> None:
    """A shard as img2dataset writes it: `<key>.jpg`, `<key>.txt`, `<key>.json`, no class label."""
    members = []
    for i, text in enumerate(captions, start):
        key = f"{i:09d}"
        meta = json.dumps({"url": f"https://example.com/{i}.jpg", "key": key, "status": "success",
                           "caption": text.decode("utf-8", "replace"), "width": 20, "height": 20})
        members += [(f"{key}.jpg", noise_jpeg(i)), (f"{key}.txt", text), (f"{key}.json", meta.encode())]
    write_tar(path, members)


def test_webdataset_captions_round_trip_without_labels(tmp_path: Path) -> None:
    texts = [f"photo number {i} of a café — ünïcode".encode() for i in range(30)]
    texts[0] = b"  padded caption\n"
    img2dataset_shard(tmp_path / "in/00000.tar", texts[:20])
    img2dataset_shard(tmp_path / "in/00001.tar", texts[20:], start=20)
    cfg = DataConfig(workers=0, val_fraction=0.3)
    summary = ingest(f"webdataset:{tmp_path / 'in'}", tmp_path / "out", cfg, progress=False)
    out = tmp_path / "out"
    assert (summary.inputs, summary.rejected, summary.classes) == (30, 0, [])
    assert summary.captions == {"train": summary.train, "val": summary.val} and summary.val > 0
    wanted = {f"{tmp_path / 'in'}/0000{i // 20}.tar#{i:09d}": t.decode().strip() for i, t in enumerate(texts)}
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    by_key = {row["key"]: row for row in manifest}
    assert all(row["label"] is None and row["class_name"] is None for row in manifest)
    members = shard_members(out)
    for key, record in members.items():
        assert set(record) == {"json", "png", "txt"}  # no .cls
        assert record["txt"].decode() == wanted[by_key[key]["source_path"]]
        meta = json.loads(record["json"])
        assert (meta["label"], meta["class_name"]) == (None, None)
    found = {**all_captions(out, "train"), **all_captions(out, "val")}
    assert found == {key: record["txt"].decode() for key, record in members.items()}
    info = json.loads((out / "dataset.json").read_text())
    assert info["captions"] == summary.captions and "caption_scheme" not in info and info["classes"] == []
    for name in info["shards"]["train"]:
        assert set(index_shard(out / name)["label"].tolist()) == {NO_LABEL}
    assert set(ShardReader(out, "train").labels.tolist()) == {NO_LABEL}
    report = validate_dataset(out, ValidateConfig(), report_dir=tmp_path / "report")
    assert report.success, format_summary(report)
    assert report.skipped == {"class_share_balanced": "skipped: no class labels"}
    assert "class_share_balanced" not in [r.name for r in report.results]
    document = json.loads((tmp_path / "report/validation.json").read_text())
    assert document["skipped"] == report.skipped
    assert "SKIP  class_share_balanced" in (tmp_path / "report/validation.txt").read_text()


def test_caption_rejections_name_the_problem(tmp_path: Path) -> None:
    texts = {"good": b"a fine caption", "latin1": b"caf\xe9", "blank": b" \n\t ", "long": b"x" * 21,
             "nul": b"a\x00b", "bell": b"ring\x07"}
    members = []
    for i, (key, text) in enumerate(texts.items()):
        members += [(f"{key}.jpg", noise_jpeg(i)), (f"{key}.txt", text)]
    members += [("neither.jpg", noise_jpeg(10)), ("badcls.jpg", noise_jpeg(11)), ("badcls.cls", b"x"),
                ("badcls.txt", b"fine")]  # fmt: skip
    write_tar(tmp_path / "in/s.tar", members)
    cfg = DataConfig(workers=0, caption_max_chars=20)
    summary = ingest(f"webdataset:{tmp_path / 'in'}", tmp_path / "out", cfg, progress=False)
    shard = tmp_path / "in/s.tar"
    assert rejected(tmp_path / "out") == [
        [f"{shard}#badcls", "no label: 'cls' is not a decimal integer: b'x'"],  # a caption excuses no bad label
        [f"{shard}#bell", "caption has a control character: U+0007"],
        [f"{shard}#blank", "caption empty (nothing but whitespace)"],
        [f"{shard}#latin1", "caption not valid UTF-8"],
        [f"{shard}#long", "caption too long: 21 characters > caption_max_chars 20"],
        [f"{shard}#neither", "no label: sample has no 'cls' or 'label' entry"],
        [f"{shard}#nul", "caption has a control character: U+0000"],
    ]
    assert (summary.inputs, summary.train + summary.val, summary.rejected) == (8, 1, 7)


def test_image_folder_sidecar_captions(tmp_path: Path) -> None:
    root = tmp_path / "src"
    for i, (path, caption) in enumerate([
        ("cat/a.jpg", "a cat"), ("cat/b.png", None), ("dog/c.jpg", "  a dog  "), ("d.jpg", "no class at all"),
        ("e.jpg", None),
    ]):  # fmt: skip
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(noise_jpeg(i))
        if caption is not None:
            (root / path).with_suffix(".txt").write_text(caption)
    (root / "dog/notes.txt").write_text("not a caption: no image beside it")
    summary = ingest(f"imagefolder:{root}", tmp_path / "out", DataConfig(workers=0), progress=False)
    assert summary.classes == ["cat", "dog"] and summary.inputs == 6  # sidecars are not inputs
    assert rejected(tmp_path / "out") == [["dog/notes.txt", "unsupported extension '.txt'"],
                                          ["e.jpg", "not in a class folder"]]
    rows = {r["source_path"]: r for r in pq.read_table(tmp_path / "out/manifest.parquet").to_pylist()}
    assert {p: r["label"] for p, r in rows.items()} == {"cat/a.jpg": 0, "cat/b.png": 0, "dog/c.jpg": 1, "d.jpg": None}
    members = shard_members(tmp_path / "out")
    texts = {p: members[r["key"]].get("txt") for p, r in rows.items()}
    assert texts == {"cat/a.jpg": b"a cat", "cat/b.png": None, "dog/c.jpg": b"a dog", "d.jpg": b"no class at all"}
    assert "cls" not in members[rows["d.jpg"]["key"]] and members[rows["cat/b.png"]["key"]]["cls"] == b"0"
    assert sum(summary.captions.values()) == 3


def test_image_folder_of_captioned_images_needs_no_class_folder(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    for i in range(6):
        (root / f"{i}.jpg").write_bytes(noise_jpeg(i))
        (root / f"{i}.txt").write_bytes(f"caption {i}".encode())
    (root / "6.jpg").write_bytes(noise_jpeg(6))
    (root / "6.txt").write_bytes(b"\x00")
    summary = ingest(f"imagefolder:{root}", tmp_path / "out", DataConfig(workers=0), progress=False)
    assert (summary.inputs, summary.rejected, summary.classes) == (7, 1, [])
    assert rejected(tmp_path / "out") == [["6.jpg", "caption has a control character: U+0000"]]
    found = {**all_captions(tmp_path / "out", "train"), **all_captions(tmp_path / "out", "val")}
    assert sorted(found.values()) == [f"caption {i}" for i in range(6)]

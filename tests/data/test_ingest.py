"""`aligntok ingest`: sources, per-image policy, rejections, shards, determinism."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from aligntok.config import DataConfig
from aligntok.data.images import ImagePolicy, process_image, to_uint8
from aligntok.data.ingest import IngestError, IngestSummary, _Pool, ingest
from aligntok.data.shards import plan_shards, tar_size
from support.corpus import ALPHA_SIZE, GOOD_IMAGES, build_bad_corpus

BACKGROUND = 200
DEFAULT_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS
MANIFEST_COLUMNS = ["key", "source_path", "split", "label", "class_name", "width", "height", "mode", "sha256", "shard"]


# --- helpers ----------------------------------------------------------------------------------


def read_shards(out_dir: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} over every shard in `out_dir`; also checks the fixed tar headers."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    for shard in sorted(out_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                assert (member.mtime, member.uid, member.gid, member.uname, member.mode) == (0, 0, 0, "aligntok", 0o444)
                key, ext = member.name.split(".", 1)
                samples[key][ext] = tar.extractfile(member).read()
    return dict(samples)


def read_rejected(out_dir: Path) -> list[list[str]]:
    with open(out_dir / "rejected.csv", newline="") as stream:
        return list(csv.reader(stream))


def manifest_rows(out_dir: Path) -> list[dict]:
    return pq.read_table(out_dir / "manifest.parquet").to_pylist()


def output_files(out_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out_dir.iterdir())}


def write_noise_folder(root: Path, count: int, classes: int = 3, size: int = 20, seed: int = 123) -> None:
    """`count` distinct small RGB PNGs spread over `classes` class folders (other `seed`, other images)."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        folder = root / f"class_{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)  # (H, W, 3)
        Image.fromarray(pixels).save(folder / f"{index:04d}.png")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, build_bad_corpus(root)


@pytest.fixture(scope="module")
def corpus_out(
    corpus: tuple[Path, dict[str, str | None]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, IngestSummary]:
    root, _ = corpus
    out = tmp_path_factory.mktemp("corpus_out") / "shards"
    cfg = DataConfig(workers=0, background=BACKGROUND, val_fraction=0.3)
    return out, ingest(f"imagefolder:{root}", out, cfg, progress=False)


@pytest.fixture(scope="module")
def noise_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("noise")
    write_noise_folder(root, 300)
    return root


# --- the bad-input corpus ---------------------------------------------------------------------


def test_corpus_rejections_are_exact_and_sorted(corpus, corpus_out) -> None:
    _, expected = corpus
    out, summary = corpus_out
    rows = read_rejected(out)
    assert rows[0] == ["path", "reason"]
    bad = {path: reason for path, reason in expected.items() if reason is not None}
    assert [path for path, _ in rows[1:]] == sorted(bad)
    for path, reason in rows[1:]:
        assert reason.startswith(bad[path]), (path, reason)
    assert summary.rejected == len(bad)


def test_corpus_manifest_records_original_mode_and_size(corpus, corpus_out) -> None:
    out, summary = corpus_out
    table = pq.read_table(out / "manifest.parquet")
    assert table.column_names == MANIFEST_COLUMNS
    types = [str(t) for t in table.schema.types]
    assert types == ["string"] * 3 + ["int64", "string", "int64", "int64"] + ["string"] * 3
    rows = {row["source_path"]: row for row in table.to_pylist()}
    assert set(rows) == set(GOOD_IMAGES)
    for path, (mode, width, height) in GOOD_IMAGES.items():
        row = rows[path]
        assert (row["mode"], row["width"], row["height"]) == (mode, width, height), path
        assert row["class_name"] == path.split("/")[0]
        assert row["label"] == ["apple", "banana", "cherry"].index(row["class_name"])
        assert row["key"] == row["sha256"][:16]
    assert rows["banana/exif_orientation_6.jpg"]["width"] == 24  # stored 48x24, EXIF-rotated


def test_corpus_outputs_are_rgb_squares_matching_the_manifest(corpus_out) -> None:
    out, summary = corpus_out
    samples = read_shards(out)
    rows = manifest_rows(out)
    assert sorted(samples) == sorted(row["key"] for row in rows)
    for row in rows:
        sample = samples[row["key"]]
        assert set(sample) == {"png", "cls", "json"}
        image = Image.open(io.BytesIO(sample["png"]))
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
        assert sample["cls"] == str(row["label"]).encode()
        meta = json.loads(sample["json"])
        assert meta == {k: row[k] for k in ("key", "source_path", "label", "class_name", "sha256")}
        with tarfile.open(out / row["shard"]) as tar:
            assert f"{row['key']}.png" in tar.getnames()


def test_corpus_counts_invariant_and_dataset_json(corpus, corpus_out) -> None:
    _, expected = corpus
    out, summary = corpus_out
    description = json.loads((out / "dataset.json").read_text())
    counts = description["counts"]
    assert counts["inputs"] == len(expected) == summary.inputs
    assert counts["inputs"] == counts["train"] + counts["val"] + counts["rejected"]
    assert description["classes"] == ["apple", "banana", "cherry"]
    assert description["params"]["background"] == BACKGROUND
    assert description["params"]["source"] == description["source"] == summary.source
    assert description["shards"] == {split: [p.name for p in paths] for split, paths in summary.shards.items()}
    shards = description["shards"]["train"] + description["shards"]["val"]
    indexes = [name.replace(".tar", ".idx") for name in shards]
    expected_files = ["dataset.json", "manifest.parquet", "rejected.csv", *shards, *indexes]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected_files)
    # the record index: each shard's count, and every row pointing at the image bytes stored in the tar
    records = description["index"]["records"]
    assert {split: sum(n) for split, n in records.items()} == {"train": counts["train"], "val": counts["val"]}
    for split, names in description["shards"].items():
        for name, count in zip(names, records[split], strict=True):
            index = np.load(out / name.replace(".tar", ".idx"))
            assert len(index) == count
            with tarfile.open(out / name) as tar:
                for row in index:
                    key = row["key"].decode()
                    stored = tar.extractfile(f"{key}.png").read()
                    assert (out / name).read_bytes()[row["offset"]:row["offset"] + row["size"]] == stored
                    assert int(tar.extractfile(f"{key}.cls").read()) == row["label"]


@pytest.mark.parametrize(
    "path", ["apple/mode_RGBA.png", "apple/mode_LA.png", "apple/mode_P_transparent.png", "apple/mode_PA.tif"]
)
def test_transparent_pixels_take_the_background_grey(corpus_out, path: str) -> None:
    out, _ = corpus_out
    row = next(row for row in manifest_rows(out) if row["source_path"] == path)
    pixels = np.asarray(Image.open(io.BytesIO(read_shards(out)[row["key"]]["png"])))  # (32, 32, 3)
    assert ALPHA_SIZE == (64, 64)  # left half transparent: output columns 0..15, minus the filter's reach
    assert np.all(pixels[:, :12] == BACKGROUND)
    assert not np.all(pixels[:, 20:] == BACKGROUND)


def test_bomb_is_rejected_from_the_header(corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = corpus
    data = (root / "cherry/bomb.png").read_bytes()
    assert len(data) < 1_000_000  # 900 megapixels claimed

    def no_decoding(image: ImageFile.ImageFile) -> None:
        raise AssertionError(f"decoded a {image.size} image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    outcome = process_image(data, ImagePolicy.from_config(DataConfig()))
    assert outcome.reason == "too large: 30000x30000 = 900000000 pixels > max_pixels 89478485"
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS  # PIL's guard is restored afterwards


# --- determinism, split and shards ------------------------------------------------------------


def test_reruns_are_byte_identical_and_independent_of_workers(corpus, tmp_path: Path) -> None:
    root, _ = corpus
    source = f"imagefolder:{root}"
    cfg = DataConfig(workers=0, val_fraction=0.3)
    ingest(source, tmp_path / "a", cfg, progress=False)
    ingest(source, tmp_path / "b", cfg.model_copy(update={"workers": 2}), progress=False)
    first = output_files(tmp_path / "a")
    ingest(source, tmp_path / "a", cfg, progress=False)
    assert output_files(tmp_path / "a") == first
    with_workers = output_files(tmp_path / "b")
    description = json.loads(with_workers.pop("dataset.json"))
    assert description["params"].pop("workers") == 2
    assert {**description, "params": {**description["params"], "workers": 0}} == json.loads(first.pop("dataset.json"))
    assert with_workers == first


def test_split_fraction_and_shard_count_bound(noise_folder: Path, tmp_path: Path) -> None:
    cfg = DataConfig(workers=0, val_fraction=0.25, shard_max_count=40)
    summary = ingest(f"imagefolder:{noise_folder}", tmp_path, cfg, progress=False)
    assert summary.inputs == 300 and summary.rejected == 0
    assert 0.25 - 0.08 < summary.val / 300 < 0.25 + 0.08
    assert len(summary.shards["train"]) == -(-summary.train // 40)
    rows = manifest_rows(tmp_path)
    per_shard: dict[str, int] = defaultdict(int)
    for row in rows:
        per_shard[row["shard"]] += 1
        assert row["shard"].startswith(row["split"] + "-")
    assert max(per_shard.values()) == 40
    for name, count in per_shard.items():
        with tarfile.open(tmp_path / name) as tar:
            assert len(tar.getnames()) == 3 * count
    labels = [row["label"] for row in rows[:40]]
    assert len(set(labels)) == 3  # seeded order mixes classes within a shard


def test_shard_byte_bound_holds_for_file_sizes(noise_folder: Path, tmp_path: Path) -> None:
    cfg = DataConfig(workers=0, shard_max_bytes=60_000)
    summary = ingest(f"imagefolder:{noise_folder}", tmp_path, cfg, progress=False)
    shards = summary.shards["train"] + summary.shards["val"]
    assert len(shards) > 5
    assert all(path.stat().st_size <= 60_000 for path in shards)
    assert sum(len(tarfile.open(p).getnames()) for p in shards) == 3 * 300


def test_plan_shards_bounds() -> None:
    sizes = [tar_size([3000, 1, 200])] * 10  # 4608 bytes each
    assert plan_shards(sizes, max_count=4, max_bytes=10**9) == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert plan_shards(sizes, max_count=100, max_bytes=20_480) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert plan_shards([50_000, 10], max_count=100, max_bytes=1_000) == [0, 1]  # oversize: a shard alone


def test_seed_changes_the_split_but_not_the_content(noise_folder: Path, tmp_path: Path) -> None:
    runs = {}
    for seed in (0, 1):
        ingest(f"imagefolder:{noise_folder}", tmp_path / str(seed), DataConfig(workers=0, seed=seed), progress=False)
        runs[seed] = {row["sha256"]: row["split"] for row in manifest_rows(tmp_path / str(seed))}
    assert runs[0].keys() == runs[1].keys()
    assert runs[0] != runs[1]


def test_rerun_removes_stale_shards(noise_folder: Path, tmp_path: Path) -> None:
    ingest(f"imagefolder:{noise_folder}", tmp_path, DataConfig(workers=0, shard_max_count=30), progress=False)
    assert (tmp_path / "train-000005.tar").exists()
    summary = ingest(f"imagefolder:{noise_folder}", tmp_path, DataConfig(workers=0), progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]
    assert {row["shard"] for row in manifest_rows(tmp_path)} == {"train-000000.tar", "val-000000.tar"}
    assert summary.train + summary.val == 300


def test_duplicates_keep_the_first_path_in_sorted_order(tmp_path: Path) -> None:
    write_noise_folder(tmp_path / "src", 2, classes=2)
    shutil.copyfile(tmp_path / "src/class_1/0001.png", tmp_path / "src/class_0/9999.png")  # sorts first
    ingest(f"imagefolder:{tmp_path / 'src'}", tmp_path / "out", DataConfig(workers=0), progress=False)
    assert read_rejected(tmp_path / "out")[1:] == [["class_1/0001.png", "duplicate of class_0/9999.png"]]
    kept = {row["source_path"]: row["label"] for row in manifest_rows(tmp_path / "out")}
    assert kept == {"class_0/0000.png": 0, "class_0/9999.png": 0}


def test_links_and_special_files_are_rejected_not_dropped(tmp_path: Path) -> None:
    write_noise_folder(tmp_path / "src", 2, classes=1)
    (tmp_path / "src/class_0/broken.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(tmp_path / "src/class_0/pipe.png")
    summary = ingest(f"imagefolder:{tmp_path / 'src'}", tmp_path / "out", DataConfig(workers=0), progress=False)
    assert (summary.inputs, summary.rejected) == (4, 2)
    assert read_rejected(tmp_path / "out")[1:] == [
        ["class_0/broken.png", "unreadable: No such file or directory"],
        ["class_0/pipe.png", "unreadable: not a regular file"],
    ]


def test_pool_reads_its_input_lazily() -> None:
    consumed = []

    def items():
        for index in range(10_000):
            consumed.append(index)
            yield index

    with _Pool(1) as pool:
        results = pool.imap(abs, items())
        assert next(results) == 0
        assert len(consumed) <= 4 * 32 + 32  # a few chunks ahead, not the whole input
        assert list(results) == list(range(1, 10_000))


# --- other sources ----------------------------------------------------------------------------


def test_fashion_mnist_slice(tmp_path: Path) -> None:
    cfg = DataConfig(workers=0)
    if not Path(cfg.fashion_mnist_dir).is_dir():
        pytest.skip(f"{cfg.fashion_mnist_dir} absent (apt-get install dataset-fashion-mnist)")
    summary = ingest("fashion-mnist", tmp_path, cfg, progress=False, limit=300)
    assert summary.inputs == 300 and summary.rejected == 0
    assert summary.classes[0] == "T-shirt/top" and summary.classes[9] == "Ankle boot"
    rows = manifest_rows(tmp_path)
    assert {(row["mode"], row["width"], row["height"]) for row in rows} == {("L", 28, 28)}
    assert all(re.fullmatch(r"train-images-idx3-ubyte\.gz#\d+", row["source_path"]) for row in rows)
    assert all(row["class_name"] == summary.classes[row["label"]] for row in rows)
    assert len({row["label"] for row in rows}) == 10


def test_webdataset_source_round_trip(corpus_out, tmp_path: Path) -> None:
    first, summary = corpus_out
    pattern = f"{first}/train-{{000000..{len(summary.shards['train']) - 1:06d}}}.tar"
    again = ingest(f"webdataset:{pattern}", tmp_path / "pattern", DataConfig(workers=0), progress=False)
    assert (again.inputs, again.rejected) == (summary.train, 0)
    whole = ingest(f"webdataset:{first}", tmp_path / "folder", DataConfig(workers=0), progress=False)
    assert (whole.inputs, whole.rejected) == (summary.train + summary.val, 0)
    assert whole.classes[:2] == ["apple", "banana"]  # names from the samples' json
    original = {row["key"]: row["label"] for row in manifest_rows(first)}
    for row in manifest_rows(tmp_path / "folder"):
        url, key = row["source_path"].rsplit("#", 1)
        assert url.startswith(str(first)) and original[key] == row["label"]
        assert (row["mode"], row["width"], row["height"]) == ("RGB", 32, 32)


def test_real_photos_from_imagenet_sample(imagenet_sample: Path, tmp_path: Path) -> None:
    files = sorted(imagenet_sample.glob("*.JPEG"))
    grey = [f for f in files if Image.open(f).mode == "L"]
    chosen = grey[:5] + [f for f in files if f not in grey][:35]
    for index, path in enumerate(chosen):
        folder = tmp_path / "src" / ("even" if index % 2 == 0 else "odd")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / path.name)  # a link would lead out of the source folder: rejected
    cfg = DataConfig(workers=2, resolution=64, image_format="jpeg")
    summary = ingest(f"imagefolder:{tmp_path / 'src'}", tmp_path / "out", cfg, progress=False)
    assert (summary.inputs, summary.rejected) == (len(chosen), 0)
    rows = manifest_rows(tmp_path / "out")
    modes = {row["source_path"].split("/")[1]: row["mode"] for row in rows}
    assert {name for name, mode in modes.items() if mode == "L"} == {f.name for f in grey[:5]}
    for sample in read_shards(tmp_path / "out").values():
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("imagefolder:/nonexistent/images", "/nonexistent/images: image folder not found"),
        ("s3bucket:foo", "unknown source 's3bucket:foo'"),
        ("imagefolder:", "unknown source"),
        ("webdataset:/nonexistent/shard-{000..002}.tar", "/nonexistent/shard-000.tar: shard not found"),
    ],
)
def test_clear_errors_for_bad_sources(source: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(IngestError, match=re.escape(message)):
        ingest(source, tmp_path / "out", DataConfig(workers=0), progress=False)
    assert not (tmp_path / "out").exists()


def test_clear_errors_for_empty_or_flat_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="empty"):
        ingest(f"imagefolder:{tmp_path / 'empty'}", tmp_path / "out", DataConfig(), progress=False)
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "flat/a.png")
    with pytest.raises(IngestError, match="no class folders"):
        ingest(f"imagefolder:{tmp_path / 'flat'}", tmp_path / "out", DataConfig(), progress=False)


def test_missing_fashion_mnist_names_the_package(tmp_path: Path) -> None:
    cfg = DataConfig(fashion_mnist_dir=str(tmp_path / "none"))
    with pytest.raises(IngestError, match="apt-get install dataset-fashion-mnist"):
        ingest("fashion-mnist", tmp_path / "out", cfg, progress=False)


def test_refuses_an_out_dir_with_unrelated_files(noise_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("mine\n")
    with pytest.raises(IngestError, match=r"refusing to write .*notes\.md"):
        ingest(f"imagefolder:{noise_folder}", tmp_path, DataConfig(workers=0), progress=False)
    with pytest.raises(IngestError, match="inside the source folder"):
        ingest(f"imagefolder:{noise_folder}", noise_folder / "out", DataConfig(workers=0), progress=False)
    assert (tmp_path / "notes.md").read_text() == "mine\n"


# --- policy units -----------------------------------------------------------------------------


def test_high_bit_depth_grey_scales_to_8_bit() -> None:
    assert to_uint8(np.array([0, 257, 65535], dtype=np.uint16), "I;16").tolist() == [0, 1, 255]
    assert to_uint8(np.array([0.0, 0.5, 1.0], dtype=np.float32), "F").tolist() == [0, 128, 255]
    assert to_uint8(np.array([0, 100, 255], dtype=np.int32), "I").tolist() == [0, 100, 255]
    assert to_uint8(np.array([0, 65535], dtype=np.int32), "I").tolist() == [0, 255]
    assert to_uint8(np.array([-10.0, 10.0], dtype=np.float32), "F").tolist() == [0, 255]


# --- a separate val source (data.val_source) --------------------------------------------------


def val_source_cfg(val: Path, **kw) -> DataConfig:
    return DataConfig(workers=0, val_source=f"imagefolder:{val}", **kw)


def relative_images(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*.png")}


def test_val_source_is_the_val_split_and_source_the_train_split(tmp_path: Path) -> None:
    train, val = tmp_path / "train", tmp_path / "val"
    write_noise_folder(train, 12, classes=3)
    write_noise_folder(val, 6, classes=3, seed=7)
    summary = ingest(f"imagefolder:{train}", tmp_path / "out", val_source_cfg(val), progress=False)
    assert (summary.inputs, summary.train, summary.val, summary.rejected) == (18, 12, 6, 0)
    rows = manifest_rows(tmp_path / "out")
    by_split = {split: {r["source_path"] for r in rows if r["split"] == split} for split in ("train", "val")}
    assert by_split["val"] == {f"val:{path}" for path in relative_images(val)}  # exactly the val folder
    assert by_split["train"] == {f"train:{path}" for path in relative_images(train)}  # all of the train folder
    assert all(r["class_name"] == r["source_path"].split(":")[1].split("/")[0] for r in rows)
    shards = read_shards(tmp_path / "out")
    val_keys = {key for shard in (tmp_path / "out").glob("val-*.tar") for key in read_shards_of(shard)}
    assert val_keys == {r["key"] for r in rows if r["split"] == "val"} and len(shards) == 18
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["params"]["val_source"] == f"imagefolder:{val}" and meta["counts"]["val"] == 6
    assert meta["classes"] == ["class_0", "class_1", "class_2"]
    # val_fraction is not used: another value gives the same bytes
    ingest(f"imagefolder:{train}", tmp_path / "again", val_source_cfg(val, val_fraction=0.9), progress=False)
    same = {name: data for name, data in output_files(tmp_path / "again").items() if name != "dataset.json"}
    assert same == {name: data for name, data in output_files(tmp_path / "out").items() if name != "dataset.json"}


def read_shards_of(shard: Path) -> set[str]:
    with tarfile.open(shard) as tar:
        return {member.name.split(".", 1)[0] for member in tar}


def test_an_image_in_both_sources_stays_in_val_and_leaves_train(tmp_path: Path) -> None:
    train, val = tmp_path / "train", tmp_path / "val"
    write_noise_folder(train, 4, classes=2)
    write_noise_folder(val, 2, classes=2, seed=7)
    shutil.copyfile(train / "class_1/0001.png", val / "class_1/leaked.png")  # a train image also in val
    shutil.copyfile(val / "class_0/0000.png", val / "class_0/0000-copy.png")  # a duplicate within val
    summary = ingest(f"imagefolder:{train}", tmp_path / "out", val_source_cfg(val), progress=False)
    assert (summary.inputs, summary.train, summary.val, summary.rejected) == (8, 3, 3, 2)
    assert read_rejected(tmp_path / "out")[1:] == [
        ["train:class_1/0001.png", "duplicate of val:class_1/leaked.png"],
        ["val:class_0/0000.png", "duplicate of val:class_0/0000-copy.png"],
    ]
    val_paths = {r["source_path"] for r in manifest_rows(tmp_path / "out") if r["split"] == "val"}
    assert val_paths == {"val:class_0/0000-copy.png", "val:class_1/0001.png", "val:class_1/leaked.png"}


def test_a_val_source_with_other_classes_is_refused_before_any_work(tmp_path: Path) -> None:
    train = tmp_path / "train"
    write_noise_folder(train, 6, classes=3)
    for name, folders in (("renamed", ["class_0", "class_1", "class_x"]), ("short", ["class_0", "class_1"])):
        val = tmp_path / name
        for folder in folders:
            write_noise_folder(val / folder, 1, classes=1, seed=len(folder))
        with pytest.raises(IngestError) as caught:
            ingest(f"imagefolder:{train}", tmp_path / "out", val_source_cfg(val), progress=False)
        message = str(caught.value)
        assert "\n" not in message
        assert f"data.val_source imagefolder:{val} " in message and f"data.source imagefolder:{train}:" in message
        theirs = "'class_x'" if name == "renamed" else "no class"
        assert f"label 2 is {theirs} in the val source, 'class_2' in the train source" in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(IngestError, match="data.val_source .* is data.source itself"):
        ingest(f"imagefolder:{train}", tmp_path / "out", val_source_cfg(train), progress=False)


def test_a_webdataset_val_source_is_checked_after_its_pass(tmp_path: Path) -> None:
    """`webdataset:` classes are only known once read: the check runs then, and nothing is published."""
    from support.corpus import noise_png, write_tar

    train = tmp_path / "train"
    write_noise_folder(train, 4, classes=2)
    meta = json.dumps({"class_name": "class_9"}).encode()
    write_tar(tmp_path / "val/val-000000.tar", [("a.cls", b"0"), ("a.json", meta), ("a.png", noise_png(5))])
    cfg = DataConfig(workers=0, val_source=f"webdataset:{tmp_path / 'val'}")
    with pytest.raises(IngestError, match="label 0 is 'class_9' in the val source, 'class_0' in the train source"):
        ingest(f"imagefolder:{train}", tmp_path / "out", cfg, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # staging removed, nothing published

"""`aligntok.data.validate`: every expectation passes on a valid dataset and each breakage
fails exactly the expectations that describe it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from aligntok.config import ValidateConfig
from aligntok.data.validate import (
    DatasetFormatError,
    ValidationReport,
    format_summary,
    validate_dataset,
)
from support.shards import (
    edit_manifest,
    edit_meta,
    edit_record,
    edit_shard,
    encode_image,
    read_manifest,
    set_json,
    write_dataset,
)
from support.paths import REPO

EXPECTATIONS = [
    "manifest_columns", "manifest_row_count", "key_not_null", "key_unique", "key_format",
    "sha256_unique", "split_in_set", "label_in_range", "class_name_known",
    "class_name_matches_label", "width_min_side", "height_min_side", "pixels_max", "shard_listed",
    "class_share_balanced",
    "rejected_columns", "rejected_fraction", "rejected_count", "inputs_accounted",
    "split_nonempty", "split_shard_records", "shard_exists", "shard_readable",
    "sample_decodes", "sample_height", "sample_width", "sample_channels", "sample_dtype",
    "sample_min", "sample_max", "sample_not_blank", "sample_in_manifest",
    "sample_label_matches_manifest", "sample_shard_matches_manifest", "sample_json_consistent",
]  # fmt: skip

CFG = ValidateConfig()


def _validate(root: Path, cfg: ValidateConfig = CFG) -> ValidationReport:
    return validate_dataset(root, cfg)


def _first_key(root: Path, shard: str = "train-000000.tar") -> str:
    manifest = read_manifest(root)
    return str(manifest.loc[manifest["shard"] == shard, "key"].iloc[0])


# ---------------------------------------------------------------------------- the valid dataset


def test_valid_dataset_passes_every_expectation(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "data")
    report = _validate(root)
    assert report.success, format_summary(report)
    assert [r.name for r in report.results] == EXPECTATIONS
    assert report.failed == []
    assert report.counts["observed"]["splits"]["train"] == {"manifest_rows": 24, "shard_records": 24}
    assert report.counts["observed"]["sampled_records"] == 30


def test_reports_are_written_as_json_and_text(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "data")
    report = _validate(root)
    document = json.loads((root / "validation.json").read_text())
    assert document["success"] is True and document["failed"] == []
    assert document["counts"]["declared"] == {"inputs": 31, "train": 24, "val": 6, "rejected": 1}
    by_name = {r["name"]: r for r in document["results"]}
    assert list(by_name) == EXPECTATIONS
    assert by_name["manifest_row_count"] == {
        "name": "manifest_row_count",
        "frame": "manifest",
        "expectation_type": "expect_table_row_count_to_equal",
        "kwargs": {"value": 30},
        "success": True,
        "observed": 30,
    }
    text = (root / "validation.txt").read_text()
    assert text == format_summary(report) + "\n"
    lines = text.splitlines()
    assert "PASSED" in lines[0]
    assert [line.split()[:2] for line in lines[1:]] == [["PASS", name] for name in EXPECTATIONS]
    assert not list(root.glob(".*.tmp"))


def test_report_dir_receives_the_reports(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "data")
    report_dir = tmp_path / "reports" / "nested"
    report = validate_dataset(root, CFG, report_dir=report_dir)
    assert report.success
    assert (report_dir / "validation.json").is_file() and (report_dir / "validation.txt").is_file()
    assert not (root / "validation.json").exists() and not (root / "validation.txt").exists()


def test_one_constant_image_is_tolerated(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "data")
    constant = encode_image(np.full((16, 16, 3), 128, np.uint8))
    edit_record(root, _first_key(root), lambda s: s.update(png=constant))
    report = _validate(root)
    assert report.success, format_summary(report)
    not_blank = next(r for r in report.results if r.name == "sample_not_blank")
    assert not_blank.observed["unexpected_count"] == 1


def test_only_the_first_records_of_a_shard_are_decoded(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "data")
    edit_shard(root, "train-000000.tar", lambda samples: samples[5].update(png=b"garbage"))
    assert _validate(root, ValidateConfig(sample_per_shard=2)).success
    assert _validate(root, ValidateConfig(sample_per_shard=6)).failed == ["sample_decodes"]


# ---------------------------------------------------------------------------- one breakage each

Breaker = Callable[[Path], None]
CASES: list[tuple[str, Breaker, set[str]]] = []


def case(*expected: str) -> Callable[[Breaker], Breaker]:
    """Register a function that writes a dataset broken so that exactly `expected` fail."""

    def register(breaker: Breaker) -> Breaker:
        CASES.append((breaker.__name__, breaker, set(expected)))
        return breaker

    return register


def _set_row(root: Path, column: str, value: object, row: int = 0) -> None:
    """Set one manifest cell (row 0 is the first val record of class 0)."""

    def edit(manifest):
        manifest.loc[row, column] = value

    edit_manifest(root, edit)


# The record whose key the manifest loses is still in its shard: sample_in_manifest fails too.
@case("key_unique", "sample_in_manifest")
def duplicate_key(root: Path) -> None:
    write_dataset(root)
    _set_row(root, "key", read_manifest(root).loc[0, "key"], row=1)


@case("key_not_null", "sample_in_manifest")
def null_key(root: Path) -> None:
    write_dataset(root)
    _set_row(root, "key", None)


@case("key_format")
def key_not_16_hex(root: Path) -> None:
    write_dataset(root)
    old, new = _first_key(root), "ABCDEF0123456789"
    edit_record(root, old, lambda s: (s.update(__key__=new), set_json(s, key=new)))
    edit_manifest(root, lambda m: m.replace({"key": {old: new}}))


@case("sha256_unique")
def duplicate_sha256(root: Path) -> None:
    write_dataset(root)
    _set_row(root, "sha256", read_manifest(root).loc[0, "sha256"], row=1)


# The val split then has one manifest row fewer than its shard has records.
@case("split_in_set", "split_shard_records")
def unknown_split(root: Path) -> None:
    write_dataset(root)
    _set_row(root, "split", "test")


@case("label_in_range")
def label_out_of_range(root: Path) -> None:
    write_dataset(root)
    key = _first_key(root)
    edit_record(root, key, lambda s: (s.update(cls=b"7"), set_json(s, label=7)))
    edit_manifest(root, lambda m: m.assign(label=m["label"].where(m["key"] != key, 7)))


@case("class_name_known", "class_name_matches_label")
def unknown_class_name(root: Path) -> None:
    write_dataset(root)
    _set_row(root, "class_name", "zebra")


@case("class_name_matches_label")
def class_name_of_another_label(root: Path) -> None:
    write_dataset(root)
    _set_row(root, "class_name", "trouser")  # row 0 has label 0, "tshirt"


@case("width_min_side")
def width_below_min_side(root: Path) -> None:
    write_dataset(root)
    _set_row(root, "width", 8)


@case("height_min_side")
def height_below_min_side(root: Path) -> None:
    write_dataset(root)
    _set_row(root, "height", 15)


@case("pixels_max")
def too_many_pixels(root: Path) -> None:
    write_dataset(root)
    edit_manifest(root, lambda m: m.assign(width=m["width"].where(m.index != 3, 200),
                                           height=m["height"].where(m.index != 3, 200)))  # fmt: skip


@case("shard_listed", "sample_shard_matches_manifest")
def manifest_names_unlisted_shard(root: Path) -> None:
    write_dataset(root)
    _set_row(root, "shard", "train-000009.tar")


@case("sample_shard_matches_manifest")
def manifest_names_wrong_shard(root: Path) -> None:
    write_dataset(root)
    key = _first_key(root)
    edit_manifest(root, lambda m: m.assign(shard=m["shard"].where(m["key"] != key, "train-000001.tar")))


@case("manifest_columns")
def manifest_column_missing(root: Path) -> None:
    write_dataset(root)
    edit_manifest(root, lambda m: m.drop(columns=["mode"]))


@case("manifest_row_count")
def declared_train_count_differs(root: Path) -> None:
    write_dataset(root)
    edit_meta(root, lambda meta: meta["counts"].update(train=25))


@case("class_share_balanced")
def imbalanced_classes(root: Path) -> None:
    write_dataset(root, per_class=(10, 10, 4))


@case("class_share_balanced")
def class_without_images(root: Path) -> None:
    write_dataset(root, per_class=(10, 10, 0))


@case("rejected_fraction")
def too_many_rejections(root: Path) -> None:
    write_dataset(root, n_rejected=5)  # 5 of 35 inputs > floor(0.05 * 35) = 1


@case("rejected_count")
def declared_rejected_count_differs(root: Path) -> None:
    write_dataset(root)
    edit_meta(root, lambda meta: meta["counts"].update(rejected=0))


@case("rejected_columns")
def rejected_csv_wrong_header(root: Path) -> None:
    write_dataset(root)
    (root / "rejected.csv").write_text("file,why\n/raw/tiny/0000.png,too small\n")


@case("inputs_accounted")
def inputs_not_accounted_for(root: Path) -> None:
    write_dataset(root)
    edit_meta(root, lambda meta: meta["counts"].update(inputs=34))


@case("split_nonempty")
def empty_val_split(root: Path) -> None:
    write_dataset(root, val_per_class=0)  # val_fraction stays 0.2


@case("shard_exists")
def missing_shard(root: Path) -> None:
    write_dataset(root)
    (root / "train-000001.tar").unlink()


@case("shard_readable")
def shard_not_a_tar(root: Path) -> None:
    write_dataset(root)
    (root / "val-000000.tar").write_bytes(b"\x00not a tar file" * 100)


@case("shard_readable")
def truncated_shard(root: Path) -> None:
    write_dataset(root)
    path = root / "train-000000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])


@case("split_shard_records")
def record_missing_from_shard(root: Path) -> None:
    write_dataset(root)
    edit_shard(root, "train-000001.tar", lambda samples: samples[:-1])


@case("sample_decodes")
def corrupt_image(root: Path) -> None:
    write_dataset(root)
    edit_record(root, _first_key(root, "val-000000.tar"), lambda s: s.update(png=b"\x89PNG broken"))


@case("sample_decodes")
def record_without_label(root: Path) -> None:
    write_dataset(root)
    edit_record(root, _first_key(root), lambda s: s.pop("cls"))


@case("sample_height", "sample_width")
def wrong_sized_image(root: Path) -> None:
    write_dataset(root)
    small = encode_image(np.zeros((8, 8, 3), np.uint8) + np.arange(8, dtype=np.uint8)[:, None, None])
    edit_record(root, _first_key(root), lambda s: s.update(png=small))


@case("sample_channels")
def grayscale_image(root: Path) -> None:
    write_dataset(root)
    grey = encode_image(np.arange(256, dtype=np.uint8).reshape(16, 16))
    edit_record(root, _first_key(root), lambda s: s.update(png=grey))


@case("sample_channels", "sample_dtype", "sample_max")
def sixteen_bit_image(root: Path) -> None:
    write_dataset(root)
    deep = encode_image(Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 200))
    edit_record(root, _first_key(root), lambda s: s.update(png=deep))


@case("sample_channels", "sample_dtype", "sample_min")
def float_image_with_negative_values(root: Path) -> None:
    write_dataset(root)
    ramp = np.linspace(-1, 1, 256, dtype=np.float32).reshape(16, 16)
    floats = encode_image(Image.fromarray(ramp), "TIFF")  # PIL decodes by content, not extension
    edit_record(root, _first_key(root), lambda s: s.update(png=floats))


@case("sample_not_blank")
def blank_images(root: Path) -> None:
    write_dataset(root)
    constant = encode_image(np.zeros((16, 16, 3), np.uint8))

    def blank(samples: list[dict]) -> None:
        for sample in samples:
            sample["png"] = constant

    edit_shard(root, "val-000000.tar", blank)  # 6 of 30 sampled records: 20% > 10%


@case("sample_label_matches_manifest")
def shard_label_differs_from_manifest(root: Path) -> None:
    write_dataset(root)
    edit_record(root, _first_key(root), lambda s: (s.update(cls=b"2"), set_json(s, label=2)))


@case("sample_json_consistent")
def json_label_differs_from_cls(root: Path) -> None:
    write_dataset(root)
    edit_record(root, _first_key(root), lambda s: set_json(s, label=2))


@pytest.mark.parametrize(("breaker", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_breakage_fails_exactly_its_expectations(
    tmp_path: Path, breaker: Breaker, expected: set[str]
) -> None:
    root = tmp_path / "data"
    breaker(root)
    report = _validate(root)
    assert not report.success
    assert set(report.failed) == expected, format_summary(report)
    document = json.loads((root / "validation.json").read_text())
    assert document["success"] is False and set(document["failed"]) == expected
    text = (root / "validation.txt").read_text()
    assert "FAILED" in text.splitlines()[0]
    for name in expected:
        assert f"FAIL  {name} " in text


def test_missing_manifest_column_is_a_failure_not_a_crash(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "data")
    edit_manifest(root, lambda m: m.drop(columns=["label"]))
    report = _validate(root)
    assert {"manifest_columns", "label_in_range", "class_share_balanced"} <= set(report.failed)
    observed = {r.name: r.observed for r in report.results}
    assert observed["manifest_columns"]["mismatched"] == {"missing": ["label"]}
    assert "label" in observed["label_in_range"]["error"]


def test_every_expectation_has_a_breakage() -> None:
    covered = set().union(*(expected for _, _, expected in CASES))
    assert covered == set(EXPECTATIONS)


def test_failures_name_the_shard(tmp_path: Path) -> None:
    root = tmp_path / "data"
    corrupt_image(root)
    (root / "train-000001.tar").unlink()
    other = tmp_path / "other"
    shard_not_a_tar(other)
    report, broken_tar = _validate(root), _validate(other)
    observed = {r.name: r.observed for r in report.results + broken_tar.results if not r.success}
    missing = {"exists": False, "shard": "train-000001.tar", "error": "missing"}
    assert observed["shard_exists"]["unexpected"] == [missing]
    assert observed["sample_decodes"]["unexpected"][0]["shard"] == "val-000000.tar"
    assert "UnidentifiedImageError" in observed["sample_decodes"]["unexpected"][0]["error"]
    assert observed["shard_readable"]["unexpected"][0]["shard"] == "val-000000.tar"
    summary = format_summary(report)
    assert "shard=train-000001.tar" in summary and "shard=val-000000.tar" in summary


# ---------------------------------------------------------------------------- contract errors


@pytest.mark.parametrize("name", ["manifest.parquet", "dataset.json", "rejected.csv"])
def test_missing_contract_file_raises_naming_it(tmp_path: Path, name: str) -> None:
    root = write_dataset(tmp_path / "data")
    (root / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        _validate(root)


def test_dataset_json_without_a_required_key_raises(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "data")
    edit_meta(root, lambda meta: meta["counts"].pop("inputs"))
    with pytest.raises(DatasetFormatError, match="counts.inputs"):
        _validate(root)


# ---------------------------------------------------------------------------- side effects


def test_import_is_light_and_analytics_default_off(tmp_path: Path) -> None:
    code = (
        "import os, sys; import aligntok.data.validate; "
        "assert 'great_expectations' not in sys.modules and 'webdataset' not in sys.modules; "
        "assert 'GX_ANALYTICS_ENABLED' not in os.environ"
    )
    env = {k: v for k, v in os.environ.items() if k != "GX_ANALYTICS_ENABLED"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)


def test_run_sets_analytics_off_unless_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_dataset(tmp_path / "data")
    monkeypatch.delenv("GX_ANALYTICS_ENABLED", raising=False)
    _validate(root)
    assert os.environ["GX_ANALYTICS_ENABLED"] == "false"
    monkeypatch.setenv("GX_ANALYTICS_ENABLED", "False")
    _validate(root)
    assert os.environ["GX_ANALYTICS_ENABLED"] == "False"

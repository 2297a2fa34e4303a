"""Great Expectations checks on an ingested dataset, run before training (`validate` stage).

The dataset directory is the contract written by `aligntok ingest`: WebDataset shards
(`train-000000.tar`, `val-000000.tar`, ...), `manifest.parquet`, `rejected.csv` and
`dataset.json`. Every check is one GX 1.x expectation with a stable name (`key_unique`,
`class_share_balanced`, ...), run on one of these pandas frames:

| frame    | one row per                                    | built from                        |
|----------|------------------------------------------------|-----------------------------------|
| manifest | accepted image                                 | manifest.parquet, derived columns |
| classes  | class of dataset.json, empty classes included  | manifest labels                   |
| rejected | rejected input                                 | rejected.csv                      |
| totals   | (a single row)                                 | dataset.json counts, row counts   |
| splits   | split (train, val)                             | manifest, shard record counts     |
| shards   | shard listed in dataset.json                   | the shard files                   |
| samples  | first `sample_per_shard` records of each shard | decoded shard records             |

A failed expectation is reported, never raised: `ValidationReport.success` is False and
`ValidationReport.failed` names the failures. Only a missing or malformed contract file
(`dataset.json`, `manifest.parquet`, `rejected.csv`) raises. GX (~4 s to import) and
webdataset are imported inside the functions that use them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
from PIL import Image

from aligntok.errors import AligntokError
from aligntok.config import ValidateConfig

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = (
    "key", "source_path", "split", "label", "class_name",
    "width", "height", "mode", "sha256", "shard",
)  # fmt: skip
REJECTED_COLUMNS = ("path", "reason")
SPLITS = ("train", "val")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")
KEY_PATTERN = r"^[0-9a-f]{16}$"
NOT_BLANK_MOSTLY = 0.9
"""A legitimate image can be constant, so `max > min` must hold for this share of samples only."""
SHARE_DIGITS = 12
"""Shares and their bounds are rounded so that an exact-boundary share is not lost to float error."""
REQUIRED_META_KEYS = (
    "classes", "resolution", "shards",
    "counts.inputs", "counts.train", "counts.val", "counts.rejected",
    "params.min_side", "params.max_pixels", "params.val_fraction",
)  # fmt: skip
SAMPLE_COLUMNS = (
    "shard", "key", "decoded", "error", "height", "width", "channels", "dtype", "min", "max",
    "label", "json_consistent", "in_manifest", "manifest_label", "manifest_shard",
)  # fmt: skip
SHARD_COLUMNS = ("shard", "split", "exists", "readable", "records", "error")
ID_COLUMNS = {
    "manifest": ("key",),
    "classes": ("class_name",),
    "rejected": ("path",),
    "splits": ("split",),
    "shards": ("shard", "error"),
    "samples": ("shard", "key", "error"),
}
"""Columns that GX copies into each failing row's description, so a report names the culprit."""


class DatasetFormatError(AligntokError, ValueError):
    """A contract file exists but cannot be read as the ingest contract describes."""


@dataclass(frozen=True)
class ExpectationResult:
    """The outcome of one named expectation."""

    name: str
    frame: str
    expectation_type: str
    kwargs: dict[str, Any]
    success: bool
    observed: Any
    """GX's observed value, or a summary of the unexpected rows, or `{"error": message}`."""


@dataclass(frozen=True)
class ValidationReport:
    """All expectation results for one dataset directory."""

    data_dir: str
    success: bool
    results: list[ExpectationResult]
    counts: dict[str, Any]
    """`declared` (dataset.json counts) and `observed` (rows, records) numbers."""
    config: dict[str, Any]

    @property
    def failed(self) -> list[str]:
        """Names of the failed expectations, in report order."""
        return [r.name for r in self.results if not r.success]

    def to_dict(self) -> dict[str, Any]:
        """The JSON document written to `validation.json`."""
        return _clean(
            {
                "success": self.success,
                "data_dir": self.data_dir,
                "failed": self.failed,
                "counts": self.counts,
                "config": self.config,
                "results": [asdict(r) for r in self.results],
            }
        )


@dataclass(frozen=True)
class _Check:
    """One expectation, declared without importing GX."""

    name: str
    frame: str
    gx_class: str
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class _Dataset:
    """The contract files of one dataset directory, read but not yet checked."""

    data_dir: Path
    meta: dict[str, Any]
    manifest: pd.DataFrame
    rejected: pd.DataFrame

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def shards(self) -> dict[str, list[str]]:
        return {split: list(names) for split, names in self.meta["shards"].items()}


@dataclass(frozen=True)
class _ShardScan:
    """One pass over a shard: record count, read error, decoded leading records."""

    shard: str
    split: str
    exists: bool
    readable: bool | None
    records: int | None
    error: str | None
    samples: list[dict[str, Any]]


# ---------------------------------------------------------------------------- public API


def validate_dataset(
    data_dir: Path, cfg: ValidateConfig, report_dir: Path | None = None
) -> ValidationReport:
    """Run every expectation on `data_dir`; write `validation.json`/`.txt` to `report_dir`.

    `report_dir` defaults to `data_dir`. A failed expectation gives `success=False`; a missing
    contract file raises `FileNotFoundError`, a malformed one `DatasetFormatError`.
    """
    data_dir = Path(data_dir)
    dataset = load_dataset(data_dir)
    index = _manifest_index(dataset.manifest)
    scans = [
        _scan_shard(data_dir / name, split, cfg.sample_per_shard, index)
        for split, names in dataset.shards.items()
        for name in names
    ]
    frames = _frames(dataset, scans)
    results = _run_expectations(frames, _checks(dataset, cfg))
    report = ValidationReport(
        data_dir=str(data_dir),
        success=all(r.success for r in results),
        results=results,
        counts=_counts(dataset, frames),
        config=cfg.model_dump(mode="json"),
    )
    write_report(report, Path(report_dir) if report_dir is not None else data_dir)
    log.info(
        "validated %s: %d expectations, %d failed, %d shards, %d records decoded",
        data_dir, len(results), len(report.failed), len(scans), len(frames["samples"]),
    )  # fmt: skip
    return report


def load_dataset(data_dir: Path) -> _Dataset:
    """Read the contract files; raise naming the file that is missing or malformed."""
    paths = {name: data_dir / name for name in ("dataset.json", "manifest.parquet", "rejected.csv")}
    for name, path in paths.items():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: {name} not found; is {data_dir} an ingest output?")
    meta = _read_meta(paths["dataset.json"])
    try:
        manifest = pd.read_parquet(paths["manifest.parquet"])
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DatasetFormatError(f"{paths['manifest.parquet']}: not readable: {exc}") from exc
    return _Dataset(data_dir, meta, manifest, _read_rejected(paths["rejected.csv"]))


def format_summary(report: ValidationReport) -> str:
    """A readable summary: a header, then one PASS/FAIL line per expectation."""
    passed = len(report.results) - len(report.failed)
    verdict = "PASSED" if report.success else "FAILED"
    lines = [f"validation of {report.data_dir}: {verdict} ({passed}/{len(report.results)} passed)"]
    width = max((len(r.name) for r in report.results), default=0)
    for r in report.results:
        status = "PASS" if r.success else "FAIL"
        expected = " ".join(f"{k}={v}" for k, v in r.kwargs.items())
        lines.append(
            f"{status}  {r.name:<{width}}  observed: {_render_observed(r.observed)}"
            f"  [{r.frame}: {r.expectation_type} {expected}]"
        )
    if report.failed:
        lines.append("failed: " + ", ".join(report.failed))
    return "\n".join(lines)


def write_report(report: ValidationReport, report_dir: Path) -> tuple[Path, Path]:
    """Write `validation.json` and `validation.txt` atomically; return their paths."""
    report_dir.mkdir(parents=True, exist_ok=True)
    json_path, txt_path = report_dir / "validation.json", report_dir / "validation.txt"
    _write_atomic(json_path, json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    _write_atomic(txt_path, format_summary(report) + "\n")
    return json_path, txt_path


# ---------------------------------------------------------------------------- reading


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DatasetFormatError(f"{path}: not valid JSON: {exc}") from exc
    for dotted in REQUIRED_META_KEYS:
        node: Any = meta
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise DatasetFormatError(f"{path}: missing key {dotted!r}")
            node = node[part]
    if not isinstance(meta["classes"], list) or not meta["classes"]:
        raise DatasetFormatError(f"{path}: 'classes' must be a non-empty list")
    if not isinstance(meta["shards"], dict):
        raise DatasetFormatError(f"{path}: 'shards' must map split names to shard file names")
    return meta


def _read_rejected(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:  # not even a header: rejected_columns reports it
        return pd.DataFrame()


def _manifest_index(manifest: pd.DataFrame) -> dict[str, tuple[Any, Any]]:
    """key -> (label, shard) of the first manifest row with that key."""
    if "key" not in manifest.columns:
        return {}
    rows = manifest.drop_duplicates("key")
    labels = rows["label"].tolist() if "label" in rows else [None] * len(rows)
    shards = rows["shard"].tolist() if "shard" in rows else [None] * len(rows)
    keys = rows["key"].tolist()
    return {k: (lab, sh) for k, lab, sh in zip(keys, labels, shards) if isinstance(k, str)}


# ---------------------------------------------------------------------------- shards


def _scan_shard(path: Path, split: str, n: int, index: dict[str, tuple[Any, Any]]) -> _ShardScan:
    """Count the records of one shard and decode its first `n` (deterministic, no shuffle)."""
    if not path.is_file():
        return _ShardScan(path.name, split, False, None, None, "missing", [])
    samples: list[dict[str, Any]] = []
    records = 0
    try:
        for sample in _iter_records(path):
            if records < n:
                samples.append(_sample_row(path.name, sample, index))
            records += 1
    except Exception as exc:  # any read failure is a finding about this shard, not a crash
        return _ShardScan(path.name, split, True, False, None, _describe(exc), samples)
    return _ShardScan(path.name, split, True, True, records, None, samples)


def _iter_records(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a tar shard, grouped by key exactly as webdataset's loader groups them."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with path.open("rb") as stream:
        files = ({**f, "__url__": path.name} for f in tar_file_iterator(stream))
        yield from group_by_keys(files)


def _sample_row(shard: str, sample: dict[str, Any], index: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """One row of the samples frame; a decode failure fills `error`, never raises."""
    key = sample["__key__"]
    row: dict[str, Any] = dict.fromkeys(SAMPLE_COLUMNS)
    row.update(shard=shard, key=key, decoded=False, in_manifest=key in index)
    if key in index:
        row["manifest_label"], row["manifest_shard"] = index[key]
    try:
        row.update(_image_stats(_read_image(sample)))
        row["label"] = _read_label(sample)
        row["decoded"] = True
    except Exception as exc:  # PIL raises many types for a damaged image
        row["error"] = _describe(exc)
    row["json_consistent"] = _json_consistent(sample, key, row["label"])
    return row


def _read_image(sample: dict[str, Any]) -> np.ndarray:
    """The stored image as an array, without any mode conversion: (H, W) or (H, W, C)."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(f"no .png/.jpg member (members: {members})")
    with Image.open(BytesIO(sample[ext])) as image:
        image.load()
        return np.asarray(image)


def _image_stats(array: np.ndarray) -> dict[str, Any]:
    return {
        "height": array.shape[0],
        "width": array.shape[1],
        "channels": 1 if array.ndim == 2 else array.shape[2],
        "dtype": str(array.dtype),
        "min": float(array.min()),
        "max": float(array.max()),
    }


def _read_label(sample: dict[str, Any]) -> int:
    if "cls" not in sample:
        raise ValueError("no .cls member")
    return int(sample["cls"].decode("ascii").strip())


def _json_consistent(sample: dict[str, Any], key: str, label: int | None) -> bool:
    """The `.json` member parses and names the record's own key and `.cls` label."""
    try:
        meta = json.loads(sample["json"])
    except (KeyError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("key") != key:
        return False
    return label is None or meta.get("label") == label


def _describe(exc: BaseException) -> str:
    # webdataset appends stream objects to args; the first argument is the message.
    message = exc.args[0] if exc.args else ""
    return f"{type(exc).__name__}: {message}"


# ---------------------------------------------------------------------------- frames


def _frames(dataset: _Dataset, scans: list[_ShardScan]) -> dict[str, pd.DataFrame]:
    return {
        "manifest": _manifest_frame(dataset),
        "classes": _classes_frame(dataset),
        "rejected": dataset.rejected,
        "totals": _totals_frame(dataset),
        "splits": _splits_frame(dataset, scans),
        "shards": pd.DataFrame(
            [{c: getattr(s, c) for c in SHARD_COLUMNS} for s in scans], columns=list(SHARD_COLUMNS)
        ),
        "samples": _samples_frame(scans),
    }


def _manifest_frame(dataset: _Dataset) -> pd.DataFrame:
    """The manifest plus `pixels` (original width*height) and the class name its label implies."""
    frame = dataset.manifest.copy()
    if {"width", "height"} <= set(frame.columns):
        frame["pixels"] = frame["width"] * frame["height"]
    if "label" in frame.columns:
        frame["expected_class_name"] = [_class_name(dataset.classes, v) for v in frame["label"]]
    return frame


def _class_name(classes: list[str], label: Any) -> str | None:
    if isinstance(label, (int, float, np.number)) and not isinstance(label, bool):
        if float(label).is_integer() and 0 <= label < len(classes):
            return classes[int(label)]
    return None


def _labels(manifest: pd.DataFrame) -> pd.Series:
    """Integer-valued labels of the manifest (others are reported by `label_in_range`)."""
    if "label" not in manifest.columns:
        return pd.Series([], dtype="int64")
    labels = pd.to_numeric(manifest["label"], errors="coerce").dropna()
    return labels[labels == labels.round()].astype("int64")


def _classes_frame(dataset: _Dataset) -> pd.DataFrame:
    """One row per class of dataset.json, zero-image classes included: count and share."""
    k = len(dataset.classes)
    counts = _labels(dataset.manifest).value_counts().reindex(range(k), fill_value=0)
    total = int(counts.sum())
    shares = [round(int(c) / total, SHARE_DIGITS) if total else 0.0 for c in counts]
    return pd.DataFrame(
        {"label": range(k), "class_name": dataset.classes, "count": counts.tolist(), "share": shares}
    )


def _totals_frame(dataset: _Dataset) -> pd.DataFrame:
    accepted, rejected = len(dataset.manifest), len(dataset.rejected)
    return pd.DataFrame(
        [{
            "inputs": dataset.meta["counts"]["inputs"],
            "accepted": accepted,
            "rejected": rejected,
            "accepted_plus_rejected": accepted + rejected,
        }]
    )  # fmt: skip


def _splits_frame(dataset: _Dataset, scans: list[_ShardScan]) -> pd.DataFrame:
    """Per split: manifest rows and shard records (unknown when a shard is missing or unreadable)."""
    manifest = dataset.manifest
    split_column = manifest["split"] if "split" in manifest.columns else pd.Series([], dtype=object)
    val_fraction = dataset.meta["params"]["val_fraction"]
    rows = []
    for split in SPLITS:
        own = [s for s in scans if s.split == split]
        known = all(s.records is not None for s in own)
        required = split == "train" or val_fraction > 0
        manifest_rows = int((split_column == split).sum())
        rows.append({
            "split": split,
            "shards": len(own),
            "manifest_rows": manifest_rows,
            # null (not checked) for a split that may be empty
            "required_manifest_rows": manifest_rows if required else None,
            "shard_records": sum(s.records or 0 for s in own) if known else None,
        })  # fmt: skip
    return pd.DataFrame(rows)


def _samples_frame(scans: list[_ShardScan]) -> pd.DataFrame:
    frame = pd.DataFrame([row for s in scans for row in s.samples], columns=list(SAMPLE_COLUMNS))
    for column in ("height", "width", "channels", "min", "max", "label", "manifest_label"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    return frame


# ---------------------------------------------------------------------------- expectations


def _checks(dataset: _Dataset, cfg: ValidateConfig) -> list[_Check]:
    """Every expectation, in report order."""
    return (
        _manifest_checks(dataset)
        + _balance_checks(dataset, cfg)
        + _rejection_checks(dataset, cfg)
        + _shard_checks(dataset)
        + _sample_checks(dataset)
    )


def _manifest_checks(dataset: _Dataset) -> list[_Check]:
    counts, params = dataset.meta["counts"], dataset.meta["params"]
    listed = sorted({name for names in dataset.shards.values() for name in names})

    def check(name: str, gx_class: str, **kwargs: Any) -> _Check:
        return _Check(name, "manifest", gx_class, kwargs)

    between, in_set = "ExpectColumnValuesToBeBetween", "ExpectColumnValuesToBeInSet"
    return [
        check("manifest_columns", "ExpectTableColumnsToMatchSet",
              column_set=list(MANIFEST_COLUMNS), exact_match=False),
        check("manifest_row_count", "ExpectTableRowCountToEqual", value=counts["train"] + counts["val"]),
        check("key_not_null", "ExpectColumnValuesToNotBeNull", column="key"),
        check("key_unique", "ExpectColumnValuesToBeUnique", column="key"),
        check("key_format", "ExpectColumnValuesToMatchRegex", column="key", regex=KEY_PATTERN),
        check("sha256_unique", "ExpectColumnValuesToBeUnique", column="sha256"),
        check("split_in_set", in_set, column="split", value_set=list(SPLITS)),
        check("label_in_range", between, column="label", min_value=0, max_value=len(dataset.classes) - 1),
        check("class_name_known", in_set, column="class_name", value_set=dataset.classes),
        check("class_name_matches_label", "ExpectColumnPairValuesToBeEqual", column_A="class_name",
              column_B="expected_class_name", ignore_row_if="either_value_is_missing"),
        check("width_min_side", between, column="width", min_value=params["min_side"]),
        check("height_min_side", between, column="height", min_value=params["min_side"]),
        check("pixels_max", between, column="pixels", max_value=params["max_pixels"]),
        check("shard_listed", in_set, column="shard", value_set=listed),
    ]  # fmt: skip


def _balance_checks(dataset: _Dataset, cfg: ValidateConfig) -> list[_Check]:
    k, b = len(dataset.classes), cfg.max_class_imbalance
    bounds = {"min_value": round(1 / (k * b), SHARE_DIGITS), "max_value": round(b / k, SHARE_DIGITS)}
    between = "ExpectColumnValuesToBeBetween"
    return [_Check("class_share_balanced", "classes", between, {"column": "share", **bounds})]


def _rejection_checks(dataset: _Dataset, cfg: ValidateConfig) -> list[_Check]:
    counts = dataset.meta["counts"]
    # round first: 0.29 * 100 is 28.999999999999996 in floating point
    allowed = math.floor(round(cfg.max_rejected_fraction * counts["inputs"], 9))
    inputs = counts["inputs"]
    return [
        _Check("rejected_columns", "rejected", "ExpectTableColumnsToMatchOrderedList",
               {"column_list": list(REJECTED_COLUMNS)}),
        _Check("rejected_fraction", "rejected", "ExpectTableRowCountToBeBetween",
               {"min_value": 0, "max_value": allowed}),
        _Check("rejected_count", "rejected", "ExpectTableRowCountToEqual", {"value": counts["rejected"]}),
        _Check("inputs_accounted", "totals", "ExpectColumnMaxToBeBetween",
               {"column": "accepted_plus_rejected", "min_value": inputs, "max_value": inputs}),
    ]  # fmt: skip


def _shard_checks(dataset: _Dataset) -> list[_Check]:
    return [
        _Check("split_nonempty", "splits", "ExpectColumnValuesToBeBetween",
               {"column": "required_manifest_rows", "min_value": 1}),
        _Check("split_shard_records", "splits", "ExpectColumnPairValuesToBeEqual",
               {"column_A": "shard_records", "column_B": "manifest_rows",
                "ignore_row_if": "either_value_is_missing"}),
        _Check("shard_exists", "shards", "ExpectColumnValuesToBeInSet",
               {"column": "exists", "value_set": [True]}),
        _Check("shard_readable", "shards", "ExpectColumnValuesToBeInSet",
               {"column": "readable", "value_set": [True]}),
    ]  # fmt: skip


def _sample_checks(dataset: _Dataset) -> list[_Check]:
    side = int(dataset.meta["resolution"])

    def check(name: str, gx_class: str, **kwargs: Any) -> _Check:
        return _Check(name, "samples", gx_class, kwargs)

    between, in_set = "ExpectColumnValuesToBeBetween", "ExpectColumnValuesToBeInSet"
    pair_equal, missing = "ExpectColumnPairValuesToBeEqual", "either_value_is_missing"
    return [
        check("sample_decodes", in_set, column="decoded", value_set=[True]),
        check("sample_height", between, column="height", min_value=side, max_value=side),
        check("sample_width", between, column="width", min_value=side, max_value=side),
        check("sample_channels", between, column="channels", min_value=3, max_value=3),
        check("sample_dtype", in_set, column="dtype", value_set=["uint8"]),
        check("sample_min", between, column="min", min_value=0),
        check("sample_max", between, column="max", max_value=255),
        check("sample_not_blank", "ExpectColumnPairValuesAToBeGreaterThanB", column_A="max",
              column_B="min", ignore_row_if=missing, mostly=NOT_BLANK_MOSTLY),
        check("sample_in_manifest", in_set, column="in_manifest", value_set=[True]),
        check("sample_label_matches_manifest", pair_equal, column_A="label",
              column_B="manifest_label", ignore_row_if=missing),
        check("sample_shard_matches_manifest", pair_equal, column_A="shard",
              column_B="manifest_shard", ignore_row_if=missing),
        check("sample_json_consistent", in_set, column="json_consistent", value_set=[True]),
    ]  # fmt: skip


# ---------------------------------------------------------------------------- running GX


def _run_expectations(frames: dict[str, pd.DataFrame], checks: list[_Check]) -> list[ExpectationResult]:
    """Validate each frame against a suite of its checks in one ephemeral GX context."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    # one asset and one batch definition for all frames: each addition re-serialises the context
    whole = (
        context.data_sources.add_pandas("aligntok_validate")
        .add_dataframe_asset("frames")
        .add_batch_definition_whole_dataframe("whole")
    )
    outcomes: dict[str, dict[str, Any]] = {}
    for frame_name, frame in frames.items():
        suite = gx.ExpectationSuite(name=f"aligntok_{frame_name}")
        for c in checks:
            if c.frame == frame_name:
                expectation = getattr(gx.expectations, c.gx_class)(**c.kwargs, meta={"name": c.name})
                suite.add_expectation(expectation)
        if not suite.expectations:
            continue
        batch = whole.get_batch(batch_parameters={"dataframe": frame})
        validation = batch.validate(suite, result_format=_result_format(frame_name, frame))
        for result in validation.results:
            outcome = result.to_json_dict()
            outcomes[outcome["expectation_config"]["meta"]["name"]] = outcome
    return [_to_result(c, outcomes[c.name]) for c in checks]


def _result_format(frame_name: str, frame: pd.DataFrame) -> dict[str, Any]:
    ids = [c for c in ID_COLUMNS.get(frame_name, ()) if c in frame.columns]
    fmt: dict[str, Any] = {"result_format": "SUMMARY", "partial_unexpected_count": 20}
    if ids:
        fmt["unexpected_index_column_names"] = ids
    return fmt


def _to_result(check: _Check, outcome: dict[str, Any]) -> ExpectationResult:
    config = outcome["expectation_config"]
    kwargs = {k: v for k, v in config["kwargs"].items() if k != "batch_id"}
    return ExpectationResult(
        name=check.name,
        frame=check.frame,
        expectation_type=config["type"],
        kwargs=_clean(kwargs),
        success=bool(outcome["success"]),
        observed=_clean(_observed(outcome)),
    )


def _observed(outcome: dict[str, Any]) -> Any:
    """GX's observed value; for row-wise expectations, the count and examples of bad rows."""
    error = _exception_message(outcome.get("exception_info") or {})
    if error:
        return {"error": error}
    result = outcome.get("result") or {}
    if "observed_value" in result:
        # column-list expectations: a dict of missing/unexpected names, or a list of positions
        mismatched = (result.get("details") or {}).get("mismatched")
        extras_allowed = outcome["expectation_config"]["kwargs"].get("exact_match") is False
        if isinstance(mismatched, dict) and extras_allowed:
            mismatched = {k: v for k, v in mismatched.items() if k != "unexpected"}  # extras allowed
        if mismatched:
            return {"observed_value": result["observed_value"], "mismatched": mismatched}
        return result["observed_value"]
    if "unexpected_count" in result:
        rows = result.get("partial_unexpected_index_list") or []
        examples = [{k: v for k, v in row.items() if not _missing(v)} for row in rows]
        return {
            "element_count": result.get("element_count"),
            "unexpected_count": result["unexpected_count"],
            "unexpected_percent": round(result.get("unexpected_percent") or 0.0, 3),
            "unexpected": examples or result.get("partial_unexpected_list", []),
        }
    return result


def _exception_message(info: dict[str, Any]) -> str | None:
    """GX reports either one exception or one per failed metric; take the first message."""
    if "raised_exception" in info:
        return info.get("exception_message") if info["raised_exception"] else None
    for value in info.values():
        if isinstance(value, dict) and value.get("exception_message"):
            return str(value["exception_message"])
    return None


# ---------------------------------------------------------------------------- output


def _counts(dataset: _Dataset, frames: dict[str, pd.DataFrame]) -> dict[str, Any]:
    splits = frames["splits"].set_index("split")
    return {
        "declared": dataset.meta["counts"],
        "observed": {
            "manifest_rows": len(dataset.manifest),
            "rejected_rows": len(dataset.rejected),
            "splits": {
                s: {
                    "manifest_rows": int(row.manifest_rows),
                    "shard_records": None if pd.isna(row.shard_records) else int(row.shard_records),
                }
                for s, row in splits.iterrows()
            },
            "shards": len(frames["shards"]),
            "sampled_records": len(frames["samples"]),
        },
    }


def _render_observed(observed: Any) -> str:
    if isinstance(observed, dict) and "error" in observed:
        return f"error: {str(observed['error'])[:200]}"
    if isinstance(observed, dict) and "mismatched" in observed:
        if isinstance(observed["mismatched"], dict):
            return ", ".join(f"{k}: {v}" for k, v in observed["mismatched"].items())
        observed = observed["observed_value"]
    if isinstance(observed, dict) and "unexpected_count" in observed:
        text = f"{observed['unexpected_count']} of {observed['element_count']} rows unexpected"
        examples = [
            " ".join(f"{k}={v}" for k, v in e.items()) if isinstance(e, dict) else repr(e)
            for e in observed["unexpected"][:5]
        ]
        return text + (" (" + "; ".join(examples) + ")" if examples else "")
    text = json.dumps(observed, default=str)
    return text if len(text) <= 200 else text[:197] + "..."


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: no half-written report."""
    # open(mode="x") rather than mkstemp: the report gets the umask's permissions, not 0600
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("x", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN becomes None, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value

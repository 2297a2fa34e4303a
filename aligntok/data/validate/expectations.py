"""The expectations: each a named GX 1.x expectation on one frame, declared as data (`Check`) without
importing GX, then run in one ephemeral GX context (`run_expectations`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import pandas as pd

from aligntok.config import ValidateConfig
from aligntok.data.validate.dataset import MANIFEST_COLUMNS, REJECTED_COLUMNS, SPLITS, Dataset
from aligntok.data.validate.frames import SHARE_DIGITS
from aligntok.data.validate.report import ExpectationResult, is_missing, json_safe

KEY_PATTERN = r"^[0-9a-f]{16}$"
NO_CLASS_LABELS = "skipped: no class labels"
"""Why the class-balance check does not run on a dataset without classes (captions only)."""
DEFAULT_CAPTION_MAX_CHARS = 1000
"""`data.caption_max_chars` for a dataset.json written before the key existed."""
NOT_BLANK_MOSTLY = 0.9
"""A legitimate image can be constant, so `max > min` must hold for this share of samples only."""
ID_COLUMNS = {
    "manifest": ("key",),
    "classes": ("class_name",),
    "rejected": ("path",),
    "splits": ("split",),
    "shards": ("shard", "error"),
    "samples": ("shard", "key", "error"),
    "captions": ("shard", "key"),
}
"""Columns that GX copies into each failing row's description, so a report names the culprit."""


@dataclass(frozen=True)
class Check:
    """One expectation, declared without importing GX."""

    name: str
    frame: str
    gx_class: str
    kwargs: dict[str, Any]


def expectation_checks(dataset: Dataset, cfg: ValidateConfig, captioned: bool = False) -> list[Check]:
    """Every expectation, in report order; the caption checks when `captioned` (dataset.json declares captions,
    or the shards hold some)."""
    return (
        _manifest_checks(dataset)
        + _balance_checks(dataset, cfg)
        + _rejection_checks(dataset, cfg)
        + _shard_checks(dataset)
        + _sample_checks(dataset)
        + (_caption_checks(dataset, cfg) if captioned else [])
    )


def skipped_checks(dataset: Dataset) -> dict[str, str]:
    """Expectations that do not apply to this dataset: name -> why."""
    return {} if dataset.classes else {"class_share_balanced": NO_CLASS_LABELS}


def _manifest_checks(dataset: Dataset) -> list[Check]:
    counts, params = dataset.meta["counts"], dataset.meta["params"]
    listed = sorted({name for names in dataset.shards.values() for name in names})

    def check(name: str, gx_class: str, **kwargs: Any) -> Check:
        return Check(name, "manifest", gx_class, kwargs)

    between, in_set = "ExpectColumnValuesToBeBetween", "ExpectColumnValuesToBeInSet"
    if dataset.classes:
        labels = [check("label_in_range", between, column="label", min_value=0, max_value=len(dataset.classes) - 1),
                  check("class_name_known", in_set, column="class_name", value_set=dataset.classes)]
    else:  # no classes: no record may name one
        labels = [check("label_in_range", "ExpectColumnValuesToBeNull", column="label"),
                  check("class_name_known", "ExpectColumnValuesToBeNull", column="class_name")]
    return [
        check("manifest_columns", "ExpectTableColumnsToMatchSet",
              column_set=list(MANIFEST_COLUMNS), exact_match=False),
        check("manifest_row_count", "ExpectTableRowCountToEqual", value=counts["train"] + counts["val"]),
        check("key_not_null", "ExpectColumnValuesToNotBeNull", column="key"),
        check("key_unique", "ExpectColumnValuesToBeUnique", column="key"),
        check("key_format", "ExpectColumnValuesToMatchRegex", column="key", regex=KEY_PATTERN),
        check("sha256_unique", "ExpectColumnValuesToBeUnique", column="sha256"),
        check("split_in_set", in_set, column="split", value_set=list(SPLITS)),
        *labels,
        check("class_name_matches_label", "ExpectColumnPairValuesToBeEqual", column_A="class_name",
              column_B="expected_class_name", ignore_row_if="either_value_is_missing"),
        check("width_min_side", between, column="width", min_value=params["min_side"]),
        check("height_min_side", between, column="height", min_value=params["min_side"]),
        check("pixels_max", between, column="pixels", max_value=params["max_pixels"]),
        check("shard_listed", in_set, column="shard", value_set=listed),
    ]  # fmt: skip


def _balance_checks(dataset: Dataset, cfg: ValidateConfig) -> list[Check]:
    if not dataset.classes:  # `skipped_checks` says so
        return []
    k, b = len(dataset.classes), cfg.max_class_imbalance
    bounds = {"min_value": round(1 / (k * b), SHARE_DIGITS), "max_value": round(b / k, SHARE_DIGITS)}
    between = "ExpectColumnValuesToBeBetween"
    return [Check("class_share_balanced", "classes", between, {"column": "share", **bounds})]


def _rejection_checks(dataset: Dataset, cfg: ValidateConfig) -> list[Check]:
    counts = dataset.meta["counts"]
    # round first: 0.29 * 100 is 28.999999999999996 in floating point
    allowed = math.floor(round(cfg.max_rejected_fraction * counts["inputs"], 9))
    inputs = counts["inputs"]
    return [
        Check("rejected_columns", "rejected", "ExpectTableColumnsToMatchOrderedList",
               {"column_list": list(REJECTED_COLUMNS)}),
        Check("rejected_fraction", "rejected", "ExpectTableRowCountToBeBetween",
               {"min_value": 0, "max_value": allowed}),
        Check("rejected_count", "rejected", "ExpectTableRowCountToEqual", {"value": counts["rejected"]}),
        Check("inputs_accounted", "totals", "ExpectColumnMaxToBeBetween",
               {"column": "accepted_plus_rejected", "min_value": inputs, "max_value": inputs}),
    ]  # fmt: skip


def _shard_checks(dataset: Dataset) -> list[Check]:
    return [
        Check("split_nonempty", "splits", "ExpectColumnValuesToBeBetween",
               {"column": "required_manifest_rows", "min_value": 1}),
        Check("split_shard_records", "splits", "ExpectColumnPairValuesToBeEqual",
               {"column_A": "shard_records", "column_B": "manifest_rows",
                "ignore_row_if": "either_value_is_missing"}),
        Check("shard_exists", "shards", "ExpectColumnValuesToBeInSet",
               {"column": "exists", "value_set": [True]}),
        Check("shard_readable", "shards", "ExpectColumnValuesToBeInSet",
               {"column": "readable", "value_set": [True]}),
    ]  # fmt: skip


def _sample_checks(dataset: Dataset) -> list[Check]:
    side = int(dataset.meta["resolution"])

    def check(name: str, gx_class: str, **kwargs: Any) -> Check:
        return Check(name, "samples", gx_class, kwargs)

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


def _caption_checks(dataset: Dataset, cfg: ValidateConfig) -> list[Check]:
    """The caption rules of ingest (`aligntok.data.captions.normalise_caption`) on every stored caption, the caption
    counts dataset.json declares, and for captions that follow a scheme: each parses, names the record's class,
    and no held-out pair is in train."""
    max_chars = int(dataset.meta["params"].get("caption_max_chars", DEFAULT_CAPTION_MAX_CHARS))

    def check(name: str, gx_class: str, **kwargs: Any) -> Check:
        return Check(name, "captions", gx_class, kwargs)

    between, in_set = "ExpectColumnValuesToBeBetween", "ExpectColumnValuesToBeInSet"
    checks = [
        Check("labelled_or_captioned", "manifest", in_set, {"column": "labelled_or_captioned", "value_set": [True]}),
        Check("split_caption_count", "splits", "ExpectColumnPairValuesToBeEqual",
              {"column_A": "captions", "column_B": "declared_captions", "ignore_row_if": "either_value_is_missing"}),
        check("caption_utf8", in_set, column="utf8", value_set=[True]),
        check("caption_not_empty", between, column="chars", min_value=1),
        check("caption_length", between, column="chars", min_value=cfg.caption_min_chars, max_value=max_chars),
        check("caption_stripped", in_set, column="stripped", value_set=[True]),
        check("caption_no_control", in_set, column="control", value_set=[False]),
    ]  # fmt: skip
    if dataset.caption_scheme is not None:
        checks += [
            check("caption_in_scheme", in_set, column="in_scheme", value_set=[True]),
            check("caption_matches_label", "ExpectColumnPairValuesToBeEqual", column_A="caption_label",
                  column_B="label", ignore_row_if="either_value_is_missing"),
            check("held_out_not_in_train", in_set, column="held_out_in_train", value_set=[False]),
        ]  # fmt: skip
    return checks


def run_expectations(frames: dict[str, pd.DataFrame], checks: list[Check]) -> list[ExpectationResult]:
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


def _to_result(check: Check, outcome: dict[str, Any]) -> ExpectationResult:
    config = outcome["expectation_config"]
    kwargs = {k: v for k, v in config["kwargs"].items() if k != "batch_id"}
    return ExpectationResult(
        name=check.name,
        frame=check.frame,
        expectation_type=config["type"],
        kwargs=json_safe(kwargs),
        success=bool(outcome["success"]),
        observed=json_safe(_observed(outcome)),
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
        examples = [{k: v for k, v in row.items() if not is_missing(v)} for row in rows]
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

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
| captions | shard record with a caption (`.txt`)           | every shard record's caption      |

A captioned dataset (dataset.json declares captions, or the shards hold some) also gets the caption checks
(`caption_utf8`, `caption_not_empty`, `caption_length` within [`caption_min_chars`, the ingest's
`data.caption_max_chars`], `caption_stripped`, `caption_no_control`, `split_caption_count`,
`labelled_or_captioned`) and, when its captions follow a scheme (dataset.json `caption_scheme`: the captioned
Fashion-MNIST), `caption_in_scheme`, `caption_matches_label` and `held_out_not_in_train`. A dataset without
class labels (dataset.json `classes` empty) skips `class_share_balanced`, logged and recorded in the report's
`skipped` as `skipped: no class labels`.

The package, by concern: `dataset` reads the contract and the shards, `frames` builds the frames,
`expectations` declares and runs the checks, `report` writes the result. A failed expectation is
reported, never raised: `ValidationReport.success` is False and `ValidationReport.failed` names the
failures. Only a missing or malformed contract file (`dataset.json`, `manifest.parquet`,
`rejected.csv`) raises. GX (~4 s to import) and webdataset are imported inside the functions that
use them. The stages that read the shards check the written report with
`aligntok.data.loader.require_validated` (kept out of this package, so that they do not depend on it).
"""

from __future__ import annotations

import logging
from pathlib import Path

from aligntok.config import ValidateConfig
from aligntok.data.validate.dataset import DatasetFormatError, load_dataset, manifest_index, scan_shard
from aligntok.data.validate.expectations import expectation_checks, run_expectations, skipped_checks
from aligntok.data.validate.frames import build_frames, observed_counts
from aligntok.data.validate.report import ExpectationResult, ValidationReport, format_summary, write_report

log = logging.getLogger(__name__)

__all__ = ["DatasetFormatError", "ExpectationResult", "ValidationReport", "format_summary", "load_dataset",
           "validate_dataset", "write_report"]


def validate_dataset(
    data_dir: Path, cfg: ValidateConfig, report_dir: Path | None = None
) -> ValidationReport:
    """Run every expectation on `data_dir`; write `validation.json`/`.txt` to `report_dir`.

    `report_dir` defaults to `data_dir`. A failed expectation gives `success=False`; a missing
    contract file raises `FileNotFoundError`, a malformed one `DatasetFormatError`.
    """
    data_dir = Path(data_dir)
    dataset = load_dataset(data_dir)
    index = manifest_index(dataset.manifest)
    scheme = dataset.caption_scheme
    scans = [
        scan_shard(data_dir / name, split, cfg.sample_per_shard, index, scheme)
        for split, names in dataset.shards.items()
        for name in names
    ]
    frames = build_frames(dataset, scans)
    captioned = any(dataset.declared_captions.values()) or not frames["captions"].empty
    results = run_expectations(frames, expectation_checks(dataset, cfg, captioned))
    skipped = skipped_checks(dataset)
    for name, why in skipped.items():
        log.info("validate %s: %s %s", data_dir, name, why)
    report = ValidationReport(
        data_dir=str(data_dir),
        success=all(r.success for r in results),
        results=results,
        counts=observed_counts(dataset, frames),
        config=cfg.model_dump(mode="json"),
        skipped=skipped,
    )
    write_report(report, Path(report_dir) if report_dir is not None else data_dir)
    log.info(
        "validated %s: %d expectations, %d failed, %d shards, %d records decoded",
        data_dir, len(results), len(report.failed), len(scans), len(frames["samples"]),
    )  # fmt: skip
    return report

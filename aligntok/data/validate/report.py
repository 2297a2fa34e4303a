"""The validation report: one result per expectation, its readable summary (`validation.txt`) and JSON
document (`validation.json`), written atomically."""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


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
    skipped: dict[str, str] = field(default_factory=dict)
    """Expectations that do not apply to this dataset, with why (`class_share_balanced`: no class labels)."""

    @property
    def failed(self) -> list[str]:
        """Names of the failed expectations, in report order."""
        return [r.name for r in self.results if not r.success]

    def to_dict(self) -> dict[str, Any]:
        """The JSON document written to `validation.json`."""
        return json_safe(
            {
                "success": self.success,
                "data_dir": self.data_dir,
                "failed": self.failed,
                "skipped": self.skipped,
                "counts": self.counts,
                "config": self.config,
                "results": [asdict(r) for r in self.results],
            }
        )


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
    lines += [f"SKIP  {name:<{width}}  {why}" for name, why in report.skipped.items()]
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


def is_missing(value: Any) -> bool:
    """None or NaN (a cell GX reports as missing)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def json_safe(value: Any) -> Any:
    """JSON-safe copy: NaN becomes None, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value

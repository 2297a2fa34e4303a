"""The validation gate: stages that read the shards refuse unless the `validate` report says success."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aligntok.cli import VALIDATION_REPORT, build_parser, main
from aligntok.data.loader import ValidationGateError, require_validated
from aligntok.data.validate import ExpectationResult, ValidationReport, write_report

from support.paths import REPO


def _report(folder: Path, failed: list[str]) -> Path:
    """A validation.json as the `validate` stage writes it, with `failed` expectations failing."""
    results = [ExpectationResult(name=name, frame="manifest", expectation_type="expect_x", kwargs={},
                                 success=name not in failed, observed=None)
               for name in dict.fromkeys(["row_count", "labels_in_range", *failed])]
    report = ValidationReport(data_dir="data/shards", success=not failed, results=results, counts={}, config={})
    return write_report(report, folder)[0]


def test_a_passing_report_lets_the_stage_run(tmp_path: Path) -> None:
    assert require_validated(_report(tmp_path, []))["success"] is True


def test_a_failed_report_is_refused_naming_the_failed_expectations(tmp_path: Path) -> None:
    path = _report(tmp_path, ["class_balance", "image_sizes"])
    with pytest.raises(ValidationGateError) as error:
        require_validated(path)
    message = str(error.value)
    assert message.startswith(f"{path}: validation of data/shards failed (expectations: class_balance, image_sizes)")
    assert "\n" not in message


def test_a_missing_or_malformed_report_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationGateError, match=r"nowhere\.json: validation report not found; run `aligntok validate`"):
        require_validated(tmp_path / "nowhere.json")
    broken = tmp_path / "validation.json"
    broken.write_text('{"succ')
    with pytest.raises(ValidationGateError, match=r"validation\.json: not a validation report \(JSONDecodeError"):
        require_validated(broken)
    broken.write_text('{"failed": []}')
    with pytest.raises(ValidationGateError, match=r"not a validation report \(KeyError"):
        require_validated(broken)


def test_cli_default_is_where_dvc_yaml_puts_the_report() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert f"{stages['validate']['outs'][0]}/validation.json" == VALIDATION_REPORT
    for stage in ("align_latent", "align_perceptual", "refine_decoder", "vae_baseline"):
        assert VALIDATION_REPORT in stages[stage]["deps"]
    parser = build_parser()
    for command in (["align_latent"], ["vae_baseline"], ["cache_latents"]):
        assert parser.parse_args(command).validation == VALIDATION_REPORT


@pytest.mark.parametrize("command", ["align_latent", "refine_decoder", "cache_latents"])
def test_stages_refuse_failed_shards_before_any_work(command: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    report = _report(tmp_path / "reports", ["labels_in_range"])
    out = tmp_path / "out"
    code = main(["--params", str(REPO / "params.yaml"), command, "--data", str(tmp_path / "shards"),
                 "--validation", str(report), "--out", str(out)])
    assert code == 1
    error = capsys.readouterr().err.strip()
    assert error == (f"aligntok {command}: error: {report}: validation of data/shards failed (expectations: "
                     "labels_in_range); fix the data or the expectations and rerun `aligntok validate`")
    assert not out.exists()

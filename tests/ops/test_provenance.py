"""Where a registered version came from, against a real MLflow registry (a SQLite file): the run's tags, the
descriptions, and `aligntok lineage` for versions made by a pipeline run and outside one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from aligntok.cli import main
from aligntok.ops.provenance import LineageError, RunRecord, parse_ref, record_run
from aligntok.ops.tracking import describe_version, experiment_id, tag_model_version


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[object]:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def a_version(client, model: str = "aligntok-tokenizer", parent: str | None = None) -> tuple[str, str]:
    """A registered version logged by a stage run (nested under `parent`), as a stage registers one."""
    tags = {"stage": "refine_decoder", "mlflow.runName": "refine_decoder", "git_commit": "c0de" * 10}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(experiment_id(client), tags=tags)
    try:
        client.create_registered_model(model)
    except Exception:  # noqa: BLE001 - already there
        pass
    number = str(client.create_model_version(model, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
                                             tags={"stage": "refine_decoder", "val_psnr": "21.3"}).version)
    client.set_registered_model_alias(model, "stage3", number)
    describe_version(model, number, client)
    return number, run.info.run_id


def test_registration_describes_the_model_and_the_version(registry) -> None:
    number, _ = a_version(registry)
    assert registry.get_registered_model("aligntok-tokenizer").description.startswith("Image tokenizer: a frozen DINOv2")
    text = registry.get_model_version("aligntok-tokenizer", number).description
    assert f"Version {number}, trained by stage `refine_decoder`, aliases @stage3." in text
    assert "Figures: val_psnr 21.3." in text and f'models:/aligntok-tokenizer/{number}' in text
    tag_model_version("aligntok-tokenizer", number, {"eval_rfid": "98.1", "eval_step2_rfid": "120"})
    text = registry.get_model_version("aligntok-tokenizer", number).description
    assert "eval_rfid 98.1" in text and "eval_step2" not in text  # per-snapshot figures stay in the tags


def test_a_pipeline_runs_record_is_on_its_versions_and_parent_run_and_lineage_prints_how_to_check_out(
        registry, capsys: pytest.CaptureFixture[str]) -> None:
    parent = registry.create_run(experiment_id(registry), tags={"mlflow.runName": "pipeline"}).info.run_id
    number, run_id = a_version(registry, parent=parent)
    record = RunRecord(run_commit="a" * 40, run_branch="aligntok-runs/nightly-retrain", code_commit="b" * 40,
                       git_remote="git@example.com:team/aligntok.git", source_fingerprint="f" * 64,
                       deployment="nightly-retrain", flow_run="witty-cat", pipeline_run_id=parent)
    record_run(record, [("aligntok-tokenizer", number)])
    version = registry.get_model_version("aligntok-tokenizer", number)
    assert version.tags["aligntok.run_commit"] == "a" * 40 and version.tags["aligntok.source_fingerprint"] == "f" * 64
    assert registry.get_run(parent).data.tags["aligntok.run_commit"] == "a" * 40
    assert f"From pipeline run commit {'a' * 40} (branch aligntok-runs/nightly-retrain" in version.description
    assert main(["lineage", "aligntok-tokenizer@stage3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"aligntok-tokenizer v{number} (@stage3)\n")
    assert f"MLflow run     {run_id} (stage refine_decoder), pipeline run {parent}" in out
    assert f"run commit     {'a' * 40} on branch aligntok-runs/nightly-retrain (nightly-retrain, flow run witty-cat)" in out
    assert "git clone git@example.com:team/aligntok.git" in out and f"  git checkout {'a' * 40}\n" in out
    assert "dvc pull" in out and "dvc repro" in out and "f" * 64 in out


def test_a_version_made_outside_a_pipeline_run_says_it_has_no_run_commit(registry, capsys) -> None:
    number, _ = a_version(registry)
    assert main(["lineage", f"aligntok-tokenizer/{number}"]) == 0
    out = capsys.readouterr().out
    assert f"code commit    {'c0de' * 10}" in out and "run commit     none: registered outside a pipeline flow run" in out
    assert "git checkout" not in out


def test_bad_references_name_what_is_wrong(registry, capsys) -> None:
    assert parse_ref("models:/aligntok-dit@champion") == ("aligntok-dit", "champion", None)
    assert parse_ref("aligntok-dit:3") == ("aligntok-dit", None, "3")
    with pytest.raises(LineageError, match=r"name a version as MODEL@ALIAS or MODEL/VERSION"):
        parse_ref("aligntok-dit")
    a_version(registry)
    assert main(["lineage", "aligntok-tokenizer@champion"]) == 1
    assert "aligntok-tokenizer@champion: not in the registry at sqlite:///" in capsys.readouterr().err


def test_metric_history_reads_a_run_back_and_is_none_for_a_run_the_store_lacks(registry) -> None:
    """`evaluate` reads each stage's loss curve from the run its receipt names; outputs restored by DVC from
    a run tracked in another store name a run this store lacks, which is None (not a crash)."""
    from aligntok.ops.tracking import metric_history

    run = registry.create_run(experiment_id(registry))
    for step, loss in ((0, 1.0), (10, 0.5)):
        registry.log_metric(run.info.run_id, "loss", loss, step=step)
    registry.log_metric(run.info.run_id, "l1", 0.25, step=10)
    assert metric_history(run.info.run_id) == [{"step": 0, "l1": "", "loss": 1.0},
                                               {"step": 10, "l1": 0.25, "loss": 0.5}]
    assert metric_history("0" * 32) is None


def test_evaluate_tags_each_version_it_measured_and_skips_one_the_store_lacks(registry, tmp_path: Path) -> None:
    import json

    from aligntok.eval.evaluate import _tag
    from aligntok.ops.tracking import tag_model_version

    number, run_id = a_version(registry)
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    for folder, version in ((here, number), (elsewhere, "99")):
        folder.mkdir()
        (folder / "receipt.json").write_text(json.dumps({"model": "aligntok-tokenizer", "version": version,
                                                         "run_id": run_id}))
    assert _tag(here, {"rfid": 12.5}, "eval-run", tag_model_version) == f"aligntok-tokenizer/{number}"
    assert registry.get_model_version("aligntok-tokenizer", number).tags["eval_rfid"] == "12.5"
    assert _tag(elsewhere, {"rfid": 12.5}, "eval-run", tag_model_version) == \
        "aligntok-tokenizer/99 (not in this tracking store: not tagged)"

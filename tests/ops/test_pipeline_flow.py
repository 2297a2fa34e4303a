"""The pipeline run's own logic, without servers: stage selection, presets, DVC's output read, failure classes,
the summary and the run commit's message (the workspace lock is aligntok.locks: tests/test_locks.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from support.paths import REPO
from aligntok.errors import AligntokError
from aligntok.ops.pipeline_run import (
    InfrastructureError,
    StageFailed,
    error_line,
    find_preset,
    run_commit_message,
    select_stages,
    stage_metrics,
    stage_status,
    summary_markdown,
)
from aligntok.ops.workspace import WorkspaceError

from flows.pipeline import _infrastructure_failure


def test_targets_bring_what_they_depend_on_and_unknown_ones_are_named() -> None:
    assert select_stages(REPO, ["validate"]) == ["snapshot", "ingest", "validate"]
    dit = select_stages(REPO, ["train_dit"])
    assert dit[-1] == "train_dit" and "refine_decoder" in dit and "vae_baseline" not in dit  # via ${cache_latents...}
    everything = select_stages(REPO, None)
    assert set(everything) == set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert everything.index("train_dit") < everything.index("evaluate")
    assert everything.index("train_t2i") < everything.index("evaluate_t2i")
    assert everything.index("refine_decoder") < everything.index("t2i_latents")
    with pytest.raises(ValueError, match=r"unknown stages \['trian_dit'\]"):
        select_stages(REPO, ["trian_dit"])


def test_the_stage_error_line_is_picked_out_of_the_output() -> None:
    output = ("Running stage 'ingest':\n> python -m aligntok ingest data/shards\n"
              "ingest:  50%|#####     | 5/10\r"
              "aligntok ingest: error: /x: Fashion-MNIST files missing (a.gz)\n"
              "ERROR: failed to reproduce 'ingest': failed to run: python -m aligntok ingest, exited with 1\n")
    assert error_line(output) == "aligntok ingest: error: /x: Fashion-MNIST files missing (a.gz)"
    assert error_line("Traceback\n  File x\nKeyError: 'k'\n") == "KeyError: 'k'"
    assert error_line("ERROR: failed to reproduce 'x'\n") == "ERROR: failed to reproduce 'x'"


@pytest.mark.parametrize(("error", "retried"), [
    (StageFailed("s", 255, "ConnectionError: refused", infrastructure=True), True),
    (StageFailed("s", 1, "aligntok s: error: bad key", infrastructure=False), False),
    (InfrastructureError("server down"), True),
    (WorkspaceError("/w: dvc push failed: ERROR: Max retries exceeded with url"), True),
    (WorkspaceError("/w: git checkout failed: error: pathspec"), False),
    (KeyError("bug"), False),
])
def test_only_infrastructure_failures_are_retried(error: BaseException, retried: bool) -> None:
    def result() -> None:
        raise error

    assert _infrastructure_failure(None, None, SimpleNamespace(result=result)) is retried


def test_what_dvc_did_with_a_stage_is_read_from_its_output() -> None:
    assert stage_status("ingest", "Running stage 'ingest':\n> python -m aligntok ingest data/shards\n") == "ran"
    assert stage_status("ingest", "Stage 'ingest' didn't change, skipping\n") == "skipped"
    assert stage_status("ingest", "Stage 'ingest' is cached - skipping run, checking out outputs\n") == "restored"


def test_a_preset_is_found_in_the_ref_first_then_in_the_checkout(tmp_path: Path) -> None:
    ref, checkout = tmp_path / "ref", tmp_path / "checkout"
    for folder in (ref, checkout):
        (folder / "configs").mkdir(parents=True)
    (checkout / "configs" / "mine.yaml").write_text("{}\n")
    (ref / "configs" / "tiny.yaml").write_text("{}\n")
    (checkout / "configs" / "tiny.yaml").write_text("{}\n")
    assert find_preset("configs/tiny.yaml", ref, checkout) == ref / "configs" / "tiny.yaml"
    assert find_preset("configs/mine.yaml", ref, checkout) == checkout / "configs" / "mine.yaml"
    with pytest.raises(AligntokError, match=r"preset configs/typo.yaml: no such file in .*ref or .*checkout"):
        find_preset("configs/typo.yaml", ref, checkout)


def test_the_run_commit_message_names_what_ran_and_the_runs_facts() -> None:
    header = {"flow run": "witty-cat", "deployment": "nightly-retrain", "ref": "main (abc)", "params": "params.yaml",
              "source fingerprint": "f" * 64, "mlflow parent run": "r1"}
    rows = [{"stage": "snapshot", "status": "ran"}, {"stage": "ingest", "status": "ran"},
            {"stage": "align_latent", "status": "ran", "versions": ["aligntok-tokenizer v4"]},
            {"stage": "evaluate", "status": "skipped"}]
    message = run_commit_message(header, rows)
    assert message.startswith("aligntok run witty-cat: 2 stage(s) ran (ingest, align_latent)\n\n")
    assert "Deployment: nightly-retrain\n" in message and f"Source-Fingerprint: {'f' * 64}\n" in message
    assert "Registered: aligntok-tokenizer v4\n" in message
    assert run_commit_message(header, rows[:1]).startswith("aligntok run witty-cat: nothing changed\n")


def test_summary_lists_each_stage_its_versions_metrics_and_promotions(tmp_path: Path) -> None:
    rows = [{"stage": "align_latent", "status": "ran", "seconds": 12.5, "versions": ["aligntok-tokenizer v3"],
             "metrics": {"align_latent.val_psnr": 21.27}},
            {"stage": "ingest", "status": "skipped", "seconds": 1.0, "versions": [], "metrics": {}},
            {"stage": "evaluate", "status": "failed: aligntok evaluate: error: x"}]
    text = summary_markdown(rows, [{"outcome": "refused", "message": "v3 refused: eval_rfid ..."}],
                            {"outcome": "failed", "params": "configs/tiny.yaml"})
    assert text.startswith("# aligntok pipeline: failed")
    assert "| align_latent | ran | 12.5 | aligntok-tokenizer v3 | align_latent.val_psnr 21.27 |" in text
    assert "| ingest | skipped | 1.0 | - | - |" in text and "| evaluate | failed: aligntok evaluate: error: x |" in text
    assert "- refused: v3 refused: eval_rfid ..." in text and "- params: configs/tiny.yaml" in text


def test_key_metrics_are_read_from_the_stage_metrics_files() -> None:
    found = stage_metrics(REPO, "refine_decoder")
    assert set(found) == {"refine_decoder.val_psnr", "refine_decoder.val_ssim", "refine_decoder.final_loss"}
    evaluate = stage_metrics(REPO, "evaluate")
    assert "diffusion.gfid_cfg" in evaluate and "tokenizer.refine_decoder.rfid" in evaluate

"""The pipeline flow's own logic, without servers: stage selection, the checkout lock, failure classes, summary."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO
from flows.pipeline import (
    InfrastructureError,
    PipelineBusy,
    StageFailed,
    _infrastructure_failure,
    error_line,
    pipeline_lock,
    select_stages,
    stage_metrics,
    summary_markdown,
)


def test_targets_bring_what_they_depend_on_and_unknown_ones_are_named() -> None:
    assert select_stages(REPO, ["validate"]) == ["ingest", "validate"]
    dit = select_stages(REPO, ["train_dit"])
    assert dit[-1] == "train_dit" and "refine_decoder" in dit and "vae_baseline" not in dit  # via ${cache_latents...}
    assert select_stages(REPO, None)[-1] == "evaluate"
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
    (KeyError("bug"), False),
])
def test_only_infrastructure_failures_are_retried(error: BaseException, retried: bool) -> None:
    def result() -> None:
        raise error

    assert _infrastructure_failure(None, None, SimpleNamespace(result=result)) is retried


def test_a_second_run_waits_for_the_lock_then_gives_up_naming_the_holder(tmp_path: Path) -> None:
    held, release = threading.Event(), threading.Event()

    def first() -> None:
        with pipeline_lock(tmp_path, 5, "pid 1 on box, flow run first"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=first)
    thread.start()
    held.wait(10)
    start = time.monotonic()
    with pytest.raises(PipelineBusy, match=r"holds the checkout \(pid 1 on box, flow run first\); gave up after "
                                           r"waiting 1.5 s"):
        with pipeline_lock(tmp_path, 1.5, "second"):
            pass
    assert time.monotonic() - start >= 1.5
    release.set()
    thread.join()
    with pipeline_lock(tmp_path, 1, "third"):  # released: taken at once
        assert (tmp_path / ".dvc/tmp/aligntok-pipeline.lock").read_text() == "third"


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

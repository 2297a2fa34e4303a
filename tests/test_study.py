"""The study's overrides and its report: rows of params, and claims judged against a noise scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aligntok.config import load_params
from aligntok.study import STUDY_SIZE, VARIANTS, _set_args, compare, variant_overrides, write_report

REPO = Path(__file__).resolve().parents[1]


def test_every_variant_is_a_valid_set_of_params_overrides() -> None:
    """Each variant's -S overrides load through the typed config (the study needs no code per variant)."""
    for variant in VARIANTS:
        params = load_params(REPO / "params.yaml", variant_overrides(variant, seed=3, size=STUDY_SIZE))
        assert params.cache_latents.tokenizer == variant.tokenizer
        assert params.evaluate.tokenizers == [variant.tokenizer]
        assert params.train_dit.seed == 3 and params.train_dit.steps == STUDY_SIZE["train_dit.steps"]
    c = load_params(REPO / "params.yaml", variant_overrides(VARIANTS[2], 0, STUDY_SIZE))
    assert c.align_perceptual.losses.semantic == 0.0


def test_set_args_are_yaml_values_dvc_can_parse() -> None:
    assert _set_args({"a.b": [1.0, 4.0], "c": 0.0, "d": "random:x", "e": [50]}) == [
        "-S", "a.b=[1.0, 4.0]", "-S", "c=0.0", "-S", "d=random:x", "-S", "e=[50]"]


@pytest.mark.parametrize(("a", "b", "noise", "lower", "verdict"), [
    (10.0, 12.0, 1.0, True, "holds"),
    (12.0, 10.0, 1.0, True, "does not hold"),
    (10.0, 10.5, 1.0, True, "tie (within noise)"),
    (0.9, 0.8, 0.05, False, "holds"),
])
def test_compare_calls_a_tie_within_noise(a: float, b: float, noise: float, lower: bool, verdict: str) -> None:
    assert compare(a, b, noise, lower) == verdict


def _record(variant: str, seed: int, lp: float, gfid: float, early: float = 5.0) -> dict:
    tok = {"rfid": 5.0, "psnr": 22.0, "ssim": 0.8, "fd_dinov2": 1.0, "lp_top1": lp, "psnr_sem": 0.1,
           "ssim_sem": 0.01}
    diffusion = {"gfid_cfg": gfid, "gfid_nocfg": gfid + 10, "precision_cfg": 0.5, "recall_cfg": 0.4,
                 "train_steps": 1000.0, "by_step": {"500": {"gfid_cfg": gfid + early, "gfid_nocfg": gfid + 15}}}
    return {"variant": variant, "label": variant, "seed": seed, "experiment": f"study-{variant}-seed{seed}",
            "wall_seconds": 60.0, "metrics": {"tokenizer": {"x": tok}, "diffusion": diffusion},
            "evaluate_run_id": f"run-{variant}-{seed}", "protocol": {"gfid": "200 samples"}}


def test_report_judges_claims_with_the_measured_seed_noise(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    # seed spread 4 at the end of training, 12 at step 500 (45 vs 57): the noise scale is the wider one
    records = [_record("a_full", 0, 0.85, 40.0), _record("a_full", 1, 0.85, 44.0, early=13.0),
               _record("e_vavae", 0, 0.70, 60.0), _record("d_vae", 0, 0.72, 61.0)]
    for r in records:
        (results / f"{r['variant']}-seed{r['seed']}.json").write_text(json.dumps(r))
    text = write_report(results, tmp_path / "study.md").read_text()
    assert "gFID noise scale: 12.00, the widest range over 2 diffusion seeds of one variant at any measured " \
           "training length (`gfid_cfg@500`)" in text
    assert "gFID (a) < (e) (with guidance, end of training): 42.00 vs 60.00 — **holds**" in text
    assert "gFID (e) < (d) (with guidance, end of training): 60.00 vs 61.00 — **tie (within noise)**" in text
    assert "latent LP (e) > (d): 70.0% vs 72.0% — **tie (within noise)**" in text  # 2 SE on 500 images ~ 4%
    assert "latent LP (a) > (e): 85.0% vs 70.0% — **holds**" in text
    assert "42.00 ± 2.00" in text and "`run-a_full-1`" in text
    assert (tmp_path / "study_convergence.png").stat().st_size > 0

"""The study's overrides and its report: rows of params, and claims judged against a noise scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from aligntok.config import load_params
import aligntok.ops.study as study
from aligntok.ops.study import (STUDY_SIZE, TOKENIZER_SEED_STRIDE, VARIANTS, Figure, _set_args, compare, figure,
                            stale_result, study_command, variant_overrides, write_report)

from support.paths import REPO


def test_every_variant_is_a_valid_set_of_params_overrides() -> None:
    """Each variant's -S overrides load through the typed config (the study needs no code per variant)."""
    for variant in VARIANTS:
        params = load_params(REPO / "params.yaml", variant_overrides(variant, seed=3, size=STUDY_SIZE))
        assert params.cache_latents.tokenizer == variant.tokenizer
        assert params.evaluate.tokenizers == [variant.tokenizer]
        assert params.train_dit.seed == 3 and params.train_dit.steps == STUDY_SIZE["train_dit.steps"]
    c = load_params(REPO / "params.yaml", variant_overrides(VARIANTS[2], 0, STUDY_SIZE))
    assert c.align_perceptual.losses.semantic == 0.0


def test_a_seed_above_zero_reseeds_the_tokenizer_rows_the_variant_trains_and_only_those() -> None:
    default = load_params(REPO / "params.yaml")
    rows = {"align_latent": 5, "align_perceptual": 6, "refine_decoder": 7, "vae_baseline": 8}
    by_name = {v.name: v for v in VARIANTS}
    assert not any(k.endswith(".seed") and k.split(".")[0] in rows
                   for k in variant_overrides(by_name["a_full"], 0, STUDY_SIZE, rows))  # seed 0: params.yaml's rows
    c = variant_overrides(by_name["c_no_sp"], 2, STUDY_SIZE, rows)
    assert (c["align_latent.seed"], c["align_perceptual.seed"]) == (5 + 2 * TOKENIZER_SEED_STRIDE,
                                                                    6 + 2 * TOKENIZER_SEED_STRIDE)
    assert "refine_decoder.seed" not in c and "vae_baseline.seed" not in c
    d = load_params(REPO / "params.yaml", variant_overrides(by_name["d_vae"], 1, STUDY_SIZE))
    assert d.vae_baseline.seed == default.vae_baseline.seed + TOKENIZER_SEED_STRIDE
    assert d.align_latent.seed == default.align_latent.seed and d.train_dit.seed == 1


def test_a_study_run_reproduces_evaluate_and_not_the_text_to_image_stages() -> None:
    command = study_command("study-a_full-seed0", {"train_dit.seed": 0})
    assert command[:4] == ["dvc", "exp", "run", "--name"] and command[-1] == "evaluate"
    assert "evaluate_t2i" not in command


def test_set_args_are_yaml_values_dvc_can_parse() -> None:
    assert _set_args({"a.b": [1.0, 4.0], "c": 0.0, "d": "random:x", "e": [50]}) == [
        "-S", "a.b=[1.0, 4.0]", "-S", "c=0.0", "-S", "d=random:x", "-S", "e=[50]"]


def _fig(lo: float | None, hi: float | None, mean: float = 0.0) -> Figure:
    return Figure(mean=mean, values=[mean], interval=None if lo is None else (lo, hi))


@pytest.mark.parametrize(("a", "b", "lower", "verdict"), [
    (_fig(9, 11), _fig(12, 13), True, "holds"),
    (_fig(12, 13), _fig(9, 11), True, "does not hold"),
    (_fig(9, 12.5), _fig(12, 13), True, "tie (intervals overlap)"),
    (_fig(0.85, 0.9), _fig(0.7, 0.8), False, "holds"),
    (_fig(0.7, 0.8), _fig(0.85, 0.9), False, "does not hold"),
    (_fig(None, None), _fig(0.7, 0.8), False, "not called (no interval)"),
])
def test_compare_calls_a_tie_when_the_intervals_overlap(a: Figure, b: Figure, lower: bool, verdict: str) -> None:
    assert compare(a, b, lower) == verdict


def test_a_figure_spans_every_seed_and_its_bootstrap_interval() -> None:
    rows = [{"gfid": 40.0, "gfid_ci_lo": 37.0, "gfid_ci_hi": 45.0}, {"gfid": 48.0, "gfid_ci_lo": 46.0, "gfid_ci_hi": 47.0}]
    f = figure(rows, "gfid")
    assert f is not None and f.mean == 44.0 and f.values == [40.0, 48.0] and f.interval == (37.0, 48.0)
    assert figure([{"x": 1.0}, {"x": 3.0}], "x").interval == (1.0, 3.0)  # no bootstrap: the seeds' range
    assert figure([{"x": 1.0}], "x").interval is None  # one seed, no bootstrap, no fallback: no interval
    assert figure([{"x": 1.0}], "x", lambda v, r: (v - 0.5, v + 0.25)).interval == (0.5, 1.25)
    assert figure([{"y": 1.0}], "x") is None


def _record(variant: str, seed: int, lp: float, gfid: float, early: float = 5.0, half: float = 2.0) -> dict:
    tok = {"rfid": 5.0, "psnr": 22.0, "ssim": 0.8, "fd_dinov2": 1.0, "lp_top1": lp, "psnr_sem": 0.1,
           "ssim_sem": 0.01, "lp_top1_ci_lo": lp - 0.03, "lp_top1_ci_hi": lp + 0.03,
           "rkid": 0.004, "rkid_ci_lo": 0.003, "rkid_ci_hi": 0.005}
    diffusion = {"gfid_cfg": gfid, "gfid_cfg_ci_lo": gfid - half, "gfid_cfg_ci_hi": gfid + half,
                 "gfid_nocfg": gfid + 10, "precision_cfg": 0.5, "recall_cfg": 0.4,
                 "train_steps": 1000.0, "by_step": {"500": {"gfid_cfg": gfid + early, "gfid_nocfg": gfid + 15}}}
    return {"variant": variant, "label": variant, "seed": seed, "experiment": f"study-{variant}-seed{seed}",
            "wall_seconds": 60.0, "cpu_seconds": 90.0, "metrics": {"tokenizer": {"x": tok}, "diffusion": diffusion},
            "evaluate_run_id": f"run-{variant}-{seed}", "protocol": {"gfid": "200 samples"}}


def test_report_calls_claims_from_the_intervals(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    records = [_record("a_full", 0, 0.85, 40.0), _record("a_full", 1, 0.83, 44.0, early=13.0),
               _record("e_vavae", 0, 0.70, 60.0), _record("d_vae", 0, 0.72, 61.0),
               _record("b_stage1", 0, 0.8, 50.0)]
    for r in records:
        (results / f"{r['variant']}-seed{r['seed']}.json").write_text(json.dumps(r))
    text = write_report(results, tmp_path / "study.md").read_text()
    # (a): mean 42 over its seeds, interval [38, 46] (values and bootstrap intervals); (e): [58, 62]
    assert "gFID (a) < (e) (with guidance, end of training): 42.00 vs 60.00 — **holds** (by seed: 40.00, 44.00 vs " \
           "60.00)\n" in text
    assert "latent LP (e) > (d): 70.0% vs 72.0% — **tie (intervals overlap)**\n" in text  # one seed each: no list
    # Table 1's claims, under the heading with the paper's figures; (c) was not run: not measured, not a verdict
    table1 = text.index("### Table 1: the stages")
    assert text.index("gFID (a) < (b) (with guidance, end of training): 42.00 vs 50.00 — **holds**") > table1
    assert "gFID (a) < (c) (with guidance, end of training): not measured" in text
    assert "42.00 [38.00, 46.00]" in text
    assert "gFID (e) < (d) (with guidance, end of training): 60.00 vs 61.00 — **tie (intervals overlap)**" in text
    # no-cfg gFID has no bootstrap interval: (a) has the range of its two seeds, (e) one seed: not called
    assert "gFID (a) < (e) (without guidance): 52.00 vs 70.00 — **not called (no interval)**" in text
    assert "latent LP (e) > (d): 70.0% vs 72.0% — **tie (intervals overlap)**" in text
    assert "latent LP (a) > (e): 84.0% vs 70.0% — **holds**" in text
    assert "gKID (a) < (e) (with guidance, x1e3): not measured" in text
    assert "reconstruction (a) better than (b): rKID (x1e3): 4.00 vs 4.00 — **tie (intervals overlap)**" in text
    assert "`run-a_full-1`" in text and "| a_full | 1 | `study-a_full-seed1` | `run-a_full-1` | 1.0 min | 1.5 min |" in text
    assert "In all: 0.08 h wall, 0.12 h CPU" in text
    assert (tmp_path / "study_convergence.png").stat().st_size > 0


def test_a_result_stands_only_for_the_overrides_it_was_run_with(tmp_path: Path) -> None:
    path = tmp_path / "a_full-seed0.json"
    assert stale_result(path, {"train_dit.steps": 500}) == "not run yet"
    path.write_text(json.dumps({"overrides": {"train_dit.steps": 500, "evaluate.cfg_sweep": [1.0, 4.0]}}))
    assert stale_result(path, {"train_dit.steps": 500, "evaluate.cfg_sweep": [1.0, 4.0]}) is None
    assert stale_result(path, {"train_dit.steps": 800, "evaluate.cfg_sweep": [1.0, 4.0]}) == \
        "run with other overrides (train_dit.steps)"


def test_a_result_stands_only_for_the_params_yaml_it_was_run_on(tmp_path: Path) -> None:
    """A changed default (here the data source) makes every result stale although the overrides match."""
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    base = study.params_digest(params)
    params.write_text("# a comment does not count\n" + params.read_text())
    assert study.params_digest(params) == base
    path = tmp_path / "a_full-seed0.json"
    overrides = {"train_dit.steps": 500}
    path.write_text(json.dumps({"overrides": overrides}))
    assert stale_result(path, overrides, base) == "run before results recorded their params.yaml"
    path.write_text(json.dumps({"overrides": overrides, "params_sha256": base}))
    assert stale_result(path, overrides, base) is None
    values = yaml.safe_load(params.read_text())
    values["data"]["source"] = "somewhere-else"
    params.write_text(yaml.safe_dump(values))
    assert stale_result(path, overrides, study.params_digest(params)) == "run on another params.yaml"


def test_the_study_runs_only_what_is_missing_or_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_study's plan: variants x seeds, the results already run with the same overrides kept."""
    results = tmp_path / "results"
    results.mkdir()
    size = {"train_dit.steps": 10}
    rows = study.default_row_seeds(REPO / "params.yaml")
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    a, d = (next(v for v in VARIANTS if v.name == n) for n in ("a_full", "d_vae"))
    (results / "a_full-seed0.json").write_text(json.dumps({"overrides": variant_overrides(a, 0, size, rows),
                                                          "params_sha256": study.params_digest(REPO / "params.yaml")}))
    (results / "d_vae-seed0.json").write_text(json.dumps({"overrides": {"train_dit.steps": 5}}))  # stale
    ran: list[tuple[str, int]] = []
    monkeypatch.setattr(study, "run_variant", lambda v, s, *_: ran.append((v.name, s)))
    monkeypatch.setattr(study, "write_report", lambda results, report: report)
    monkeypatch.setattr(study.subprocess, "run", lambda *a, **k: None)  # the closing `dvc checkout`
    study.run_study(tmp_path, variants=["a_full", "d_vae"], seeds=[0, 1], size=size, results=results,
                    report=tmp_path / "study.md")
    assert ran == [("d_vae", 0), ("a_full", 1), ("d_vae", 1)]

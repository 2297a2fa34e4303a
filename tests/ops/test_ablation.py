"""The w_sp ablation's pieces: linear CKA, stage snapshots, and a tiny run of the ablation end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from aligntok.ops.ablation import (ARMS, AblationSize, Workspace, gfid_verdict, measured_elsewhere, run_ablation,
                                   verdict, write_report)
from aligntok.config import ConfigError, parse_params
from aligntok.eval.cka import linear_cka, relative_change
from aligntok.tokenizer.api import Tokenizer
from aligntok.tokenizer.stages import SNAPSHOTS, StagePaths, run_tokenizer_stage

from support.tiny import TINY_MODEL, one_thread  # noqa: F401  (fixture)


def _reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC form with the centring matrix H (Kornblith et al. 2019, eq. 2 with linear kernels)."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    kx, ky = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float(np.trace(kx @ ky) / np.sqrt(np.trace(kx @ kx) * np.trace(ky @ ky)))


def test_linear_cka_is_invariant_to_rotation_and_scale_and_matches_the_hsic_form() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6))
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert linear_cka(x, 3.0 * x @ rotation + 5.0) == pytest.approx(1.0, abs=1e-12)
    y = x[:, :3] @ rng.normal(size=(3, 9)) + 0.5 * rng.normal(size=(40, 9))
    assert linear_cka(x, y) == pytest.approx(_reference_cka(x, y), rel=1e-10)  # N > D: cross-covariance route
    wide_x, wide_y = rng.normal(size=(8, 30)), rng.normal(size=(8, 50))
    assert linear_cka(wide_x, wide_y) == pytest.approx(_reference_cka(wide_x, wide_y), rel=1e-10)  # Gram route
    unrelated = linear_cka(rng.normal(size=(2000, 4)), rng.normal(size=(2000, 4)))
    assert unrelated < 0.01


def test_relative_change_and_bad_input() -> None:
    x = np.ones((4, 3))
    assert relative_change(x, 1.5 * x) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same N"):
        linear_cka(x, np.ones((5, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        relative_change(x, np.full((4, 3), np.nan))
    with pytest.raises(ValueError, match="constant"):
        linear_cka(x, np.arange(12.0).reshape(4, 3))


RAW = {
    **TINY_MODEL,
    "align_latent": {"train": ["adapter", "decoder"], "steps": 2, "batch_size": 4, "lr": 1e-3, "val_images": 4,
                     "losses": {"gan": 0.0, "perceptual": 0.0}},
    "align_perceptual": {"train": ["encoder", "adapter", "decoder"], "steps": 3, "batch_size": 4, "lr": 1e-3,
                         "encoder_lr_scale": 1.0, "ema_decay": 0.5, "val_images": 4,
                         "losses": {"semantic": 1.0, "gan": 0.0, "perceptual": 0.0}},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:  # noqa: F811
    """A repository root as the ablation expects it: params.yaml, shards, encoder, a validated report, stage 1."""
    from aligntok.config import EncoderConfig
    from aligntok.encoder import export_encoder
    from support.shards import write_dataset

    root = tmp_path_factory.mktemp("ablation")
    write_dataset(root / "data" / "shards")
    export_encoder(EncoderConfig(**TINY_MODEL["encoder"]), root / "models" / "encoder")
    (root / "reports" / "validation").mkdir(parents=True)
    (root / "reports" / "validation" / "validation.json").write_text('{"success": true, "failed": []}')
    (root / "params.yaml").write_text(yaml.safe_dump(RAW))
    run_tokenizer_stage("align_latent", parse_params(RAW),
                        StagePaths(data=root / "data" / "shards", encoder=root / "models" / "encoder",
                                   out=root / "models" / "tokenizer" / "align_latent", checkpoints=root / "ck"),
                        register=False, progress=False)
    return root


def test_stage_snapshots_are_loadable_tokenizers_and_the_last_is_the_saved_model(workspace: Path,
                                                                                  tmp_path: Path) -> None:
    params = parse_params(RAW)
    paths = StagePaths(data=workspace / "data" / "shards", encoder=workspace / "models" / "encoder",
                       out=tmp_path / "stage2", previous=workspace / "models" / "tokenizer" / "align_latent",
                       checkpoints=tmp_path / "ck")
    run_tokenizer_stage("align_perceptual", params, paths, register=False, progress=False, snapshots=(1, 3))
    names = sorted(p.name for p in (tmp_path / "stage2" / SNAPSHOTS).iterdir())
    assert names == ["step_000001", "step_000003"]
    images = torch.rand(2, 3, 16, 16)
    last = Tokenizer.load(tmp_path / "stage2" / SNAPSHOTS / "step_000003")
    first = Tokenizer.load(tmp_path / "stage2" / SNAPSHOTS / "step_000001")
    final = Tokenizer.load(tmp_path / "stage2")
    assert torch.equal(last.encode(images), final.encode(images))  # the EMA at the last step is what the stage saves
    assert not torch.equal(first.encode(images), final.encode(images))
    assert last.description["metrics"]["steps"] == 3.0
    with pytest.raises(ConfigError, match=r"snapshot steps \[4\] are outside 1..align_perceptual.steps=3"):
        run_tokenizer_stage("align_perceptual", params, paths, register=False, progress=False, snapshots=(4,))


def test_a_tiny_ablation_measures_every_arm_resumes_and_reports(workspace: Path, tmp_path: Path) -> None:
    size = AblationSize(steps=3, snapshots=(1, 3), probe_train_images=24, probe_val_images=6, drift_images=6,
                        gfid_at=())
    ws = Workspace(repo=workspace, out=tmp_path / "ablation_wsp", scratch=tmp_path / "scratch")
    arms = [a for a in ARMS if a.encoder_lr_scale == 1.0]
    report = run_ablation(ws, arms, size, progress=False)
    records = {a.name: json.loads((ws.out / f"{a.name}.json").read_text()) for a in arms}
    for name, record in records.items():
        assert sorted(record["points"], key=int) == ["0", "1", "3"]
        start = record["points"]["0"]  # stage 1 against itself
        assert start["latent_cka"] == pytest.approx(1.0) and start["latent_relative_change"] == pytest.approx(0.0)
        assert start["encoder_cka"] == pytest.approx(1.0)
        assert record["points"]["3"]["encoder_relative_change"] > 0  # the encoder trained (lr 1x)
        assert 0 <= record["points"]["3"]["lp_top1"] <= 1
    # w_sp is the only difference between the two arms: same start, different end
    assert records["wsp1_lr1"]["points"]["0"] == records["wsp0_lr1"]["points"]["0"]
    assert records["wsp1_lr1"]["points"]["3"] != records["wsp0_lr1"]["points"]["3"]
    text = report.read_text()
    assert "| wsp1_lr1 | 1 | 1x | 3 |" in text and "encoder lr 1x, step 3" in text
    assert "encoder lr 0.1x" not in text
    assert report.with_suffix(".png").stat().st_size > 0
    # a rerun measures nothing new; another size is refused, naming the file
    before = (ws.out / "wsp1_lr1.json").read_text()
    run_ablation(ws, arms, size, progress=False)
    assert json.loads((ws.out / "wsp1_lr1.json").read_text())["points"] == json.loads(before)["points"]
    with pytest.raises(Exception, match="wsp1_lr1.json: measured at another size"):
        run_ablation(ws, arms, AblationSize(steps=3, snapshots=(3,), probe_train_images=24, probe_val_images=6,
                                            drift_images=6, gfid_at=()), progress=False)


def test_the_verdict_needs_a_difference_beyond_both_intervals() -> None:
    assert verdict({"lp_top1": 0.72, "lp_val_images": 500}, {"lp_top1": 0.40, "lp_val_images": 500}) == "holds"
    assert verdict({"lp_top1": 0.72, "lp_val_images": 500}, {"lp_top1": 0.70, "lp_val_images": 500}) == \
        "tie (intervals overlap)"
    assert verdict({"lp_top1": 0.30, "lp_val_images": 500}, {"lp_top1": 0.70, "lp_val_images": 500}) == \
        "does not hold"


def test_the_gfid_verdict_needs_the_bootstrap_intervals_apart() -> None:
    def g(lo: float, hi: float) -> dict[str, float]:
        return {"gfid_cfg": (lo + hi) / 2, "gfid_cfg_ci_lo": lo, "gfid_cfg_ci_hi": hi}

    assert gfid_verdict(g(140, 150), g(160, 170)) == "holds"
    assert gfid_verdict(g(140, 161), g(160, 170)) == "tie (intervals overlap)"
    assert gfid_verdict(g(180, 190), g(160, 170)) == "does not hold"


def test_the_report_needs_results(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no ablation results"):
        write_report(tmp_path, tmp_path.with_suffix(".md"))


def test_another_gfid_step_extends_an_arm_and_any_other_size_is_refused() -> None:
    arm, size = ARMS[0], AblationSize(steps=400, gfid_at=(400,))
    record = {"arm": {"name": arm.name, "w_sp": arm.w_sp, "encoder_lr_scale": arm.encoder_lr_scale},
              "size": json.loads(json.dumps(vars(size))), "points": {}, "gfid": {"400": {}}}
    assert measured_elsewhere({}, arm, size) is None
    assert measured_elsewhere(record, arm, AblationSize(steps=400, gfid_at=(100, 400))) is None
    assert measured_elsewhere(record, arm, AblationSize(steps=400, gfid_at=())) is None
    assert measured_elsewhere(record, arm, AblationSize(steps=200, snapshots=(100, 200), gfid_at=(200,))) == \
        "snapshots=[25, 50, 100, 200, 400], not [100, 200]; steps=400, not 200"
    assert measured_elsewhere(record, arm, AblationSize(steps=400, dit_steps=100)) == "dit_steps=500, not 100"
    assert measured_elsewhere(record, ARMS[1], size) == f"arm {record['arm']}"


def _gfid(value: float) -> dict[str, float]:
    return {"gfid_cfg": value, "gfid_cfg_ci_lo": value - 5, "gfid_cfg_ci_hi": value + 5, "gfid_nocfg": value + 10}


def test_the_report_calls_gfid_at_every_step_both_arms_measured(tmp_path: Path) -> None:
    point = {"lp_top1": 0.5, "lp_val_images": 500, "latent_cka": 1.0, "latent_relative_change": 0.0,
             "encoder_cka": 1.0, "encoder_relative_change": 0.0, "psnr": 20.0}
    size = json.loads(json.dumps(vars(AblationSize(gfid_at=(400,)))))
    for arm, gfid in ((ARMS[2], {"100": _gfid(150), "400": _gfid(140)}),  # w_sp 1, lr 1x
                      (ARMS[3], {"100": _gfid(152), "400": _gfid(180), "200": _gfid(170)})):  # w_sp 0: 200 only here
        record = {"arm": {"name": arm.name, "w_sp": arm.w_sp, "encoder_lr_scale": arm.encoder_lr_scale},
                  "size": size, "points": {"0": point, "400": point}, "gfid": gfid,
                  "seconds": {"wall": 60.0, "cpu": 120.0}}
        (tmp_path / f"{arm.name}.json").write_text(json.dumps(record))
    text = write_report(tmp_path, tmp_path.with_suffix(".md")).read_text()
    assert "at steps [100, 200, 400], gFID" in text
    assert ("encoder lr 1x, step 100, downstream gFID with guidance: 150.00 [145.00, 155.00] with w_sp vs "
            "152.00 [147.00, 157.00] without — **tie (intervals overlap)**") in text
    assert "encoder lr 1x, step 400, downstream gFID with guidance: 140.00 [135.00, 145.00] with w_sp vs " \
           "180.00 [175.00, 185.00] without — **holds**" in text
    assert "step 200, downstream" not in text  # measured in one arm only: nothing to compare
    assert tmp_path.with_suffix(".png").stat().st_size > 0

"""The `fid_reference` and `evaluate` stages end to end on tiny trained models, with the real FID network
and a real MLflow registry: every metric present, the numbers consistent with an independent computation,
and the registered versions tagged with their own figures."""

from __future__ import annotations

import csv
import json
import math
from typing import Any

import numpy as np
import pytest
import torch

from aligntok.config import CacheLatentsConfig, EncoderConfig, Params, parse_params
from aligntok.diffusion.latent_writer import cache_latents
from aligntok.diffusion.train import DiTPaths, run_train_dit
from aligntok.encoder import export_encoder
from aligntok.config import TOKENIZER_STAGES as TOKENIZER_STAGES
from aligntok.eval.evaluate import EvalPaths, run_evaluate
from aligntok.eval.reference import build_reference, load_reference
from aligntok.tokenizer.stages import StagePaths, run_tokenizer_stage

from support.shards import write_dataset
from support.tiny import TINY_MODEL, one_thread  # noqa: F401 (fixture)

STAGE = {"batch_size": 4, "lr": 1e-3, "val_images": 4}
TINY = {
    **TINY_MODEL,
    "align_latent": {**STAGE, "train": ["adapter", "decoder"], "steps": 2, "losses": {"gan_start": 1}},
    "align_perceptual": {**STAGE, "train": ["encoder", "adapter", "decoder"], "steps": 2,
                         "losses": {"semantic": 1.0}, "carry_discriminator": True},
    "refine_decoder": {**STAGE, "train": ["decoder"], "steps": 2, "carry_discriminator": True},
    "vae_baseline": {**STAGE, "train": ["encoder", "decoder"], "steps": 2, "losses": {"kl": 1e-6}},
    "dit": {"preset": "LightningDiT-T/1"},
    "train_dit": {"steps": 4, "batch_size": 8, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1,
                  "sample_every": 4, "snapshot_steps": [3]},
    "sample": {"steps": 2, "cfg_scale": 2.0},
    "evaluate": {"reference_images": 16, "recon_images": 6, "gen_samples": 6, "sweep_samples": 3,
                 "steps_sweep": [1, 2], "cfg_sweep": [1.0, 3.0], "probe_train_images": 24,
                 "probe_val_images": 12, "batch_size": 6},
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def params() -> Params:
    return parse_params(TINY)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory, params: Params) -> dict:
    """Every stage once, registered in a throwaway MLflow; then fid_reference and evaluate."""
    root = tmp_path_factory.mktemp("evaluate")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.chdir(root)  # artifacts land in root/mlartifacts
    try:
        data = write_dataset(root / "data", per_class=(12, 12, 12), val_per_class=4)
        export_encoder(EncoderConfig(**TINY["encoder"]), root / "encoder")
        tokenizers = root / "tokenizer"
        previous = {"align_perceptual": "align_latent", "refine_decoder": "align_perceptual"}
        for stage in TOKENIZER_STAGES:
            prev = tokenizers / previous[stage] if stage in previous else None
            run_tokenizer_stage(stage, params, StagePaths(data=data, encoder=root / "encoder",
                                out=tokenizers / stage, previous=prev, checkpoints=root / "ckpt"), progress=False)
        cache_latents(tokenizers / "refine_decoder", data, root / "latents",
                      CacheLatentsConfig(max_images=None, batch_size=8, shard_size=12), progress=False)
        run_train_dit(params, DiTPaths(latents=root / "latents", tokenizer=tokenizers / "refine_decoder",
                                       out=root / "dit", checkpoints=root / "ckpt"), progress=False)
        build_reference(data, root / "encoder", root / "reference", params.evaluate, progress=False)
        paths = EvalPaths(data=data, encoder=root / "encoder", reference=root / "reference", tokenizers=tokenizers,
                          dit=root / "dit", out=root / "reports" / "eval", metrics=root / "reports" / "metrics.json",
                          plots=root / "reports" / "plots")
        metrics = run_evaluate(params, paths, progress=False)
        yield {"root": root, "paths": paths, "metrics": metrics}
    finally:
        mp.undo()


def _finite(values: dict) -> bool:
    return all(isinstance(v, float) and math.isfinite(v) for v in values.values())


INTERVALS = {"tokenizer": ("rfid", "rkid", "psnr", "ssim", "lp_top1"),
             "diffusion": ("gfid_cfg", "gfid_nocfg", "gkid_cfg", "gkid_nocfg")}
"""The figures that carry a bootstrap interval (`<figure>_ci_lo`, `<figure>_ci_hi`)."""


def _assert_brackets(values: dict, figure: str) -> None:
    low, high = values[f"{figure}_ci_lo"], values[f"{figure}_ci_hi"]
    assert low <= values[figure] <= high, (figure, low, values[figure], high)


def test_metrics_json_holds_every_metric(evaluated: dict) -> None:
    written = json.loads(evaluated["paths"].metrics.read_text())
    assert written == json.loads(json.dumps(evaluated["metrics"]))
    for stage in TOKENIZER_STAGES:
        tok = written["tokenizer"][stage]
        assert set(tok) == {"rfid", "psnr", "ssim", "fd_dinov2", "lp_top1", "psnr_sem", "ssim_sem", "rkid", "rkid_std",
                            *(f"{k}_ci_{end}" for k in INTERVALS["tokenizer"] for end in ("lo", "hi"))}, stage
        assert _finite(tok)
        assert tok["rfid"] > 0 and 0 <= tok["lp_top1"] <= 1
        assert tok["rkid"] > 0 and tok["rkid_std"] >= 0  # 6 poor reconstructions: far from their originals
        for figure in INTERVALS["tokenizer"]:
            _assert_brackets(tok, figure)
        assert tok["rfid_ci_lo"] < tok["rfid_ci_hi"] and tok["psnr_ci_lo"] < tok["psnr_ci_hi"]
        assert 0 <= tok["lp_top1_ci_lo"] and tok["lp_top1_ci_hi"] <= 1
    assert set(written["reference"]) == {"lp_top1_pixels", "lp_top1_encoder"}
    diffusion = written["diffusion"]
    for key in ("gfid_cfg", "gfid_nocfg", "precision_cfg", "recall_cfg", "precision_nocfg", "recall_nocfg",
                "fd_dinov2_cfg", "fd_dinov2_nocfg", "gkid_cfg", "gkid_nocfg", "gkid_cfg_std", "gkid_nocfg_std",
                *(f"{k}_ci_{end}" for k in INTERVALS["diffusion"] for end in ("lo", "hi"))):
        assert key in diffusion and math.isfinite(diffusion[key]), key
    for figure in INTERVALS["diffusion"]:
        _assert_brackets(diffusion, figure)
    assert diffusion["gkid_cfg_std"] > 0  # 6 of the 16 reference vectors per subset: the subsets differ
    assert 0 <= diffusion["precision_cfg"] <= 1 and 0 <= diffusion["recall_cfg"] <= 1
    assert set(diffusion["by_step"]) == {"3"} and diffusion["train_steps"] == 4.0  # the step-3 snapshot
    assert math.isfinite(diffusion["by_step"]["3"]["gfid_cfg"])


def test_stage3_shares_stage2s_latent_so_its_probe_is_the_same(evaluated: dict) -> None:
    tok = evaluated["metrics"]["tokenizer"]
    assert tok["refine_decoder"]["lp_top1"] == tok["align_perceptual"]["lp_top1"]


def test_rfid_matches_an_independent_computation_on_the_same_images(evaluated: dict, params: Params) -> None:
    """Reconstruct the same validation images, extract Inception features, and compute the Fréchet distance
    with scipy's sqrtm against the cached reference features: the stage's figure must agree."""
    from scipy import linalg

    from aligntok.data.loader import load_split
    from aligntok.eval.inception import InceptionFeatures
    from aligntok.tokenizer.api import Tokenizer

    paths, cfg = evaluated["paths"], params.evaluate
    images, _ = load_split(paths.data, "val", limit=cfg.recon_images).batch(
        torch.arange(cfg.recon_images))
    tokenizer = Tokenizer.load(paths.tokenizers / "align_latent")
    with torch.no_grad():
        feats = InceptionFeatures()(tokenizer.decode(tokenizer.encode(images)).clamp(0, 1)).double().numpy()
    ref = load_reference(paths.reference, cfg)["val"].features.astype(np.float64)
    mu1, mu2 = feats.mean(0), ref.mean(0)
    s1, s2 = np.cov(feats, rowvar=False), np.cov(ref, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    got = evaluated["metrics"]["tokenizer"]["align_latent"]["rfid"]
    assert got == pytest.approx(expected, rel=2e-2)
    from torchmetrics.image.kid import poly_mmd  # 6 of each: KID's subsets are all of both sets

    kid = float(poly_mmd(torch.from_numpy(ref), torch.from_numpy(feats)))
    assert evaluated["metrics"]["tokenizer"]["align_latent"]["rkid"] == pytest.approx(kid, rel=2e-2)


def test_plots_and_grids_are_written(evaluated: dict, params: Params) -> None:
    paths = evaluated["paths"]
    with open(paths.plots / "gfid_vs_steps.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["steps"]) for r in rows] == [1, 2] and all(float(r["gfid"]) > 0 for r in rows)
    with open(paths.plots / "gfid_vs_cfg.csv") as handle:
        assert [float(r["cfg_scale"]) for r in csv.DictReader(handle)] == [1.0, 3.0]
    for stage in (*TOKENIZER_STAGES, "train_dit"):
        with open(paths.plots / f"loss_{stage}.csv") as handle:
            losses = list(csv.DictReader(handle))
        assert losses and "loss" in losses[0], stage
    for name in ("recon_align_latent.png", "recon_vae_baseline.png", "samples_cfg.png", "samples_nocfg.png"):
        assert (paths.out / name).stat().st_size > 0
    protocol = json.loads((paths.out / "protocol.json").read_text())
    assert "no classification head" in protocol["inception_score"]
    assert protocol["inception"]["resize"]
    assert (protocol["kid_subsets"], protocol["kid_subset_size"]) == (100, 1000)
    assert (protocol["bootstrap_level"], protocol["bootstrap_resamples"]) == (0.95, 200)
    assert "shifted by the bootstrap bias estimate" in protocol["bootstrap"]


def test_registered_versions_carry_their_evaluation_as_tags(evaluated: dict) -> None:
    import mlflow

    root, metrics = evaluated["root"], evaluated["metrics"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    stage3 = client.get_model_version_by_alias("aligntok-tokenizer", "stage3")
    assert float(stage3.tags["eval_rfid"]) == pytest.approx(metrics["tokenizer"]["refine_decoder"]["rfid"], rel=1e-5)
    assert float(stage3.tags["eval_ssim"]) == pytest.approx(metrics["tokenizer"]["refine_decoder"]["ssim"], rel=1e-5)
    baseline = client.get_model_version_by_alias("aligntok-vae-baseline", "baseline")
    assert float(baseline.tags["eval_lp_top1"]) == pytest.approx(metrics["tokenizer"]["vae_baseline"]["lp_top1"])
    dit = client.search_model_versions("name='aligntok-dit'")[0]
    assert float(dit.tags["eval_gfid_cfg"]) == pytest.approx(metrics["diffusion"]["gfid_cfg"], rel=1e-5)
    assert float(stage3.tags["eval_rkid"]) == pytest.approx(metrics["tokenizer"]["refine_decoder"]["rkid"], rel=1e-5)
    assert float(dit.tags["eval_gkid_cfg_ci_hi"]) == pytest.approx(metrics["diffusion"]["gkid_cfg_ci_hi"], rel=1e-5)
    logged = client.get_run(dit.tags["eval_run_id"]).data.metrics  # snapshot gFIDs flattened, not dropped
    assert logged["diffusion.step3.gfid_cfg"] == pytest.approx(metrics["diffusion"]["by_step"]["3"]["gfid_cfg"])
    assert logged["diffusion.gkid_nocfg"] == pytest.approx(metrics["diffusion"]["gkid_nocfg"])
    assert logged["refine_decoder.rfid_ci_lo"] == pytest.approx(metrics["tokenizer"]["refine_decoder"]["rfid_ci_lo"])


def test_a_reference_built_for_other_counts_is_refused(evaluated: dict, params: Params) -> None:
    other = params.evaluate.model_copy(update={"reference_images": 17})
    with pytest.raises(ValueError, match="rerun the fid_reference stage"):
        load_reference(evaluated["paths"].reference, other)


def _evaluate_as_a_rank(raw: dict, root_dir: str, out: str) -> dict | None:
    """fid_reference then evaluate (no registry) of the module's trained models, as one rank."""
    from pathlib import Path

    root, out_dir = Path(root_dir), Path(out)
    params = parse_params(raw)
    summary = build_reference(root / "data", root / "encoder", out_dir / "reference", params.evaluate, progress=False,
                              runtime=params.runtime)
    paths = EvalPaths(data=root / "data", encoder=root / "encoder", reference=out_dir / "reference",
                      tokenizers=root / "tokenizer", dit=root / "dit", out=out_dir / "eval",
                      metrics=out_dir / "metrics.json", plots=out_dir / "plots")
    return {"reference": summary, "metrics": run_evaluate(params, paths, register=False, progress=False)}


def test_two_ranks_measure_every_figure_of_one_process(evaluated: dict, tmp_path) -> None:
    """Batches of 2: the references, reconstructions, probe features and samples spread over both ranks (batch
    i on rank i mod 2); rank 0 gathers them in batch order, so every figure and file equals one process's."""
    from support.ranks import spawn_ranks

    raw = {**TINY, "evaluate": {**TINY["evaluate"], "batch_size": 2}}
    two = spawn_ranks(_evaluate_as_a_rank, 2, raw, str(evaluated["root"]), str(tmp_path / "two"))
    one = spawn_ranks(_evaluate_as_a_rank, 1, raw, str(evaluated["root"]), str(tmp_path / "one"))[0]
    assert two[1] == {"reference": {}, "metrics": None}  # rank 1 computes its share and writes nothing
    timing = ("evaluate_seconds", "sampling_seconds")

    def figures(metrics: dict) -> dict:
        return {k: ({kk: vv for kk, vv in v.items() if kk not in timing} if isinstance(v, dict) else v)
                for k, v in metrics.items() if k not in timing}

    assert figures(two[0]["metrics"]) == figures(one["metrics"])
    assert two[0]["reference"] == one["reference"]
    for name in sorted(p.name for p in (tmp_path / "one" / "reference").iterdir()):
        assert (tmp_path / "two" / "reference" / name).read_bytes() == (tmp_path / "one" / "reference" / name).read_bytes()
    for name in sorted(p.name for p in (tmp_path / "one" / "eval").glob("*.png")):  # the grids, pixel for pixel
        assert (tmp_path / "two" / "eval" / name).read_bytes() == (tmp_path / "one" / "eval" / name).read_bytes(), name
    for name in ("gfid_vs_steps.csv", "gfid_vs_cfg.csv", "gfid_vs_train_steps.csv"):
        assert (tmp_path / "two" / "plots" / name).read_text() == (tmp_path / "one" / "plots" / name).read_text()


# ------------------------------------------------------------------------ counts, checked when a stage starts
def _ingest_folder(root, train: int, val: int):
    """An ingest folder that only says its split sizes (the count check reads nothing else)."""
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"counts": {"train": train, "val": val}}))
    return root


def test_evaluate_refuses_counts_the_splits_cannot_supply_before_reading_any_model(tmp_path) -> None:
    """50,000 reconstructions from a 12,812-image val split: refused at the start, naming the key, with no
    reference, tokenizer, encoder or DiT read (none of these paths exists) and nothing written."""
    from aligntok.errors import AligntokError

    data = _ingest_folder(tmp_path / "shards", train=100_000, val=12_812)
    params = parse_params({"evaluate": {"recon_images": 50_000, "probe_train_images": 200_000}})
    missing = tmp_path / "absent"
    paths = EvalPaths(data=data, encoder=missing / "encoder", reference=missing / "reference",
                      tokenizers=missing / "tokenizer", dit=missing / "dit", out=tmp_path / "eval",
                      metrics=tmp_path / "metrics.json", plots=tmp_path / "plots")
    with pytest.raises(AligntokError) as caught:
        run_evaluate(params, paths, register=False, progress=False)
    assert str(caught.value) == (
        f"evaluate.recon_images: 50000 asked, the val split holds 12812 images ({data / 'dataset.json'}); "
        f"evaluate.probe_train_images: 200000 asked, the train split holds 100000 images ({data / 'dataset.json'})")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def test_evaluate_refuses_probe_images_beyond_the_val_split(tmp_path) -> None:
    data = _ingest_folder(tmp_path / "shards", train=5000, val=400)
    params = parse_params({"evaluate": {"recon_images": 100}})  # probe_val_images: 500 by default
    paths = EvalPaths(data=data, encoder=tmp_path / "e", reference=tmp_path / "r", tokenizers=tmp_path / "t",
                      dit=tmp_path / "d", out=tmp_path / "o", metrics=tmp_path / "m.json", plots=tmp_path / "p")
    with pytest.raises(ValueError, match=r"^evaluate\.probe_val_images: 500 asked, the val split holds 400 images"):
        run_evaluate(params, paths, register=False, progress=False)


def test_fid_reference_refuses_counts_the_splits_cannot_supply_before_loading_a_network(tmp_path) -> None:
    from aligntok.errors import AligntokError
    from aligntok.eval.reference import CountError

    data = _ingest_folder(tmp_path / "shards", train=900, val=7039)
    cfg = parse_params({"evaluate": {"reference_images": 1000}}).evaluate
    with pytest.raises(CountError, match=r"^evaluate\.reference_images: 1000 asked, the train split holds 900 "
                                         r"images \(.*dataset\.json\)$"):
        build_reference(data, tmp_path / "no-encoder", tmp_path / "reference", cfg, progress=False)
    assert not (tmp_path / "reference").exists()
    build_counts = parse_params({"evaluate": {"reference_images": 900, "recon_images": 7039}}).evaluate
    with pytest.raises(AligntokError, match="no exported encoder"):  # counts pass: on to the (absent) encoder
        build_reference(data, tmp_path / "no-encoder", tmp_path / "reference", build_counts, progress=False)


def test_precision_recall_counts_are_refused_when_params_load() -> None:
    from aligntok.config import ConfigError

    for key in ("gen_samples", "reference_images"):
        with pytest.raises(ConfigError, match=rf"evaluate\.{key}: 3 is invalid: must be at least 4: precision/recall"):
            parse_params({"evaluate": {key: 3}})
    assert parse_params({"evaluate": {"gen_samples": 4, "reference_images": 4}}).evaluate.gen_samples == 4


# ---------------------------------------------------------------------------------- the pixel probe, 32 px
class _Images:
    """An in-memory image set with the loader's interface: len, batch(indices), labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[indices], self.labels[indices]


def _probe_features(monkeypatch, side: int) -> tuple[dict, Any]:
    """Run `reference_probes` on random `side`-px sets; return the features each probe was given."""
    import aligntok.eval.evaluate as evaluate
    from aligntok.eval.probe import ProbeResult

    seen = []

    def probe(train_x, train_y, val_x, val_y):
        seen.append((train_x, val_x))
        return ProbeResult(top1=0.5, n_train=len(train_x), n_val=len(val_x), dim=train_x.shape[1], classes=2,
                           converged=True)

    monkeypatch.setattr(evaluate, "linear_probe", probe)
    gen = torch.Generator().manual_seed(side)
    sets = evaluate.ProbeSets(train=_Images(torch.rand(7, 3, side, side, generator=gen), torch.arange(7) % 2),
                              val=_Images(torch.rand(5, 3, side, side, generator=gen), torch.arange(5) % 2))
    cfg = parse_params({"evaluate": {"batch_size": 3}}).evaluate
    out = evaluate.reference_probes(sets, lambda x: x.mean(dim=(2, 3)).double(), cfg, progress=False)
    assert out == {"lp_top1_pixels": 0.5, "lp_top1_encoder": 0.5}
    return {"pixels": seen[0], "encoder": seen[1]}, sets



def test_the_pixel_probe_sees_64_px_images_area_averaged_to_32x32(monkeypatch) -> None:
    features, sets = _probe_features(monkeypatch, 64)
    train_x, val_x = features["pixels"]
    assert train_x.shape == (7, 3 * 32 * 32) and val_x.shape == (5, 3072)
    manual = sets.train.images.reshape(7, 3, 32, 2, 32, 2).mean(dim=(3, 5)).flatten(1).double()  # 2x2 cells
    np.testing.assert_allclose(train_x, manual.numpy(), rtol=0, atol=1e-6)


def test_the_pixel_probe_at_32_px_is_bit_identical_to_the_flattened_images(monkeypatch) -> None:
    """The embedded default runs at 32 px: its pixel features, hence its probe figure, are unchanged."""
    features, sets = _probe_features(monkeypatch, 32)
    train_x, val_x = features["pixels"]
    assert np.array_equal(train_x, sets.train.images.flatten(1).double().numpy())
    assert np.array_equal(val_x, sets.val.images.flatten(1).double().numpy())


def test_pixel_features_never_upsample_and_pool_odd_sizes_by_area() -> None:
    from aligntok.eval.probe import PIXEL_SIDE, pixel_features

    small = torch.rand(2, 3, 16, 16)
    assert PIXEL_SIDE == 32 and torch.equal(pixel_features(small), small.flatten(1))  # (2, 768): as they are
    odd = torch.rand(2, 3, 48, 48, dtype=torch.float64)
    expected = torch.nn.functional.interpolate(odd, size=(32, 32), mode="area").flatten(1)
    assert pixel_features(odd).shape == (2, 3072) and torch.allclose(pixel_features(odd), expected, atol=1e-12)
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        pixel_features(torch.zeros(3, 8, 8))

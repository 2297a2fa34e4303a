"""The text-to-image branch end to end on the captioned Fashion-MNIST: ingest -> tokenizers -> text_features ->
t2i_latents -> train_t2i (two tokenizers, registered in a throwaway MLflow) -> evaluate_t2i -> the registered
pyfunc and `aligntok sample --prompt`; plus the skip path of a dataset without captions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from aligntok.config import DataConfig, EncoderConfig, Params, parse_params

from support.tiny import TINY_MODEL, one_thread  # noqa: F401 (fixture)

FMNIST = Path(DataConfig().fashion_mnist_dir)
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not FMNIST.is_dir(), reason=f"{FMNIST} absent")]

STAGE = {"batch_size": 4, "lr": 1e-3, "val_images": 4}
TINY = {
    **TINY_MODEL,
    "data": {**TINY_MODEL["data"], "source": "fashion-mnist-captioned", "max_images": 700, "workers": 1},
    "align_latent": {**STAGE, "train": ["adapter", "decoder"], "steps": 2, "losses": {"gan": 0.0, "perceptual": 0.0}},
    "align_perceptual": {**STAGE, "train": ["encoder", "adapter", "decoder"], "steps": 1,
                         "losses": {"semantic": 1.0, "gan": 0.0, "perceptual": 0.0}},
    "refine_decoder": {**STAGE, "train": ["decoder"], "steps": 1, "losses": {"gan": 0.0, "perceptual": 0.0}},
    "vae_baseline": {**STAGE, "train": ["encoder", "decoder"], "steps": 2,
                     "losses": {"kl": 1e-6, "gan": 0.0, "perceptual": 0.0}},
    "text": {"max_length": 12, "batch_size": 64},
    "t2i": {"tokenizers": ["refine_decoder", "vae_baseline"], "max_images": 48},
    "train_t2i": {"steps": 3, "batch_size": 8, "warmup_steps": 0, "checkpoint_every": 2, "log_every": 1,
                  "sample_every": 3},
    "sample": {"steps": 2, "cfg_scale": 2.0},
    "evaluate_t2i": {"fid_samples": 6, "per_prompt": 1, "seeds": [0, 1], "steps": 2, "judge_train_images": 60,
                     "judge_val_images": 20, "batch_size": 25},
}


@pytest.fixture(scope="module")
def params() -> Params:
    return parse_params(TINY)


@pytest.fixture(scope="module")
def branch(tmp_path_factory: pytest.TempPathFactory, params: Params) -> dict:
    """Every stage of the branch once, in a throwaway MLflow."""
    from aligntok.data.ingest import ingest
    from aligntok.diffusion.t2i_latents import cache_t2i_latents
    from aligntok.diffusion.t2i_train import T2IPaths, run_train_t2i
    from aligntok.encoder import export_encoder
    from aligntok.eval.t2i import T2IEvalPaths, run_evaluate_t2i
    from aligntok.text.features import cache_text_features
    from aligntok.tokenizer.stages import StagePaths, run_tokenizer_stage

    root = tmp_path_factory.mktemp("t2i")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.chdir(root)
    try:
        data = root / "data"
        ingest(params.data.source, data, params.data, progress=False, limit=params.data.max_images)
        export_encoder(EncoderConfig(**TINY["encoder"]), root / "encoder")
        tokenizers = root / "tokenizer"
        previous = {"align_perceptual": "align_latent", "refine_decoder": "align_perceptual"}
        for stage in ("align_latent", "align_perceptual", "refine_decoder", "vae_baseline"):
            prev = tokenizers / previous[stage] if stage in previous else None
            run_tokenizer_stage(stage, params, StagePaths(data=data, encoder=root / "encoder", out=tokenizers / stage,
                                                          previous=prev, checkpoints=root / "ckpt"),
                                progress=False, register=False)
        text = cache_text_features(data, root / "text", params.text, progress=False)
        latents = cache_t2i_latents(params, tokenizers, data, root / "latents", progress=False)
        paths = T2IPaths(latents=root / "latents", text=root / "text", tokenizers=tokenizers, out=root / "t2i",
                         checkpoints=root / "ckpt")
        trained = run_train_t2i(params, paths, progress=False)
        eval_paths = T2IEvalPaths(data=data, encoder=root / "encoder", text=root / "text", models=root / "t2i",
                                  out=root / "reports" / "t2i", metrics=root / "reports" / "t2i.json",
                                  report=root / "reports" / "t2i.md")
        metrics = run_evaluate_t2i(params, eval_paths, progress=False)
        yield {"root": root, "data": data, "text": text, "latents": latents, "trained": trained, "paths": paths,
               "eval_paths": eval_paths, "metrics": metrics}
    finally:
        mp.undo()


def test_text_features_hold_one_row_per_distinct_caption(branch: dict) -> None:
    from aligntok.text.features import TextFeatureSet, split_captions

    features = TextFeatureSet(branch["root"] / "text")
    captions = {**split_captions(branch["data"], "train"), **split_captions(branch["data"], "val")}
    assert features.captions == sorted(set(captions.values()))
    assert branch["text"]["distinct"] == len(features.captions) < len(captions)  # templates repeat
    keys = sorted(split_captions(branch["data"], "train"))[:5]
    rows = features.rows("train", keys)
    assert [features.captions[r] for r in rows] == [captions[k] for k in keys]
    batch = features.gather(rows)
    assert batch.tokens.shape == (5, 12, features.width) and batch.mask.dtype == torch.bool
    assert not batch.tokens[~batch.mask].any()  # padding is zero
    assert features.encoder["sha256"].startswith("53aa5117")


def test_every_tokenizer_caches_the_same_captioned_images(branch: dict) -> None:
    from aligntok.diffusion.latents import load_latents
    from aligntok.diffusion.t2i_train import latent_keys

    keys = {name: latent_keys(load_latents(branch["root"] / "latents" / name))
            for name in ("refine_decoder", "vae_baseline")}
    assert keys["refine_decoder"] == keys["vae_baseline"] and len(keys["refine_decoder"]) == 48


def test_one_model_per_tokenizer_is_trained_saved_and_registered(branch: dict) -> None:
    import mlflow

    root = branch["root"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    for name in ("refine_decoder", "vae_baseline"):
        metrics = branch["trained"][name]
        assert metrics["steps"] == 3.0 and math.isfinite(metrics["final_loss"])
        version = client.get_model_version_by_alias("aligntok-t2i", name.replace("_", "-"))
        assert version.tags["tokenizer_stage"] == name
        receipt = json.loads((root / "t2i" / name / "receipt.json").read_text())
        assert str(receipt["version"]) == str(version.version)
    assert json.loads((root / "t2i" / "receipt.json").read_text()) == \
        json.loads((root / "t2i" / "refine_decoder" / "receipt.json").read_text())


def test_training_is_deterministic_and_resumes_to_the_same_weights(branch: dict, params: Params,
                                                                     tmp_path: Path) -> None:
    """A fresh run in another folder gives the same weights (a pure function of seed and step)."""
    from safetensors.torch import load_file

    from aligntok.diffusion.t2i_train import T2IPaths, run_train_t2i

    root = branch["root"]
    one = params.model_copy(update={"t2i": params.t2i.model_copy(update={"tokenizers": ["vae_baseline"]})})
    run_train_t2i(one, T2IPaths(latents=root / "latents", text=root / "text", tokenizers=root / "tokenizer",
                                out=tmp_path / "t2i", checkpoints=tmp_path / "ckpt"), register=False, progress=False)
    a = load_file(root / "t2i" / "vae_baseline" / "t2i.safetensors")
    b = load_file(tmp_path / "t2i" / "vae_baseline" / "t2i.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluation_measures_both_models_on_seen_and_held_out_prompts(branch: dict) -> None:
    metrics = json.loads(branch["eval_paths"].metrics.read_text())["t2i"]
    assert set(metrics["models"]) == {"refine_decoder", "vae_baseline"}
    for name, model in metrics["models"].items():
        figures = model["figures"]
        for key in ("fid_cfg", "fid_nocfg", "agreement_cfg", "agreement_nocfg", "agreement_seen_cfg",
                    "agreement_held_out_cfg", "colour_held_out_cfg", "garment_seen_nocfg"):
            assert math.isfinite(figures[key]["mean"]) and len(figures[key]["values"]) == 2, (name, key)
            assert figures[key]["mean"] == pytest.approx(np.mean(figures[key]["values"]))
        for key in ("agreement_cfg", "agreement_held_out_cfg", "colour_seen_nocfg"):
            assert 0.0 <= figures[key]["mean"] <= 1.0
        assert figures["fid_cfg"]["mean"] > 0
        assert model["receipt"]["version"]
    real = metrics["judges_on_real"]
    assert 0.0 <= real["garment"] <= 1.0 and real["colour"] >= 0.9  # the colour judge reads real tints back
    assert sorted(metrics["protocol"]["held_out_pairs"]) == ["a blue bag", "a green dress", "a red sandal",
                                                            "a yellow coat"]
    report = branch["eval_paths"].report.read_text()
    assert "held-out" in report and metrics["mlflow_run_id"] in report
    assert (branch["eval_paths"].out / "prompts_refine_decoder.png").is_file()


def test_registered_versions_carry_their_evaluation(branch: dict) -> None:
    import mlflow

    root = branch["root"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    metrics = json.loads(branch["eval_paths"].metrics.read_text())["t2i"]
    logged = client.get_run(metrics["mlflow_run_id"]).data.metrics
    for name in ("refine_decoder", "vae_baseline"):
        version = client.get_model_version_by_alias("aligntok-t2i", name.replace("_", "-"))
        figures = metrics["models"][name]["figures"]
        assert float(version.tags["eval_agreement_cfg"]) == pytest.approx(figures["agreement_cfg"]["mean"], abs=1e-5)
        assert float(version.tags["eval_fid_cfg"]) == pytest.approx(figures["fid_cfg"]["mean"], rel=1e-5)
        assert logged[f"{name}.fid_cfg"] == pytest.approx(figures["fid_cfg"]["mean"], rel=1e-6)
        assert version.tags["eval_run_id"] == metrics["mlflow_run_id"]


def test_the_registered_pyfunc_draws_a_prompt_as_the_folder_does(branch: dict) -> None:
    import mlflow

    from aligntok.diffusion.t2i_api import TextToImageModel

    root = branch["root"]  # the fixture's MLFLOW_TRACKING_URI names the registry (no global set_tracking_uri)
    served = mlflow.pyfunc.load_model("models:/aligntok-t2i@refine-decoder")
    request = {"prompts": ["a red sandal", "a photo of a blue bag"], "steps": 2, "cfg_scale": 3.0, "seed": 5}
    images = np.asarray(served.predict(request))
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0.0 and images.max() <= 1.0
    local = TextToImageModel.load(root / "t2i" / "refine_decoder").generate(request["prompts"], steps=2,
                                                                            cfg_scale=3.0, seed=5)
    assert np.allclose(images, local.numpy(), atol=1e-5)
    again = TextToImageModel.load(root / "t2i" / "refine_decoder").generate(["a red sandal"], steps=2,
                                                                            cfg_scale=3.0, seed=5)
    assert not torch.allclose(again[0], local[1])  # a different prompt draws a different image


def test_sample_prompt_writes_a_grid(branch: dict, tmp_path: Path) -> None:
    from PIL import Image

    from aligntok.cli import main

    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(branch["root"] / "t2i" / "vae_baseline"), "--prompt", "a green dress",
                 "--prompt", "a yellow coat", "--per-class", "3", "--steps", "2", "--out", str(out)]) == 0
    grid = Image.open(out)
    assert grid.size == (2 + 2 * 18, 2 + 3 * 18)  # 2 prompt columns, 3 rows of 16 px images, 2 px padding
    assert sorted(p.name for p in tmp_path.glob("grid/*.png"))[:2] == ["000_000_a_green_dress.png",
                                                                       "000_001_a_yellow_coat.png"]
    assert len(list(tmp_path.glob("grid/*.png"))) == 6


def test_a_dataset_without_captions_skips_every_t2i_stage(params: Params, tmp_path: Path) -> None:
    from aligntok.diffusion.t2i_train import T2IPaths, run_train_t2i
    from aligntok.text.features import cache_text_features

    from support.shards import write_dataset

    data = write_dataset(tmp_path / "data")
    summary = cache_text_features(data, tmp_path / "text", params.text, progress=False)
    assert "no training record has a caption" in summary["skipped"]
    result = run_train_t2i(params, T2IPaths(latents=tmp_path / "latents", text=tmp_path / "text",
                                            tokenizers=tmp_path / "tok", out=tmp_path / "t2i"), progress=False)
    assert result == {"skipped": summary["skipped"]}
    assert json.loads((tmp_path / "t2i" / "skipped.json").read_text())["skipped"] == summary["skipped"]


def _train_t2i_as_a_rank(raw: dict, root: str, out: str) -> dict:
    """train_t2i of the vae_baseline model (no registry), as one rank of a spawned group."""
    from aligntok.diffusion.t2i_train import T2IPaths, run_train_t2i

    params = parse_params({**raw, "t2i": {**raw["t2i"], "tokenizers": ["vae_baseline"]}})
    base, folder = Path(root), Path(out)
    return run_train_t2i(params, T2IPaths(latents=base / "latents", text=base / "text", tokenizers=base / "tokenizer",
                                          out=folder / "t2i", checkpoints=folder / "ckpt"),
                         register=False, progress=False)


def test_two_processes_train_the_one_process_weights(branch: dict, tmp_path: Path) -> None:
    """The global batch of every step is drawn on the CPU and sliced by rank, so 2 gloo ranks of 4 samples each
    train the weights that one process of 8 does (up to float32 reduction order)."""
    from safetensors.torch import load_file

    from support.ranks import spawn_ranks

    two = spawn_ranks(_train_t2i_as_a_rank, 2, TINY, str(branch["root"]), str(tmp_path / "two"))
    one = spawn_ranks(_train_t2i_as_a_rank, 1, TINY, str(branch["root"]), str(tmp_path / "one"))[0]
    assert two[0]["vae_baseline"]["world_size"] == 2.0 and one["vae_baseline"]["world_size"] == 1.0
    assert two[0]["vae_baseline"]["final_loss"] == pytest.approx(one["vae_baseline"]["final_loss"], rel=1e-4)
    assert not (tmp_path / "two" / "t2i" / "vae_baseline" / "receipt.json").exists()
    a = load_file(tmp_path / "one" / "t2i" / "vae_baseline" / "t2i.safetensors")
    b = load_file(tmp_path / "two" / "t2i" / "vae_baseline" / "t2i.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        scale = max(a[key].abs().max().item(), 1e-6)
        assert (a[key] - b[key]).abs().max().item() / scale < 1e-3, key

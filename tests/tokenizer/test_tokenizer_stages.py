"""The tokenizer stages end to end on a tiny dataset: what each stage trains, the semantic
target, resume after SIGKILL, and registration in MLflow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from aligntok.config import ConfigError, EncoderConfig, Params, parse_params
from aligntok.encoder import export_encoder
from aligntok.tokenizer.api import Tokenizer
from aligntok.tokenizer.objective import SemanticTarget
from aligntok.tokenizer.stages import StagePaths, build_stage_model, run_tokenizer_stage

from support.shards import write_dataset
from support.tiny import TINY_MODEL

TINY = {
    **TINY_MODEL,
    "align_latent": {"train": ["adapter", "decoder"], "steps": 4, "batch_size": 4, "lr": 1e-3,
                     "checkpoint_every": 2, "val_images": 4, "losses": {"gan_start": 2}},
    "align_perceptual": {"train": ["encoder", "adapter", "decoder"], "steps": 3, "batch_size": 4, "lr": 1e-3,
                         "encoder_lr_scale": 1.0, "ema_decay": 0.5, "val_images": 4,
                         "losses": {"semantic": 1.0}},
    "refine_decoder": {"train": ["decoder"], "steps": 3, "batch_size": 4, "lr": 1e-3, "val_images": 4},
}


@pytest.fixture(scope="module")
def params() -> Params:
    return parse_params(TINY)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, params: Params) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("inputs")
    data = write_dataset(root / "data")
    export_encoder(EncoderConfig(**TINY["encoder"]), root / "encoder")
    return data, root / "encoder"


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, params: Params, inputs: tuple[Path, Path]) -> dict[str, Path]:
    """Stages 1-3 run once (no registry) for the tests that inspect their outputs."""
    root = tmp_path_factory.mktemp("chain")
    data, encoder = inputs
    folders: dict[str, Path] = {}
    previous = None
    for stage in ("align_latent", "align_perceptual", "refine_decoder"):
        folders[stage] = root / stage
        paths = StagePaths(data=data, encoder=encoder, out=folders[stage], previous=previous,
                           checkpoints=root / "checkpoints")
        run_tokenizer_stage(stage, params, paths, register=False, progress=False)
        previous = folders[stage]
    return folders


def weights(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(folder / "tokenizer.safetensors")).items() if k.startswith(prefix)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage1_leaves_the_encoder_bit_for_bit_and_trains_adapter_and_decoder(
        chain: dict[str, Path], params: Params, inputs: tuple[Path, Path]) -> None:
    data, encoder = inputs
    torch.manual_seed(params.align_latent.seed)  # the stage seeds the same way before building
    initial, _ = build_stage_model("align_latent", params, StagePaths(data=data, encoder=encoder, out=Path()))
    start = {k: v for k, v in initial.state_dict().items()}
    trained = load_file(str(chain["align_latent"] / "tokenizer.safetensors"))
    exported = load_file(str(encoder / "encoder.safetensors"))
    encoder_keys = [k for k in trained if k.startswith("encoder.vit.")]
    assert encoder_keys and all(torch.equal(trained[k], exported[k.removeprefix("encoder.vit.")]) for k in encoder_keys)
    for role in ("adapter.", "decoder."):
        changed = [k for k in trained if k.startswith(role) and not torch.equal(trained[k], start[k])]
        assert changed, f"no {role} parameter changed in stage 1"


def test_stage2_fine_tunes_everything_and_stage3_only_the_decoder(chain: dict[str, Path]) -> None:
    s1, s2, s3 = chain["align_latent"], chain["align_perceptual"], chain["refine_decoder"]
    for role in ("encoder.", "adapter.", "decoder."):
        assert not same(weights(s1, role), weights(s2, role)), f"stage 2 did not train {role}"
    assert same(weights(s2, "encoder."), weights(s3, "encoder."))
    assert same(weights(s2, "adapter."), weights(s3, "adapter."))
    assert not same(weights(s2, "decoder."), weights(s3, "decoder."))


def test_semantic_target_is_the_frozen_stage1_snapshot(chain: dict[str, Path]) -> None:
    stage1 = Tokenizer.load(chain["align_latent"])
    model = Tokenizer.load(chain["align_latent"]).model
    target = SemanticTarget(model)
    images = torch.rand(2, 3, 16, 16)
    before = target(images)
    with torch.no_grad():  # the live encoder moves, as in stage 2
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    assert torch.equal(target(images), before)
    assert (before - stage1.encode(images)).abs().max() < 1e-5, (before - stage1.encode(images)).abs().max()
    assert not torch.allclose(model.encode(images), before)
    assert all(not p.requires_grad for p in target.parameters())


def test_outputs_load_and_round_trip(chain: dict[str, Path]) -> None:
    tokenizer = Tokenizer.load(chain["refine_decoder"] / "tokenizer.safetensors")
    images = torch.rand(5, 3, 16, 16)
    latents = tokenizer.encode(images)
    assert latents.shape == (5, 4, 4, 4)
    decoded = tokenizer.decode(latents)
    assert decoded.shape == (5, 3, 16, 16) and 0 <= decoded.min() and decoded.max() <= 1
    metrics = yaml.safe_load((chain["refine_decoder"] / "metrics.json").read_text())["refine_decoder"]
    assert {"val_psnr", "val_ssim"} <= set(metrics) and np.isfinite(metrics["val_psnr"])
    with pytest.raises(ValueError, match=r"latents \(B, \(4, 4, 4\)\)"):
        tokenizer.decode(torch.zeros(1, 3, 4, 4))


def _stage_command(params_file: Path, inputs: tuple[Path, Path], out: Path, checkpoints: Path) -> list[str]:
    data, encoder = inputs
    report = out.parent / "validation.json"  # the shards passed `validate`
    report.write_text('{"success": true, "data_dir": "data", "failed": []}')
    return [sys.executable, "-m", "aligntok", "--params", str(params_file), "align_latent", "--data", str(data),
            "--encoder", str(encoder), "--out", str(out), "--checkpoints", str(checkpoints),
            "--validation", str(report), "--no-register", "--no-progress"]


@pytest.mark.slow  # SIGKILL and resume: ~40 s; `make test-slow`
def test_sigkill_mid_stage_then_rerun_resumes_to_identical_weights(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    raw = {**TINY, "align_latent": {**TINY["align_latent"], "steps": 24, "checkpoint_every": 3,
                                    "losses": {"gan_start": 6}}}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_stage_command(params_file, inputs, reference, tmp_path / "ck-ref"), check=True, env=env,
                   capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    checkpoints = tmp_path / "ck"
    process = subprocess.Popen(_stage_command(params_file, inputs, killed, checkpoints), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        sidecars = list(checkpoints.glob("align_latent/*.json"))
        if sidecars and yaml.safe_load(sidecars[0].read_text())["step"] >= 9:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the stage finished before it could be killed; make it longer"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    step_at_kill = yaml.safe_load(sidecars[0].read_text())["step"]
    assert 9 <= step_at_kill < 24 and not (killed / "tokenizer.safetensors").exists()

    rerun = subprocess.run(_stage_command(params_file, inputs, killed, checkpoints), env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming from step {step_at_kill}" in rerun.stderr
    a, b = load_file(str(reference / "tokenizer.safetensors")), load_file(str(killed / "tokenizer.safetensors"))
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_three_stages_register_versions_and_aliases(params: Params, inputs: tuple[Path, Path],
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    data, encoder = inputs
    previous = None
    for number, stage in enumerate(("align_latent", "align_perceptual", "refine_decoder"), start=1):
        out = tmp_path / stage
        result = run_tokenizer_stage(stage, params, StagePaths(data=data, encoder=encoder, out=out,
                                     previous=previous, checkpoints=tmp_path / "ck"), progress=False)
        receipt = yaml.safe_load((out / "receipt.json").read_text())
        assert receipt == {**result.receipt, "version": str(number), "alias": f"stage{number}",
                           "model": "aligntok-tokenizer"}
        previous = out
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    for number in (1, 2, 3):
        version = client.get_model_version_by_alias("aligntok-tokenizer", f"stage{number}")
        assert str(version.version) == str(number)
        stage = ("align_latent", "align_perceptual", "refine_decoder")[number - 1]
        assert version.tags["stage"] == stage
        assert len(version.tags["manifest_sha256"]) == 64 and version.tags["git_commit"]
        run = client.get_run(version.run_id)
        assert "val_psnr" in run.data.metrics and "loss" in run.data.metrics
        assert run.data.params[f"{stage}.steps"] and run.data.params["tokenizer.decoder.channels"]
    model = mlflow.pyfunc.load_model("models:/aligntok-tokenizer@stage3")
    images = np.random.default_rng(0).random((3, 3, 16, 16), dtype=np.float32)
    latents = model.predict({"op": "encode", "images": images})
    assert latents.shape == (3, 4, 4, 4)
    expected = Tokenizer.load(tmp_path / "refine_decoder").encode(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(latents, expected, rtol=0, atol=1e-6)
    decoded = model.predict({"op": "decode", "latents": latents})
    assert decoded.shape == (3, 3, 16, 16)
    artifacts = client.list_artifacts(version.run_id, "images")
    assert artifacts == [] or all(a.path.endswith(".png") for a in artifacts)


def test_encode_and_decode_commands_on_image_files(chain: dict[str, Path], tmp_path: Path,
                                                   imagenet_sample: Path) -> None:
    from aligntok.cli import main

    photos = sorted(imagenet_sample.glob("*.JPEG"))[:3]
    latents = tmp_path / "latents.safetensors"
    model = str(chain["refine_decoder"])
    assert main(["encode", *map(str, photos), "--model", model, "--out", str(latents)]) == 0
    assert load_file(str(latents))["latents"].shape == (3, 4, 4, 4)
    assert main(["decode", str(latents), "--model", model, "--out-dir", str(tmp_path / "decoded")]) == 0
    written = sorted((tmp_path / "decoded").glob("*.png"))
    assert [p.stem for p in written] == sorted(p.stem for p in photos)
    from PIL import Image

    assert Image.open(written[0]).size == (16, 16)


def test_encode_command_names_an_unreadable_file(chain: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from aligntok.cli import main

    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    code = main(["encode", str(bad), "--model", str(chain["refine_decoder"]), "--out", str(tmp_path / "z.st")])
    assert code == 1
    assert f"{bad}: cannot read image" in capsys.readouterr().err


def test_a_stage_refuses_a_previous_folder_of_another_row(params: Params, inputs: tuple[Path, Path],
                                                          chain: dict[str, Path], tmp_path: Path) -> None:
    data, encoder = inputs
    wrong = StagePaths(data=data, encoder=encoder, out=tmp_path / "out", previous=chain["align_latent"])
    with pytest.raises(ConfigError, match=r"refine_decoder starts from align_perceptual \(aligned\), but .*"
                                          r"align_latent holds align_latent \(aligned\)"):
        build_stage_model("refine_decoder", params, wrong)
    with pytest.raises(ConfigError, match=r"starts from align_perceptual \(refine_decoder.start_from\): give"):
        build_stage_model("refine_decoder", params, StagePaths(data=data, encoder=encoder, out=tmp_path / "out"))

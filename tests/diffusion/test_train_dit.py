"""train_dit end to end on a tiny latent cache: the global-batch slicing, batches gathered from the mapped
cache, registration + pyfunc, and `aligntok sample` (two processes against one: tests/test_distributed.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from aligntok.config import CacheLatentsConfig, EncoderConfig, Params, parse_params
from aligntok.diffusion.latent_writer import cache_latents
from aligntok.diffusion.latents import load_latents
from aligntok.data.loader import step_generator
from aligntok.diffusion.dit import build_dit
from aligntok.diffusion.flow import FlowDraws, draw_flow, flow_matching_loss
from aligntok.diffusion.train import DiTPaths, FlowMatchingObjective, _fingerprint, run_train_dit, step_batch
from aligntok.encoder import export_encoder
from aligntok.tokenizer.stages import StagePaths, run_tokenizer_stage

from support.tiny import QUICK_STAGE1, TINY_MODEL, one_thread  # noqa: F401 (fixture)
from support.shards import write_dataset

TINY = {
    **TINY_MODEL,
    "align_latent": QUICK_STAGE1,
    "dit": {"preset": "LightningDiT-T/1", "class_dropout": 0.2},
    "train_dit": {"steps": 6, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "ema_decay": 0.9,
                  "checkpoint_every": 3, "log_every": 1, "sample_every": 6},
    "sample": {"steps": 3, "cfg_scale": 2.0},
}


pytestmark = pytest.mark.usefixtures("one_thread")  # see support.tiny.one_thread


@pytest.fixture(scope="module")
def params() -> Params:
    return parse_params(TINY)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, params: Params) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dit")
    data = write_dataset(root / "data")
    export_encoder(EncoderConfig(**TINY["encoder"]), root / "encoder")
    run_tokenizer_stage("align_latent", params, StagePaths(data=data, encoder=root / "encoder",
                        out=root / "tokenizer", checkpoints=root / "ckpt"), register=False, progress=False)
    cache_latents(root / "tokenizer", data, root / "latents", CacheLatentsConfig(max_images=None, batch_size=8,
                  shard_size=10), progress=False)
    return {"root": root, "latents": root / "latents", "tokenizer": root / "tokenizer"}


def test_rank_slices_make_up_the_global_batch(setup: dict[str, Path]) -> None:
    latents = load_latents(setup["latents"])
    whole = step_batch(latents, 5, 8, 0, 0.5, 0.0, 1.0)
    halves = [step_batch(latents, 5, 8, 0, 0.5, 0.0, 1.0, rank, 2) for rank in (0, 1)]
    for field in ("z0", "y", "t", "eps", "drop"):
        assert torch.equal(torch.cat([getattr(h, field) for h in halves]), getattr(whole, field)), field
    again = step_batch(latents, 5, 8, 0, 0.5, 0.0, 1.0)
    assert torch.equal(again.eps, whole.eps) and not torch.equal(step_batch(latents, 6, 8, 0, 0.5, 0.0, 1.0).eps,
                                                                 whole.eps)
    # t, eps and the label dropout are the step's "flow" stream, drawn as flow_matching_loss draws
    g = step_generator(0, 5, "flow")
    draws = draw_flow(8, latents.latent_shape, g, 0.0, 1.0)
    assert torch.equal(whole.t, draws.t) and torch.equal(whole.eps, draws.eps)
    assert torch.equal(whole.drop, torch.rand(8, generator=g) < 0.5)


def test_step_streams_are_distinct_and_pure() -> None:
    def first(seed: int, step: int, stream: str) -> torch.Tensor:
        return torch.rand(4, generator=step_generator(seed, step, stream))

    draws = {(seed, step, stream): first(seed, step, stream)
             for seed in (0, 1) for step in (0, 1, 2, 3) for stream in ("batch", "flip", "flow")}
    values = list(draws.values())
    assert all(not torch.equal(a, b) for i, a in enumerate(values) for b in values[i + 1:])
    assert torch.equal(first(1, 3, "flow"), draws[(1, 3, "flow")])
    with pytest.raises(ValueError, match="unknown random stream 'noise'"):
        step_generator(0, 0, "noise")


def test_the_training_objective_is_the_tested_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    import aligntok.diffusion.train as train

    torch.manual_seed(0)
    model = build_dit(parse_params(TINY).dit, 4, 4, 3)
    with torch.no_grad():  # off the zero init, so that the labels (and their dropout) matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    z0, y = torch.randn(6, 4, 4, 4, generator=g), torch.randint(3, (6,), generator=g)
    draws = draw_flow(6, (4, 4, 4), g)
    drop = torch.tensor([True, False, True, False, False, True])
    batch = train.StepBatch(z0=z0, y=y, t=draws.t, eps=draws.eps, drop=drop)

    calls: list[FlowDraws] = []

    def spy(*args, **kwargs):  # the real function, noting that training called it
        calls.append(kwargs["draws"])
        return flow_matching_loss(*args, **kwargs)

    monkeypatch.setattr(train, "flow_matching_loss", spy)
    trained = FlowMatchingObjective(model)(batch, step=0).main
    assert len(calls) == 1 and torch.equal(calls[0].t, draws.t) and torch.equal(calls[0].eps, draws.eps)
    tested = flow_matching_loss(lambda z, t, y: model(z, t, y, force_drop=drop), z0, y, draws=draws).loss
    assert torch.equal(trained, tested)
    no_drop = flow_matching_loss(lambda z, t, y: model(z, t, y, force_drop=torch.zeros_like(drop)), z0, y,
                                 draws=draws).loss
    assert not torch.equal(trained, no_drop)  # the label dropout reaches the model


def test_a_run_sets_stale_checkpoints_aside(setup: dict[str, Path], params: Params, tmp_path: Path) -> None:
    folder = tmp_path / "ck" / "train_dit"
    folder.mkdir(parents=True)
    stale = ["0123456789abcdef.safetensors", "0123456789abcdef.json", ".0123456789abcdef.json.tmp-7"]
    for name in stale:
        (folder / name).write_text("old")
    run_train_dit(params, DiTPaths(latents=setup["latents"], tokenizer=setup["tokenizer"], out=tmp_path / "out",
                  checkpoints=tmp_path / "ck"), register=False, progress=False)
    key = _fingerprint(params, DiTPaths(latents=setup["latents"], tokenizer=setup["tokenizer"], out=tmp_path))
    assert sorted(p.name for p in folder.iterdir()) == [f"{key}.json", f"{key}.safetensors", "stale"]
    assert sorted(p.name for p in (folder / "stale").iterdir()) == sorted(stale[:2])


def test_training_gathers_each_step_from_the_mapped_cache(setup: dict[str, Path], params: Params, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """No whole-cache tensor: each step gathers its batch's rows from the shard maps, and the labels are never
    concatenated (the class count comes from stats.json's class names)."""
    from aligntok.diffusion.latents import LatentSet

    sizes: list[int] = []
    gather = LatentSet.gather

    def spy(self: LatentSet, indices: torch.Tensor, flips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sizes.append(len(indices))
        return gather(self, indices, flips)

    monkeypatch.setattr(LatentSet, "gather", spy)
    monkeypatch.setattr(LatentSet, "labels", lambda self: pytest.fail("train_dit read every label"))
    metrics = run_train_dit(params, DiTPaths(latents=setup["latents"], tokenizer=setup["tokenizer"],
                                             out=tmp_path / "out", checkpoints=tmp_path / "ck"),
                            register=False, progress=False)
    assert metrics["steps"] == 6 and sizes == [8] * 6
    assert json.loads((tmp_path / "out" / "dit.json").read_text())["num_classes"] == 3


def test_fingerprint_covers_the_code(params: Params, tmp_path: Path) -> None:
    (tmp_path / "stats.json").write_text("{}")
    paths = DiTPaths(latents=tmp_path, tokenizer=tmp_path, out=tmp_path)
    assert _fingerprint(params, paths, code="a") != _fingerprint(params, paths, code="b")
    assert _fingerprint(params, paths) != _fingerprint(params, paths, code="a")  # "": the code left out


def test_registered_model_samples_and_sample_command(setup: dict[str, Path], params: Params, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from aligntok.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "dit"
    run_train_dit(params, DiTPaths(latents=setup["latents"], tokenizer=setup["tokenizer"], out=out,
                  checkpoints=tmp_path / "ck"), progress=False)
    receipt = yaml.safe_load((out / "receipt.json").read_text())
    assert receipt["model"] == "aligntok-dit" and receipt["version"] == "1"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    artifacts = [a.path for a in client.list_artifacts(receipt["run_id"], "images")]
    assert artifacts and all(a.endswith(".png") for a in artifacts)
    model = mlflow.pyfunc.load_model("models:/aligntok-dit@latest")
    images = model.predict({"labels": [0, 1, 2], "steps": 3, "cfg_scale": 2.0, "seed": 7})
    assert images.shape == (3, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    again = model.predict({"labels": [0, 1, 2], "steps": 3, "cfg_scale": 2.0, "seed": 7})
    np.testing.assert_array_equal(images, again)

    grid = tmp_path / "samples" / "grid.png"
    assert main(["sample", "--model", str(out), "--classes", "0", "2", "--per-class", "2", "--steps", "3",
                 "--cfg", "1.5", "--seed", "1", "--out", str(grid)]) == 0
    from PIL import Image

    assert Image.open(grid).size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)
    assert len(list((tmp_path / "samples" / "grid").glob("*.png"))) == 4


@pytest.mark.slow  # SIGKILL and resume: ~25 s; `make test-slow`
def test_sigkill_mid_training_then_rerun_gives_the_same_weights(setup: dict[str, Path], tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    raw = {**TINY, "train_dit": {**TINY["train_dit"], "steps": 80, "checkpoint_every": 5, "log_every": 5,
                                 "sample_every": 1000}}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))

    def command(out: str, checkpoints: str) -> list[str]:
        return [sys.executable, "-m", "aligntok", "--params", str(params_file), "train_dit", "--latents",
                str(setup["latents"]), "--tokenizer", str(setup["tokenizer"]), "--out", str(tmp_path / out),
                "--checkpoints", str(tmp_path / checkpoints), "--no-register", "--no-progress"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command("reference", "ck-ref"), check=True, env=env, capture_output=True, timeout=300)
    process = subprocess.Popen(command("killed", "ck"), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline, step = time.monotonic() + 240, 0
    while time.monotonic() < deadline and process.poll() is None:
        sidecars = list((tmp_path / "ck").glob("train_dit/*.json"))
        if sidecars:
            try:
                step = json.loads(sidecars[0].read_text())["step"]
            except (ValueError, KeyError):  # caught mid-rename: read again
                step = 0
            if step >= 10:
                break
        time.sleep(0.02)
    assert process.poll() is None, "training finished before it could be killed; make it longer"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert 10 <= step < 80 and not (tmp_path / "killed" / "dit.safetensors").exists()
    rerun = subprocess.run(command("killed", "ck"), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming from step" in rerun.stderr
    a = load_file(str(tmp_path / "reference" / "dit.safetensors"))
    b = load_file(str(tmp_path / "killed" / "dit.safetensors"))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_compile_switch_trains_eagerly_when_the_compiler_fails(setup: dict[str, Path], params: Params,
                                                                tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """runtime.compile on a machine whose compiler fails: the stage warns, trains eagerly to the same weights."""
    import functools

    def failing_backend(gm: object, example_inputs: object) -> None:
        raise RuntimeError("no C++ compiler on this machine")

    paths = dict(latents=setup["latents"], tokenizer=setup["tokenizer"])
    eager = run_train_dit(params, DiTPaths(**paths, out=tmp_path / "eager", checkpoints=tmp_path / "ck1"),
                          register=False, progress=False)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=failing_backend))
    compiled = parse_params({**TINY, "runtime": {"compile": True}})
    fallback = run_train_dit(compiled, DiTPaths(**paths, out=tmp_path / "fallback", checkpoints=tmp_path / "ck2"),
                             register=False, progress=False)
    assert eager["compiled"] == 0.0 and fallback["compiled"] == 0.0
    assert fallback["final_loss"] == eager["final_loss"]
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "eager" / "dit.safetensors")), load_file(str(tmp_path / "fallback" / "dit.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

"""`ALIGNTOK_RETRAIN=1` (what the pipeline flow sets for a forced stage): a tokenizer stage and train_dit set
their checkpoint aside in `stale/` and train from step 0, to a fresh run's result; cache_latents re-encodes
every shard. Without it a rerun resumes (trains nothing) and skips complete shards."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aligntok.config import CacheLatentsConfig, Params, parse_params
from aligntok.diffusion.latent_writer import cache_latents
from aligntok.diffusion.latents import shard_name
from aligntok.diffusion.train import WEIGHTS as DIT_WEIGHTS
from aligntok.diffusion.train import DiTPaths, _fingerprint, run_train_dit
from aligntok.errors import AligntokError
from aligntok.tokenizer.stages import StagePaths, fingerprint, run_tokenizer_stage
from aligntok.train.checkpoint import RETRAIN_ENV, STALE, read_step, retrain_requested, set_aside_for_retraining

from support.tiny import QUICK_STAGE1, TINY_MODEL, make_inputs, one_thread  # noqa: F401 (fixture)

TINY = {
    **TINY_MODEL,
    "align_latent": {**QUICK_STAGE1, "checkpoint_every": 1},
    "dit": {"preset": "LightningDiT-T/1", "class_dropout": 0.2},
    "train_dit": {"steps": 4, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "ema_decay": 0.9,
                  "checkpoint_every": 2, "log_every": 1, "sample_every": 4, "snapshot_steps": [2]},
    "sample": {"steps": 2, "cfg_scale": 2.0},
}
CACHE = CacheLatentsConfig(max_images=None, batch_size=8, shard_size=10)
pytestmark = pytest.mark.usefixtures("one_thread")  # see support.tiny.one_thread


@pytest.fixture(scope="module")
def params() -> Params:
    return parse_params(TINY)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, params: Params) -> dict[str, Path]:
    """Data, encoder, a fresh stage-1 tokenizer (its own checkpoint folder) and its latent cache."""
    root = tmp_path_factory.mktemp("retrain")
    data, encoder = make_inputs(root)
    run_tokenizer_stage("align_latent", params, StagePaths(data=data, encoder=encoder, out=root / "tokenizer",
                        checkpoints=root / "ckpt-fresh"), register=False, progress=False)
    cache_latents(root / "tokenizer", data, root / "latents", CACHE, progress=False)
    return {"data": data, "encoder": encoder, "tokenizer": root / "tokenizer", "latents": root / "latents"}


def same_tensors(a: Path, b: Path) -> bool:
    left, right = load_file(str(a)), load_file(str(b))
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_the_switch_reads_1_0_or_unset_and_names_a_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RETRAIN_ENV, raising=False)
    assert not retrain_requested()
    for value, expected in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv(RETRAIN_ENV, value)
        assert retrain_requested() is expected
    monkeypatch.setenv(RETRAIN_ENV, "yes")
    with pytest.raises(AligntokError, match=r"ALIGNTOK_RETRAIN='yes': set it to 1"):
        retrain_requested()


def test_setting_aside_twice_keeps_both_earlier_runs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "stage"
    folder.mkdir()
    checkpoint = folder / "00aa.safetensors"
    assert set_aside_for_retraining(checkpoint, "s") == []  # nothing to set aside: nothing said
    for run in ("first", "second"):
        for name in ("00aa.safetensors", "00aa.json", "00aa.safetensors.corrupt"):
            (folder / name).write_text(run)
        (folder / "00aa.snapshots").mkdir()
        (folder / "00aa.snapshots" / "step_000002.safetensors").write_text(run)
        (folder / "11bb.json").write_text("another fingerprint: not ours")
        set_aside_for_retraining(checkpoint, "s")
    assert sorted(p.name for p in folder.iterdir()) == ["11bb.json", STALE]
    stale = folder / STALE
    assert sorted(p.name for p in stale.iterdir()) == sorted(
        f"00aa{n}.{ext}" for n in ("", "-1") for ext in ("safetensors", "json", "safetensors.corrupt", "snapshots"))
    assert (stale / "00aa.json").read_text() == "first" and (stale / "00aa-1.json").read_text() == "second"
    assert (stale / "00aa-1.snapshots" / "step_000002.safetensors").read_text() == "second"
    assert f"s: {RETRAIN_ENV}=1, retraining from step 0: set the earlier run (an unreadable checkpoint) aside in " \
           f"{stale}: 00aa-1.json" in caplog.text


def test_a_forced_tokenizer_stage_trains_from_step_0_and_a_plain_rerun_resumes(
        inputs: dict[str, Path], params: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.delenv(RETRAIN_ENV, raising=False)
    paths = StagePaths(data=inputs["data"], encoder=inputs["encoder"], out=tmp_path / "out",
                       checkpoints=tmp_path / "ck")
    folder = tmp_path / "ck" / "align_latent"
    key = fingerprint("align_latent", params, paths, None)
    steps = QUICK_STAGE1["steps"]
    run_tokenizer_stage("align_latent", params, paths, register=False, progress=False)
    assert read_step(folder / f"{key}.safetensors") == steps

    caplog.clear()
    run_tokenizer_stage("align_latent", params, paths, register=False, progress=False)  # not forced: resumes
    assert f"align_latent: resuming from step {steps}" in caplog.text and "align_latent: 0 steps in" in caplog.text
    assert not (folder / STALE).exists()

    caplog.clear()
    before = (folder / f"{key}.safetensors").read_bytes()
    monkeypatch.setenv(RETRAIN_ENV, "1")
    run_tokenizer_stage("align_latent", params, paths, register=False, progress=False)
    assert "resuming" not in caplog.text and f"align_latent: {steps} steps in" in caplog.text
    assert f"{RETRAIN_ENV}=1, retraining from step 0: set the earlier run (step {steps}) aside in {folder / STALE}" \
        in caplog.text
    assert sorted(p.name for p in (folder / STALE).iterdir()) == [f"{key}.json", f"{key}.safetensors"]
    assert (folder / STALE / f"{key}.safetensors").read_bytes() == before  # kept as it was
    assert read_step(folder / f"{key}.safetensors") == steps
    assert same_tensors(tmp_path / "out" / "tokenizer.safetensors", inputs["tokenizer"] / "tokenizer.safetensors")


def test_a_forced_train_dit_trains_from_step_0_with_its_snapshots_set_aside(
        inputs: dict[str, Path], params: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.delenv(RETRAIN_ENV, raising=False)

    def paths(out: str) -> DiTPaths:
        return DiTPaths(latents=inputs["latents"], tokenizer=inputs["tokenizer"], out=tmp_path / out,
                        checkpoints=tmp_path / "ck")

    steps, folder = TINY["train_dit"]["steps"], tmp_path / "ck" / "train_dit"
    key = _fingerprint(params, paths("fresh"))
    run_train_dit(params, paths("fresh"), register=False, progress=False)
    run_train_dit(params, paths("resumed"), register=False, progress=False)
    assert f"train_dit: resuming from step {steps}" in caplog.text and "train_dit: 0 steps in" in caplog.text

    caplog.clear()
    monkeypatch.setenv(RETRAIN_ENV, "1")
    run_train_dit(params, paths("forced"), register=False, progress=False)
    assert "resuming" not in caplog.text and f"train_dit: {steps} steps in" in caplog.text
    assert sorted(p.name for p in (folder / STALE).iterdir()) == [f"{key}.json", f"{key}.safetensors",
                                                                 f"{key}.snapshots"]
    assert (folder / f"{key}.snapshots" / "step_000002.safetensors").is_file()  # retaken by the new run
    assert same_tensors(tmp_path / "forced" / DIT_WEIGHTS, tmp_path / "fresh" / DIT_WEIGHTS)
    assert same_tensors(tmp_path / "forced" / "snapshots" / "step_000002.safetensors",
                        tmp_path / "fresh" / "snapshots" / "step_000002.safetensors")


def test_a_forced_cache_latents_re_encodes_every_shard(inputs: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(RETRAIN_ENV, raising=False)
    out = inputs["latents"]
    shards = sorted(p.name for p in out.glob("latents-*.safetensors"))
    assert shards == [shard_name(i) for i in range(len(shards))] and len(shards) >= 2
    kept = {name: (out / name).read_bytes() for name in shards}
    again = cache_latents(inputs["tokenizer"], inputs["data"], out, CACHE, progress=False)
    assert again.encoded == [] and again.skipped == list(range(len(shards)))

    monkeypatch.setenv(RETRAIN_ENV, "1")
    forced = cache_latents(inputs["tokenizer"], inputs["data"], out, CACHE, progress=False)
    assert forced.encoded == list(range(len(shards))) and forced.skipped == []
    assert f"cache_latents: {RETRAIN_ENV}=1: re-encoding all {len(shards)} shards in {out}" in caplog.text
    assert {name: (out / name).read_bytes() for name in shards} == kept  # the same encodes, written anew

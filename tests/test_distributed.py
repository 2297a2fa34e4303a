"""Every training stage at two gloo processes ends where one process ends, on the same global batches; a run
stopped at two processes resumes at one; the placement and its collectives.

The tokenizer rows are compared in float64. In float32 one process does not agree with itself across thread
counts: the LPIPS-style perceptual distance divides each feature vector by sqrt(|f|^2 + 1e-10), a gain of up to
1e5 where the features nearly vanish, so rounding noise in the reconstruction drives part of the gradient; on
the tiny preset, 1 vs 2 threads of one process already end 6 steps apart by up to 1.8% on a conv weight. In
float64 that noise is 1e-16, and what is left to compare is what DDP, the rank slices and the reduced adaptive
weights compute: the test builds the same modules in float64 (`double_precision`) and runs the stages' own code.
The DiT has no such amplifier and is compared in float32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aligntok.config import CacheLatentsConfig, Params, parse_params
from aligntok.distributed import Placement, dist_info, map_batches
from aligntok.tokenizer.stages import StagePaths, run_tokenizer_stage

from support.ranks import spawn_ranks
from support.tiny import TINY_MODEL, make_inputs

TOLERANCE = 1e-3
ROWS = {  # every loss term and mechanism of the tokenizer rows, a few steps each, global batch 8
    "align_latent": {"train": ["adapter", "decoder"], "steps": 4, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 2,
                     "val_images": 6, "losses": {"gan": 0.5, "gan_start": 1, "perceptual": 1.0}},
    "align_perceptual": {"train": ["encoder", "adapter", "decoder"], "steps": 4, "batch_size": 8, "lr": 1e-3,
                         "ema_decay": 0.5, "checkpoint_every": 2, "val_images": 6,
                         "losses": {"semantic": 1.0, "gan": 0.5, "perceptual": 1.0}},
    "refine_decoder": {"train": ["decoder"], "steps": 4, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 2,
                       "val_images": 6, "losses": {"gan": 0.5, "perceptual": 0.0}},
    "vae_baseline": {"train": ["encoder", "decoder"], "steps": 4, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 2,
                     "val_images": 6, "losses": {"kl": 1e-3, "gan": 0.5, "gan_start": 2, "perceptual": 0.0,
                                                 "vf": 0.1, "vf_adaptive": True}},
}
CHAIN = ("align_latent", "align_perceptual", "refine_decoder", "vae_baseline")
DIT = {"dit": {"preset": "LightningDiT-T/1", "class_dropout": 0.2},
       "train_dit": {"steps": 6, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "ema_decay": 0.9,
                     "checkpoint_every": 2, "log_every": 1, "sample_every": 6},
       "sample": {"steps": 3, "cfg_scale": 2.0}}
RAW = {**TINY_MODEL, **ROWS, **DIT}


@pytest.fixture(scope="module")
def params() -> Params:
    return parse_params(RAW)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    data, encoder = make_inputs(root)
    return {"root": root, "data": data, "encoder": encoder}


class Stop(Exception):
    """Raised by a test at a chosen step: the run stops there, as if killed after its checkpoint."""


def _stop_at(step: int | None) -> None:
    """Make every training objective raise `Stop` when it reaches `step` (every rank at the same step)."""
    if step is None:
        return
    import aligntok.diffusion.train as dit_train
    import aligntok.tokenizer.stages as stages

    for owner, name in ((stages, "TokenizerObjective"), (dit_train, "FlowMatchingObjective")):
        cls = getattr(owner, name)
        original = cls.__call__

        def stopping(self: Any, batch: Any, at: int, _original: Any = original) -> Any:
            if at == step:
                raise Stop(at)
            return _original(self, batch, at)

        cls.__call__ = stopping


def double_precision() -> None:
    """The tokenizer stages' modules in float64 in this process (new tensors default to float64; the encoder,
    the perceptual network and the VF target, loaded from float32 files, are cast)."""
    import aligntok.tokenizer.stages as stages

    torch.set_default_dtype(torch.float64)
    build, perceptual, vf = stages.build_stage_model, stages.perceptual_loss, stages.vf_alignment

    def built(*args: Any) -> Any:
        model, description = build(*args)
        return model.double(), description

    def aligned(*args: Any) -> Any:
        found = vf(*args)
        found.target.double()
        return found

    stages.build_stage_model = built
    stages.perceptual_loss = lambda *args: perceptual(*args).double()
    stages.vf_alignment = aligned


def train_chain(raw: dict, inputs: dict[str, Path], out: Path, checkpoints: Path, stages: tuple[str, ...] = CHAIN,
                stop_at: int | None = None, float64: bool = True) -> dict[str, Any]:
    """The tokenizer rows in order (each from the previous one's folder), as one rank of a spawned group or, in
    a spawned process of its own, alone; returns what this rank's `run_tokenizer_stage` calls returned."""
    if float64:
        double_precision()
    _stop_at(stop_at)
    params = parse_params(raw)
    results: dict[str, Any] = {"rank": dist_info().rank}
    for stage in stages:
        start = params.stage(stage).start_from
        paths = StagePaths(data=inputs["data"], encoder=inputs["encoder"], out=out / stage, checkpoints=checkpoints,
                           previous=out / start if start else None)
        try:
            result = run_tokenizer_stage(stage, params, paths, register=False, progress=False)
        except Stop:
            results["stopped"] = stage
            return results
        results[stage] = result.metrics
    return results


def alone(fn: Any, *args: Any) -> Any:
    """`fn(*args)` in one fresh process (one thread, no process group): the one-process reference, kept apart
    from this test process's default dtype and patches."""
    return spawn_ranks(fn, 1, *args)[0]


def train_dit_once(raw: dict, latents: Path, tokenizer: Path, out: Path, checkpoints: Path,
                   stop_at: int | None = None) -> dict[str, Any]:
    from aligntok.diffusion.train import DiTPaths, run_train_dit

    _stop_at(stop_at)
    history: list[float] = []
    try:
        metrics = run_train_dit(parse_params(raw), DiTPaths(latents=latents, tokenizer=tokenizer, out=out,
                                checkpoints=checkpoints), register=False, progress=False,
                                on_log=lambda step, logs: history.append(logs["loss_global"]))
    except Stop:
        return {"stopped": True}
    return {"metrics": metrics, "history": history, "rank": dist_info().rank}


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


SCALE_FLOOR = 1e-6
"""Tensors whose values all lie below this compare absolutely: a bias whose gradient is zero in exact arithmetic
(before a one-channel GroupNorm group) moves by ~1e-12 in float64, and its relative difference means nothing."""


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(max |a|, SCALE_FLOOR); 0 for equal integer tensors, 1 for unequal ones."""
    if not a.dtype.is_floating_point:
        return float(not torch.equal(a, b))
    return float((a.double() - b.double()).abs().max() / max(a.double().abs().max().item(), SCALE_FLOOR))


def compare(two: Path, one: Path) -> float:
    """The worst relative difference over every tensor of every safetensors file under `one` and `two` (weights,
    EMA, discriminator, optimiser moments); asserts each is within the tolerance."""
    files = weight_files(one)
    assert [p.relative_to(one) for p in files] == [p.relative_to(two) for p in weight_files(two)]
    worst = 0.0
    for path in files:
        a, b = load_file(str(path)), load_file(str(two / path.relative_to(one)))
        assert a.keys() == b.keys(), path
        for key in a:
            d = relative(a[key], b[key])
            assert d <= TOLERANCE, f"{path.relative_to(one)}: {key} differs by {d:.3g} at two processes"
            worst = max(worst, d)
    return worst


def test_two_processes_train_every_tokenizer_row_to_the_one_process_weights(
        inputs: dict[str, Path], tmp_path: Path) -> None:
    """Each row at 2 ranks (DDP on the model, the discriminator and the VF head; the adaptive GAN and VF weights
    from the averaged gradients; the VAE noise drawn for the global batch) against 1 process of the same global
    batch of 8: every tensor within 1e-3. Rank 0 alone writes outputs and checkpoints."""
    two = spawn_ranks(train_chain, 2, RAW, inputs, tmp_path / "two", tmp_path / "ck2")
    one = alone(train_chain, RAW, inputs, tmp_path / "one", tmp_path / "ck1")
    assert [r["rank"] for r in two] == [0, 1]
    assert all(two[1][stage] == {} for stage in CHAIN)  # rank 1 evaluates its share, reports nothing
    for stage in CHAIN:
        for key in ("val_psnr", "val_ssim", "final_loss", "final_loss_discriminator"):
            assert two[0][stage][key] == pytest.approx(one[stage][key], rel=TOLERANCE), (stage, key)
        checkpoints = sorted(p.name for p in (tmp_path / "ck2" / stage).iterdir())
        assert len(checkpoints) == 2 and checkpoints[0].endswith(".json")  # one checkpoint and its sidecar
    worst = compare(tmp_path / "two", tmp_path / "one")
    print(f"tokenizer rows at 2 processes, float64: worst relative difference {worst:.3g} over every tensor")


def test_stopped_at_two_processes_resumes_at_one_to_where_one_process_ends(
        inputs: dict[str, Path], tmp_path: Path) -> None:
    raw = {**RAW, "align_latent": {**ROWS["align_latent"], "steps": 6}}
    stopped = spawn_ranks(train_chain, 2, raw, inputs, tmp_path / "run", tmp_path / "ck", ("align_latent",), 4)
    assert [r.get("stopped") for r in stopped] == ["align_latent", "align_latent"]
    sidecar = json.loads(next((tmp_path / "ck" / "align_latent").glob("*.json")).read_text())
    assert sidecar["step"] == 4 and not (tmp_path / "run" / "align_latent" / "tokenizer.safetensors").exists()
    resumed = alone(train_chain, raw, inputs, tmp_path / "run", tmp_path / "ck", ("align_latent",))
    uninterrupted = alone(train_chain, raw, inputs, tmp_path / "one", tmp_path / "ck1", ("align_latent",))
    assert resumed["align_latent"]["final_loss"] == pytest.approx(uninterrupted["align_latent"]["final_loss"],
                                                                 rel=TOLERANCE)
    compare(tmp_path / "run", tmp_path / "one")


@pytest.fixture(scope="module")
def latents(inputs: dict[str, Path], params: Params) -> dict[str, Path]:
    from aligntok.diffusion.latent_writer import cache_latents

    root = inputs["root"]
    alone(train_chain, RAW, inputs, root / "tokenizers", root / "ck-tokenizers", ("align_latent",), None, False)
    cache_latents(root / "tokenizers" / "align_latent", inputs["data"], root / "latents",
                  CacheLatentsConfig(max_images=None, batch_size=8, shard_size=10), progress=False)
    return {"latents": root / "latents", "tokenizer": root / "tokenizers" / "align_latent"}


def test_two_processes_train_the_dit_to_the_one_process_weights_and_resume_at_one(
        latents: dict[str, Path], tmp_path: Path) -> None:
    args = (RAW, latents["latents"], latents["tokenizer"])
    two = spawn_ranks(train_dit_once, 2, *args, tmp_path / "two", tmp_path / "ck2")
    one = alone(train_dit_once, *args, tmp_path / "one", tmp_path / "ck1")
    assert two[0]["metrics"]["world_size"] == 2.0 and one["metrics"]["world_size"] == 1.0
    np.testing.assert_allclose(two[0]["history"], one["history"], rtol=TOLERANCE)
    assert two[1]["history"] == []  # only rank 0 logs
    assert one["history"][0] != one["history"][-1]  # it trained
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    worst = compare(tmp_path / "two", tmp_path / "one")
    # stopped at 2 processes after step 4, resumed at 1: where the uninterrupted run ends
    stopped = spawn_ranks(train_dit_once, 2, *args, tmp_path / "resumed", tmp_path / "ck4", 4)
    assert all(r == {"stopped": True} for r in stopped)
    resumed = alone(train_dit_once, *args, tmp_path / "resumed", tmp_path / "ck4")
    np.testing.assert_allclose(resumed["history"], one["history"][4:], rtol=TOLERANCE)
    compare(tmp_path / "resumed", tmp_path / "one")
    print(f"train_dit at 2 processes, float32: worst relative difference {worst:.3g} over every tensor")


# ------------------------------------------------------------------------------------------- collectives
def _gather(counts: int) -> Any:
    from aligntok.config import RuntimeConfig
    from aligntok.distributed import placed

    with placed(RuntimeConfig()) as place:
        rows = {i: 1 + i % 3 for i in range(counts)}  # batches of 1, 2, 3, 1, 2, ... rows

        def compute(index: int) -> dict[str, torch.Tensor]:
            start = sum(rows[j] for j in range(index))
            return {"x": torch.arange(start, start + rows[index], dtype=torch.float64)[:, None].repeat(1, 2),
                    "rank": torch.full((rows[index],), place.rank)}

        found = map_batches(compute, ("x", "rank"), counts, place)
        means = place.mean_floats({"a": float(place.rank), "b": 2.0 * place.rank})
        step = place.broadcast_int(7 if place.is_main else -1)
        return {"found": found, "means": means, "step": step, "slice": place.rank_slice(8)}


def test_batches_go_to_rank_i_mod_w_and_come_back_in_batch_order() -> None:
    results = spawn_ranks(_gather, 2, 5)
    found = results[0]["found"]
    total = sum(1 + i % 3 for i in range(5))
    assert torch.equal(found["x"][:, 0], torch.arange(total, dtype=torch.float64))  # in batch order
    assert found["rank"].tolist() == [0, 1, 1, 0, 0, 0, 1, 0, 0]  # batch i on rank i mod 2
    assert results[1]["found"] is None  # only rank 0 gets them
    assert all(r["means"] == {"a": 0.5, "b": 1.0} and r["step"] == 7 for r in results)
    assert [r["slice"] for r in results] == [slice(0, 4), slice(4, 8)]
    alone = Placement()
    assert map_batches(lambda i: {"x": torch.ones(2)}, ("x",), 3, alone)["x"].tolist() == [1.0] * 6
    with pytest.raises(Exception, match="does not split over 3 processes"):
        Placement(rank=0, world_size=3).rank_slice(8)

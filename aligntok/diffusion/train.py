"""The `train_dit` stage: a LightningDiT trained with flow matching on the cached latents.

The same loop and stage scaffold as the tokenizer (`aligntok/train/loop.py`, `aligntok/train/stage.py`):
EMA, clipping, warm-up, checkpoint + resume, NaN guard. One process, or several ranks with DDP
(`aligntok.distributed`: NCCL and bf16 autocast on GPUs, gloo on CPUs). Every random draw of a step
(samples, flips, t, noise, label dropout) is made on the CPU for the *global* batch from a generator seeded
by (seed, step) and then sliced by rank, so N processes follow the same loss trajectory as one process with
the same global batch, and a run resumes at any world size. The latent cache is mapped, not loaded
(`load_latents`): each step's slice is gathered on the CPU from the shards and moved to the device by the loop,
so a rank's memory does not grow with the cache. Rank 0 alone logs, checkpoints, writes outputs and registers.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from aligntok.config import DIT_REGISTERED_MODEL, Params
from aligntok.data.loader import step_generator
from aligntok.diffusion.dit import build_dit
from aligntok.diffusion.flow import FlowDraws, draw_flow, flow_matching_loss
from aligntok.diffusion.latents import LatentSet, load_latents, read_stats
from aligntok.diffusion.sampling import sample_grid
from aligntok.distributed import Placement, placed
from aligntok.fileio import atomic_write_text, sha256_file
from aligntok.tokenizer.api import Tokenizer
from aligntok.train.checkpoint import TrainState
from aligntok.fileio import atomic_save_safetensors
from aligntok.runtime import CompiledOrEager
from aligntok.train.loop import LoopSettings, StepLosses, run_loop
from aligntok.train.stage import TrainingStage, fingerprint, training_stage

log = logging.getLogger(__name__)

WEIGHTS, CONFIG = "dit.safetensors", "dit.json"
FORMAT = "aligntok-dit/1"
REGISTERED_MODEL = DIT_REGISTERED_MODEL


@dataclass(frozen=True)
class DiTPaths:
    latents: Path
    """The `cache_latents` folder (shards + stats.json)."""
    tokenizer: Path
    """The tokenizer folder the latents came from (for sample grids and the packaged model)."""
    out: Path
    checkpoints: Path = Path("checkpoints")
    metrics: Path | None = None


@dataclass
class StepBatch:
    """This rank's slice of one global batch: z0 (b, C, h, w) normalised, y (b,), t (b,),
    eps (b, C, h, w), drop (b,) bool (label replaced by the null class)."""

    z0: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    drop: torch.Tensor


def step_batch(latents: LatentSet, step: int, batch_size: int, seed: int, class_dropout: float,
               t_mean: float, t_std: float, rank: int = 0, world_size: int = 1) -> StepBatch:
    """Everything random about step `step`, drawn for the global batch, sliced for `rank`: the samples
    and their views (`LatentSet.batch_for_step`), then t, eps (`draw_flow`) and the label dropout from the
    step's `flow` stream (`aligntok.data.loader.step_generator`)."""
    z0, y = latents.batch_for_step(step, batch_size, seed, rank, world_size)  # (b, C, h, w), (b,)
    g = step_generator(seed, step, "flow")
    draws = draw_flow(batch_size, latents.latent_shape, g, t_mean, t_std)  # t (B,), eps (B, C, h, w)
    drop = torch.rand(batch_size, generator=g) < class_dropout  # (B,)
    part = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
    return StepBatch(z0=z0, y=y, t=draws.t[part], eps=draws.eps[part], drop=drop[part])


class FlowMatchingObjective:
    """`flow_matching_loss` on this rank's slice, with the step's draws and label dropout (the loop logs its
    mean over the ranks as `loss_global`). `model` may be the module, its DDP or its `runtime.CompiledOrEager`
    wrapper; `autocast` is the forward's precision context (`Placement.autocast`; none: float32)."""

    def __init__(self, model: Callable[..., torch.Tensor],
                 autocast: Callable[[], Any] = contextlib.nullcontext) -> None:
        self.model, self.autocast = model, autocast

    def __call__(self, batch: StepBatch, step: int) -> StepLosses:
        def velocity(z_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return self.model(z_t, t, y, force_drop=batch.drop).float()  # (b, C, h, w)

        loss = flow_matching_loss(velocity, batch.z0, batch.y, draws=FlowDraws(t=batch.t, eps=batch.eps)).loss
        return StepLosses(main=loss, logs={"loss_global": loss.item()})


def run_train_dit(params: Params, paths: DiTPaths, register: bool = True, progress: bool = True,
                  on_log: Callable[[int, dict[str, float]], None] | None = None, code: str = "") -> dict[str, Any]:
    """Train (resuming from a matching checkpoint), save the EMA model and, on rank 0, register it.

    `on_log(step, logs)` is called on rank 0 every `train_dit.log_every` steps (besides MLflow). `code`: the
    digest of the code the stage runs, part of the checkpoint fingerprint (the CLI passes
    `aligntok.ops.lineage.code_digest("train_dit")`; "" leaves it out)."""
    with placed(params.runtime) as place:
        place.check_split(params.train_dit.batch_size, "train_dit.batch_size")
        return _train(params, paths, register, progress, on_log, place, code)


def _train(params: Params, paths: DiTPaths, register: bool, progress: bool,
           on_log: Callable[[int, dict[str, float]], None] | None, place: Placement, code: str) -> dict[str, Any]:
    cfg, runtime_cfg = params.train_dit, params.runtime
    latents = load_latents(paths.latents)  # mapped: each step gathers its rows on the CPU, the loop moves them
    C, h, _ = latents.latent_shape
    num_classes = latents.num_classes
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_dit(params.dit, C, h, num_classes).to(place.device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                  weight_decay=cfg.weight_decay)
    state = TrainState(step=0, modules={"model": model, "ema": ema}, optimizers={"main": optimizer})
    tracked = {k: params.to_dict()[k] for k in ("dit", "train_dit", "sample")} if register else None
    with training_stage("train_dit", fingerprint_inputs(params, paths, code), paths.checkpoints, place, tracked) as stage:
        tokenizer = Tokenizer.load(paths.tokenizer, device=place.device) if place.is_main else None
        snapshots = stage.checkpoint.with_name(f"{stage.checkpoint.stem}.snapshots")  # survives DVC clearing the out

        def log_step(step: int, logs: dict[str, float]) -> None:
            if on_log is not None:
                on_log(step, logs)
            if stage.run is None:
                return
            stage.run.metrics(logs, step)
            if step % cfg.sample_every == 0 or step == cfg.steps:
                stage.run.image(sample_grid(ema, latents, tokenizer, params), f"samples_step{step:06d}.png")

        def keep_snapshot(step: int) -> None:
            if step in cfg.snapshot_steps:
                atomic_save_safetensors(ema.state_dict(), snapshots / f"step_{step:06d}.safetensors",
                                        {"format": FORMAT})

        settings = LoopSettings.from_schedule(cfg, "train_dit",
                                              extra_checkpoints=tuple(s for s in cfg.snapshot_steps if s < cfg.steps))
        forward = CompiledOrEager(place.wrap(model), "train_dit", enabled=runtime_cfg.compile)
        result = run_loop(
            settings=settings, state=state, objective=FlowMatchingObjective(forward, place.autocast),
            batches=lambda step: step_batch(latents, step, cfg.batch_size, cfg.seed, params.dit.class_dropout,
                                            cfg.t_mean, cfg.t_std, place.rank, place.world_size),
            checkpoint=stage.checkpoint, sidecar=stage.sidecar, on_log=log_step, on_checkpoint=keep_snapshot,
            place=place, progress=progress, prefetch=runtime_cfg.prefetch,
        )
        metrics = {"final_loss": result.last_logs.get("loss_global", float("nan")), "steps": float(cfg.steps),
                   "train_seconds": result.seconds, "world_size": float(place.world_size),
                   "compiled": float(forward.is_compiled)}
        if place.is_main:
            _save(paths, params, ema, latents, metrics, stage, snapshots)
        return metrics


def fingerprint_inputs(params: Params, paths: DiTPaths, code: str = "") -> dict[str, Any]:
    """What a checkpoint was trained from: the params, the latent cache and the code (`code`: the digest the
    CLI passes, "" for none); not the world size, since the batches do not depend on it."""
    return {"params": {k: params.to_dict()[k] for k in ("dit", "train_dit")},
            "stats": sha256_file(paths.latents / "stats.json"),
            "code": code}


def _fingerprint(params: Params, paths: DiTPaths, code: str = "") -> str:
    return fingerprint(fingerprint_inputs(params, paths, code))


def _save(paths: DiTPaths, params: Params, ema: torch.nn.Module, latents: LatentSet,
          metrics: dict[str, float], stage: TrainingStage, snapshots: Path | None = None) -> None:
    """Write the self-contained model folder: EMA weights, description, latent stats, tokenizer, and the EMA
    weights kept at `train_dit.snapshot_steps` (`snapshots/step_NNNNNN.safetensors`)."""
    out, run = paths.out, stage.run
    for step in sorted(s for s in params.train_dit.snapshot_steps if s < params.train_dit.steps):
        kept = snapshots / f"step_{step:06d}.safetensors" if snapshots is not None else None
        if kept is None or not kept.is_file():  # killed between that checkpoint and its snapshot
            log.warning("train_dit: no snapshot of step %d (%s); evaluate will skip it", step, kept)
            continue
        (out / "snapshots").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kept, out / "snapshots" / kept.name)
    stats = read_stats(paths.latents)
    description = {
        "format": FORMAT, "dit": params.dit.model_dump(mode="json"), "sample": params.sample.model_dump(mode="json"),
        "latent_shape": list(latents.latent_shape), "num_classes": int(ema.num_classes),
        "classes": latents.classes, "metrics": metrics, "stats_sha256": sha256_file(paths.latents / "stats.json"),
    }
    atomic_save_safetensors(ema.state_dict(), out / WEIGHTS, {"format": FORMAT})
    atomic_write_text(out / CONFIG, json.dumps(description, indent=2) + "\n")
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.safetensors", "tokenizer.json"):
        shutil.copyfile(paths.tokenizer / name, out / "tokenizer" / name)
    metrics_path = paths.metrics or out / "metrics.json"
    atomic_write_text(metrics_path, json.dumps({"train_dit": metrics}, indent=2) + "\n")
    log.info("train_dit: final loss %.4f -> %s", metrics["final_loss"], out)
    if run is None:
        return
    from aligntok.ops.tracking import register_pyfunc

    run.metrics(metrics, int(metrics["steps"]))
    artifacts = {"weights": out / WEIGHTS, "config": out / CONFIG, "stats": out / "stats.json",
                 "tokenizer_weights": out / "tokenizer" / "tokenizer.safetensors",
                 "tokenizer_config": out / "tokenizer" / "tokenizer.json"}
    receipt = register_pyfunc(run, model_name=REGISTERED_MODEL, code_path=Path(__file__).with_name("pyfunc.py"),
                              artifacts=artifacts, tags={"stats_sha256": description["stats_sha256"]},
                              alias=None)  # load the newest with models:/aligntok-dit@latest
    receipt.write(out / "receipt.json")

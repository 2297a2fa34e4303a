"""The `train_dit` stage: a LightningDiT trained with flow matching on the cached latents.

The same loop as the tokenizer (`aligntok/train/loop.py`): EMA, clipping, warm-up,
checkpoint + resume, NaN guard. One process, or several under `torchrun` with DDP (gloo on
CPU, NCCL on GPU). Every random draw of a step (samples, flips, t, noise, label dropout) is
made for the *global* batch from a generator seeded by (seed, step) and then sliced by rank,
so N processes follow the same loss trajectory as one process with the same global batch.
Rank 0 alone logs, checkpoints, writes outputs and registers.
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

import numpy as np
import torch

from aligntok import runtime
from aligntok.config import DIT_REGISTERED_MODEL, Params
from aligntok.data.loader import step_generator
from aligntok.diffusion.dit import build_dit
from aligntok.diffusion.flow import FlowDraws, draw_flow, flow_matching_loss, sample
from aligntok.diffusion.latents import LatentSet, dist_info, load_latents, read_stats
from aligntok.fileio import atomic_write_text, sha256_file
from aligntok.tokenizer.api import Tokenizer
from aligntok.train.checkpoint import TrainState, atomic_save_safetensors, clean_checkpoint_folder
from aligntok.runtime import CompiledOrEager
from aligntok.train.loop import LoopSettings, StepLosses, run_loop

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
    """`flow_matching_loss` on this rank's slice, with the step's draws and label dropout (logged as the
    global mean). `model` may be the module or its `runtime.CompiledOrEager` wrapper; `autocast` is the
    forward's precision context (`runtime.autocast`; none: float32)."""

    def __init__(self, model: Callable[..., torch.Tensor], world_size: int,
                 autocast: Callable[[], Any] = contextlib.nullcontext) -> None:
        self.model, self.world_size, self.autocast = model, world_size, autocast

    def __call__(self, batch: StepBatch, step: int) -> StepLosses:
        def velocity(z_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return self.model(z_t, t, y, force_drop=batch.drop).float()  # (b, C, h, w)

        loss = flow_matching_loss(velocity, batch.z0, batch.y, draws=FlowDraws(t=batch.t, eps=batch.eps)).loss
        logged = loss.detach().clone()
        if self.world_size > 1:
            torch.distributed.all_reduce(logged)
            logged /= self.world_size
        return StepLosses(main=loss, logs={"loss_global": logged.item()})


def sample_grid(model: torch.nn.Module, latents: LatentSet, tokenizer: Tokenizer, params: Params,
                per_class: int = 4, seed: int = 0) -> np.ndarray:
    """A (rows = per_class, columns = classes) grid of decoded class-conditional samples: (H, W, 3) uint8."""
    from torchvision.utils import make_grid

    classes = len(latents.classes) or int(latents.label.max()) + 1
    labels = torch.arange(classes).repeat(per_class)  # (per_class * K,)
    images = generate(model, latents.normalizer, tokenizer, labels, params.sample.steps,
                      params.sample.cfg_scale, params.sample.cfg_interval, seed, params.sample.method,
                      params.sample.timestep_shift)
    grid = make_grid(images, nrow=classes, padding=2, pad_value=1.0)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def generate(model: torch.nn.Module, normalizer: Any, tokenizer: Tokenizer, labels: torch.Tensor, steps: int,
             cfg_scale: float, interval: list[float] | None, seed: int, method: str = "euler",
             timestep_shift: float = 1.0) -> torch.Tensor:
    """Class labels (B,) -> images (B, 3, R, R) in [0, 1]: ODE from noise, then de-normalise and decode."""
    was_training = model.training
    model.eval()
    z = sample(model, labels, (model.in_channels, model.input_size, model.input_size), steps=steps,
               cfg_scale=cfg_scale, interval=tuple(interval) if interval else None, seed=seed, method=method,
               timestep_shift=timestep_shift)
    model.train(was_training)
    return normalizer.decode(tokenizer, z)


def _init_distributed(world_size: int) -> None:
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)


def run_train_dit(params: Params, paths: DiTPaths, register: bool = True, progress: bool = True,
                  on_log: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train (resuming from a matching checkpoint), save the EMA model and, on rank 0, register it.

    `on_log(step, logs)` is called on rank 0 every `train_dit.log_every` steps (besides MLflow)."""
    cfg = params.train_dit
    rank, world_size, _ = dist_info()
    _init_distributed(world_size)
    if cfg.batch_size % world_size:
        raise ValueError(f"train_dit.batch_size={cfg.batch_size} does not split over {world_size} processes")
    latents = load_latents(paths.latents)
    C, h, _ = latents.latent_shape
    num_classes = len(latents.classes) or int(latents.label.max()) + 1
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_dit(params.dit, C, h, num_classes)
    ema = copy.deepcopy(model).requires_grad_(False)
    trained = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                  weight_decay=cfg.weight_decay)
    state = TrainState(step=0, modules={"model": model, "ema": ema}, optimizers={"main": optimizer})
    key = _fingerprint(params, paths)
    checkpoint = paths.checkpoints / "train_dit" / f"{key}.safetensors"
    is_main = rank == 0
    if is_main:
        clean_checkpoint_folder(checkpoint)
    if register and is_main:
        from aligntok.tracking import StageRun

        run = StageRun.for_checkpoint("train_dit", {k: params.to_dict()[k] for k in ("dit", "train_dit", "sample")},
                                      checkpoint)
    else:
        run = None
    tokenizer = Tokenizer.load(paths.tokenizer) if is_main else None

    def log_step(step: int, logs: dict[str, float]) -> None:
        if on_log is not None:
            on_log(step, logs)
        if run is None:
            return
        run.metrics(logs, step)
        if step % cfg.sample_every == 0 or step == cfg.steps:
            run.image(sample_grid(ema, latents, tokenizer, params), f"samples_step{step:06d}.png")

    snapshots = checkpoint.with_name(f"{checkpoint.stem}.snapshots")  # survives DVC clearing the out

    def keep_snapshot(step: int) -> None:
        if step in cfg.snapshot_steps:
            atomic_save_safetensors(ema.state_dict(), snapshots / f"step_{step:06d}.safetensors", {"format": FORMAT})

    settings = LoopSettings.from_schedule(cfg, "train_dit",
                                          extra_checkpoints=tuple(s for s in cfg.snapshot_steps if s < cfg.steps))
    try:
        fast = params.runtime
        device = next(model.parameters()).device
        forward = CompiledOrEager(trained, "train_dit", enabled=fast.compile)
        result = run_loop(
            settings=settings, state=state,
            objective=FlowMatchingObjective(forward, world_size, lambda: runtime.autocast(fast, device)),
            batches=lambda step: step_batch(latents, step, cfg.batch_size, cfg.seed, params.dit.class_dropout,
                                            cfg.t_mean, cfg.t_std, rank, world_size),
            checkpoint=checkpoint, sidecar=lambda: {"mlflow_run_id": run.run_id if run else None, "fingerprint": key},
            on_log=log_step, on_checkpoint=keep_snapshot, is_main_process=is_main, progress=progress,
            prefetch=fast.prefetch,
        )
        metrics = {"final_loss": result.last_logs.get("loss_global", float("nan")), "steps": float(cfg.steps),
                   "train_seconds": result.seconds, "world_size": float(world_size),
                   "compiled": float(forward.is_compiled)}
        if is_main:
            _save(paths, params, ema, latents, metrics, run, snapshots)
        return metrics
    except BaseException:
        if run is not None:
            run.finish("FAILED")
        raise
    finally:
        if world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _fingerprint(params: Params, paths: DiTPaths, code: str | None = None) -> str:
    """Identifies what a checkpoint was trained from: the params, the latent cache, the process count and
    the code (`code`: `aligntok.lineage.code_digest("train_dit")`, computed when None)."""
    import hashlib

    from aligntok.lineage import code_digest

    inputs = {"params": {k: params.to_dict()[k] for k in ("dit", "train_dit")},
              "stats": sha256_file(paths.latents / "stats.json"), "world_size": dist_info().world_size,
              "code": code if code is not None else code_digest("train_dit")}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _save(paths: DiTPaths, params: Params, ema: torch.nn.Module, latents: LatentSet,
          metrics: dict[str, float], run: Any, snapshots: Path | None = None) -> None:
    """Write the self-contained model folder: EMA weights, description, latent stats, tokenizer, and the EMA
    weights kept at `train_dit.snapshot_steps` (`snapshots/step_NNNNNN.safetensors`)."""
    out = paths.out
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
    from aligntok.tracking import register_pyfunc

    run.metrics(metrics, int(metrics["steps"]))
    artifacts = {"weights": out / WEIGHTS, "config": out / CONFIG, "stats": out / "stats.json",
                 "tokenizer_weights": out / "tokenizer" / "tokenizer.safetensors",
                 "tokenizer_config": out / "tokenizer" / "tokenizer.json"}
    receipt = register_pyfunc(run, model_name=REGISTERED_MODEL, code_path=Path(__file__).with_name("pyfunc.py"),
                              artifacts=artifacts, tags={"stats_sha256": description["stats_sha256"]},
                              alias=None)  # load the newest with models:/aligntok-dit@latest
    receipt.write(out / "receipt.json")
    run.finish()

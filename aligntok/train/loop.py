"""The training loop shared by every stage (tokenizer stages 1-3, VAE baseline, DiT).

What differs between stages is data: which parameters train (the optimisers handed in),
what the objective computes, and the schedule in `LoopSettings`. The loop owns the
mechanics: learning-rate warm-up, gradient clipping, EMA, the NaN guard, progress,
checkpointing every N steps and resuming from the last checkpoint.

Under several ranks (`aligntok.distributed.Placement`), the objective's modules are in DDP, so the
gradients every rank clips and steps with are the global batch's; the loop adds what DDP does not:
rank 0 alone reads the checkpoint's step, checkpoints and logs; the logged losses and the NaN guard
see the mean over the ranks, so every rank stops at the same step.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from tqdm import tqdm

from aligntok.config import ScheduleConfig
from aligntok.distributed import Placement
from aligntok.errors import AligntokError
from aligntok.runtime import Prefetcher
from aligntok.train.checkpoint import CorruptCheckpointError, TrainState, load_checkpoint, move_aside, save_checkpoint

log = logging.getLogger(__name__)


class NonFiniteLossError(AligntokError, RuntimeError):
    """A loss went NaN/inf; the last good checkpoint is left in place."""


@dataclass(frozen=True)
class LoopSettings:
    steps: int
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    ema_decay: float | None = None
    checkpoint_every: int = 100
    log_every: int = 10
    name: str = "train"
    extra_checkpoints: tuple[int, ...] = ()
    """Steps that are checkpointed besides every `checkpoint_every` (e.g. the DiT's snapshot steps)."""

    @classmethod
    def from_schedule(cls, schedule: ScheduleConfig, name: str, extra_checkpoints: tuple[int, ...] = ()) -> LoopSettings:
        """The loop's settings from a params row (a tokenizer stage row or `train_dit`)."""
        return cls(steps=schedule.steps, warmup_steps=schedule.warmup_steps, grad_clip=schedule.grad_clip,
                   ema_decay=schedule.ema_decay, checkpoint_every=schedule.checkpoint_every,
                   log_every=schedule.log_every, name=name, extra_checkpoints=extra_checkpoints)


@dataclass
class StepLosses:
    """What an objective returns for one batch.

    `main` is minimised by the "main" optimiser; `aux` (if any) by the optimiser of the
    same name (e.g. "discriminator"), after the main update. `logs` are floats to report.
    """

    main: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    logs: dict[str, float] = field(default_factory=dict)


class Objective(Protocol):
    def __call__(self, batch: Any, step: int) -> StepLosses: ...


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = dict(ema.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.detach(), alpha=1 - decay)
    for (name, buf), (_, src) in zip(ema.named_buffers(), model.named_buffers()):
        buf.copy_(src)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up from 1/warmup to 1 over the first `warmup_steps` steps, then constant."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    seconds: float
    last_logs: dict[str, float]
    checkpoint: Path


def _check_finite(logs: dict[str, float], names: list[str], settings: LoopSettings, step: int,
                  checkpoint: Path) -> None:
    """Stop when one of the (rank-averaged) losses `names` in `logs` is NaN/inf."""
    for name in names:
        if not math.isfinite(logs[name]):
            kept = f"the last good checkpoint is kept at {checkpoint}" if checkpoint.exists() else "no checkpoint was written yet"
            label = "main" if name == "loss" else name.removeprefix("loss_")
            raise NonFiniteLossError(
                f"stage {settings.name}: loss {label!r} is {logs[name]} at step {step}; stopped ({kept})"
            )


def run_loop(
    *,
    settings: LoopSettings,
    state: TrainState,
    objective: Objective,
    batches: Callable[[int], Any],
    checkpoint: Path,
    sidecar: Callable[[], dict[str, Any]] = dict,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    place: Placement | None = None,
    progress: bool = True,
    prefetch: int = 0,
) -> TrainResult:
    """Train from the last checkpoint (if `checkpoint` exists) up to `settings.steps`.

    `state.modules` must hold "model" (and "ema" when `settings.ema_decay` is set);
    `state.optimizers` must hold "main" and one optimiser per auxiliary loss.
    `batches(step)` returns this rank's part of the batch for a step, on the CPU (the loop moves it to
    `place.device`): a pure function of the step, which is what makes a resumed run identical to an
    uninterrupted one, and what lets `prefetch` > 0 build the next batches on a background thread
    (`aligntok.runtime.Prefetcher`) without changing any of them. `place`: this process's placement
    (default: one process on the CPU); `on_log` and `on_checkpoint` run on rank 0 only, `on_checkpoint(step)`
    just before each checkpoint is written, so a snapshot it saves is not lost to a kill between the two.
    """
    place = place or Placement()
    model, optimizers = state.modules["model"], state.optimizers
    handed_in = {role: [g["lr"] for g in opt.param_groups] for role, opt in optimizers.items()}
    for role, opt in optimizers.items():  # stored with the groups in every checkpoint
        for group, lr in zip(opt.param_groups, handed_in[role]):
            group["base_lr"] = lr
    start = _resume(checkpoint, state, settings.name, place)
    # after a resume a group's "lr" is the warmed-up rate of the step before: the base rate is stored apart
    base_lrs = {role: [g.get("base_lr", lr) for g, lr in zip(opt.param_groups, handed_in[role])]
                for role, opt in optimizers.items()}
    logs: dict[str, float] = {}
    began = time.perf_counter()
    bar = tqdm(range(start, settings.steps), initial=start, total=settings.steps, desc=settings.name,
               unit="step", disable=not (place.is_main and progress), dynamic_ncols=True)
    upcoming = Prefetcher(batches, prefetch)
    try:
        for step in bar:
            factor = warmup_factor(step, settings.warmup_steps)
            for role, opt in optimizers.items():
                for group, lr in zip(opt.param_groups, base_lrs[role]):
                    group["lr"] = lr * factor
            model.train()
            losses = objective(place.to_device(upcoming(step, settings.steps)), step)
            local = {"loss": losses.main.item(), **{f"loss_{k}": v.item() for k, v in losses.aux.items()},
                     **losses.logs}
            logs = place.mean_floats(local)  # the global batch's figures, the same on every rank
            _check_finite(logs, ["loss", *(f"loss_{k}" for k in losses.aux)], settings, step, checkpoint)
            _minimise(optimizers["main"], losses.main, settings.grad_clip)
            for role, loss in losses.aux.items():
                _minimise(optimizers[role], loss, settings.grad_clip)
            if settings.ema_decay is not None:
                update_ema(state.modules["ema"], model, settings.ema_decay)
            state.step = step + 1
            if state.step % settings.log_every == 0 or state.step == settings.steps:
                bar.set_postfix({k: f"{v:.4g}" for k, v in list(logs.items())[:4]})
                if on_log and place.is_main:
                    on_log(state.step, logs)
            if place.is_main and (state.step % settings.checkpoint_every == 0 or state.step == settings.steps
                                  or state.step in settings.extra_checkpoints):
                if on_checkpoint:  # first: what it keeps (snapshots) is never behind the checkpoint a rerun resumes
                    on_checkpoint(state.step)
                save_checkpoint(checkpoint, state, {"stage": settings.name, "logs": logs, **sidecar()})
    finally:
        upcoming.close()
    bar.close()
    seconds = time.perf_counter() - began
    done = settings.steps - start
    if place.is_main:
        log.info("%s: %d steps in %.1f s (%.2f steps/s)", settings.name, done, seconds, done / max(seconds, 1e-9))
    return TrainResult(steps=settings.steps, resumed_from=start, seconds=seconds, last_logs=logs, checkpoint=checkpoint)


def _resume(checkpoint: Path, state: TrainState, name: str, place: Placement) -> int:
    """The step to start from: the checkpoint's, or 0 without one. Rank 0 reads and checks the checkpoint
    (a corrupt one is moved aside with a warning, and training starts over instead of stopping), every rank
    learns its step, and the other ranks then load the same file once."""
    start = _load_or_set_aside(checkpoint, state, name) if place.is_main else 0
    start = place.broadcast_int(start)
    if start > 0 and not place.is_main:
        load_checkpoint(checkpoint, state)
    place.barrier()  # rank 0 writes the next checkpoint only after every rank has read this one
    if start > 0 and place.is_main:
        log.info("%s: resuming from step %d (%s)", name, start, checkpoint)
    return start


def _load_or_set_aside(checkpoint: Path, state: TrainState, name: str) -> int:
    if not checkpoint.exists():
        return 0
    try:
        return load_checkpoint(checkpoint, state)
    except CorruptCheckpointError as exc:
        log.warning("%s: %s; moved aside to %s, starting over from step 0", name, exc, move_aside(checkpoint).name)
        return 0


def _minimise(optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float | None) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if grad_clip is not None and params:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()


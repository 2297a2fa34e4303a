"""The `train_t2i` stage: a FLUX-style text-conditioned DiT per tokenizer, trained with flow matching.

One model for each tokenizer stage in `t2i.tokenizers`, each on that tokenizer's latents of the same captioned
training images (`t2i_latents`), with the same `train_t2i` schedule and seed: the paper's tokenizer comparison
for text-to-image. The scaffold is `train_dit`'s (`aligntok/train/loop.py`, `aligntok/train/stage.py`): EMA,
clipping, warm-up, checkpoint + resume, NaN guard, DDP under torchrun, rank 0 alone saving and registering.
Every random draw of a step (samples, flips, t, noise, caption dropout) is made on the CPU for the global batch
from a generator seeded by (seed, step), then sliced by rank; the draws are the same as `train_dit`'s, with the
label replaced by the record's caption row in the `text_features` cache.

Each model lands in `OUT/<tokenizer>/` (weights, `t2i.json`, latent stats, the tokenizer, its receipt); the first
tokenizer's receipt is also `OUT/receipt.json`, the version the pipeline offers for promotion.
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

from aligntok.config import T2I_REGISTERED_MODEL, Params
from aligntok.data.loader import batch_indices, step_generator
from aligntok.diffusion.flow import FlowDraws, draw_flow, flow_matching_loss
from aligntok.diffusion.latents import LatentSet, load_latents, read_stats
from aligntok.diffusion.t2i_api import CONFIG, FORMAT, WEIGHTS
from aligntok.diffusion.t2i_dit import build_t2i_dit
from aligntok.distributed import Placement, placed
from aligntok.errors import AligntokError
from aligntok.fileio import atomic_write_text, sha256_file
from aligntok.runtime import CompiledOrEager
from aligntok.text.features import TextFeatureSet
from aligntok.train.checkpoint import TrainState
from aligntok.fileio import atomic_save_safetensors
from aligntok.train.loop import LoopSettings, StepLosses, run_loop
from aligntok.train.stage import training_stage

log = logging.getLogger(__name__)

SKIPPED = "skipped.json"


@dataclass(frozen=True)
class T2IPaths:
    latents: Path
    """The `t2i_latents` folder: one latent cache per tokenizer (`<latents>/<tokenizer>/`)."""
    text: Path
    """The `text_features` folder."""
    tokenizers: Path
    """The folder of tokenizer folders (`models/tokenizer`)."""
    out: Path
    checkpoints: Path = Path("checkpoints")
    metrics: Path | None = None


@dataclass
class T2IBatch:
    """This rank's slice of one global batch: z0 (b, C, h, w) normalised, text tokens (b, L, d), mask (b, L),
    pooled (b, d), t (b,), eps (b, C, h, w), drop (b,) bool (caption replaced by the null caption)."""

    z0: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    drop: torch.Tensor


def latent_keys(latents: LatentSet) -> list[str]:
    """Every cached record's key, in cache order (each shard's `keys` metadata)."""
    from safetensors import safe_open

    keys: list[str] = []
    for shard in latents.shards:
        with safe_open(str(shard.path), framework="np") as handle:
            keys += json.loads((handle.metadata() or {}).get("keys", "[]"))
    if len(keys) != len(latents):
        raise AligntokError(f"{latents.shards[0].path.parent}: the shards list {len(keys)} keys for {len(latents)} "
                            "latents; rerun t2i_latents")
    return keys


def t2i_step_batch(latents: LatentSet, rows: np.ndarray, text: TextFeatureSet, step: int, batch_size: int,
                   seed: int, caption_dropout: float, t_mean: float, t_std: float, rank: int = 0,
                   world_size: int = 1) -> T2IBatch:
    """Everything random about step `step`, drawn for the global batch and sliced for `rank`: the samples and
    their flips (the same streams as `LatentSet.batch_for_step`), then t, eps and the caption dropout from the
    step's `flow` stream. `rows` (N,) maps a cached record to its caption row in `text`."""
    if batch_size % world_size or not 0 <= rank < world_size:
        raise ValueError(f"batch size {batch_size} must split evenly over {world_size} ranks (rank {rank})")
    indices = batch_indices(len(latents), batch_size, seed, step)  # (B,)
    flips = torch.rand(batch_size, generator=step_generator(seed, step, "flip")) < 0.5  # (B,)
    part = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
    z0, _ = latents.gather(indices[part], flips[part])  # (b, C, h, w)
    features = text.gather(rows[indices[part].numpy()])
    g = step_generator(seed, step, "flow")
    draws = draw_flow(batch_size, latents.latent_shape, g, t_mean, t_std)  # t (B,), eps (B, C, h, w)
    drop = torch.rand(batch_size, generator=g) < caption_dropout  # (B,)
    return T2IBatch(z0=z0, tokens=features.tokens, mask=features.mask, pooled=features.pooled,
                    t=draws.t[part], eps=draws.eps[part], drop=drop[part])


class TextFlowObjective:
    """`flow_matching_loss` on this rank's slice, conditioned on the batch's captions (dropped ones replaced by
    the model's null caption)."""

    def __init__(self, model: Callable[..., torch.Tensor],
                 autocast: Callable[[], Any] = contextlib.nullcontext) -> None:
        self.model, self.autocast = model, autocast

    def __call__(self, batch: T2IBatch, step: int) -> StepLosses:
        def velocity(z_t: torch.Tensor, t: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return self.model(z_t, t, batch.tokens, batch.mask, batch.pooled, force_drop=batch.drop).float()

        loss = flow_matching_loss(velocity, batch.z0, batch.drop, draws=FlowDraws(t=batch.t, eps=batch.eps)).loss
        return StepLosses(main=loss, logs={"loss_global": loss.item()})


def run_train_t2i(params: Params, paths: T2IPaths, register: bool = True, progress: bool = True,
                  code: str = "") -> dict[str, Any]:
    """Train (resuming each model from a matching checkpoint) one model per `t2i.tokenizers` entry; rank 0 saves
    and registers them. A dataset without captions writes `skipped.json` and trains nothing. `code`: the digest
    of the code the stage runs, part of each checkpoint fingerprint (the CLI passes
    `aligntok.ops.lineage.code_digest("train_t2i")`; "" leaves it out)."""
    text = TextFeatureSet(paths.text)
    if text.skipped is not None:
        paths.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(paths.out / SKIPPED, json.dumps({"skipped": text.skipped}, indent=2) + "\n")
        _write_metrics(paths, {"skipped": text.skipped})
        log.warning("train_t2i: skipped (%s)", text.skipped)
        return {"skipped": text.skipped}
    results: dict[str, Any] = {}
    with placed(params.runtime) as place:
        place.check_split(params.train_t2i.batch_size, "train_t2i.batch_size")
        for tokenizer in params.t2i.tokenizers:
            results[tokenizer] = _train(params, paths, tokenizer, text, register, progress, place, code)
        if place.is_main:
            (paths.out / SKIPPED).unlink(missing_ok=True)
            first = paths.out / params.t2i.tokenizers[0] / "receipt.json"
            if first.is_file():  # the version offered for promotion (aligntok.ops.pipeline_run.stage_receipts)
                shutil.copyfile(first, paths.out / "receipt.json")
            _write_metrics(paths, results)
    return results


def _write_metrics(paths: T2IPaths, metrics: dict[str, Any]) -> None:
    target = paths.metrics or paths.out / "metrics.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps({"train_t2i": metrics}, indent=2) + "\n")


def fingerprint_inputs(params: Params, paths: T2IPaths, tokenizer: str, code: str = "") -> dict[str, Any]:
    """What a checkpoint was trained from: the model and schedule params, the tokenizer's latent cache, the text
    features and the code (the digest the CLI passes, "" for none); not the world size."""
    cfg = params.t2i
    return {"params": {"t2i": {k: v for k, v in cfg.model_dump(mode="json").items() if k != "tokenizers"},
                       "train_t2i": params.train_t2i.model_dump(mode="json")},
            "tokenizer": tokenizer, "stats": sha256_file(paths.latents / tokenizer / "stats.json"),
            "text": sha256_file(paths.text / "captions.json"),
            "code": code}


def _train(params: Params, paths: T2IPaths, tokenizer: str, text: TextFeatureSet, register: bool, progress: bool,
           place: Placement, code: str) -> dict[str, float]:
    cfg, model_cfg, runtime_cfg = params.train_t2i, params.t2i, params.runtime
    latents = load_latents(paths.latents / tokenizer)
    rows = text.rows("train", latent_keys(latents))  # (N,) caption row of every cached record
    C, h, _ = latents.latent_shape
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank, and for every tokenizer
    model = build_t2i_dit(model_cfg.preset, C, h, text.width, text.max_length,
                          caption_dropout=model_cfg.caption_dropout, qk_norm=model_cfg.qk_norm).to(place.device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    state = TrainState(step=0, modules={"model": model, "ema": ema}, optimizers={"main": optimizer})
    tracked = ({"t2i": model_cfg.model_dump(mode="json"), "train_t2i": cfg.model_dump(mode="json"),
                "text": params.text.model_dump(mode="json"), "tokenizer": tokenizer} if register else None)
    name = f"train_t2i-{tokenizer}"
    with training_stage(name, fingerprint_inputs(params, paths, tokenizer, code), paths.checkpoints, place,
                        tracked) as stage:
        settings = LoopSettings.from_schedule(cfg, name)
        forward = CompiledOrEager(place.wrap(model), name, enabled=runtime_cfg.compile)
        result = run_loop(
            settings=settings, state=state, objective=TextFlowObjective(forward, place.autocast),
            batches=lambda step: t2i_step_batch(latents, rows, text, step, cfg.batch_size, cfg.seed,
                                                model_cfg.caption_dropout, cfg.t_mean, cfg.t_std, place.rank,
                                                place.world_size),
            checkpoint=stage.checkpoint, sidecar=stage.sidecar,
            on_log=(lambda step, logs: stage.run.metrics(logs, step)) if stage.run is not None else None,
            place=place, progress=progress, prefetch=runtime_cfg.prefetch,
        )
        metrics = {"final_loss": result.last_logs.get("loss_global", float("nan")), "steps": float(cfg.steps),
                   "train_seconds": result.seconds, "world_size": float(place.world_size),
                   "compiled": float(forward.is_compiled),
                   "parameters": float(sum(p.numel() for p in ema.parameters()))}
        if place.is_main:
            _save(paths, params, tokenizer, ema, latents, text, metrics, stage.run)
        return metrics


def _save(paths: T2IPaths, params: Params, tokenizer: str, ema: torch.nn.Module, latents: LatentSet,
          text: TextFeatureSet, metrics: dict[str, float], run: Any | None) -> None:
    """The self-contained model folder: EMA weights, description (model, text encoder, sampling defaults), latent
    stats and the tokenizer; registered as a pyfunc version of `aligntok-t2i` with alias `<tokenizer>`."""
    out = paths.out / tokenizer
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    stats_path = paths.latents / tokenizer / "stats.json"
    description = {
        "format": FORMAT, "t2i": params.t2i.model_dump(mode="json"), "sample": params.sample.model_dump(mode="json"),
        "tokenizer_stage": tokenizer, "latent_shape": list(latents.latent_shape), "text_encoder": text.encoder,
        "text_width": text.width, "text_length": text.max_length, "metrics": metrics,
        "stats_sha256": sha256_file(stats_path),
    }
    atomic_save_safetensors(ema.state_dict(), out / WEIGHTS, {"format": FORMAT})
    atomic_write_text(out / CONFIG, json.dumps(description, indent=2) + "\n")
    atomic_write_text(out / "stats.json", json.dumps(read_stats(paths.latents / tokenizer), indent=2) + "\n")
    for name in ("tokenizer.safetensors", "tokenizer.json"):
        shutil.copyfile(paths.tokenizers / tokenizer / name, out / "tokenizer" / name)
    log.info("train_t2i: %s: final loss %.4f -> %s", tokenizer, metrics["final_loss"], out)
    if run is None:
        (out / "receipt.json").unlink(missing_ok=True)
        return
    from aligntok.ops.tracking import register_pyfunc

    run.metrics(metrics, int(metrics["steps"]))
    artifacts = {"weights": out / WEIGHTS, "config": out / CONFIG, "stats": out / "stats.json",
                 "tokenizer_weights": out / "tokenizer" / "tokenizer.safetensors",
                 "tokenizer_config": out / "tokenizer" / "tokenizer.json"}
    receipt = register_pyfunc(run, model_name=T2I_REGISTERED_MODEL,
                              code_path=Path(__file__).with_name("t2i_pyfunc.py"), artifacts=artifacts,
                              tags={"stats_sha256": description["stats_sha256"], "tokenizer_stage": tokenizer,
                                    "text_encoder_sha256": str(text.encoder.get("sha256", ""))},
                              alias=tokenizer.replace("_", "-"))
    receipt.write(out / "receipt.json")

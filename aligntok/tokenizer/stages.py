"""The tokenizer training stages, as data run by the one training loop.

Each stage is a row of `params.yaml` (`TokenizerStageConfig`): its model kind, the row it starts from, what
trains, the losses, the schedule, and its registered model and alias. The default rows:

| stage            | trains                    | losses                              | starts from        |
|------------------|---------------------------|-------------------------------------|--------------------|
| align_latent     | adapter, decoder          | L1 + perceptual + GAN               | the encoder stage  |
| align_perceptual | encoder, adapter, decoder | + semantic preservation (EMA kept)  | align_latent       |
| refine_decoder   | decoder                   | L1 + perceptual + GAN               | align_perceptual   |
| vae_baseline     | VAE encoder, decoder      | L1 + perceptual + GAN + KL          | scratch            |

Any stage may add VA-VAE's vision-foundation alignment (`losses.vf > 0`, see
`aligntok.tokenizer.objective.VFAlignment`): for the VA-VAE baseline, `vae_baseline.losses.vf` with
`vf_adaptive: true` and VA-VAE's weight 0.1.

This module is the stage's engine: it builds the row's model, its objective (`aligntok.tokenizer.objective`)
and its batches, runs them in the one training loop (`aligntok.train.loop`), then evaluates, saves and
registers. Nothing here or in the loop knows which stage it runs: everything is read from the row.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aligntok import runtime
from aligntok.config import ConfigError, Params, TokenizerStageConfig, stage_alias
from aligntok.distributed import Placement, placed
from aligntok.encoder.vit import EncoderDescription
from aligntok.data.loader import StepBatches, load_split, require_validated
from aligntok.data.reader import EncodedImages
from aligntok.tokenizer.losses import PerceptualLoss, find_lpips_backbone
from aligntok.eval.metrics import psnr, ssim
from aligntok.tokenizer.api import Tokenizer, save_tokenizer_folder
from aligntok.tokenizer.model import build_discriminator, build_tokenizer
from aligntok.fileio import atomic_write_text, sha256_file
from aligntok.train.checkpoint import TrainState, optimizer_from_flat, optimizer_to_flat
from aligntok.fileio import atomic_save_safetensors
from aligntok.train.loop import LoopSettings, run_loop
from aligntok.train.stage import TrainingStage, training_stage
from aligntok.train.stage import fingerprint as digest
from aligntok.tokenizer.objective import SemanticTarget, TokenizerObjective, VFAlignment, latent_output_layer

log = logging.getLogger(__name__)

PERCEPTUAL_BLOCKS = (2, 4)
"""Encoder blocks the perceptual distance compares: early, generic features, and cheap to run
(blocks beyond the exported depth are dropped)."""


@dataclass(frozen=True)
class StagePaths:
    data: Path
    """Folder written by `ingest` (shards, manifest, dataset.json)."""
    encoder: Path
    """Folder written by the `encoder` stage."""
    out: Path
    """This stage's folder: tokenizer.safetensors/json, metrics.json, receipt.json."""
    previous: Path | None = None
    """The folder of the row the stage starts from (`start_from`; stages 2 and 3)."""
    checkpoints: Path = Path("checkpoints")
    """Where in-progress checkpoints live (outside DVC outs, so a rerun can resume)."""
    metrics: Path | None = None
    """Metrics JSON (DVC metrics); default `out/metrics.json`."""
    validation: Path | None = None
    """The `validate` stage's validation.json: the stage refuses to train unless it says success (None:
    no check, for callers that validated the shards otherwise)."""


def set_trainable(model: nn.Module, roles: list[str]) -> None:
    by_role = model.modules_by_role()
    unknown = set(roles) - set(by_role)
    if unknown:
        raise ValueError(f"train: {sorted(unknown)} are not parts of a {model.kind} tokenizer ({sorted(by_role)})")
    for role, module in by_role.items():
        module.requires_grad_(role in roles)


def param_groups(model: nn.Module, cfg: TokenizerStageConfig) -> list[dict[str, Any]]:
    """One AdamW group per trained role; the foundation encoder runs at lr x encoder_lr_scale."""
    groups = []
    for role, module in model.modules_by_role().items():
        if role in cfg.train:
            scale = cfg.encoder_lr_scale if (role == "encoder" and model.kind == "aligned") else 1.0
            groups.append({"params": list(module.parameters()), "lr": cfg.lr * scale, "name": role})
    return groups


def vf_alignment(stage: str, cfg: TokenizerStageConfig, paths: StagePaths, model: nn.Module) -> VFAlignment:
    """The VF loss's head (freshly initialised) and frozen target (from `paths.encoder`) for `model`."""
    from aligntok.encoder import load_encoder
    from aligntok.encoder.vit import FoundationEncoder

    if cfg.losses.vf_adaptive and not latent_output_layer(model).requires_grad:
        raise ConfigError(f"{stage}.losses.vf_adaptive: true needs the layer that outputs the latent to train, "
                          f"but {stage}.train is {cfg.train}")
    vit, desc = load_encoder(paths.encoder)
    return VFAlignment(FoundationEncoder(vit, desc), model.latent_shape[0], cfg.losses.vf_cos_margin,
                       cfg.losses.vf_distmat_margin)


@torch.no_grad()
def evaluate_reconstruction(model: nn.Module, val: EncodedImages, batch_size: int = 64,
                            place: Placement | None = None) -> dict[str, float] | None:
    """Mean PSNR (dB) and SSIM of encode -> decode over the validation images. Under several ranks batch i
    runs on rank i mod W and rank 0 averages every image's scores (other ranks get None)."""
    place = place or Placement()
    model.eval()
    starts = list(range(0, len(val), batch_size))
    mine = []
    for index in place.my_batches(len(starts)):
        images, _ = val.batch(torch.arange(starts[index], min(starts[index] + batch_size, len(val))))
        images = place.to_device(images)  # (B, 3, R, R)
        recon = model.decode(model.encode(images))
        mine.append(torch.stack([psnr(images, recon), ssim(images, recon)], dim=1).cpu())  # (B, 2)
    scores = place.gather_batches(mine, len(starts))  # (N, 2) on rank 0
    if scores is None:
        return None
    return {"val_psnr": float(scores[:, 0].mean()), "val_ssim": float(scores[:, 1].mean())}


def reconstruction_grid(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """Originals (top row) above reconstructions (bottom row): (H, W, 3) uint8."""
    from torchvision.utils import make_grid

    model.eval()
    with torch.no_grad():
        device = next(model.parameters()).device
        recon = model.decode(model.encode(images.to(device))).cpu()
    grid = make_grid(torch.cat([images, recon]), nrow=len(images), padding=2, pad_value=1.0)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def fingerprint_inputs(stage: str, params: Params, paths: StagePaths, perceptual: str | None,
                       code: str = "") -> dict[str, Any]:
    """What a checkpoint was trained from: the params the stage reads (not `runtime:`, not the world size),
    its input files, the perceptual network in use (`perceptual`: the loss's `.name`, None without one;
    `tokenizer.perceptual: auto` resolves by what is installed) and the code: `code` is the digest of the code
    the stage runs, which the CLI passes (`aligntok.ops.lineage.code_digest(stage)`); "" leaves it out."""
    relevant = {k: v for k, v in params.to_dict().items() if k in (stage, "tokenizer", "latent", "encoder")}
    inputs = {"stage": stage, "params": relevant, "resolution": params.data.resolution,
              "manifest": sha256_file(paths.data / "manifest.parquet"),
              "encoder": sha256_file(paths.encoder / "encoder.safetensors"),
              "perceptual": perceptual, "code": code}
    if paths.previous is not None:
        inputs["previous"] = sha256_file(paths.previous / "tokenizer.safetensors")
        if (paths.previous / DISCRIMINATOR).is_file():  # carried over by `carry_discriminator`
            inputs["previous_discriminator"] = sha256_file(paths.previous / DISCRIMINATOR)
    return inputs


def fingerprint(stage: str, params: Params, paths: StagePaths, perceptual: str | None,
                code: str = "") -> str:
    """The checkpoint name of `fingerprint_inputs`: resume only into the same configuration."""
    return digest(fingerprint_inputs(stage, params, paths, perceptual, code))


def build_stage_model(stage: str, params: Params, paths: StagePaths) -> tuple[nn.Module, EncoderDescription]:
    """The model a stage starts from and the encoder description it carries."""
    from aligntok.encoder import load_encoder

    row = params.stage(stage)
    if row.start_from is not None:
        if paths.previous is None:
            raise ConfigError(f"stage {stage} starts from {row.start_from} ({stage}.start_from): "
                              "give that stage's folder (--previous)")
        tokenizer = Tokenizer.load(paths.previous)
        found = (tokenizer.description.get("stage"), tokenizer.description.get("kind"))
        if found != (row.start_from, row.kind):
            raise ConfigError(f"stage {stage} starts from {row.start_from} ({row.kind}), but {paths.previous} "
                              f"holds {found[0]} ({found[1]})")
        return tokenizer.model, EncoderDescription.coerce(tokenizer.description["encoder"])
    vit, desc = load_encoder(paths.encoder)
    try:
        return build_tokenizer(params.tokenizer, params.latent, vit, desc, params.data.resolution, kind=row.kind), desc
    except ValueError as exc:  # shapes that do not fit together: a parameter problem
        raise ConfigError(f"stage {stage}: {exc}") from None


def perceptual_loss(choice: str, paths: StagePaths) -> PerceptualLoss:
    """The perceptual network that `tokenizer.perceptual` names (see `aligntok.tokenizer.perceptual`).

    `auto`: LPIPS when its weights are on disk, else EfficientNet-Lite0 (an ImageNet CNN independent of the
    foundation encoder); `encoder-features`: the frozen foundation encoder from the `encoder` stage.
    """
    from aligntok.encoder import load_encoder
    from aligntok.tokenizer.perceptual import EFFICIENTNET_LITE0, EfficientNetFeatures
    from aligntok.encoder.vit import FoundationEncoder

    if choice in ("auto", "lpips"):
        if find_lpips_backbone() is not None:
            return PerceptualLoss()
        if choice == "lpips":
            raise ConfigError("tokenizer.perceptual: 'lpips' is chosen, but lpips or its backbone weights are not "
                              "on disk (choose 'auto', 'efficientnet-lite0' or 'encoder-features')")
        choice = EFFICIENTNET_LITE0
    if choice == EFFICIENTNET_LITE0:
        return PerceptualLoss(EfficientNetFeatures(), use_lpips=False, feature_name=EFFICIENTNET_LITE0)
    vit, desc = load_encoder(paths.encoder)
    blocks = [b for b in PERCEPTUAL_BLOCKS if b <= desc.depth] or [desc.depth]
    return PerceptualLoss(FoundationEncoder(vit, desc), blocks=blocks, use_lpips=False)


@dataclass
class StageResult:
    metrics: dict[str, float]
    out: Path
    receipt: dict[str, Any] | None


SNAPSHOTS = "snapshots"
"""Folder inside a stage's output with the model at each of `run_tokenizer_stage`'s `snapshots` steps, each a
tokenizer folder (`step_NNNNNN/`) that `Tokenizer.load` reads."""


def run_tokenizer_stage(stage: str, params: Params, paths: StagePaths, register: bool = True,
                        progress: bool = True, snapshots: tuple[int, ...] = (), code: str = "") -> StageResult:
    """Train one stage (resuming from its checkpoint if one matches), evaluate, save, register.

    Runs on `runtime.device`, as one of several ranks when launched so (`aligntok.distributed`): each rank
    trains on its slice of every global batch, and rank 0 alone checkpoints, logs, writes the outputs and
    registers; the other ranks return metrics {} and no receipt. `snapshots`: steps at which rank 0 also saves
    the model (its EMA when the row keeps one) to `<out>/snapshots/step_NNNNNN/` (the w_sp ablation,
    `aligntok.ops.ablation`, reads them; no DVC stage uses them). `code`: the digest of the code the stage runs,
    part of the checkpoint fingerprint (the CLI passes `aligntok.ops.lineage.code_digest(stage)`; "" leaves the
    code out, so a checkpoint resumes across code edits)."""
    cfg = params.stage(stage)
    if paths.validation is not None:
        require_validated(paths.validation)
    if bad := [s for s in snapshots if not 0 < s <= cfg.steps]:
        raise ConfigError(f"{stage}: snapshot steps {bad} are outside 1..{stage}.steps={cfg.steps}")
    with placed(params.runtime) as place:
        place.check_split(cfg.batch_size, f"{stage}.batch_size")
        return _train_tokenizer(stage, params, paths, register, progress, place, tuple(sorted(set(snapshots))),
                                code)


def _train_tokenizer(stage: str, params: Params, paths: StagePaths, register: bool, progress: bool,
                     place: Placement, snapshots: tuple[int, ...] = (), code: str = "") -> StageResult:
    cfg, runtime_cfg = params.stage(stage), params.runtime
    torch.manual_seed(cfg.seed)
    model, encoder_desc = build_stage_model(stage, params, paths)
    set_trainable(model, cfg.train)
    perceptual = perceptual_loss(params.tokenizer.perceptual, paths) if cfg.losses.perceptual > 0 else None
    discriminator = build_discriminator(params.tokenizer.discriminator, params.data.resolution) \
        if cfg.losses.gan > 0 else None
    runtime.channels_last(runtime_cfg.channels_last, model, perceptual, discriminator)  # before the copies below
    for module in (model, perceptual, discriminator):
        if module is not None:
            module.to(place.device)
    semantic = SemanticTarget(model) if cfg.losses.semantic > 0 else None
    vf = vf_alignment(stage, cfg, paths, model) if cfg.losses.vf > 0 else None
    if vf is not None:
        vf.target.to(place.device)
        vf.head.to(place.device)

    train = load_split(paths.data, "train", decode_threads=runtime_cfg.decode_threads)
    val = load_split(paths.data, "val", limit=cfg.val_images, decode_threads=runtime_cfg.decode_threads)
    modules: dict[str, nn.Module] = {"model": model}
    optimizers = {"main": torch.optim.AdamW(param_groups(model, cfg), betas=tuple(cfg.betas),
                                            weight_decay=cfg.weight_decay)}
    if cfg.ema_decay is not None:
        modules["ema"] = copy.deepcopy(model).requires_grad_(False)
    if vf is not None:  # the VF projection head trains with the model and is checkpointed beside it
        modules["vf_head"] = vf.head
        optimizers["main"].add_param_group({"params": list(vf.head.parameters()), "lr": cfg.lr, "name": "vf_head"})
    if discriminator is not None:
        modules["discriminator"] = discriminator
        optimizers["discriminator"] = torch.optim.AdamW(discriminator.parameters(), lr=cfg.disc_lr,
                                                        betas=tuple(cfg.betas))
        if cfg.carry_discriminator:
            carry_discriminator(stage, paths, discriminator, optimizers["discriminator"], cfg.disc_lr)
    state = TrainState(step=0, modules=modules, optimizers=optimizers)
    inputs = fingerprint_inputs(stage, params, paths, perceptual.name if perceptual is not None else None, code)
    objective = TokenizerObjective(model, cfg, perceptual, discriminator, semantic, vf, place, runtime_cfg.channels_last)
    loader = StepBatches(train, cfg.batch_size, cfg.seed, cfg.steps, place.rank_slice(cfg.batch_size),
                         workers=runtime_cfg.loader_workers, pin_memory=torch.device(place.device).type == "cuda")
    with training_stage(stage, inputs, paths.checkpoints, place, _tracked_params(stage, params) if register else None) \
            as scaffold:
        grid_images = val.batch(torch.arange(min(8, len(val))))[0]

        def snapshot(step: int) -> None:
            if step in snapshots:
                save_tokenizer_folder(paths.out / SNAPSHOTS / f"step_{step:06d}", modules.get("ema", model),
                                      _description(stage, params, paths, encoder_desc, {"steps": float(step)},
                                                   perceptual))

        result = run_loop(
            settings=LoopSettings.from_schedule(cfg, stage, extra_checkpoints=snapshots), state=state,
            objective=objective, batches=lambda step: _nhwc_batch(loader(step), runtime_cfg.channels_last),
            checkpoint=scaffold.checkpoint, sidecar=scaffold.sidecar,
            on_log=_Logger(scaffold.run, model, grid_images, cfg.image_every), on_checkpoint=snapshot, place=place,
            progress=progress, prefetch=runtime_cfg.prefetch,
        )
        loader.close()
        final = modules.get("ema", model)
        scores = evaluate_reconstruction(final, val, place=place)
        if not place.is_main:
            return StageResult(metrics={}, out=paths.out, receipt=None)
        if discriminator is not None:
            save_discriminator(paths.out, discriminator, optimizers["discriminator"])
        metrics = {**scores, "steps": float(cfg.steps), "train_seconds": result.seconds,
                   **{f"final_{k}": v for k, v in result.last_logs.items()}}
        return _save_and_register(stage, params, paths, final, encoder_desc, metrics, scaffold, perceptual)


def _nhwc_batch(batch: tuple[torch.Tensor, torch.Tensor], enabled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = batch  # (B, 3, R, R), (B,)
    return runtime.nhwc(images, enabled), labels


DISCRIMINATOR = "discriminator.safetensors"


def save_discriminator(folder: Path, discriminator: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The discriminator and its AdamW moments, beside the tokenizer, for a later stage to carry on."""
    tensors, groups = optimizer_to_flat("optim", optimizer)
    tensors.update({f"model.{k}": v for k, v in discriminator.state_dict().items()})
    atomic_save_safetensors(tensors, folder / DISCRIMINATOR, {"optimizer_groups": json.dumps(groups)})


def carry_discriminator(stage: str, paths: StagePaths, discriminator: nn.Module,
                        optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Load the previous stage's discriminator and optimiser state (the learning rate is this stage's)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    source = paths.previous / DISCRIMINATOR if paths.previous is not None else None
    if source is None or not source.is_file():
        raise ConfigError(f"{stage}.carry_discriminator: no discriminator to carry "
                          f"({source or 'no --previous stage'}); the previous stage must train with a GAN term")
    tensors = load_file(str(source))
    with safe_open(str(source), framework="pt") as handle:
        groups = json.loads(handle.metadata()["optimizer_groups"])
    try:
        discriminator.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError as exc:
        raise ConfigError(f"{stage}.carry_discriminator: {source} does not fit tokenizer.discriminator: "
                          f"{str(exc).splitlines()[0]}") from None
    optimizer_from_flat("optim", optimizer, tensors, groups)
    for group in optimizer.param_groups:
        group["lr"] = lr
    log.info("%s: carrying the discriminator of %s", stage, paths.previous)


class _Logger:
    """Per-step losses to MLflow; a reconstruction grid every `image_every` steps."""

    def __init__(self, run: Any, model: nn.Module, grid_images: torch.Tensor, image_every: int) -> None:
        self.run, self.model, self.grid_images, self.image_every = run, model, grid_images, image_every
        self.last_grid = 0

    def __call__(self, step: int, logs: dict[str, float]) -> None:
        if self.run is None:
            return
        self.run.metrics(logs, step)
        if step // self.image_every > self.last_grid:
            self.last_grid = step // self.image_every
            self.run.image(reconstruction_grid(self.model, self.grid_images), f"reconstruction_step{step:06d}.png")
            self.model.train()


def _tracked_params(stage: str, params: Params) -> dict[str, Any]:
    """What the stage's MLflow run logs as params."""
    logged = {key: params.to_dict()[key] for key in (stage, "tokenizer", "latent", "encoder")}
    return logged | {"data.resolution": params.data.resolution}


def _description(stage: str, params: Params, paths: StagePaths, encoder_desc: EncoderDescription,
                 metrics: dict[str, float], perceptual: PerceptualLoss | None) -> dict[str, Any]:
    """The tokenizer.json of a model this stage saves (the stage's output or one of its snapshots)."""
    from aligntok.ops.tracking import git_commit

    row = params.stage(stage)
    return {
        "kind": row.kind, "stage": stage, "alias": stage_alias(stage, row),
        "tokenizer": params.tokenizer.model_dump(mode="json"),
        "latent": params.latent.model_dump(mode="json"), "encoder": encoder_desc.to_dict(),
        "resolution": params.data.resolution, "metrics": metrics,
        "perceptual_loss": perceptual.name if perceptual is not None else None,
        "manifest_sha256": sha256_file(paths.data / "manifest.parquet"), "git_commit": git_commit(),
    }


def _save_and_register(stage: str, params: Params, paths: StagePaths, model: nn.Module,
                       encoder_desc: EncoderDescription, metrics: dict[str, float], scaffold: TrainingStage,
                       perceptual: PerceptualLoss | None) -> StageResult:
    """Rank 0: the tokenizer folder, the metrics file and, when tracked, the registered version and receipt."""
    run = scaffold.run
    row = params.stage(stage)
    description = _description(stage, params, paths, encoder_desc, metrics, perceptual)
    manifest_sha = description["manifest_sha256"]
    save_tokenizer_folder(paths.out, model, description)
    metrics_path = paths.metrics or paths.out / "metrics.json"
    atomic_write_text(metrics_path, json.dumps({stage: metrics}, indent=2) + "\n")
    log.info("%s: val PSNR %.2f dB, SSIM %.4f -> %s", stage, metrics["val_psnr"], metrics["val_ssim"], paths.out)
    receipt = None
    if run is not None:
        from aligntok.ops.tracking import register_pyfunc

        run.metrics({k: v for k, v in metrics.items()}, int(metrics["steps"]))
        run.artifact(metrics_path)
        rec = register_pyfunc(
            run, model_name=row.registered_model,
            code_path=Path(__file__).with_name("pyfunc.py"),
            artifacts={"weights": paths.out / "tokenizer.safetensors", "config": paths.out / "tokenizer.json"},
            tags={"stage": stage, "manifest_sha256": manifest_sha,
                  "git_commit": description["git_commit"],
                  **{k: f"{v:.6g}" for k, v in metrics.items() if k.startswith("val_")}},
            alias=description["alias"],
        )
        rec.write(paths.out / "receipt.json")
        receipt = json.loads((paths.out / "receipt.json").read_text())
    return StageResult(metrics=metrics, out=paths.out, receipt=receipt)

"""The `evaluate` stage: the pipeline judges its own output.

The reference features come from the `fid_reference` stage (`aligntok.eval.reference`, cached by DVC).
`evaluate` measures, with every count, the resize and the network recorded beside the numbers:
- each tokenizer stage and the VAE baseline: rFID, PSNR, SSIM, FD_dinov2 of reconstructions, and the
  linear-probe top-1 of the pooled latent (plus the probe on raw pixels and raw encoder features);
- the diffusion model: gFID with and without guidance, precision and recall (k = 3), FD_dinov2, and gFID
  against the number of sampling steps and the guidance scale (DVC plots).
There is no Inception Score: the FID network here has no classification head.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from aligntok.config import EvaluateConfig, Params
from aligntok.data.loader import ImageSet, load_split, require_validated
from aligntok.eval.fid import FeatureStats, fid_from_features, frechet_distance
from aligntok.eval.fd_encoder import EncoderFeatures
from aligntok.eval.inception import InceptionFeatures, extract_features as extract
from aligntok.eval.reference import batches, load_reference
from aligntok.eval.prdc import precision_recall
from aligntok.eval.probe import linear_probe
from aligntok.fileio import atomic_write_text

log = logging.getLogger(__name__)

SNAPSHOTS = "snapshots"
"""Folder inside the DiT folder with EMA weights at `train_dit.snapshot_steps` (`step_NNNNNN.safetensors`)."""


# -------------------------------------------------------------------------------------------- tokenizers
def fd(feats: np.ndarray, ref: FeatureStats) -> float:
    """Fréchet distance of features (N, D) against a reference (from its kept features when it has them:
    the low-rank route, milliseconds instead of a 2048-d matrix square root)."""
    if ref.features is not None:
        return float(fid_from_features(feats, ref.features.astype(np.float64)))
    stats = FeatureStats.from_features(feats, source="evaluated", network=ref.network)
    return float(frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma))


def pooled_latents(tokenizer: Any, images: ImageSet, count: int, batch_size: int, progress: bool,
                   desc: str) -> np.ndarray:
    """Spatially mean-pooled latents (N, C) of the first `count` images."""
    return extract(lambda x: tokenizer.encode(x).mean(dim=(2, 3)), batches(images, count, batch_size), count,
                   desc, progress)


@dataclass
class ProbeSets:
    train: ImageSet
    val: ImageSet


def evaluate_tokenizer(name: str, folder: Path, val: ImageSet, probe: ProbeSets, ref: dict[str, Any],
                       inception: InceptionFeatures, encoder: EncoderFeatures, cfg: EvaluateConfig,
                       out_dir: Path, probe_cache: dict[bytes, dict[str, float]], progress: bool) -> dict[str, float]:
    """rFID, PSNR, SSIM, FD_dinov2 and the latent linear probe of one tokenizer."""
    from aligntok.metrics import psnr, ssim
    from aligntok.tokenizer.api import Tokenizer

    tokenizer = Tokenizer.load(folder, batch_size=cfg.batch_size)
    recon: list[torch.Tensor] = []
    scores: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": []}

    def reconstructions() -> Iterator[torch.Tensor]:
        for images in batches(val, cfg.recon_images, cfg.batch_size):
            x_hat = tokenizer.decode(tokenizer.encode(images)).clamp(0, 1)  # (B, 3, R, R)
            scores["psnr"].append(psnr(images, x_hat))
            scores["ssim"].append(ssim(images, x_hat))
            recon.append(x_hat)
            yield x_hat

    inception_feats = extract(inception, reconstructions(), cfg.recon_images, f"{name}: rFID", progress)
    recon_all = torch.cat(recon)
    encoder_feats = extract(encoder, iter(recon_all.split(cfg.batch_size)), len(recon_all), f"{name}: FD_dinov2",
                            False)
    per_image = {k: torch.cat(v).double() for k, v in scores.items()}  # (N,) each
    metrics = {"rfid": fd(inception_feats, ref["val"]), "psnr": float(per_image["psnr"].mean()),
               "ssim": float(per_image["ssim"].mean()), "fd_dinov2": fd(encoder_feats, ref["val_encoder"]),
               **{f"{k}_sem": float(v.std() / len(v) ** 0.5) for k, v in per_image.items()}}
    originals = next(batches(val, 8, 8))  # top row: originals; bottom row: their reconstructions
    _save_grid(torch.cat([originals, recon_all[:8]]), out_dir / f"recon_{name}.png", len(originals))

    # The probe depends only on encoder + adapter: stage 3 (decoder only) has stage 2's latent, so reuse it.
    first = tokenizer.encode(probe.train.batch(torch.arange(min(16, len(probe.train))))[0])
    key = first.numpy().tobytes()
    if key not in probe_cache:
        train_x = pooled_latents(tokenizer, probe.train, len(probe.train), cfg.batch_size, progress, f"{name}: probe")
        val_x = pooled_latents(tokenizer, probe.val, len(probe.val), cfg.batch_size, progress, f"{name}: probe val")
        probe_cache[key] = {"lp_top1": linear_probe(train_x, probe.train.labels.numpy(), val_x,
                                                    probe.val.labels.numpy()).top1}
    metrics |= probe_cache[key]
    log.info("%s: rFID %.2f, PSNR %.2f dB, SSIM %.4f, FD_dinov2 %.3f, latent LP %.1f%%", name, metrics["rfid"],
             metrics["psnr"], metrics["ssim"], metrics["fd_dinov2"], 100 * metrics["lp_top1"])
    return metrics


def reference_probes(probe: ProbeSets, encoder: EncoderFeatures, cfg: EvaluateConfig,
                     progress: bool) -> dict[str, float]:
    """The probe on raw pixels and on the frozen encoder's pooled tokens, for scale."""
    out = {}
    for name, fn in (("pixels", lambda x: x.flatten(1)), ("encoder", encoder)):
        train_x = extract(fn, batches(probe.train, len(probe.train), cfg.batch_size), len(probe.train),
                          f"probe on {name}", progress)
        val_x = extract(fn, batches(probe.val, len(probe.val), cfg.batch_size), len(probe.val), "", False)
        out[f"lp_top1_{name}"] = linear_probe(train_x, probe.train.labels.numpy(), val_x,
                                              probe.val.labels.numpy()).top1
    return out


# ------------------------------------------------------------------------------------------- diffusion
class SampleFeatures:
    """Inception + encoder features of generated samples, per (steps, cfg) setting, memoised.

    Samples are generated in batches seeded by (seed + batch index) with labels cycling over the classes,
    so the first n samples of a larger run are exactly the samples of a run of n: settings evaluated at
    fewer samples reuse the features of a larger run instead of sampling again.
    """

    def __init__(self, model: Any, inception: InceptionFeatures, encoder: EncoderFeatures, cfg: EvaluateConfig,
                 progress: bool) -> None:
        self.model, self.inception, self.encoder, self.cfg, self.progress = model, inception, encoder, cfg, progress
        self.done: dict[tuple[int, float], tuple[np.ndarray, np.ndarray, torch.Tensor]] = {}
        self.seconds = 0.0

    def get(self, steps: int, scale: float, count: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        key = (steps, float(scale))
        have = self.done.get(key)
        if have is None or len(have[0]) < count:
            start = time.perf_counter()
            classes = len(self.model.classes)
            images: list[torch.Tensor] = []

            def generated() -> Iterator[torch.Tensor]:
                for index, first in enumerate(range(0, count, self.cfg.batch_size)):
                    labels = torch.arange(first, min(first + self.cfg.batch_size, count)) % classes
                    x = self.model.generate(labels, steps=steps, cfg_scale=scale, seed=self.cfg.seed + index)
                    images.append(x)
                    yield x

            feats = extract(self.inception, generated(), count, f"gFID steps={steps} cfg={scale:g}", self.progress)
            all_images = torch.cat(images)
            enc = extract(self.encoder, iter(all_images.split(self.cfg.batch_size)), count, "", False)
            self.done[key] = have = (feats, enc, all_images[:32])
            self.seconds += time.perf_counter() - start
        return have[0][:count], have[1][:count], have[2]


def evaluate_diffusion(dit_dir: Path, ref: dict[str, Any], inception: InceptionFeatures, encoder: EncoderFeatures,
                       params: Params, out_dir: Path, plots_dir: Path, progress: bool) -> dict[str, float]:
    """gFID with and without guidance, precision/recall, FD_dinov2, and the two sweeps (DVC plots)."""
    from aligntok.diffusion.api import DiffusionModel

    cfg, steps, scale = params.evaluate, params.sample.steps, params.sample.cfg_scale
    samples = SampleFeatures(DiffusionModel.load(dit_dir), inception, encoder, cfg, progress)
    metrics: dict[str, float] = {}
    for suffix, s in (("cfg", scale), ("nocfg", 1.0)):
        feats, enc, shown = samples.get(steps, s, cfg.gen_samples)
        pr = precision_recall(ref["train"].features, feats, k=3)
        metrics |= {f"gfid_{suffix}": fd(feats, ref["train"]), f"precision_{suffix}": pr.precision,
                    f"recall_{suffix}": pr.recall, f"fd_dinov2_{suffix}": fd(enc, ref["train_encoder"])}
        _save_grid(shown, out_dir / f"samples_{suffix}.png", len(samples.model.classes))
    rows_steps = [{"steps": n, "gfid": fd(samples.get(n, scale, cfg.sweep_samples)[0], ref["train"])}
                  for n in sorted(set(cfg.steps_sweep))]
    rows_cfg = [{"cfg_scale": g, "gfid": fd(samples.get(steps, g, cfg.sweep_samples)[0], ref["train"])}
                for g in sorted(set(cfg.cfg_sweep))]
    _write_csv(plots_dir / "gfid_vs_steps.csv", rows_steps)
    _write_csv(plots_dir / "gfid_vs_cfg.csv", rows_cfg)
    metrics["train_steps"] = float(samples.model.description["metrics"]["steps"])
    by_step = {}
    for snapshot in sorted((dit_dir / SNAPSHOTS).glob("step_*.safetensors")):
        step = int(snapshot.stem.removeprefix("step_"))
        earlier = SampleFeatures(DiffusionModel.load(dit_dir, weights=snapshot), inception, encoder, cfg, progress)
        by_step[str(step)] = {f"gfid_{suffix}": fd(earlier.get(steps, s, cfg.gen_samples)[0], ref["train"])
                              for suffix, s in (("cfg", scale), ("nocfg", 1.0))}
        samples.seconds += earlier.seconds
    if by_step:
        metrics["by_step"] = by_step
        rows = [{"train_steps": int(k), **v} for k, v in by_step.items()]
        rows.append({"train_steps": int(metrics["train_steps"]), "gfid_cfg": metrics["gfid_cfg"],
                     "gfid_nocfg": metrics["gfid_nocfg"]})
        _write_csv(plots_dir / "gfid_vs_train_steps.csv", rows)
    metrics["sampling_seconds"] = samples.seconds
    log.info("diffusion: gFID %.2f with guidance %.1f, %.2f without; precision %.3f, recall %.3f",
             metrics["gfid_cfg"], scale, metrics["gfid_nocfg"], metrics["precision_cfg"], metrics["recall_cfg"])
    return metrics


# ------------------------------------------------------------------------------------------------ stage
@dataclass(frozen=True)
class EvalPaths:
    data: Path
    encoder: Path
    reference: Path
    tokenizers: Path
    """Folder holding one folder per tokenizer stage row (those in `evaluate.tokenizers` are evaluated)."""
    dit: Path
    out: Path
    """Image grids and `protocol.json`."""
    metrics: Path
    plots: Path
    validation: Path | None = None
    """The shards' validation report: evaluation refuses shards that failed `validate`."""


def run_evaluate(params: Params, paths: EvalPaths, register: bool = True, progress: bool = True) -> dict[str, Any]:
    """Measure every tokenizer stage and the diffusion model; write metrics, plots, grids; tag the registry."""
    cfg = params.evaluate
    start = time.perf_counter()
    if paths.validation is not None:
        require_validated(paths.validation)
    torch.manual_seed(cfg.seed)
    ref = load_reference(paths.reference, cfg)
    folders = {name: paths.tokenizers / name for name in cfg.tokenizers}
    if missing := [str(f) for f in folders.values() if not (f / "tokenizer.json").is_file()]:
        raise FileNotFoundError(f"no tokenizer in {missing} (run the tokenizer stages first)")
    fast = params.runtime
    inception = InceptionFeatures(channels_last=fast.channels_last, backend=fast.fid_backend)
    encoder = EncoderFeatures(paths.encoder)
    threads = fast.decode_threads
    val = load_split(paths.data, "val", limit=max(cfg.recon_images, cfg.probe_val_images), progress=progress,
                     decode_threads=threads)
    probe = ProbeSets(train=load_split(paths.data, "train", limit=cfg.probe_train_images, progress=progress),
                      val=_head(val, cfg.probe_val_images))
    paths.out.mkdir(parents=True, exist_ok=True)
    cache: dict[bytes, dict[str, float]] = {}
    tokenizers = {name: evaluate_tokenizer(name, folder, val, probe, ref, inception, encoder, cfg, paths.out,
                                           cache, progress) for name, folder in folders.items()}
    reference = reference_probes(probe, encoder, cfg, progress)
    diffusion = evaluate_diffusion(paths.dit, ref, inception, encoder, params, paths.out, paths.plots, progress)
    loss_curves = write_loss_curves(paths, folders, paths.plots)
    metrics = {"tokenizer": tokenizers, "reference": reference, "diffusion": diffusion,
               "evaluate_seconds": time.perf_counter() - start}
    protocol = {
        "inception": ref["inception"], "inception_backend": inception.backend, "encoder_features": ref["encoder"],
        "inception_score": (
            "not reported: the FID Inception network (pool3 features) has no classification head"),
        "rfid": f"first {cfg.recon_images} validation images vs their reconstructions",
        "gfid": f"{cfg.gen_samples} samples (labels cycling over the classes, seed {cfg.seed}) vs the first "
                f"{cfg.reference_images} training images; sweeps at {cfg.sweep_samples} samples",
        "precision_recall": f"k=3 nearest-neighbour manifolds on Inception features, against the same "
                            f"{cfg.reference_images} training images",
        "linear_probe": f"logistic regression on standardised mean-pooled features, {cfg.probe_train_images} "
                        f"training / {cfg.probe_val_images} validation images, top-1",
        "sampling": params.sample.model_dump(mode="json"), "reference_manifest_sha256": ref["manifest_sha256"],
        "loss_curves": loss_curves,
    }
    atomic_write_text(paths.metrics, json.dumps(metrics, indent=2) + "\n")
    if register:
        protocol["mlflow_run_id"] = log_to_tracking(params, paths, metrics, protocol)
    atomic_write_text(paths.out / "protocol.json", json.dumps(protocol, indent=2) + "\n")
    log.info("evaluate: %.0f s -> %s", metrics["evaluate_seconds"], paths.metrics)
    return metrics


def _head(images: ImageSet, count: int) -> ImageSet:
    return ImageSet(encoded=images.encoded[:count], labels=images.labels[:count], keys=images.keys[:count],
                    decode_threads=images.decode_threads)


def _save_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(images.clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)  # (3, H, W)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["step"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _receipt(folder: Path) -> dict[str, Any] | None:
    path = folder / "receipt.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_loss_curves(paths: EvalPaths, folders: dict[str, Path], plots_dir: Path) -> dict[str, str]:
    """Per-step training losses of every stage, read back from its MLflow run (the receipt names it), as CSV."""
    from aligntok.tracking import metric_history

    found: dict[str, str] = {}
    for stage, folder in {**folders, "train_dit": paths.dit}.items():
        receipt = _receipt(folder)
        rows = metric_history(receipt["run_id"]) if receipt else []
        if not rows:
            found[stage] = "no MLflow run recorded (trained with --no-register?)"
        _write_csv(plots_dir / f"loss_{stage}.csv", rows)
        if rows:
            found[stage] = f"run {receipt['run_id']}"
    return found


def log_to_tracking(params: Params, paths: EvalPaths, metrics: dict[str, Any], protocol: dict[str, Any]) -> str:
    """One `evaluate` run with every figure and file; each registered version tagged with its own figures."""
    from aligntok.tracking import StageRun, tag_model_version

    run = StageRun("evaluate", {"evaluate": params.evaluate.model_dump(mode="json"),
                                "sample": params.sample.model_dump(mode="json")})
    flat = {f"{stage}.{k}": v for stage, values in metrics["tokenizer"].items() for k, v in values.items()}
    flat |= {f"reference.{k}": v for k, v in metrics["reference"].items()}
    flat |= {f"diffusion.{k}": v for k, v in metrics["diffusion"].items() if k != "by_step"}
    flat |= {f"diffusion.step{step}.{k}": v for step, values in metrics["diffusion"].get("by_step", {}).items()
             for k, v in values.items()}  # gFID of the training snapshots
    run.metrics(flat)
    for folder in (paths.out, paths.plots):
        run.artifact(folder, folder.name)
    run.artifact(paths.metrics)
    tagged = {}
    for stage, values in metrics["tokenizer"].items():
        tagged[stage] = _tag(paths.tokenizers / stage, values, run.run_id, tag_model_version)
    tagged["train_dit"] = _tag(paths.dit, metrics["diffusion"], run.run_id, tag_model_version)
    atomic_write_text(paths.out / "registry_tags.json", json.dumps(tagged, indent=2) + "\n")
    run.finish()
    return run.run_id


def _tag(folder: Path, values: dict[str, float], run_id: str, tag: Callable[..., None]) -> str | None:
    receipt = _receipt(folder)
    if receipt is None:
        return None
    tags = {f"eval_{k}": f"{v:.6g}" for k, v in values.items() if isinstance(v, (int, float))}
    tags |= {f"eval_step{step}_{k}": f"{v:.6g}" for step, inner in values.get("by_step", {}).items()
             for k, v in inner.items()} | {"eval_run_id": run_id}
    tag(receipt["model"], receipt["version"], tags)
    return f"{receipt['model']}/{receipt['version']}"

"""The `evaluate` stage: the pipeline judges its own output.

The reference features come from the `fid_reference` stage (`aligntok.eval.reference`, cached by DVC).
`evaluate` measures, with every count, the resize and the network recorded beside the numbers:
- each tokenizer stage and the VAE baseline: rFID and rKID, PSNR, SSIM, FD_dinov2 of reconstructions, and
  the linear-probe top-1 of the pooled latent (plus the probe on raw pixels and raw encoder features);
- the diffusion model: gFID and gKID with and without guidance, precision and recall (k = 3), FD_dinov2, and
  gFID against the number of sampling steps and the guidance scale (DVC plots).
There is no Inception Score: the FID network here has no classification head.

KID (`aligntok.eval.kid`) is computed on the Inception vectors FID uses, against the same references; unlike
FID it is unbiased, so it does not drift with the image counts. Beside PSNR, SSIM, rFID, rKID, the probe's
top-1, gFID and gKID stand 95% bootstrap intervals over the evaluated images (`aligntok.eval.bootstrap`,
flat `<figure>_ci_lo` / `<figure>_ci_hi` keys, seeded by `evaluate.seed`): the per-image scores and the
probe's per-image correctness are resampled for the means, the reconstructions' or samples' Inception
vectors (the reference held fixed) for FID and KID, the FID interval shifted by the bootstrap's bias
estimate. They run on rank 0 over the rows folded in batch order, so they are the one-process figures too;
they need every vector kept (`FEATURES_KEPT`), and are left out, with a warning, where that is not so.

Across ranks (`aligntok.eval.stream`): batch i of every pass (reconstructions, probe features, generated
samples) runs on rank i mod W, and rank 0 folds the features and per-image scores in batch order, round by
round, and computes every figure from them, so each equals the one-process figure. Memory is bounded:
no float image arrays are kept (reconstructions and samples become features as they are made; only the few
shown in the grids are kept, as uint8); FID and FD_dinov2 features stream into float64 means and covariances
(`FeatureAccumulator`), their vectors kept only up to `FEATURES_KEPT` (the low-rank FD route) or, for the
samples' Inception features, `gen_samples` of them (precision/recall); the pixel probe sees images
area-averaged to 32 x 32 (`aligntok.eval.probe.PIXEL_SIDE`, 3,072 features), not the flattened images.
The counts are checked against the split sizes in `dataset.json` when the stage starts, before any model
loads. On CUDA the tokenizers and the DiT run under `runtime.autocast` (bf16); the FID Inception and the FD
encoder always run in float32.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from aligntok.config import PRDC_NEIGHBOURS, EvaluateConfig, Params
from aligntok.data.loader import load_split, require_validated
from aligntok.data.reader import EncodedImages
from aligntok.distributed import Placement, placed
from aligntok.eval.bootstrap import LEVEL, MEAN_RESAMPLES, RESAMPLES, Interval, bootstrap_ci, ci_keys, with_interval
from aligntok.eval.fid import FEATURES_KEPT, FeatureAccumulator, FeatureStats, fid_from_features, fid_resampler, \
    frechet_distance, low_rank_cheaper
from aligntok.eval.fd_encoder import EncoderFeatures
from aligntok.eval.inception import FEATURE_DIM, InceptionFeatures
from aligntok.eval.kid import KID_SUBSET_SIZE, KID_SUBSETS, kid, kid_resampler
from aligntok.eval.reference import batch_at, batch_count, batches, check_counts, load_reference
from aligntok.eval.prdc import precision_recall
from aligntok.eval.probe import BLAS_THREADS, PIXEL_SIDE, linear_probe, pixel_features
from aligntok.eval.stream import Rows, stream_batches
from aligntok.fileio import atomic_write_text

log = logging.getLogger(__name__)

SNAPSHOTS = "snapshots"
"""Folder inside the DiT folder with EMA weights at `train_dit.snapshot_steps` (`step_NNNNNN.safetensors`)."""
BOOTSTRAP_MAX_ROWS = FEATURES_KEPT
"""Evaluated sets beyond this many vectors get no FID/KID interval: a resample costs a (U, U) eigendecomposition
(U ~ 0.63 N distinct rows), about 1 s at N = 2048, 200 times over."""


# -------------------------------------------------------------------------------------------- tokenizers
def fd(stats: FeatureStats, ref: FeatureStats) -> float:
    """Fréchet distance of evaluated features against a reference: from both sets' vectors when both are at
    hand and the low-rank route is the cheaper (fewer samples than dimensions: milliseconds instead of a
    2048-d matrix square root), else from their means and covariances."""
    if stats.features is not None and ref.features is not None and low_rank_cheaper(stats.n, ref.n, stats.dim):
        return float(fid_from_features(stats.features, ref.features.astype(np.float64)))
    return float(frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma))


def _mean(rows: np.ndarray) -> float:
    return float(rows.mean())


def mean_interval(values: np.ndarray, seed: int) -> Interval:
    """Bootstrap interval of the mean of per-image values (N,) over the images."""
    return bootstrap_ci(_mean, np.asarray(values, dtype=np.float64), resamples=MEAN_RESAMPLES, seed=seed)


def kid_and_intervals(fid_key: str, kid_key: str, stats: FeatureStats, ref: FeatureStats, fid: float,
                      seed: int) -> dict[str, float]:
    """KID of evaluated Inception vectors (N, 2048) against a reference's (M, 2048) (`kid_key`, `{kid_key}_std`)
    and the bootstrap intervals over the N evaluated rows of the FD (`fid`, its point estimate) and the KID
    (`{fid_key}_ci_lo`, ...). Only the vectors can give these: {} (with a warning) where either set's are not
    all kept, no interval where N > `BOOTSTRAP_MAX_ROWS`. BLAS runs on `BLAS_THREADS` thread(s): the (U, U)
    eigendecompositions are small, and on 2 busy cores one thread did the defaults' 200 resamples 5-15x faster."""
    from threadpoolctl import threadpool_limits

    if stats.features is None or ref.features is None:
        log.warning("%s: no %s and no intervals: the Inception vectors are kept only up to %d (evaluated %d, "
                    "reference %d)", stats.source, kid_key, FEATURES_KEPT, stats.n, ref.n)
        return {}
    start = time.perf_counter()
    x, y = stats.features.astype(np.float64), ref.features.astype(np.float64)  # (N, D), (M, D)
    with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
        got = kid(x, y, seed=seed)
        out = {kid_key: got.mean, f"{kid_key}_std": got.std}
        if len(x) > BOOTSTRAP_MAX_ROWS:
            log.warning("%s: no %s / %s intervals: %d vectors, bootstrapped up to %d", stats.source, fid_key,
                        kid_key, len(x), BOOTSTRAP_MAX_ROWS)
            return out
        rows = np.arange(len(x))
        out |= ci_keys(fid_key, bootstrap_ci(fid_resampler(x, y), rows, seed=seed, point=fid))
        out |= ci_keys(kid_key, bootstrap_ci(kid_resampler(x, y), rows, seed=seed))
    log.debug("%s: KID and bootstrap intervals in %.2f s", stats.source, time.perf_counter() - start)
    return out


def evaluate_counts(cfg: EvaluateConfig) -> list[tuple[str, str, int]]:
    """The (params key, split, images) that `evaluate` reads (`check_counts` refuses them at the start)."""
    return [("evaluate.recon_images", "val", cfg.recon_images),
            ("evaluate.probe_val_images", "val", cfg.probe_val_images),
            ("evaluate.probe_train_images", "train", cfg.probe_train_images)]


GRID = 8
"""Reconstructions shown per tokenizer (`recon_<stage>.png`: originals above reconstructions)."""


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> uint8 levels, round(255 x), the way the grids are saved."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def _rows(count: int, size: int) -> Callable[[int], int]:
    return lambda index: min(size, count - index * size)


def pooled_latents(tokenizer: Any, images: EncodedImages, count: int, batch_size: int, place: Placement,
                   progress: bool, desc: str) -> np.ndarray | None:
    """Spatially mean-pooled latents (N, C) of the first `count` images (rank 0; other ranks None)."""
    def pooled(index: int) -> dict[str, torch.Tensor]:
        with place.autocast():
            z = tokenizer.encode(place.to_device(batch_at(images, index, count, batch_size)))  # (B, C, h, w)
        return {"z": z.mean(dim=(2, 3)).double()}  # (B, C)

    found = Rows()
    stream_batches(pooled, {"z": found}, batch_count(count, batch_size), place, desc, progress,
                   rows=_rows(count, batch_size))
    return found.tensor.numpy() if place.is_main else None


@dataclass
class ProbeSets:
    """The linear probe's images: fit on `train` (the first `probe_train_images` training images), top-1 on
    `val` (the first `probe_val_images` validation images)."""

    train: EncodedImages
    val: EncodedImages


def evaluate_tokenizer(name: str, folder: Path, val: EncodedImages, probe: ProbeSets, ref: dict[str, Any],
                       inception: InceptionFeatures, encoder: EncoderFeatures, cfg: EvaluateConfig,
                       out_dir: Path, probe_cache: dict[bytes, dict[str, float] | None], progress: bool,
                       place: Placement | None = None) -> dict[str, float] | None:
    """rFID, PSNR, SSIM, FD_dinov2 and the latent linear probe of one tokenizer (rank 0; other ranks None).
    The first `recon_images` of `val` are reconstructed batch by batch; each batch leaves per-image PSNR and
    SSIM (B,), Inception (B, 2048) and encoder (B, D) features streamed into their statistics, and the first
    `GRID` reconstructions as uint8."""
    from aligntok.eval.metrics import psnr, ssim
    from aligntok.tokenizer.api import Tokenizer

    place = place or Placement()
    tokenizer = Tokenizer.load(folder, device=place.device, batch_size=cfg.batch_size)
    count, size = cfg.recon_images, cfg.batch_size

    def reconstruct(index: int) -> dict[str, torch.Tensor]:
        images = place.to_device(batch_at(val, index, count, size))  # (B, 3, R, R)
        with place.autocast():
            x_hat = tokenizer.decode(tokenizer.encode(images)).clamp(0, 1)  # (B, 3, R, R) float32
        shown = max(0, min(len(x_hat), GRID - index * size))
        return {"psnr": psnr(images.cpu(), x_hat), "ssim": ssim(images.cpu(), x_hat),
                "inception": inception(x_hat), "encoder": encoder(x_hat), "shown": as_uint8(x_hat[:shown])}

    found = {"psnr": Rows(), "ssim": Rows(), "inception": FeatureAccumulator(), "encoder": FeatureAccumulator(),
             "shown": Rows()}
    stream_batches(reconstruct, found, batch_count(count, size), place, f"{name}: rFID", progress,
                   rows=_rows(count, size))
    # The probe depends only on encoder + adapter: stage 3 (decoder only) has stage 2's latent, so reuse it.
    first = tokenizer.encode(place.to_device(probe.train.batch(torch.arange(min(16, len(probe.train))))[0]))
    key = first.numpy().tobytes()
    if key not in probe_cache:
        train_x = pooled_latents(tokenizer, probe.train, len(probe.train), size, place, progress, f"{name}: probe")
        val_x = pooled_latents(tokenizer, probe.val, len(probe.val), size, place, progress, f"{name}: probe val")
        probe_cache[key] = None
        if train_x is not None:
            result = linear_probe(train_x, probe.train.labels.numpy(), val_x, probe.val.labels.numpy())
            probe_cache[key] = {"lp_top1": result.top1, **ci_keys("lp_top1", mean_interval(result.correct, cfg.seed))}
    if not place.is_main:
        return None
    per_image = {k: found[k].tensor.double() for k in ("psnr", "ssim")}  # (N,) each
    recon = found["inception"].stats(network=inception.name, source=f"{name}: reconstructions")
    recon_encoder = found["encoder"].stats(network=encoder.name, source=f"{name}: reconstructions")
    metrics = {"rfid": fd(recon, ref["val"]), "psnr": float(per_image["psnr"].mean()),
               "ssim": float(per_image["ssim"].mean()), "fd_dinov2": fd(recon_encoder, ref["val_encoder"]),
               **{f"{k}_sem": float(v.std() / len(v) ** 0.5) for k, v in per_image.items()}}
    metrics |= kid_and_intervals("rfid", "rkid", recon, ref["val"], metrics["rfid"], cfg.seed)
    for k, v in per_image.items():  # the same draws of the same images for every tokenizer: paired
        metrics |= ci_keys(k, mean_interval(v.numpy(), cfg.seed))
    originals = next(batches(val, GRID, GRID))  # top row: originals; bottom row: their reconstructions
    _save_grid(torch.cat([originals, found["shown"].tensor.float() / 255]), out_dir / f"recon_{name}.png",
               len(originals))
    metrics |= probe_cache[key] or {}
    log.info("%s: rFID %s, rKID %s, PSNR %s dB, SSIM %s, FD_dinov2 %.3f, latent LP %.1f%%", name,
             with_interval(metrics, "rfid", 2), with_interval(metrics, "rkid", 4), with_interval(metrics, "psnr", 2),
             with_interval(metrics, "ssim", 4), metrics["fd_dinov2"], 100 * metrics["lp_top1"])
    return metrics


def reference_probes(probe: ProbeSets, encoder: EncoderFeatures, cfg: EvaluateConfig, progress: bool,
                     place: Placement | None = None) -> dict[str, float] | None:
    """The probe on raw pixels (area-averaged to at most 32 x 32: `pixel_features`, 3,072 features) and on the
    frozen encoder's pooled tokens (B, D), for scale (rank 0; others None)."""
    place = place or Placement()
    out = {}
    for name, fn in (("pixels", lambda x: pixel_features(x).double()), ("encoder", encoder)):
        feats = {}
        for split, images in (("train", probe.train), ("val", probe.val)):
            n, size = len(images), cfg.batch_size

            def features(index: int) -> dict[str, torch.Tensor]:
                return {"x": fn(place.to_device(batch_at(images, index, n, size))).cpu()}  # (B, F) float64

            found = Rows()
            stream_batches(features, {"x": found}, batch_count(n, size), place,
                           f"probe on {name}" if split == "train" else "", progress, rows=_rows(n, size))
            feats[split] = found.tensor.numpy() if place.is_main else None
        if place.is_main:
            out[f"lp_top1_{name}"] = linear_probe(feats["train"], probe.train.labels.numpy(), feats["val"],
                                                  probe.val.labels.numpy()).top1
    return out if place.is_main else None


# ------------------------------------------------------------------------------------------- diffusion
class SampleFeatures:
    """Inception + encoder feature statistics of generated samples, per (steps, cfg) setting, memoised.

    Samples are generated in batches seeded by (seed + batch index) with labels cycling over the classes,
    so the first n samples of a larger run are exactly the samples of a run of n: settings evaluated at
    fewer samples (`evaluate.sweep_samples`) reuse a larger run's statistics, frozen on the way at that count,
    instead of sampling again. Batch i is generated on rank i mod W; rank 0 holds the statistics (other ranks
    None), the first `SHOWN` samples as uint8, and the vectors up to `FEATURES_KEPT` (all of a run's
    Inception vectors where precision/recall needs them: `get(..., keep_all=True)`).
    """

    SHOWN = 32

    def __init__(self, model: Any, inception: InceptionFeatures, encoder: EncoderFeatures, cfg: EvaluateConfig,
                 progress: bool, place: Placement | None = None) -> None:
        self.model, self.inception, self.encoder, self.cfg, self.progress = model, inception, encoder, cfg, progress
        self.place = place or Placement()
        self.done: dict[tuple[int, float], tuple[int, dict[str, Any]]] = {}
        self.seconds = 0.0

    def get(self, steps: int, scale: float, count: int,
            keep_all: bool = False) -> tuple[FeatureStats, FeatureStats, torch.Tensor] | None:
        """(Inception statistics (n = count, D = 2048), encoder statistics (count, D), shown samples
        (<= 32, 3, R, R) uint8) on rank 0; None on the others. `keep_all`: the Inception statistics carry all
        `count` vectors (precision/recall), whatever `FEATURES_KEPT`."""
        key, place, size = (steps, float(scale)), self.place, self.cfg.batch_size
        made, sinks = self.done.get(key, (0, None))
        if made < count or keep_all and count > sinks["inception"].keep:
            start = time.perf_counter()
            classes = len(self.model.classes)

            def generated(index: int) -> dict[str, torch.Tensor]:
                labels = torch.arange(index * size, min((index + 1) * size, count)) % classes
                with place.autocast():
                    x = self.model.generate(labels, steps=steps, cfg_scale=scale, seed=self.cfg.seed + index)
                shown = max(0, min(len(x), self.SHOWN - index * size))  # x: (B, 3, R, R) in [0, 1]
                return {"inception": self.inception(x), "encoder": self.encoder(x), "shown": as_uint8(x[:shown])}

            marks = {n for n in (self.cfg.gen_samples, self.cfg.sweep_samples) if n < count}
            sinks = {"inception": FeatureAccumulator(keep=max(FEATURES_KEPT, count if keep_all else 0), marks=marks),
                     "encoder": FeatureAccumulator(marks=marks), "shown": Rows()}
            stream_batches(generated, sinks, batch_count(count, size), place, f"gFID steps={steps} cfg={scale:g}",
                           self.progress, rows=_rows(count, size))
            self.done[key] = (count, sinks)
            self.seconds += time.perf_counter() - start
        if not place.is_main:
            return None
        source = f"{count} samples, steps={steps}, cfg={scale:g}"
        return (sinks["inception"].prefix(count, network=self.inception.name, source=source),
                sinks["encoder"].prefix(count, network=self.encoder.name, source=source), sinks["shown"].tensor)


def evaluate_diffusion(dit_dir: Path, ref: dict[str, Any], inception: InceptionFeatures, encoder: EncoderFeatures,
                       params: Params, out_dir: Path, plots_dir: Path, progress: bool,
                       place: Placement | None = None) -> dict[str, Any] | None:
    """gFID with and without guidance, precision/recall, FD_dinov2, and the two sweeps (DVC plots); rank 0
    (every rank generates its share of the samples; the others return None)."""
    from aligntok.diffusion.api import DiffusionModel

    place = place or Placement()
    cfg, steps, scale = params.evaluate, params.sample.steps, params.sample.cfg_scale
    samples = SampleFeatures(DiffusionModel.load(dit_dir, device=place.device), inception, encoder, cfg, progress,
                             place)
    main = place.is_main

    def gfid(steps_: int, scale_: float, count: int) -> float | None:
        got = samples.get(steps_, scale_, count)
        return fd(got[0], ref["train"]) if got is not None else None

    metrics: dict[str, Any] = {}
    for suffix, s in (("cfg", scale), ("nocfg", 1.0)):
        got = samples.get(steps, s, cfg.gen_samples, keep_all=True)
        if got is None:
            continue
        feats, enc, shown = got
        pr = precision_recall(ref["train"].features, feats.features, k=PRDC_NEIGHBOURS)
        metrics |= {f"gfid_{suffix}": fd(feats, ref["train"]), f"precision_{suffix}": pr.precision,
                    f"recall_{suffix}": pr.recall, f"fd_dinov2_{suffix}": fd(enc, ref["train_encoder"])}
        metrics |= kid_and_intervals(f"gfid_{suffix}", f"gkid_{suffix}", feats, ref["train"],
                                     metrics[f"gfid_{suffix}"], cfg.seed)
        _save_grid(shown.float() / 255, out_dir / f"samples_{suffix}.png", len(samples.model.classes))
    rows_steps = [{"steps": n, "gfid": gfid(n, scale, cfg.sweep_samples)} for n in sorted(set(cfg.steps_sweep))]
    rows_cfg = [{"cfg_scale": g, "gfid": gfid(steps, g, cfg.sweep_samples)} for g in sorted(set(cfg.cfg_sweep))]
    by_step = {}
    for snapshot in sorted((dit_dir / SNAPSHOTS).glob("step_*.safetensors")):
        step = int(snapshot.stem.removeprefix("step_"))
        earlier = SampleFeatures(DiffusionModel.load(dit_dir, weights=snapshot, device=place.device), inception,
                                 encoder, cfg, progress, place)
        values = {f"gfid_{suffix}": earlier.get(steps, s, cfg.gen_samples) for suffix, s in (("cfg", scale),
                                                                                           ("nocfg", 1.0))}
        by_step[str(step)] = {k: fd(v[0], ref["train"]) for k, v in values.items() if v is not None}
        samples.seconds += earlier.seconds
    if not main:
        return None
    _write_csv(plots_dir / "gfid_vs_steps.csv", rows_steps)
    _write_csv(plots_dir / "gfid_vs_cfg.csv", rows_cfg)
    metrics["train_steps"] = float(samples.model.description["metrics"]["steps"])
    if by_step:
        metrics["by_step"] = by_step
        rows = [{"train_steps": int(k), **v} for k, v in by_step.items()]
        rows.append({"train_steps": int(metrics["train_steps"]), "gfid_cfg": metrics["gfid_cfg"],
                     "gfid_nocfg": metrics["gfid_nocfg"]})
        _write_csv(plots_dir / "gfid_vs_train_steps.csv", rows)
    metrics["sampling_seconds"] = samples.seconds
    log.info("diffusion: gFID %s (gKID %s) with guidance %.1f, %s (%s) without; precision %.3f, recall %.3f",
             with_interval(metrics, "gfid_cfg", 2), with_interval(metrics, "gkid_cfg", 4), scale,
             with_interval(metrics, "gfid_nocfg", 2), with_interval(metrics, "gkid_nocfg", 4), metrics["precision_cfg"],
             metrics["recall_cfg"])
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


def run_evaluate(params: Params, paths: EvalPaths, register: bool = True,
                 progress: bool = True) -> dict[str, Any] | None:
    """Measure every tokenizer stage and the diffusion model; write metrics, plots, grids; tag the registry.
    Counts the splits cannot supply are refused first (`CountError`, naming the params key), before any model
    or reference is read. Under several ranks every rank computes its share and rank 0 writes and returns the
    metrics (others None)."""
    if paths.validation is not None:
        require_validated(paths.validation)
    check_counts(paths.data, evaluate_counts(params.evaluate))
    with placed(params.runtime) as place:
        return _evaluate(params, paths, register, progress, place)


def _evaluate(params: Params, paths: EvalPaths, register: bool, progress: bool,
              place: Placement) -> dict[str, Any] | None:
    cfg = params.evaluate
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    ref = load_reference(paths.reference, cfg)
    folders = {name: paths.tokenizers / name for name in cfg.tokenizers}
    if missing := [str(f) for f in folders.values() if not (f / "tokenizer.json").is_file()]:
        raise FileNotFoundError(f"no tokenizer in {missing} (run the tokenizer stages first)")
    runtime_cfg = params.runtime
    inception = InceptionFeatures(device=place.device, channels_last=runtime_cfg.channels_last, backend=runtime_cfg.fid_backend)
    encoder = EncoderFeatures(paths.encoder, device=place.device)
    threads = runtime_cfg.decode_threads
    val = load_split(paths.data, "val", limit=max(cfg.recon_images, cfg.probe_val_images), decode_threads=threads)
    probe = ProbeSets(train=load_split(paths.data, "train", limit=cfg.probe_train_images),
                      val=val.head(cfg.probe_val_images))
    if place.is_main:
        paths.out.mkdir(parents=True, exist_ok=True)
    cache: dict[bytes, dict[str, float] | None] = {}
    tokenizers = {name: evaluate_tokenizer(name, folder, val, probe, ref, inception, encoder, cfg, paths.out,
                                           cache, progress, place) for name, folder in folders.items()}
    reference = reference_probes(probe, encoder, cfg, progress, place)
    diffusion = evaluate_diffusion(paths.dit, ref, inception, encoder, params, paths.out, paths.plots, progress,
                                   place)
    if not place.is_main:
        return None
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
        "kid": f"unbiased MMD^2 with the kernel (x.y / {FEATURE_DIM} + 1)^3 on the rFID / gFID Inception vectors "
               f"against the same references: rkid, gkid_* the mean and *_std the standard deviation (ddof 0) "
               f"over {KID_SUBSETS} subsets of min({KID_SUBSET_SIZE}, the smaller set) vectors of each set, seed "
               f"{cfg.seed}; where both sets are no larger than that, every subset is all of both and the std "
               f"is 0 (the intervals give the sampling noise)",
        "kid_subsets": KID_SUBSETS, "kid_subset_size": KID_SUBSET_SIZE,
        "bootstrap": f"{LEVEL:.0%} intervals (*_ci_lo, *_ci_hi) over the evaluated images, seed {cfg.seed}, the "
                     f"same draws for every tokenizer (paired): percentile intervals of the mean over "
                     f"{MEAN_RESAMPLES} resamples of the per-image PSNR and SSIM and of the probe's per-image "
                     f"correctness (lp_top1); over {RESAMPLES} resamples of the reconstructions' or samples' "
                     f"Inception vectors for rfid, rkid, gfid_*, gkid_*, the reference held fixed (its own noise "
                     f"is not in the interval). FID's resamples hold ~63% distinct vectors and are biased upwards: "
                     f"its interval is shifted by the bootstrap bias estimate, an interval for FID's expectation "
                     f"at this count that errs wide; KID's leave out pairs of a repeated vector (plain "
                     f"percentile). Left out where the vectors are not all kept (> {FEATURES_KEPT})",
        "bootstrap_level": LEVEL, "bootstrap_resamples": RESAMPLES, "bootstrap_mean_resamples": MEAN_RESAMPLES,
        "precision_recall": f"k={PRDC_NEIGHBOURS} nearest-neighbour manifolds on Inception features, against the same "
                            f"{cfg.reference_images} training images",
        "linear_probe": f"logistic regression on standardised mean-pooled features, {cfg.probe_train_images} "
                        f"training / {cfg.probe_val_images} validation images, top-1; the pixel baseline on "
                        f"images area-averaged to at most {PIXEL_SIDE}x{PIXEL_SIDE} (3 x {PIXEL_SIDE}^2 features)",
        "sampling": params.sample.model_dump(mode="json"), "reference_manifest_sha256": ref["manifest_sha256"],
        "loss_curves": loss_curves,
    }
    atomic_write_text(paths.metrics, json.dumps(metrics, indent=2) + "\n")
    if register:
        protocol["mlflow_run_id"] = log_to_tracking(params, paths, metrics, protocol)
    atomic_write_text(paths.out / "protocol.json", json.dumps(protocol, indent=2) + "\n")
    log.info("evaluate: %.0f s -> %s", metrics["evaluate_seconds"], paths.metrics)
    return metrics


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
    """Per-step training losses of every stage, read back from its MLflow run (the receipt names it), as CSV. A
    run the tracking store does not hold (the stage's outputs came from DVC's cache of a run tracked elsewhere)
    leaves an empty CSV and says so, rather than failing the evaluation."""
    from aligntok.ops.tracking import metric_history, tracking_uri

    found: dict[str, str] = {}
    for stage, folder in {**folders, "train_dit": paths.dit}.items():
        receipt = _receipt(folder)
        rows = metric_history(receipt["run_id"]) if receipt else []
        if rows is None:
            found[stage] = f"MLflow run {receipt['run_id']} is not in the tracking store at {tracking_uri()}"
            log.warning("loss curve of %s left empty: %s", stage, found[stage])
            rows = []
        elif not rows:
            found[stage] = "no MLflow run recorded (trained with --no-register?)"
        _write_csv(plots_dir / f"loss_{stage}.csv", rows)
        if rows:
            found[stage] = f"run {receipt['run_id']}"
    return found


def log_to_tracking(params: Params, paths: EvalPaths, metrics: dict[str, Any], protocol: dict[str, Any]) -> str:
    """One `evaluate` run with every figure and file; each registered version tagged with its own figures."""
    from aligntok.ops.tracking import StageRun, tag_model_version

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
    name = f"{receipt['model']}/{receipt['version']}"
    try:
        tag(receipt["model"], receipt["version"], tags)
    except Exception as exc:  # MlflowException; mlflow is imported only by the tracking module
        from aligntok.ops.tracking import not_in_store

        if not not_in_store(exc):
            raise
        log.warning("%s: not tagged with its figures, the tracking store has no such version (the stage's outputs "
                    "came from DVC's cache of a run tracked elsewhere)", name)
        return f"{name} (not in this tracking store: not tagged)"
    return name

"""The semantic-preservation ablation run long: does the latent lose its semantics without w_sp?

The paper's key ablation: stage 2 fine-tunes the whole tokenizer, and without the semantic preservation loss
the latent's linear probe collapses (35% -> 9.5%). The default pipeline's stage 2 is too short to tell (100
steps at 0.1x the encoder learning rate barely move the encoder), so this runs stage 2 long in four arms, with
w_sp = 1 and 0 at the encoder learning-rate ratio of `params.yaml` (0.1x) and at 1x, from the workspace's
stage-1 tokenizer, and measures along the way (snapshots of the EMA model at `snapshots` steps):

- the **latent linear probe** (top-1 of logistic regression on the pooled latent, as `evaluate` measures it);
- the **drift** from stage 1: linear CKA and the relative change of the latent, and the linear CKA of the
  encoder's pooled features (`aligntok.eval.cka`), on the first `drift_images` validation images;
- the reconstruction PSNR on the same images;
- at the `gfid_at` snapshots, the **downstream gFID** and gKID (with their bootstrap intervals, as `evaluate`):
  a latent cache of the snapshot, a DiT trained on it for `dit_steps` (the study's budget), sampled with and
  without guidance against the `fid_reference` stage's features.

    python -m aligntok.ops.ablation                      # the four arms at the default size, then the report
    python -m aligntok.ops.ablation --arms wsp1_lr1 wsp0_lr1 --steps 400
    python -m aligntok.ops.ablation --report-only

Everything it trains lives in `--scratch` (default `checkpoints/ablation_wsp/`, not versioned): a killed run
resumes from the stage checkpoint, and every measured point is written at once to `--out`
(`reports/ablation_wsp/<arm>.json`), so a rerun measures only what is missing. The report is
`reports/ablation_wsp.md` with the plots `reports/ablation_wsp.png`. It needs the default pipeline's outputs
(`dvc repro align_latent fid_reference`) and no DVC stage depends on it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aligntok.errors import AligntokError
from aligntok.eval.bootstrap import with_interval
from aligntok.fileio import atomic_write_text
from aligntok.ops.lineage import code_digest

log = logging.getLogger(__name__)

STAGE = "align_perceptual"
"""The stage the ablation runs long (stage 2: the full fine-tune with the semantic preservation loss)."""


@dataclass(frozen=True)
class Arm:
    name: str
    w_sp: float
    encoder_lr_scale: float


ARMS = (Arm("wsp1_lr0.1", 1.0, 0.1), Arm("wsp0_lr0.1", 0.0, 0.1), Arm("wsp1_lr1", 1.0, 1.0), Arm("wsp0_lr1", 0.0, 1.0))


@dataclass(frozen=True)
class AblationSize:
    steps: int = 400
    """Stage-2 steps of every arm (the default pipeline's stage 2 runs 100)."""
    snapshots: tuple[int, ...] = (25, 50, 100, 200, 400)
    probe_train_images: int = 2000
    probe_val_images: int = 500
    drift_images: int = 256
    gfid_at: tuple[int, ...] = (100, 200, 400)
    """Snapshots whose latents train a DiT for the downstream gFID (each costs a cache, a DiT and sampling: about
    4 minutes on 2 cores at the default size). 100 is the default pipeline's stage-2 length."""
    cache_images: int = 3000
    dit_steps: int = 500
    gen_samples: int = 150

    def check(self) -> None:
        if bad := [s for s in (*self.snapshots, *self.gfid_at) if not 0 < s <= self.steps]:
            raise AligntokError(f"ablation: steps {bad} are outside 1..--steps={self.steps}")
        if bad := [s for s in self.gfid_at if s not in self.snapshots]:
            raise AligntokError(f"ablation: --gfid-at {bad} must be among --snapshots {list(self.snapshots)}")


@dataclass(frozen=True)
class Workspace:
    """The default pipeline's outputs the ablation starts from, and where it writes."""

    repo: Path
    out: Path
    scratch: Path

    @property
    def data(self) -> Path:
        return self.repo / "data" / "shards"

    @property
    def stage1(self) -> Path:
        return self.repo / "models" / "tokenizer" / "align_latent"

    @property
    def validation(self) -> Path:
        return self.repo / "reports" / "validation" / "validation.json"

    def check(self, gfid: bool) -> None:
        needed = {self.data / "manifest.parquet": "ingest", self.validation: "validate",
                  self.repo / "models" / "encoder" / "encoder.safetensors": "encoder",
                  self.stage1 / "tokenizer.safetensors": "align_latent"}
        if gfid:
            needed[self.repo / "data" / "fid_reference" / "reference.json"] = "fid_reference"
        if missing := [f"{path} (stage {stage})" for path, stage in needed.items() if not path.is_file()]:
            raise AligntokError(f"ablation: missing {', '.join(missing)}; run `dvc repro "
                                f"{' '.join(sorted(set(needed.values())))}` first")


def arm_params(repo: Path, arm: Arm, size: AblationSize) -> Any:
    """params.yaml with the arm's stage-2 row: its length, w_sp and encoder learning-rate ratio."""
    from aligntok.config import load_params

    return load_params(repo / "params.yaml", {f"{STAGE}.steps": size.steps, f"{STAGE}.losses.semantic": arm.w_sp,
                                              f"{STAGE}.encoder_lr_scale": arm.encoder_lr_scale,
                                              f"{STAGE}.checkpoint_every": min(50, size.steps)})


def snapshot_folder(ws: Workspace, arm: Arm, step: int) -> Path:
    from aligntok.tokenizer.stages import SNAPSHOTS

    return ws.stage1 if step == 0 else ws.scratch / arm.name / "model" / SNAPSHOTS / f"step_{step:06d}"


def train_arm(ws: Workspace, arm: Arm, size: AblationSize, progress: bool) -> None:
    """Stage 2 of one arm with its snapshots (resuming a killed run; nothing to do when every snapshot is there)."""
    from aligntok.tokenizer.stages import StagePaths, run_tokenizer_stage

    if all((snapshot_folder(ws, arm, s) / "tokenizer.json").is_file() for s in size.snapshots):
        return
    paths = StagePaths(data=ws.data, encoder=ws.repo / "models" / "encoder", out=ws.scratch / arm.name / "model",
                       previous=ws.stage1, checkpoints=ws.scratch / "checkpoints" / arm.name,
                       validation=ws.validation)
    run_tokenizer_stage(STAGE, arm_params(ws.repo, arm, size), paths, register=False, progress=progress,
                        snapshots=size.snapshots, code=code_digest(STAGE))


# ------------------------------------------------------------------------------------------------ measures
@dataclass
class Probe:
    """The fixed images every snapshot is measured on, and stage 1's representations of the drift images."""

    train: tuple[torch.Tensor, np.ndarray]
    val: tuple[torch.Tensor, np.ndarray]
    drift: torch.Tensor
    stage1: dict[str, np.ndarray] = field(default_factory=dict)


def load_probe(ws: Workspace, size: AblationSize) -> Probe:
    from aligntok.data.loader import load_split

    def first(split: str, count: int) -> tuple[torch.Tensor, np.ndarray]:
        reader = load_split(ws.data, split, limit=count)
        images, labels = reader.batch(torch.arange(len(reader)))
        return images, labels.numpy()

    train, val = first("train", size.probe_train_images), first("val", max(size.probe_val_images, size.drift_images))
    return Probe(train=train, val=(val[0][:size.probe_val_images], val[1][:size.probe_val_images]),
                 drift=val[0][:size.drift_images])


def representations(tokenizer: Any, images: torch.Tensor) -> dict[str, np.ndarray]:
    """A `Tokenizer`'s latent (N, C*h*w), its encoder's pooled features (N, D) and the reconstruction PSNR (N,)."""
    from aligntok.eval.metrics import psnr

    latent = tokenizer.encode(images)  # (N, C, h, w)
    with torch.no_grad():
        features = torch.cat([tokenizer.model.encoder(part).mean(dim=(2, 3)) for part in images.split(64)])  # (N, D)
    recon = tokenizer.decode(latent)  # (N, 3, R, R)
    return {"latent": latent.flatten(1).double().numpy(), "encoder": features.double().numpy(),
            "psnr": psnr(images, recon).double().numpy()}


def measure(folder: Path, probe: Probe) -> dict[str, float]:
    """Linear probe, drift from stage 1 and PSNR of one snapshot."""
    from aligntok.eval.cka import linear_cka, relative_change
    from aligntok.eval.probe import linear_probe
    from aligntok.tokenizer.api import Tokenizer

    tokenizer = Tokenizer.load(folder)
    pooled = {name: tokenizer.encode(images).mean(dim=(2, 3)).double().numpy()  # (N, C)
              for name, (images, _) in (("train", probe.train), ("val", probe.val))}
    lp = linear_probe(pooled["train"], probe.train[1], pooled["val"], probe.val[1])
    now = representations(tokenizer, probe.drift)
    return {"lp_top1": lp.top1, "lp_val_images": float(lp.n_val),
            "latent_cka": linear_cka(probe.stage1["latent"], now["latent"]),
            "latent_relative_change": relative_change(probe.stage1["latent"], now["latent"]),
            "encoder_cka": linear_cka(probe.stage1["encoder"], now["encoder"]),
            "encoder_relative_change": relative_change(probe.stage1["encoder"], now["encoder"]),
            "psnr": float(now["psnr"].mean())}


def downstream_gfid(ws: Workspace, arm: Arm, step: int, size: AblationSize, progress: bool) -> dict[str, float]:
    """gFID with and without guidance of a DiT trained on the snapshot's latents at the study's budget."""
    from aligntok.config import load_params
    from aligntok.diffusion.api import DiffusionModel
    from aligntok.diffusion.latent_writer import cache_latents
    from aligntok.diffusion.train import DiTPaths, run_train_dit
    from aligntok.eval.evaluate import SampleFeatures, fd, kid_and_intervals
    from aligntok.eval.fd_encoder import EncoderFeatures
    from aligntok.eval.inception import InceptionFeatures
    from aligntok.eval.reference import load_reference

    params = load_params(ws.repo / "params.yaml", {"cache_latents.max_images": size.cache_images,
                                                   "train_dit.steps": size.dit_steps, "train_dit.snapshot_steps": [],
                                                   "evaluate.gen_samples": size.gen_samples})
    folder, work = snapshot_folder(ws, arm, step), ws.scratch / arm.name / f"dit_{step:06d}"
    cache_latents(folder, ws.data, work / "latents", params.cache_latents, progress=progress, runtime=params.runtime)
    run_train_dit(params, DiTPaths(latents=work / "latents", tokenizer=folder, out=work / "dit",
                                   checkpoints=ws.scratch / "checkpoints" / f"{arm.name}_dit_{step:06d}"),
                  register=False, progress=progress, code=code_digest("train_dit"))
    runtime_cfg, cfg = params.runtime, params.evaluate
    ref = load_reference(ws.repo / "data" / "fid_reference", cfg)
    samples = SampleFeatures(DiffusionModel.load(work / "dit"), InceptionFeatures(
        channels_last=runtime_cfg.channels_last, backend=runtime_cfg.fid_backend), EncoderFeatures(ws.repo / "models" / "encoder"),
        cfg, progress)
    out = {}
    for suffix, scale in (("cfg", params.sample.cfg_scale), ("nocfg", 1.0)):
        stats = samples.get(params.sample.steps, scale, cfg.gen_samples, keep_all=True)
        assert stats is not None  # one process: rank 0
        out[f"gfid_{suffix}"] = fd(stats[0], ref["train"])
        out |= kid_and_intervals(f"gfid_{suffix}", f"gkid_{suffix}", stats[0], ref["train"], out[f"gfid_{suffix}"],
                                 cfg.seed)
    return out | {"dit_steps": float(size.dit_steps), "cache_images": float(size.cache_images),
                  "gen_samples": float(cfg.gen_samples)}


# ------------------------------------------------------------------------------------------------ the run
def _as_recorded(arm: Arm, size: AblationSize) -> dict[str, Any]:
    """The arm and size as an arm's record holds them (tuples as JSON lists)."""
    return json.loads(json.dumps({"arm": asdict(arm), "size": asdict(size)}))


def measured_elsewhere(record: dict[str, Any], arm: Arm, size: AblationSize) -> str | None:
    """Why an arm's `record` cannot be extended by a run at `size` (another arm, or a size its points or gFIDs
    depend on: a field other than `gfid_at`, which only says where a DiT is trained), or None when it can. A
    rerun with other `--gfid-at` steps adds the missing ones and keeps the rest."""
    if not record:
        return None
    wanted = _as_recorded(arm, size)
    if record.get("arm") not in (None, wanted["arm"]):
        return f"arm {record['arm']}"
    recorded = {k: v for k, v in (record.get("size") or {}).items() if k != "gfid_at"}
    if changed := sorted(k for k in recorded if recorded[k] != wanted["size"].get(k)):
        return "; ".join(f"{k}={recorded[k]}, not {wanted['size'].get(k)}" for k in changed)
    return None


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_ablation(ws: Workspace, arms: list[Arm], size: AblationSize, progress: bool = True) -> Path:
    """Train and measure every arm (what `--out` already holds is kept), then write the report."""
    from aligntok.tokenizer.api import Tokenizer

    size.check()
    ws.check(gfid=bool(size.gfid_at))
    probe = load_probe(ws, size)
    probe.stage1 = representations(Tokenizer.load(ws.stage1), probe.drift)
    for arm in arms:
        path = ws.out / f"{arm.name}.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        if why := measured_elsewhere(record, arm, size):
            raise AligntokError(f"{path}: measured at another size or arm ({why}); move it away or rerun with "
                                "the size it was measured at")
        record |= _as_recorded(arm, size)
        # The gFID steps are what was asked for, this time and before: a point added later keeps the earlier ones.
        record["size"]["gfid_at"] = sorted({*map(int, record.get("gfid", {})), *size.gfid_at})
        record.setdefault("points", {})
        record.setdefault("gfid", {})
        record.setdefault("seconds", {"wall": 0.0, "cpu": 0.0})

        def save() -> None:
            ws.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(record, indent=2) + "\n")

        start, cpu = time.perf_counter(), _cpu_seconds()
        missing = [s for s in (0, *size.snapshots) if str(s) not in record["points"]]
        if missing or any(str(s) not in record["gfid"] for s in size.gfid_at):
            train_arm(ws, arm, size, progress)
        for step in missing:
            record["points"][str(step)] = measure(snapshot_folder(ws, arm, step), probe)
            log.info("%s step %d: %s", arm.name, step, {k: round(v, 4) for k, v in record["points"][str(step)].items()})
            save()
        for step in size.gfid_at:
            if str(step) not in record["gfid"]:
                record["gfid"][str(step)] = downstream_gfid(ws, arm, step, size, progress)
                log.info("%s step %d: %s", arm.name, step, record["gfid"][str(step)])
                save()
        record["seconds"]["wall"] += time.perf_counter() - start
        record["seconds"]["cpu"] += _cpu_seconds() - cpu
        save()
    return write_report(ws.out, ws.out.with_suffix(".md"))


# ------------------------------------------------------------------------------------------------ report
def load_records(results: Path) -> dict[str, dict[str, Any]]:
    records = {}
    for arm in ARMS:
        if (results / f"{arm.name}.json").is_file():
            records[arm.name] = json.loads((results / f"{arm.name}.json").read_text())
    return records


def _binomial_half(p: float, n: float) -> float:
    """Two binomial standard errors of a top-1 accuracy on n images."""
    return 2 * math.sqrt(max(p * (1 - p), 1e-4) / max(n, 1.0))


def verdict(with_sp: dict[str, float], without: dict[str, float]) -> str:
    """'holds' when w_sp = 1 keeps a higher probe than w_sp = 0 by more than both intervals (two binomial
    standard errors each), 'does not hold' when it is lower by as much, else a tie."""
    a, b = with_sp["lp_top1"], without["lp_top1"]
    margin = _binomial_half(a, with_sp["lp_val_images"]) + _binomial_half(b, without["lp_val_images"])
    if abs(a - b) <= margin:
        return "tie (intervals overlap)"
    return "holds" if a > b else "does not hold"


def gfid_verdict(with_sp: dict[str, float], without: dict[str, float], key: str = "gfid_cfg") -> str:
    """'holds' when w_sp = 1 gives the lower gFID with the two bootstrap intervals apart, 'does not hold' when
    it is higher likewise, else a tie: the study's `compare` on the two intervals."""
    from aligntok.ops.study import Figure, compare

    def figure(g: dict[str, float]) -> Figure:
        return Figure(mean=g[key], values=[g[key]], interval=(g[f"{key}_ci_lo"], g[f"{key}_ci_hi"]))

    return compare(figure(with_sp), figure(without), lower_is_better=True)


def write_report(results: Path, report: Path) -> Path:
    records = load_records(results)
    if not records:
        raise AligntokError(f"{results}: no ablation results (run `python -m aligntok.ops.ablation` first)")
    size = next(iter(records.values()))["size"]
    gfid_steps = sorted({int(step) for r in records.values() for step in r["gfid"]})
    lines = ["# The semantic-preservation ablation, run long", "",
             f"Generated by `python -m aligntok.ops.ablation` from `{results}`. Stage 2 (`{STAGE}`) from the pipeline's "
             f"stage-1 tokenizer for {size['steps']} steps (the default pipeline runs 100) in each arm; at each "
             f"snapshot (EMA weights): the latent linear probe ({size['probe_train_images']} training / "
             f"{size['probe_val_images']} validation images), the drift from stage 1 on {size['drift_images']} "
             "validation images (linear CKA and relative change of the latent, linear CKA of the encoder's pooled "
             f"features) and the reconstruction PSNR; at steps {gfid_steps}, gFID of a DiT trained for "
             f"{size['dit_steps']} steps on {size['cache_images']} cached images ({size['gen_samples']} samples).", "",
             "| arm | w_sp | encoder lr | step | LP top-1 | latent CKA | latent rel. change | encoder CKA | PSNR | "
             "gFID cfg [95%] | gFID no-cfg | gKID cfg x1e3 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, record in records.items():
        arm = record["arm"]
        for step, point in sorted(record["points"].items(), key=lambda kv: int(kv[0])):
            g = record["gfid"].get(step, {})
            lines.append(f"| {name} | {arm['w_sp']:g} | {arm['encoder_lr_scale']:g}x | {step} | "
                         f"{100 * point['lp_top1']:.1f}% | {point['latent_cka']:.3f} | "
                         f"{point['latent_relative_change']:.3f} | {point['encoder_cka']:.3f} | {point['psnr']:.2f} | "
                         f"{with_interval(g, 'gfid_cfg', missing='—')} | {with_interval(g, 'gfid_nocfg', missing='—')} | "
                         f"{with_interval(g, 'gkid_cfg', scale=1e3, missing='—')} |")
    lines += ["", "## w_sp keeps the latent's semantics (the paper: LP 35% with it, 9.5% without)", ""]
    for ratio in sorted({r["arm"]["encoder_lr_scale"] for r in records.values()}):
        pair = {r["arm"]["w_sp"]: r for r in records.values() if r["arm"]["encoder_lr_scale"] == ratio}
        if 1.0 not in pair or 0.0 not in pair:
            lines.append(f"- encoder lr {ratio:g}x: not measured (an arm is missing)")
            continue
        end = str(max(int(s) for s in pair[1.0]["points"]) if pair[1.0]["points"] else 0)
        a, b = pair[1.0]["points"].get(end), pair[0.0]["points"].get(end)
        if a is None or b is None:
            lines.append(f"- encoder lr {ratio:g}x: not measured at step {end}")
            continue
        lines.append(f"- encoder lr {ratio:g}x, step {end}: LP {100 * a['lp_top1']:.1f}% with w_sp vs "
                     f"{100 * b['lp_top1']:.1f}% without (latent CKA to stage 1: {a['latent_cka']:.3f} vs "
                     f"{b['latent_cka']:.3f}) — **{verdict(a, b)}**")
        for step in sorted(set(pair[1.0]["gfid"]) & set(pair[0.0]["gfid"]), key=int):
            ga, gb = pair[1.0]["gfid"][step], pair[0.0]["gfid"][step]
            lines.append(f"- encoder lr {ratio:g}x, step {step}, downstream gFID with guidance: "
                         f"{with_interval(ga, 'gfid_cfg')} with w_sp vs {with_interval(gb, 'gfid_cfg')} without — "
                         f"**{gfid_verdict(ga, gb)}**")
    lines += ["", "Intervals: two binomial standard errors of each probe's top-1, the claim holding when the difference "
              "exceeds both; for gFID the 95% bootstrap intervals over the generated samples, the claim holding "
              "when they are apart.", "", f"![LP, drift and gFID against stage-2 steps]({_plot(records, report).name})", "",
              "Cost: each arm's wall and CPU time summed over the runs that measured it (a run that adds points "
              "adds its own, with stage 2 retrained where `--scratch` no longer holds it).", "",
              "| arm | wall | CPU |", "|---|---|---|"]
    for name, record in records.items():
        lines.append(f"| {name} | {record['seconds']['wall'] / 60:.1f} min | {record['seconds']['cpu'] / 60:.1f} min |")
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report


def _plot(records: dict[str, dict[str, Any]], report: Path) -> Path:
    """LP, latent and encoder CKA against stage-2 steps, one line per arm (dashed: w_sp = 0), and the downstream
    gFID with guidance and its 95% bootstrap interval where it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for name, record in records.items():
        points = sorted((int(s), p) for s, p in record["points"].items())
        steps = [s for s, _ in points]
        style = "-" if record["arm"]["w_sp"] > 0 else "--"
        for axis, key, scale in zip(axes, ("lp_top1", "latent_cka", "encoder_cka"), (100, 1, 1)):
            axis.plot(steps, [scale * p[key] for _, p in points], style, marker="o", label=name)
        gfid = sorted((int(s), g) for s, g in record["gfid"].items())
        if gfid:
            values = [g["gfid_cfg"] for _, g in gfid]
            below = [v - g.get("gfid_cfg_ci_lo", v) for v, (_, g) in zip(values, gfid)]
            above = [g.get("gfid_cfg_ci_hi", v) - v for v, (_, g) in zip(values, gfid)]
            axes[3].errorbar([s for s, _ in gfid], values, yerr=[below, above], fmt=style, marker="o", capsize=3,
                             label=name)
    for axis, label in zip(axes, ("latent LP top-1 (%)", "latent linear CKA to stage 1",
                                  "encoder linear CKA to stage 1", "downstream gFID with guidance [95%]")):
        axis.set_xlabel("stage-2 steps")
        axis.set_ylabel(label)
    axes[0].legend()
    axes[3].set_xlim(axes[0].get_xlim())  # the same step axis as the other panels
    path = report.with_suffix(".png")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def build_parser() -> argparse.ArgumentParser:
    default = AblationSize()
    parser = argparse.ArgumentParser(prog="python -m aligntok.ops.ablation", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arms", nargs="*", choices=[a.name for a in ARMS], default=[a.name for a in ARMS],
                        help="arms to run: w_sp 1/0 at encoder lr 0.1x/1x")
    parser.add_argument("--steps", type=int, default=default.steps, help="stage-2 steps of every arm")
    parser.add_argument("--snapshots", type=int, nargs="+", default=list(default.snapshots),
                        help="steps measured (besides stage 1, step 0)")
    parser.add_argument("--gfid-at", type=int, nargs="*", default=list(default.gfid_at),
                        help="snapshots whose latents train a DiT for the downstream gFID (none: skip)")
    parser.add_argument("--dit-steps", type=int, default=default.dit_steps)
    parser.add_argument("--cache-images", type=int, default=default.cache_images)
    parser.add_argument("--repo", default=".", help="the workspace with the default pipeline's outputs")
    parser.add_argument("--out", default="reports/ablation_wsp", help="one JSON per arm; the report beside it")
    parser.add_argument("--scratch", default="checkpoints/ablation_wsp", help="models, caches and checkpoints")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from --out")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    out = Path(args.out)
    try:
        if args.report_only:
            report = write_report(out, out.with_suffix(".md"))
        else:
            size = AblationSize(steps=args.steps, snapshots=tuple(sorted(set(args.snapshots))),
                                gfid_at=tuple(sorted(set(args.gfid_at))), dit_steps=args.dit_steps,
                                cache_images=args.cache_images)
            ws = Workspace(repo=Path(args.repo), out=out, scratch=Path(args.scratch))
            report = run_ablation(ws, [a for a in ARMS if a.name in args.arms], size, progress=not args.no_progress)
    except AligntokError as exc:
        print(f"aligntok.ops.ablation: error: {exc}", file=sys.stderr)
        return 1
    print(f"ablation report -> {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

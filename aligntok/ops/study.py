"""The small-scale study: the paper's central comparisons, as DVC experiments over this pipeline.

Each variant is a set of `dvc exp run -S key=value` overrides of `params.yaml` (rows, not code):

| variant | tokenizer the diffusion model learns on |
|---|---|
| a_full   | the three-stage AlignTok tokenizer (stages 1+2+3) |
| b_stage1 | stage 1 only |
| c_no_sp  | stages 1+2 with the semantic preservation weight w_sp = 0 |
| d_vae    | the vanilla VAE of the same latent shape |
| e_vavae  | a VA-VAE-style VAE: the same VAE plus the VF loss aligning its latent to the frozen encoder |
| f_random | the three-stage tokenizer on a randomly initialised encoder of the same architecture |

Every variant runs at each seed of `SEEDS` (0, 1, 2) with the same diffusion budget: seed s is the diffusion
and evaluation seed and, for s > 0, offsets the seeds of the tokenizer rows the variant trains, so the spread
covers both trainings. The tokenizer stages variants share are not retrained (DVC's run cache restores them:
(a)-(c) start from the same stage 1 at each seed). Each run is `dvc exp run ... evaluate`: `evaluate` measures
only the variant's tokenizer, and gFID at every diffusion snapshot (`train_dit.snapshot_steps`) as well as at
the end; the text-to-image stages are not run. Results land in `reports/study/<variant>-seed<s>.json` with
their overrides, command, wall and CPU time; a result is rerun only when missing or run with other overrides.
`reports/study.md` is generated from them: each figure as the mean over seeds with an interval (every seed's
value and its 95% bootstrap interval from `evaluate`), and each claim called only when the intervals are apart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from aligntok.errors import AligntokError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    tokenizer: str
    """The tokenizer stage whose latents the diffusion model learns (`cache_latents.tokenizer`)."""
    overrides: dict[str, Any] = field(default_factory=dict)


VARIANTS = (
    Variant("a_full", "(a) AlignTok, stages 1+2+3", "refine_decoder"),
    Variant("b_stage1", "(b) stage 1 only", "align_latent"),
    Variant("c_no_sp", "(c) stages 1+2, w_sp = 0", "align_perceptual", {"align_perceptual.losses.semantic": 0.0}),
    Variant("d_vae", "(d) vanilla VAE", "vae_baseline"),
    Variant("e_vavae", "(e) VA-VAE-style VAE", "vae_baseline",  # VA-VAE's published defaults
            {"vae_baseline.losses.vf": 0.1, "vae_baseline.losses.vf_adaptive": True}),
    Variant("f_random", "(f) random-init encoder, stages 1+2+3", "refine_decoder",
            {"encoder.source": "random:dinov2_vits14"}),
)

STUDY_SIZE = {
    # The same diffusion budget for every variant, reduced so that the six variants and one extra seed fit
    # about an hour on 2 CPU cores (the default pipeline trains its DiT for 1,500 steps on 8,000 images).
    "cache_latents.max_images": 3000,
    "train_dit.steps": 500,
    "train_dit.snapshot_steps": [250],
    "evaluate.recon_images": 100,
    "evaluate.gen_samples": 150,
    "evaluate.sweep_samples": 100,
    "evaluate.steps_sweep": [50],
    "evaluate.cfg_sweep": [1.0, 4.0],
    "evaluate.probe_train_images": 1000,
    "evaluate.probe_val_images": 300,
}


TRAINS = {
    # The tokenizer rows each variant's tokenizer is trained through (its `start_from` chain).
    "align_latent": ("align_latent",),
    "align_perceptual": ("align_latent", "align_perceptual"),
    "refine_decoder": ("align_latent", "align_perceptual", "refine_decoder"),
    "vae_baseline": ("vae_baseline",),
}

TOKENIZER_SEED_STRIDE = 10
"""Study seed s > 0 offsets the seed of every tokenizer row the variant trains by s x this (seed 0 leaves the
rows as in `params.yaml`, so its tokenizers are the default pipeline's and come from DVC's run cache)."""

TARGET = "evaluate"
"""The stage each study run reproduces with its upstream: the text-to-image stages are not part of the study."""


def variant_overrides(variant: Variant, seed: int, size: dict[str, Any],
                      row_seeds: dict[str, int] | None = None) -> dict[str, Any]:
    """Every `-S` override of one run: the study size, the variant's rows, and the seed: the diffusion and
    evaluation seed, and for s > 0 the seeds of the tokenizer rows the variant trains (`row_seeds`: their
    seeds in params.yaml; default: read from the repository's params.yaml)."""
    overrides = {**size, "cache_latents.tokenizer": variant.tokenizer, "evaluate.tokenizers": [variant.tokenizer],
                 "train_dit.seed": seed, "evaluate.seed": seed}
    if seed > 0:
        rows = row_seeds if row_seeds is not None else default_row_seeds()
        overrides |= {f"{row}.seed": rows[row] + TOKENIZER_SEED_STRIDE * seed for row in TRAINS[variant.tokenizer]}
    return overrides | variant.overrides


def default_row_seeds(params_file: Path | None = None) -> dict[str, int]:
    """The seed of each tokenizer row in params.yaml (the repository's by default)."""
    from aligntok.config import load_params

    params = load_params(params_file or Path(__file__).resolve().parents[2] / "params.yaml")
    return {row: params.stage(row).seed for row in TRAINS}


def _set_args(overrides: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for key, value in overrides.items():
        args += ["-S", f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]
    return args


def study_command(name: str, overrides: dict[str, Any]) -> list[str]:
    """The `dvc exp run` of one variant and seed. No --force: stages whose inputs are unchanged are skipped or
    restored from DVC's run cache."""
    return ["dvc", "exp", "run", "--name", name, *_set_args(overrides), TARGET]


def params_digest(params: Path) -> str:
    """SHA-256 of params.yaml's values (canonical JSON, so that comments and layout do not count): a result
    stands only for the base params.yaml it was run on, since a changed default (the data source, a stage's
    size) changes every variant although the study's overrides stay the same."""
    values = yaml.safe_load(params.read_text())
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_variant(variant: Variant, seed: int, size: dict[str, Any], results: Path, repo: Path) -> dict[str, Any]:
    """`dvc exp run` one variant in the workspace and keep its metrics, its wall and CPU time and the command;
    params.yaml and dvc.lock are restored afterwards (the experiment itself stays in DVC's experiment refs)."""
    saved = {path: path.read_text() for path in (repo / "params.yaml", repo / "dvc.lock") if path.is_file()}
    name = f"study-{variant.name}-seed{seed}"
    base = params_digest(repo / "params.yaml")
    overrides = variant_overrides(variant, seed, size, default_row_seeds(repo / "params.yaml"))
    command = study_command(name, overrides)
    log.info("%s: %s", name, " ".join(command))
    start, cpu = time.perf_counter(), _children_cpu_seconds()
    try:
        done = subprocess.run(command, cwd=repo, check=False)
        if done.returncode != 0:
            raise AligntokError(f"study variant {variant.name} (seed {seed}): `dvc exp run` exited "
                                f"{done.returncode}; its stage's own error is printed above")
        metrics = json.loads((repo / "reports" / "metrics.json").read_text())
        protocol = json.loads((repo / "reports" / "eval" / "protocol.json").read_text())
    finally:
        for path, text in saved.items():
            path.write_text(text)
        subprocess.run(["git", "reset", "-q", "--", *map(str, saved)], cwd=repo, check=False)  # dvc staged them
    record = {"variant": variant.name, "label": variant.label, "seed": seed, "experiment": name,
              "overrides": overrides, "params_sha256": base, "command": " ".join(command), "wall_seconds": time.perf_counter() - start,
              "cpu_seconds": _children_cpu_seconds() - cpu,
              "metrics": metrics, "evaluate_run_id": protocol.get("mlflow_run_id"),
              "protocol": {k: protocol[k] for k in ("rfid", "gfid", "linear_probe", "inception") if k in protocol}}
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{variant.name}-seed{seed}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


SEEDS = (0, 1, 2)
"""The study's default seeds (tokenizer and diffusion) of every variant."""


def stale_result(path: Path, overrides: dict[str, Any], params_sha256: str | None = None) -> str | None:
    """Why the result at `path` cannot stand for a run with `overrides` on the params.yaml of digest
    `params_sha256` (missing, run on another params.yaml, or run with other overrides), or None when it can.
    Without `params_sha256` only the overrides are compared."""
    if not path.is_file():
        return "not run yet"
    record = json.loads(path.read_text())
    if params_sha256 is not None and record.get("params_sha256") != params_sha256:
        return ("run on another params.yaml" if record.get("params_sha256") else
                "run before results recorded their params.yaml")
    recorded = record.get("overrides") or {}
    wanted = json.loads(json.dumps(overrides))  # as the record holds them: tuples as lists
    if changed := sorted(k for k in recorded.keys() | wanted.keys() if recorded.get(k) != wanted.get(k)):
        return f"run with other overrides ({', '.join(changed)})"
    return None


def run_study(repo: Path, variants: list[str] | None = None, seeds: list[int] | None = None,
              extra_seeds_for: str = "a_full", extra_seeds: int = 0, size: dict[str, Any] | None = None,
              results: Path | None = None, report: Path | None = None) -> Path:
    """Run what is missing of the variants x seeds (a result in `results` run with the same overrides is kept),
    then write the report and restore outputs."""
    chosen = [v for v in VARIANTS if variants is None or v.name in variants]
    if variants and (unknown := set(variants) - {v.name for v in VARIANTS}):
        raise AligntokError(f"unknown study variants {sorted(unknown)}; known: {[v.name for v in VARIANTS]}")
    results, report = results or repo / "reports" / "study", report or repo / "reports" / "study.md"
    seeds, size = list(seeds or SEEDS), size or STUDY_SIZE
    row_seeds, base = default_row_seeds(repo / "params.yaml"), params_digest(repo / "params.yaml")
    # Seed by seed over the variants (every variant at the first seed before any at the second); the report is
    # rewritten after each run, so an interrupted study still reports what it measured, and a rerun runs only
    # what is missing or was run with other overrides.
    plan = [(v, s) for s in seeds for v in chosen]
    plan += [(v, max(seeds) + 1 + i) for v in chosen if v.name == extra_seeds_for for i in range(extra_seeds)]
    try:
        for variant, seed in plan:
            path = results / f"{variant.name}-seed{seed}.json"
            why = stale_result(path, variant_overrides(variant, seed, size, row_seeds), base)
            if why is None:
                log.info("%s seed %d: already in %s, not rerun", variant.name, seed, results)
                continue
            log.info("%s seed %d: %s; running it", variant.name, seed, why)
            run_variant(variant, seed, size, results, repo)
            write_report(results, report)
    finally:
        subprocess.run(["dvc", "checkout", "--quiet"], cwd=repo, check=False)  # outputs back to params.yaml's
    return write_report(results, report)


# ------------------------------------------------------------------------------------------------ report
def load_results(results: Path) -> dict[str, list[dict[str, Any]]]:
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(results.glob("*-seed*.json")):
        record = json.loads(path.read_text())
        by_variant.setdefault(record["variant"], []).append(record)
    return {name: sorted(records, key=lambda r: r["seed"]) for name, records in by_variant.items()}  # seed 10 after 2


@dataclass(frozen=True)
class Figure:
    """One figure of one variant over its seeds: the mean, the values and the interval a verdict reads."""

    mean: float
    values: list[float]
    interval: tuple[float, float] | None
    """The union of every seed's value and its 95% bootstrap interval (`<key>_ci_lo`/`_hi` in metrics.json);
    without intervals, the range of the seeds' values when there are two or more, else the fallback."""


def figure(rows: list[dict[str, Any]], key: str,
           fallback: Callable[[float, dict[str, Any]], tuple[float, float]] | None = None) -> Figure | None:
    """`key` of every seed's metrics row (None when no row has it)."""
    rows = [r for r in rows if r.get(key) is not None]
    if not rows:
        return None
    values = [float(r[key]) for r in rows]
    bounds = [(float(r[f"{key}_ci_lo"]), float(r[f"{key}_ci_hi"])) for r in rows
              if r.get(f"{key}_ci_lo") is not None and r.get(f"{key}_ci_hi") is not None]
    interval: tuple[float, float] | None = None
    if bounds:
        interval = (min(values + [lo for lo, _ in bounds]), max(values + [hi for _, hi in bounds]))
    elif fallback is not None:
        ends = [fallback(v, r) for v, r in zip(values, rows)]
        interval = (min(lo for lo, _ in ends), max(hi for _, hi in ends))
    elif len(values) > 1:
        interval = (min(values), max(values))
    return Figure(mean=sum(values) / len(values), values=values, interval=interval)


TOKENIZER_FIGURES = ("rfid", "rkid", "psnr", "ssim", "lp_top1")
DIFFUSION_FIGURES = ("gfid_cfg", "gfid_nocfg", "gkid_cfg", "gkid_nocfg", "precision_cfg", "recall_cfg")


def _binomial(n: int) -> Callable[[float, dict[str, Any]], tuple[float, float]]:
    """Two binomial standard errors of a top-1 accuracy on n images (records without a bootstrap interval)."""
    def ends(p: float, _: dict[str, Any]) -> tuple[float, float]:
        half = 2 * math.sqrt(max(p * (1 - p), 1e-4) / n)
        return p - half, p + half
    return ends


def _two_sem(key: str) -> Callable[[float, dict[str, Any]], tuple[float, float]]:
    """Two standard errors of a per-image mean (records without a bootstrap interval)."""
    def ends(value: float, row: dict[str, Any]) -> tuple[float, float]:
        half = 2 * float(row.get(f"{key}_sem", 0.0))
        return value - half, value + half
    return ends


def _summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: every figure over its seeds, the training length, its seeds, runs and cost."""
    tokenizer = [next(iter(r["metrics"]["tokenizer"].values())) for r in records]
    diffusion = [r["metrics"]["diffusion"] for r in records]
    probe_val = int(records[0].get("overrides", {}).get("evaluate.probe_val_images", 500))
    fallbacks = {"lp_top1": _binomial(probe_val), "psnr": _two_sem("psnr"), "ssim": _two_sem("ssim")}
    figures = {k: figure(tokenizer, k, fallbacks.get(k)) for k in TOKENIZER_FIGURES}
    figures |= {k: figure(diffusion, k) for k in DIFFUSION_FIGURES}
    steps = sorted({step for d in diffusion for step in d.get("by_step", {})}, key=int)
    for step in steps:
        rows = [d.get("by_step", {}).get(step, {}) for d in diffusion]
        figures |= {f"{k}@{step}": figure(rows, k) for k in ("gfid_cfg", "gfid_nocfg")}
    return {"figures": {k: v for k, v in figures.items() if v is not None},
            "end_step": int(diffusion[0]["train_steps"]), "steps": steps,
            "seeds": [r["seed"] for r in records], "runs": [r["evaluate_run_id"] for r in records],
            "wall": sum(r["wall_seconds"] for r in records),
            "cpu": sum(r.get("cpu_seconds", math.nan) for r in records)}


def compare(a: Figure, b: Figure, lower_is_better: bool) -> str:
    """The verdict on "a is better than b": 'holds' / 'does not hold' when their intervals are apart,
    'tie (intervals overlap)' when they overlap, and not called when either has no interval."""
    if a.interval is None or b.interval is None:
        return "not called (no interval)"
    (a_lo, a_hi), (b_lo, b_hi) = a.interval, b.interval
    if a_hi < b_lo:
        return "holds" if lower_is_better else "does not hold"
    if b_hi < a_lo:
        return "does not hold" if lower_is_better else "holds"
    return "tie (intervals overlap)"


def write_report(results: Path, report: Path) -> Path:
    data = {name: _summary(records) for name, records in load_results(results).items()}
    if not data:
        raise AligntokError(f"{results}: no study results to report (run `aligntok study` first)")
    records = [r for rs in load_results(results).values() for r in rs]
    size = {k: v for k, v in records[0].get("overrides", {}).items() if k in STUDY_SIZE}
    lines = ["# Small-scale study: the paper's comparisons on the embedded default", "",
             f"Generated by `aligntok study` from `{results}` (one JSON per variant and seed).", "",
             "Run at a reduced size so that every variant fits the session on 2 CPU cores (the same for every "
             "variant): " + ", ".join(f"`{k}={v}`" for k, v in size.items()) + ". The paper trains on ImageNet at "
             "256 px for hundreds of thousands of steps; these figures compare variants with one another, not with "
             "the paper's absolute numbers.", ""]
    lines += _table(data) + [""] + _claims(data) + [""] + _convergence(data, report) + [""] + _provenance(results)
    report.write_text("\n".join(lines) + "\n")
    return report


def _fmt(value: Any, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _cell(f: Figure | None, digits: int = 2, scale: float = 1.0, unit: str = "") -> str:
    """'mean [lo, hi]' (the interval a verdict reads), or the mean alone."""
    if f is None:
        return "—"
    text = f"{f.mean * scale:.{digits}f}{unit}"
    if f.interval is not None:
        text += f" [{f.interval[0] * scale:.{digits}f}, {f.interval[1] * scale:.{digits}f}]"
    return text


def _table(data: dict[str, Any]) -> list[str]:
    steps = sorted({s for d in data.values() for s in d["steps"]}, key=int)
    head = ["variant", "rFID", "rKID x1e3", "PSNR", "SSIM", "LP top-1"]
    head += [f"gFID cfg @{s}" for s in steps] + ["gFID cfg (end)", "gKID cfg x1e3"]
    head += [f"gFID no-cfg @{s}" for s in steps] + ["gFID no-cfg (end)", "precision", "recall", "seeds"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    label = {v.name: v.label for v in VARIANTS}
    for name, d in data.items():
        f = d["figures"]
        cells = [label.get(name, name), _cell(f.get("rfid")), _cell(f.get("rkid"), 2, 1e3), _cell(f.get("psnr")),
                 _cell(f.get("ssim"), 4), _cell(f.get("lp_top1"), 1, 100, "%")]
        cells += [_cell(f.get(f"gfid_cfg@{s}")) for s in steps] + [_cell(f.get("gfid_cfg")),
                                                                   _cell(f.get("gkid_cfg"), 2, 1e3)]
        cells += [_cell(f.get(f"gfid_nocfg@{s}")) for s in steps] + [_cell(f.get("gfid_nocfg"))]
        cells += [_cell(f.get("precision_cfg"), 3), _cell(f.get("recall_cfg"), 3), ",".join(map(str, d["seeds"]))]
        rows.append("| " + " | ".join(cells) + " |")
    return rows + ["", "Each figure is the mean over the variant's seeds; in brackets, the interval its verdicts read: "
                   "the union over seeds of the seed's value and its 95% bootstrap interval over images or samples "
                   "(records without one: the range over seeds; LP: two binomial standard errors; PSNR, SSIM: two "
                   "standard errors of the per-image mean)."]


def _claims(data: dict[str, Any]) -> list[str]:
    """Each of the paper's claims, judged on the measured intervals: a difference inside them is a tie."""
    out = ["## The paper's claims at this scale", "",
           "A claim holds when the two variants' intervals (the table's brackets) do not overlap; when they "
           "overlap it is a tie, and without an interval it is not called. Each line ends with the seeds' values "
           "behind the two means.", ""]

    def fig(name: str, key: str) -> Figure | None:
        return data[name]["figures"].get(key) if name in data else None

    def claim(text: str, x: str, y: str, key: str, lower: bool, scale: float = 1.0, unit: str = "",
              digits: int = 2) -> str:
        a, b = fig(x, key), fig(y, key)
        if a is None or b is None:
            return f"- {text}: not measured (a variant or its `{key}` is missing)."
        line = (f"- {text}: {a.mean * scale:.{digits}f}{unit} vs {b.mean * scale:.{digits}f}{unit} — "
                f"**{compare(a, b, lower)}**")
        if len(a.values) > 1 or len(b.values) > 1:  # the seeds behind each mean, in seed order
            line += " (by seed: " + " vs ".join(", ".join(f"{v * scale:.{digits}f}" for v in f.values)
                                                 for f in (a, b)) + ")"
        return line

    def gfid_claims(x: str, y: str, text: str) -> list[str]:
        return [claim(f"gFID {text} (with guidance, end of training)", x, y, "gfid_cfg", True),
                claim(f"gFID {text} (without guidance)", x, y, "gfid_nocfg", True),
                claim(f"gKID {text} (with guidance, x1e3)", x, y, "gkid_cfg", True, 1e3)]

    # Grouped by where the paper makes the claim (its figures: docs/method.md), so each verdict reads against it.
    out += ["### Table 3: the latent's linear probe (paper: AlignTok 35.1%, VA-VAE 23.0%, vanilla VAE 6.0%; "
            "without w_sp 9.5%)", ""]
    for x, y, text in [("a_full", "e_vavae", "latent LP (a) > (e)"), ("e_vavae", "d_vae", "latent LP (e) > (d)"),
                       ("a_full", "c_no_sp", "latent LP (a) > (c): w_sp keeps the semantics")]:
        out.append(claim(text, x, y, "lp_top1", False, 100, "%", 1))
    out += ["", "### Table 1: the stages (paper, gFID: stage 1 only 3.00, stages 1+2 with w_sp = 0 3.05, "
            "all three 2.17)", ""]
    out += gfid_claims("a_full", "b_stage1", "(a) < (b)") + gfid_claims("a_full", "c_no_sp", "(a) < (c)")
    out += ["", "### The system table: AlignTok against VA-VAE (paper, gFID: 1.90 vs 2.11 with guidance, 3.71 vs "
            "5.14 without)", ""]
    out += gfid_claims("a_full", "e_vavae", "(a) < (e)")
    out += ["", "### Stages 2 and 3 improve reconstruction (paper: rFID 1.63 after stage 1, 0.26 after all three; "
            "PSNR 17.3 and 25.8)", ""]
    out.append(claim("reconstruction (a) better than (b): PSNR", "a_full", "b_stage1", "psnr", False, unit=" dB"))
    out.append(claim("reconstruction (a) better than (b): rFID", "a_full", "b_stage1", "rfid", True))
    out.append(claim("reconstruction (a) better than (b): rKID (x1e3)", "a_full", "b_stage1", "rkid", True, 1e3))
    out += ["", "### Beside the paper: the pretrained encoder (against the same architecture at random init) and "
            "VA-VAE against the VAE it extends", ""]
    out.append(claim("latent LP (a) > (f): the pretrained encoder matters", "a_full", "f_random", "lp_top1", False,
                     100, "%", 1))
    out += gfid_claims("a_full", "f_random", "(a) < (f)") + gfid_claims("e_vavae", "d_vae", "(e) < (d)")
    return out


def _convergence(data: dict[str, Any], report: Path) -> list[str]:
    """gFID (with guidance) against diffusion training steps, one line per tokenizer: a PNG beside the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, d in data.items():
        points = sorted((int(k.split("@")[1]), v.mean) for k, v in d["figures"].items() if k.startswith("gfid_cfg@"))
        points.append((d["end_step"], d["figures"]["gfid_cfg"].mean))
        axis.plot(*zip(*points), marker="o", label=name)
    axis.set_xlabel("diffusion training steps")
    axis.set_ylabel("gFID (with guidance)")
    axis.legend()
    path = report.with_name(report.stem + "_convergence.png")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return ["## Convergence", "", f"![gFID against diffusion steps]({path.name})"]


def _provenance(results: Path) -> list[str]:
    out = ["## Provenance and cost", "",
           "| variant | seed | experiment | MLflow evaluate run | wall time | CPU time |", "|---|---|---|---|---|---|"]
    wall = cpu = 0.0
    for name, records in load_results(results).items():
        for r in records:
            seconds = r.get("cpu_seconds")
            out.append(f"| {name} | {r['seed']} | `{r['experiment']}` | `{r['evaluate_run_id']}` | "
                       f"{r['wall_seconds'] / 60:.1f} min | {_fmt(None if seconds is None else seconds / 60, 1)} min |")
            wall, cpu = wall + r["wall_seconds"], cpu + (seconds or 0.0)
    out += ["", f"In all: {wall / 3600:.2f} h wall, {cpu / 3600:.2f} h CPU (the CPU time of `dvc exp run` and its "
            "stages; a run restored from DVC's run cache costs little of either). Each run's command is in its JSON "
            "(`command`): `dvc exp run --name study-<variant>-seed<s> -S key=value ... evaluate`."]
    protocol = next(iter(load_results(results).values()))[0]["protocol"]
    out += ["", "Protocol: " + "; ".join(f"{k}: {v}" for k, v in protocol.items() if isinstance(v, str))]
    return out


def copy_results(source: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for path in source.glob("*.json"):
        shutil.copyfile(path, dest / path.name)

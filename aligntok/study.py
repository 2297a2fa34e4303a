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

Every variant trains the diffusion model with the same budget and seed; the tokenizer stages they share
are not retrained (DVC's run cache restores them: (a)-(c) start from the same stage 1). `evaluate` measures
only the variant's tokenizer, and gFID at every diffusion snapshot (`train_dit.snapshot_steps`) as well as
at the end. Results land in `reports/study/<variant>.json`; `reports/study.md` is generated from them.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def variant_overrides(variant: Variant, seed: int, size: dict[str, Any]) -> dict[str, Any]:
    """Every `-S` override of one run: the study size, the variant's rows, the diffusion seed."""
    return {**size, "cache_latents.tokenizer": variant.tokenizer, "evaluate.tokenizers": [variant.tokenizer],
            "train_dit.seed": seed, "evaluate.seed": seed, **variant.overrides}


def _set_args(overrides: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for key, value in overrides.items():
        args += ["-S", f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]
    return args


def run_variant(variant: Variant, seed: int, size: dict[str, Any], results: Path, repo: Path) -> dict[str, Any]:
    """`dvc exp run` one variant in the workspace and keep its metrics; params.yaml and dvc.lock are restored
    afterwards (the experiment itself stays in DVC's experiment refs)."""
    saved = {path: path.read_text() for path in (repo / "params.yaml", repo / "dvc.lock") if path.is_file()}
    name = f"study-{variant.name}-seed{seed}"
    # No --force: stages whose inputs are unchanged are skipped or restored from DVC's run cache.
    command = ["dvc", "exp", "run", "--name", name, *_set_args(variant_overrides(variant, seed, size))]
    log.info("%s: %s", name, " ".join(command))
    start = time.perf_counter()
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
              "overrides": variant_overrides(variant, seed, size), "wall_seconds": time.perf_counter() - start,
              "metrics": metrics, "evaluate_run_id": protocol.get("mlflow_run_id"),
              "protocol": {k: protocol[k] for k in ("rfid", "gfid", "linear_probe", "inception") if k in protocol}}
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{variant.name}-seed{seed}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def run_study(repo: Path, variants: list[str] | None = None, seeds: list[int] | None = None,
              extra_seeds_for: str = "a_full", extra_seeds: int = 1, size: dict[str, Any] | None = None,
              results: Path | None = None, report: Path | None = None) -> Path:
    """Run the variants (skipping those already in `results`), then write the report and restore outputs."""
    chosen = [v for v in VARIANTS if variants is None or v.name in variants]
    if variants and (unknown := set(variants) - {v.name for v in VARIANTS}):
        raise AligntokError(f"unknown study variants {sorted(unknown)}; known: {[v.name for v in VARIANTS]}")
    results, report = results or repo / "reports" / "study", report or repo / "reports" / "study.md"
    seeds = seeds or [0]
    # Every variant once first, the extra seeds (the noise estimate) last; the report is rewritten after
    # each run, so an interrupted study still reports what it measured, and a rerun skips what is done.
    plan = [(v, s) for v in chosen for s in seeds]
    plan += [(v, max(seeds) + 1 + i) for v in chosen if v.name == extra_seeds_for for i in range(extra_seeds)]
    try:
        for variant, seed in plan:
            if (results / f"{variant.name}-seed{seed}.json").is_file():
                log.info("%s seed %d: already in %s, not rerun", variant.name, seed, results)
                continue
            run_variant(variant, seed, size or STUDY_SIZE, results, repo)
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
    return by_variant


def _summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: tokenizer metrics (seed-independent), diffusion metrics as mean over seeds + spread."""
    tokenizer = next(iter(records[0]["metrics"]["tokenizer"].values()))
    diffusion: dict[str, list[float]] = {}
    for record in records:
        d = record["metrics"]["diffusion"]
        for key in ("gfid_cfg", "gfid_nocfg", "precision_cfg", "recall_cfg"):
            diffusion.setdefault(key, []).append(d[key])
        for step, values in d.get("by_step", {}).items():
            for key in ("gfid_cfg", "gfid_nocfg"):
                diffusion.setdefault(f"{key}@{step}", []).append(values[key])
    probe_val = records[0].get("overrides", {}).get("evaluate.probe_val_images", 500)
    return {"tokenizer": tokenizer, "end_step": int(records[0]["metrics"]["diffusion"]["train_steps"]),
            "probe_val": int(probe_val),
            "diffusion": {k: (sum(v) / len(v), (max(v) - min(v)) if len(v) > 1 else None, v)
                                                  for k, v in diffusion.items()},
            "seeds": [r["seed"] for r in records], "runs": [r["evaluate_run_id"] for r in records],
            "wall": sum(r["wall_seconds"] for r in records)}


def compare(a: float, b: float, noise: float, lower_is_better: bool) -> str:
    """'a better' / 'b better' / 'tie (within noise)' for two figures and a noise scale."""
    if abs(a - b) <= noise:
        return "tie (within noise)"
    return "holds" if (a < b) == lower_is_better else "does not hold"


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


def _table(data: dict[str, Any]) -> list[str]:
    steps = sorted({k.split("@")[1] for d in data.values() for k in d["diffusion"] if "@" in k}, key=int)
    head = ["variant", "rFID", "PSNR", "SSIM", "LP top-1"]
    head += [f"gFID cfg @{s}" for s in steps] + ["gFID cfg (end)"]
    head += [f"gFID no-cfg @{s}" for s in steps] + ["gFID no-cfg (end)", "precision", "recall", "seeds"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    label = {v.name: v.label for v in VARIANTS}
    for name, d in data.items():
        t, g = d["tokenizer"], d["diffusion"]

        def gfid(key: str) -> str:
            mean, spread, _ = g.get(key, (None, None, None))
            return _fmt(mean) + (f" ± {spread / 2:.2f}" if spread else "")

        cells = [label.get(name, name), _fmt(t["rfid"]), _fmt(t["psnr"]), _fmt(t["ssim"], 4),
                 f"{100 * t['lp_top1']:.1f}%"]
        cells += [gfid(f"gfid_cfg@{s}") for s in steps] + [gfid("gfid_cfg")]
        cells += [gfid(f"gfid_nocfg@{s}") for s in steps] + [gfid("gfid_nocfg")]
        cells += [_fmt(g["precision_cfg"][0], 3), _fmt(g["recall_cfg"][0], 3), ",".join(map(str, d["seeds"]))]
        rows.append("| " + " | ".join(cells) + " |")
    return rows + ["", "± is half the range over diffusion seeds where a variant ran with more than one."]


def _lp_noise(p: float, n: int) -> float:
    """Two binomial standard errors of a top-1 accuracy on n images."""
    return 2 * math.sqrt(max(p * (1 - p), 1e-4) / n)


def _claims(data: dict[str, Any]) -> list[str]:
    """Each of the paper's claims, judged on the measured numbers with an explicit noise scale."""
    out = ["## The paper's claims at this scale", ""]
    # Conservative: the widest seed-to-seed range at any measured training length, with or without guidance
    # (with two seeds, the range at one length alone can be small by chance).
    spreads = {k: s for d in data.values() for k, (_, s, _) in d["diffusion"].items() if k.startswith("gfid") and s}
    gfid_noise = max(spreads.values()) if spreads else None
    widest = max(spreads, key=spreads.get) if spreads else None
    seeds = max(len(d["seeds"]) for d in data.values())
    out.append(f"gFID noise scale: {_fmt(gfid_noise)}, the widest range over {seeds} diffusion seeds of one variant "
               f"at any measured training length (`{widest}`); a difference within it is a tie" if gfid_noise else
               "gFID noise scale: unknown (one seed per variant): gFID differences are reported but not called wins.")

    def lp(name: str) -> float | None:
        return data[name]["tokenizer"]["lp_top1"] if name in data else None

    def gf(name: str, key: str = "gfid_cfg") -> float | None:
        return data[name]["diffusion"][key][0] if name in data and key in data[name]["diffusion"] else None

    def claim(text: str, a: float | None, b: float | None, noise: float | None, lower: bool, fmt: str) -> str:
        if a is None or b is None:
            return f"- {text}: not measured (a variant is missing)."
        verdict = compare(a, b, noise, lower) if noise is not None else "not called (no noise estimate)"
        return f"- {text}: {fmt.format(a)} vs {fmt.format(b)} — **{verdict}**"

    pairs_lp = [("a_full", "e_vavae", "latent LP (a) > (e)"), ("e_vavae", "d_vae", "latent LP (e) > (d)"),
                ("a_full", "c_no_sp", "latent LP (a) > (c): w_sp keeps the semantics"),
                ("a_full", "f_random", "latent LP (a) > (f): the pretrained encoder matters")]
    for x, y, text in pairs_lp:
        noise = _lp_noise(lp(x), data[x]["probe_val"]) if lp(x) is not None else None
        out.append(claim(text, lp(x), lp(y), noise, False, "{:.1%}"))
    for x, y, text in [("a_full", "e_vavae", "gFID (a) < (e)"), ("e_vavae", "d_vae", "gFID (e) < (d)"),
                       ("a_full", "f_random", "gFID (a) < (f)")]:
        out.append(claim(text + " (with guidance, end of training)", gf(x), gf(y), gfid_noise, True, "{:.2f}"))
        out.append(claim(text + " (without guidance)", gf(x, "gfid_nocfg"), gf(y, "gfid_nocfg"), gfid_noise, True,
                         "{:.2f}"))
    if "a_full" in data and "b_stage1" in data:
        ta, tb = data["a_full"]["tokenizer"], data["b_stage1"]["tokenizer"]
        out.append(claim("reconstruction (a) better than (b): PSNR", ta["psnr"], tb["psnr"],
                         2 * max(ta.get("psnr_sem", 0.0), tb.get("psnr_sem", 0.0)), False, "{:.2f} dB"))
        out.append(claim("reconstruction (a) better than (b): rFID", ta["rfid"], tb["rfid"], None, True, "{:.2f}"))
    out += ["", "LP noise: two binomial standard errors on the validation images; PSNR noise: two standard errors "
            "of the per-image mean. rFID differences are reported without a noise estimate."]
    return out


def _convergence(data: dict[str, Any], report: Path) -> list[str]:
    """gFID (with guidance) against diffusion training steps, one line per tokenizer: a PNG beside the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, d in data.items():
        points = sorted((int(k.split("@")[1]), v[0]) for k, v in d["diffusion"].items() if k.startswith("gfid_cfg@"))
        points.append((d["end_step"], d["diffusion"]["gfid_cfg"][0]))
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
    out = ["## Provenance", "", "| variant | seed | experiment | MLflow evaluate run | wall time |", "|---|---|---|---|---|"]
    for name, records in load_results(results).items():
        for r in records:
            out.append(f"| {name} | {r['seed']} | `{r['experiment']}` | `{r['evaluate_run_id']}` | "
                       f"{r['wall_seconds'] / 60:.1f} min |")
    protocol = next(iter(load_results(results).values()))[0]["protocol"]
    out += ["", "Protocol: " + "; ".join(f"{k}: {v}" for k, v in protocol.items() if isinstance(v, str))]
    return out


def copy_results(source: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for path in source.glob("*.json"):
        shutil.copyfile(path, dest / path.name)

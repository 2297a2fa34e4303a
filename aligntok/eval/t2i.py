"""The `evaluate_t2i` stage: how well each text-to-image model draws what its prompt says.

For every model in `models/t2i/<tokenizer>/` (one per `t2i.tokenizers` entry, same model and steps) and every
sampling seed in `evaluate_t2i.seeds`, with guidance (`cfg_scale`) and without (scale 1):

- **FID on the validation captions**: the first `fid_samples` validation records' captions are generated from,
  and the Inception features of those samples are compared with the features of the same validation images;
- **prompt agreement**: every (colour, garment) prompt of the captioned Fashion-MNIST (`a {colour} {garment}`,
  `per_prompt` samples each) is generated and judged by two judges that never saw a generated image: the garment
  by a logistic regression on the frozen image encoder's pooled features, fit on real training images; the colour
  by the mean chromaticity of the generated foreground, nearest in the palette. The judges' own accuracy on real
  validation images is reported beside them (their ceiling). Agreement is reported separately for prompts whose
  pair was in training (`seen`) and for the pairs held out of the training split (`held_out`: composition).

Figures are means over seeds with the spread (max - min); everything lands in the metrics JSON, the MLflow run
(whose id the JSON records) and the registered versions' `eval_*` tags (`eval_agreement_cfg`, `eval_fid_cfg`,
... for the promotion gate); `reports/t2i.md` is generated from the metrics JSON (`write_report`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aligntok.config import Params
from aligntok.errors import AligntokError
from aligntok.fileio import atomic_write_text

log = logging.getLogger(__name__)

FOREGROUND = 0.2
"""A pixel is foreground when its brightest channel exceeds this (the captioned images' background is black)."""


@dataclass(frozen=True)
class T2IEvalPaths:
    data: Path
    encoder: Path
    text: Path
    models: Path
    out: Path
    metrics: Path
    report: Path | None = None


# ------------------------------------------------------------------------------------------------ judges
def palette_array() -> tuple[list[str], np.ndarray]:
    """Colour names and their chromaticities (K, 3): RGB divided by its largest channel."""
    from aligntok.data.captions import PALETTE

    names = list(PALETTE)
    rgb = np.array([PALETTE[n] for n in names], dtype=np.float64)  # (K, 3)
    return names, rgb / rgb.max(axis=1, keepdims=True)


def foreground_colour(images: torch.Tensor) -> np.ndarray:
    """Images (B, 3, H, W) in [0, 1] -> palette index (B,) of each foreground's mean chromaticity, -1 when an image
    has no foreground pixel."""
    _, chroma = palette_array()
    x = images.detach().double().cpu()  # (B, 3, H, W)
    fg = x.amax(dim=1) > FOREGROUND  # (B, H, W)
    counts = fg.sum(dim=(1, 2))  # (B,)
    mean = (x * fg[:, None]).sum(dim=(2, 3)) / counts.clamp(min=1)[:, None]  # (B, 3)
    mean = mean / mean.amax(dim=1, keepdim=True).clamp(min=1e-6)  # (B, 3) chromaticity
    distance = torch.cdist(mean, torch.from_numpy(chroma))  # (B, K)
    return torch.where(counts > 0, distance.argmin(dim=1), -1).numpy()


class GarmentJudge:
    """Logistic regression on the frozen encoder's pooled features, fit on real training images."""

    def __init__(self, encoder_dir: Path, device: str | torch.device = "cpu") -> None:
        from aligntok.eval.fd_encoder import EncoderFeatures

        self.features = EncoderFeatures(encoder_dir, device=device)
        self.scaler: Any = None
        self.classifier: Any = None

    def fit(self, images: torch.Tensor, labels: np.ndarray) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        x = self._features(images)
        self.scaler = StandardScaler().fit(x)
        self.classifier = LogisticRegression(max_iter=2000, C=1.0).fit(self.scaler.transform(x), labels)

    def _features(self, images: torch.Tensor, batch: int = 100) -> np.ndarray:
        return np.concatenate([self.features(chunk).numpy() for chunk in images.split(batch)])  # (N, D)

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.classifier.predict(self.scaler.transform(self._features(images)))


# ------------------------------------------------------------------------------------------------ stage
def _load_split(data: Path, split: str, count: int) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """The first `count` records of a split: images (N, 3, R, R) in [0, 1], labels (N,), keys."""
    from aligntok.data.loader import load_split

    reader = load_split(data, split, limit=count)
    if len(reader) < count:
        raise AligntokError(f"{data}: the {split} split has {len(reader)} records, evaluate_t2i needs {count} "
                            "(lower evaluate_t2i.judge_*_images / fid_samples)")
    images, labels = reader.batch(torch.arange(count))
    return images, labels.numpy(), reader.keys


def judge_real(params: Params, paths: T2IEvalPaths, device: str | torch.device) -> tuple[GarmentJudge, dict]:
    """Fit the garment judge on training images; both judges' accuracy on real validation images."""
    from aligntok.data.captions import parse_caption
    from aligntok.text.features import split_captions

    cfg = params.evaluate_t2i
    train_images, train_labels, _ = _load_split(paths.data, "train", cfg.judge_train_images)
    judge = GarmentJudge(paths.encoder, device)
    judge.fit(train_images, train_labels)
    val_images, val_labels, val_keys = _load_split(paths.data, "val", cfg.judge_val_images)
    captions = split_captions(paths.data, "val")
    names, _ = palette_array()
    truth = [parse_caption(captions.get(k, "")) for k in val_keys]
    colour_true = np.array([names.index(t[0]) if t else -2 for t in truth])
    garment_ok = judge.predict(val_images) == val_labels
    colour_ok = foreground_colour(val_images) == colour_true
    ceiling = {"garment": float(garment_ok.mean()), "colour": float(colour_ok.mean()),
               "both": float((garment_ok & colour_ok).mean()), "images": int(cfg.judge_val_images)}
    log.info("evaluate_t2i: judges on %d real validation images: garment %.3f, colour %.3f, both %.3f",
             cfg.judge_val_images, ceiling["garment"], ceiling["colour"], ceiling["both"])
    return judge, ceiling


def agreement_prompts(per_prompt: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Every (colour, garment) prompt `per_prompt` times: prompts, colour index, garment label, held-out flag."""
    from aligntok.data.captions import HELD_OUT, PALETTE, prompt
    from aligntok.data.sources import FASHION_MNIST_CLASSES

    names = list(PALETTE)
    pairs = [(c, g) for c in names for g in range(len(FASHION_MNIST_CLASSES))]
    held = {(c, int(g)) for c, g in HELD_OUT}
    repeated = [p for p in pairs for _ in range(per_prompt)]
    return ([prompt(c, g) for c, g in repeated], np.array([names.index(c) for c, _ in repeated]),
            np.array([g for _, g in repeated]), np.array([(c, g) in held for c, g in repeated]))


def _generate(model: Any, text: Any, steps: int, cfg_scale: float, seed: int, batch: int) -> torch.Tensor:
    """Images for every caption of `text` (a TextBatch), in chunks; chunk i uses noise seed 1000 * seed + i."""
    from aligntok.text.features import TextBatch

    out = []
    for i, first in enumerate(range(0, len(text.tokens), batch)):
        part = slice(first, first + batch)
        chunk = TextBatch(tokens=text.tokens[part], mask=text.mask[part], pooled=text.pooled[part])
        out.append(model.generate_from_text(chunk, steps=steps, cfg_scale=cfg_scale, seed=1000 * seed + i))
    return torch.cat(out)  # (N, 3, R, R)


def _spread(values: list[float]) -> dict[str, Any]:
    return {"mean": float(np.mean(values)), "spread": float(np.max(values) - np.min(values)) if len(values) > 1
            else None, "values": [float(v) for v in values]}


def evaluate_model(model: Any, params: Params, judge: GarmentJudge, inception: Any, real_features: np.ndarray,
                   fid_text: Any, prompt_text: Any, colours: np.ndarray, garments: np.ndarray,
                   held_out: np.ndarray, progress: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One model's figures over seeds and guidance settings, and the first seed's guided agreement images."""
    from aligntok.eval.fid import fid_from_features

    cfg = params.evaluate_t2i
    per_seed: dict[str, list[float]] = {}
    shown: dict[str, torch.Tensor] = {}
    for seed in cfg.seeds:
        for tag, scale in (("cfg", cfg.cfg_scale), ("nocfg", 1.0)):
            images = _generate(model, fid_text, cfg.steps, scale, seed, cfg.batch_size)
            feats = np.concatenate([inception(chunk).numpy() for chunk in images.split(cfg.batch_size)])
            per_seed.setdefault(f"fid_{tag}", []).append(fid_from_features(feats, real_features))
            images = _generate(model, prompt_text, cfg.steps, scale, seed, cfg.batch_size)
            colour_ok = foreground_colour(images) == colours
            garment_ok = judge.predict(images) == garments
            both = colour_ok & garment_ok
            for part, chosen in (("seen", ~held_out), ("held_out", held_out)):
                per_seed.setdefault(f"agreement_{part}_{tag}", []).append(float(both[chosen].mean()))
                per_seed.setdefault(f"colour_{part}_{tag}", []).append(float(colour_ok[chosen].mean()))
                per_seed.setdefault(f"garment_{part}_{tag}", []).append(float(garment_ok[chosen].mean()))
            per_seed.setdefault(f"agreement_{tag}", []).append(float(both.mean()))
            if seed == cfg.seeds[0]:
                shown[tag] = images
            log.info("evaluate_t2i: seed %d %s: FID %.2f, agreement %.3f (seen %.3f, held-out %.3f)", seed, tag,
                     per_seed[f"fid_{tag}"][-1], per_seed[f"agreement_{tag}"][-1],
                     per_seed[f"agreement_seen_{tag}"][-1], per_seed[f"agreement_held_out_{tag}"][-1])
    return {key: _spread(values) for key, values in per_seed.items()}, shown


def run_evaluate_t2i(params: Params, paths: T2IEvalPaths, register: bool = True, progress: bool = True
                     ) -> dict[str, Any]:
    """Every text-to-image model of `paths.models`, judged; metrics JSON, grids, registry tags, the report."""
    from aligntok.diffusion.t2i_api import TextToImageModel
    from aligntok.distributed import resolve_device
    from aligntok.eval.inception import InceptionFeatures
    from aligntok.text.features import TextFeatureSet

    cfg = params.evaluate_t2i
    text = TextFeatureSet(paths.text)
    paths.out.mkdir(parents=True, exist_ok=True)
    if text.skipped is not None:
        metrics: dict[str, Any] = {"skipped": text.skipped}
        atomic_write_text(paths.metrics, json.dumps({"t2i": metrics}, indent=2) + "\n")
        if paths.report is not None:
            atomic_write_text(paths.report, f"# Text-to-image\n\nNot run: {text.skipped}.\n")
        return metrics
    device = resolve_device(params.runtime)  # one process: evaluation is minutes at this scale
    judge, ceiling = judge_real(params, paths, device)
    fid_images, _, fid_keys = _load_split(paths.data, "val", cfg.fid_samples)
    inception = InceptionFeatures(device=device, backend=params.runtime.fid_backend)
    real_features = np.concatenate([inception(chunk).numpy() for chunk in fid_images.split(cfg.batch_size)])
    fid_text = text.gather(text.rows("val", fid_keys))
    prompts, colours, garments, held_out = agreement_prompts(cfg.per_prompt)
    models: dict[str, Any] = {}
    for tokenizer in params.t2i.tokenizers:
        folder = paths.models / tokenizer
        model = TextToImageModel.load(folder, device=device)
        prompt_text = model.encode_prompts(prompts)
        figures, shown = evaluate_model(model, params, judge, inception, real_features, fid_text, prompt_text,
                                        colours, garments, held_out, progress)
        models[tokenizer] = {"figures": figures, "train_steps": model.description["metrics"]["steps"],
                             "parameters": model.description["metrics"].get("parameters"),
                             "receipt": _receipt(folder)}
        _save_grid(shown["cfg"], held_out, cfg.per_prompt, paths.out / f"prompts_{tokenizer}.png")
    metrics = {"models": models, "judges_on_real": ceiling,
               "protocol": {"fid": f"{cfg.fid_samples} validation captions generated vs the same validation images, "
                                   f"Inception pool3 ({inception.backend})",
                            "agreement": f"{len(set(prompts))} prompts x {cfg.per_prompt} samples; garment: logistic "
                                         f"regression on encoder features fit on {cfg.judge_train_images} training "
                                         "images; colour: nearest palette chromaticity of the foreground mean",
                            "seeds": list(cfg.seeds), "steps": cfg.steps, "cfg_scale": cfg.cfg_scale,
                            "held_out_pairs": sorted({p for p, h in zip(prompts, held_out) if h})}}
    if register:
        metrics["mlflow_run_id"] = _log_to_tracking(params, paths, metrics)
    atomic_write_text(paths.metrics, json.dumps({"t2i": metrics}, indent=2) + "\n")
    if paths.report is not None:
        write_report(paths.metrics, paths.report, params)
    return metrics


def _receipt(folder: Path) -> dict[str, Any] | None:
    path = folder / "receipt.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _save_grid(images: torch.Tensor, held_out: np.ndarray, per_prompt: int, path: Path) -> None:
    """The first sample of every prompt, held-out pairs first, as one PNG."""
    from PIL import Image
    from torchvision.utils import make_grid

    first = torch.arange(0, len(images), per_prompt)  # (P,)
    order = torch.cat([first[torch.from_numpy(held_out[first.numpy()])], first[torch.from_numpy(~held_out[first.numpy()])]])
    grid = make_grid(images[order], nrow=10, padding=2, pad_value=1.0)
    Image.fromarray((grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


def _flat(figures: dict[str, Any]) -> dict[str, float]:
    return {k: v["mean"] for k, v in figures.items()}


def _log_to_tracking(params: Params, paths: T2IEvalPaths, metrics: dict[str, Any]) -> str:
    from aligntok.ops.tracking import StageRun, tag_model_version

    run = StageRun("evaluate_t2i", {"evaluate_t2i": params.evaluate_t2i.model_dump(mode="json"),
                                    "t2i": params.t2i.model_dump(mode="json")})
    flat = {f"{tok}.{k}": v for tok, m in metrics["models"].items() for k, v in _flat(m["figures"]).items()}
    flat |= {f"judge_real.{k}": float(v) for k, v in metrics["judges_on_real"].items()}
    run.metrics(flat)
    run.artifact(paths.out, paths.out.name)
    for tokenizer, model in metrics["models"].items():
        receipt = model["receipt"]
        if receipt is not None:
            tags = {f"eval_{k}": f"{v:.6g}" for k, v in _flat(model["figures"]).items()} | {"eval_run_id": run.run_id}
            tag_model_version(receipt["model"], receipt["version"], tags)
    run.finish()
    return run.run_id


# ------------------------------------------------------------------------------------------------ report
def _cell(figure: dict[str, Any], percent: bool = False) -> str:
    scale, unit = (100.0, "%") if percent else (1.0, "")
    text = f"{figure['mean'] * scale:.1f}{unit}" if percent else f"{figure['mean']:.2f}"
    return text + (f" ± {figure['spread'] * scale / 2:.1f}" if figure.get("spread") else "")


def verdict(a: dict[str, Any], b: dict[str, Any], higher_is_better: bool) -> str:
    """'holds' / 'does not hold' / 'tie' for model a against b: a tie when the seed ranges overlap."""
    lo_a, hi_a = min(a["values"]), max(a["values"])
    lo_b, hi_b = min(b["values"]), max(b["values"])
    if lo_a <= hi_b and lo_b <= hi_a:
        return "tie (seed ranges overlap)"
    better = a["mean"] > b["mean"] if higher_is_better else a["mean"] < b["mean"]
    return "holds" if better else "does not hold"


def write_report(metrics_path: Path, report: Path, params: Params) -> Path:
    """`reports/t2i.md` from the evaluate_t2i metrics JSON (every number in it comes from that file)."""
    data = json.loads(metrics_path.read_text())["t2i"]
    models, ceiling = data["models"], data["judges_on_real"]
    names = list(models)
    lines = ["# Text-to-image: the paper's tokenizer comparison at toy scale", "",
             f"Generated by `aligntok evaluate_t2i` from `{metrics_path}` (MLflow run "
             f"`{data.get('mlflow_run_id', 'not tracked')}`). One `{params.t2i.preset}` text-conditioned DiT per "
             f"tokenizer, the same {int(next(iter(models.values()))['train_steps'])} steps and seed on the same "
             f"{params.t2i.max_images} captioned training images (and flips), text from the frozen "
             f"`{params.text.source}` encoder. The VAE baseline stands in for FLUX's VAE (same latent shape as "
             "the aligned tokenizer); no FLUX VAE weights are available offline.", "",
             f"Protocol: {data['protocol']['fid']}; agreement: {data['protocol']['agreement']}. Sampling: "
             f"{data['protocol']['steps']} {params.sample.method} steps, guidance {data['protocol']['cfg_scale']} (cfg) or none "
             f"(no-cfg); seeds {data['protocol']['seeds']}, shown as mean ± half the range over seeds. Held-out "
             f"pairs (never in the training split): {', '.join(data['protocol']['held_out_pairs'])}.", "",
             f"Judges on {ceiling['images']} real validation images (their ceiling): garment "
             f"{100 * ceiling['garment']:.1f}%, colour {100 * ceiling['colour']:.1f}%, both {100 * ceiling['both']:.1f}%.",
             "", "| tokenizer | FID cfg | FID no-cfg | agreement cfg (seen) | agreement cfg (held-out) | "
             "agreement no-cfg (seen) | agreement no-cfg (held-out) | colour cfg (held-out) | garment cfg (held-out) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        f = models[name]["figures"]
        lines.append(f"| {name} | {_cell(f['fid_cfg'])} | {_cell(f['fid_nocfg'])} | "
                     f"{_cell(f['agreement_seen_cfg'], True)} | {_cell(f['agreement_held_out_cfg'], True)} | "
                     f"{_cell(f['agreement_seen_nocfg'], True)} | {_cell(f['agreement_held_out_nocfg'], True)} | "
                     f"{_cell(f['colour_held_out_cfg'], True)} | {_cell(f['garment_held_out_cfg'], True)} |")
    if len(names) >= 2:
        a, d = names[0], names[1]
        fa, fd = models[a]["figures"], models[d]["figures"]
        lines += ["", f"## The paper's claim: text-to-image on {a} beats {d}", ""]
        for key, label, higher in (("fid_cfg", "FID with guidance (lower is better)", False),
                                   ("fid_nocfg", "FID without guidance", False),
                                   ("agreement_seen_cfg", "prompt agreement, seen pairs, with guidance", True),
                                   ("agreement_held_out_cfg", "prompt agreement, held-out pairs, with guidance", True),
                                   ("agreement_held_out_nocfg", "prompt agreement, held-out pairs, no guidance", True)):
            lines.append(f"- {label}: {_cell(fa[key], 'agreement' in key)} vs {_cell(fd[key], 'agreement' in key)} "
                         f"— **{verdict(fa[key], fd[key], higher)}**")
    lines += ["", "Samples (first seed, with guidance; first row(s): held-out pairs): "
              + ", ".join(f"[{n}](t2i/prompts_{n}.png)" for n in names), ""]
    report.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report

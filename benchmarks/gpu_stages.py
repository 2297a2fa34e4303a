"""The pipeline's own stage code on this machine's device, a few steps each, at a preset's shapes.

gpu_check.py times the models; this runs the stages themselves (`run_tokenizer_stage` for every row,
`cache_latents`, `run_train_dit`, `build_reference`, `run_evaluate`, and the text-to-image branch
`cache_text_features`, `cache_t2i_latents`, `run_train_t2i`, `run_evaluate_t2i`) with the preset's
architectures, image size, precision and fast paths, on a small synthetic image folder with a caption beside
every image and with the counts cut to a few steps, so that a GPU box shows in a minute or two whether every
stage places its work on the device and what one step costs. The encoder is the preset's architecture randomly
initialised (`random:`), as no weights may be downloaded, and the DiTs run eagerly (gpu_check.py times the
compiled step). `--text-source` names the text encoder (default: the preset's; on a machine without the
embedded MiniLM, a folder of the same architecture with random weights, see device_bundle.py). Per stage: wall
seconds, seconds per training step and peak device memory.

    python benchmarks/gpu_stages.py [--tiny] [--text-source file:PATH] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aligntok.config import TOKENIZER_STAGES, Params, load_params  # noqa: E402


def synthetic_folder(root: Path, side: int, per_class: int, classes: int = 4, seed: int = 0) -> Path:
    """An ImageNet-layout folder of smooth random colour fields (PNG, `side` px), `per_class` per class, each with
    a sidecar caption `<stem>.txt` naming its class and its brightest channel."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((side, side), Image.BICUBIC)
            image.save(folder / f"{i:04d}.png")
            colour = ("red", "green", "blue")[int(coarse.reshape(-1, 3).mean(0).argmax())]
            (folder / f"{i:04d}.txt").write_text(f"a {colour} colour field of kind {label}", encoding="utf-8")
    return root


def cut_params(preset: Path, folder: Path, steps: int, batch: int, images: int, text_source: str | None = None
               ) -> Params:
    """The preset with a few steps per stage, small counts, and the encoder architecture random."""
    base = load_params(preset)
    arch = base.encoder.source.split(":", 1)[1].split(".")[0]  # timm:vit_large_patch14_dinov2.lvd142m -> arch
    overrides: dict[str, Any] = {"encoder.source": f"random:{arch}", "data.source": f"imagefolder:{folder}",
                                 "runtime.compile": False,  # gpu_check.py times the compiled DiT step
                                 "data.val_fraction": 0.25, "data.val_source": None, "data.max_images": None,
                                 "cache_latents.max_images": None, "cache_latents.batch_size": batch,
                                 "train_dit.steps": steps, "train_dit.batch_size": batch,
                                 "train_dit.warmup_steps": 0, "train_dit.checkpoint_every": steps,
                                 "train_dit.sample_every": 10 * steps, "train_dit.snapshot_steps": [],
                                 "sample.steps": 4, "evaluate.reference_images": images // 2,
                                 "evaluate.recon_images": images // 4, "evaluate.gen_samples": images // 4,
                                 "evaluate.sweep_samples": images // 8, "evaluate.steps_sweep": [2],
                                 "evaluate.cfg_sweep": [1.0], "evaluate.probe_train_images": images // 2,
                                 "evaluate.probe_val_images": images // 4, "evaluate.batch_size": batch,
                                 "t2i.max_images": None, "train_t2i.steps": steps, "train_t2i.batch_size": batch,
                                 "train_t2i.warmup_steps": 0, "train_t2i.checkpoint_every": steps,
                                 "train_t2i.sample_every": 10 * steps, "train_t2i.snapshot_steps": [],
                                 "evaluate_t2i.fid_samples": images // 4, "evaluate_t2i.per_prompt": 1,
                                 "evaluate_t2i.seeds": [0], "evaluate_t2i.steps": 2,
                                 "evaluate_t2i.judge_train_images": images // 2,
                                 "evaluate_t2i.judge_val_images": images // 4, "evaluate_t2i.batch_size": batch}
    if text_source is not None:
        overrides["text.source"] = text_source
    for stage in TOKENIZER_STAGES:
        overrides |= {f"{stage}.steps": steps, f"{stage}.batch_size": batch, f"{stage}.warmup_steps": 0,
                      f"{stage}.checkpoint_every": steps, f"{stage}.val_images": images // 4,
                      f"{stage}.image_every": 10 * steps, f"{stage}.losses.gan_start": 0}
    return load_params(preset, overrides)


def run(preset: Path, steps: int, batch: int, images: int, text_source: str | None = None,
        write: Any = lambda figures: None) -> dict[str, Any]:
    """Every stage in DAG order; `write(figures)` after each, so that a run cut short keeps what it measured."""
    from aligntok.data.ingest import ingest
    from aligntok.diffusion.latent_writer import cache_latents
    from aligntok.diffusion.t2i_latents import cache_t2i_latents
    from aligntok.diffusion.t2i_train import T2IPaths, run_train_t2i
    from aligntok.diffusion.train import DiTPaths, run_train_dit
    from aligntok.distributed import resolve_device
    from aligntok.encoder import export_encoder
    from aligntok.eval.evaluate import EvalPaths, run_evaluate
    from aligntok.eval.reference import build_reference
    from aligntok.eval.t2i import T2IEvalPaths, run_evaluate_t2i
    from aligntok.text.features import cache_text_features
    from aligntok.tokenizer.stages import StagePaths, run_tokenizer_stage

    cuda = torch.cuda.is_available()
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-stages-") as tmp:
        root = Path(tmp)
        base = load_params(preset)
        folder = synthetic_folder(root / "images", base.data.resolution, per_class=images // 2)  # 2x images in all
        params = cut_params(preset, folder, steps, batch, images, text_source)
        export_encoder(params.encoder, root / "encoder")
        ingest(params.data.source, root / "shards", params.data, progress=False)

        def timed(name: str, fn: Any, per_step: int | None = None) -> Any:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn()
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            figures[f"{name}_seconds"] = seconds
            if cuda:
                figures[f"{name}_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            memory = f", peak {figures[f'{name}_peak_memory_gb']:.1f} GB" if cuda else ""
            print(f"stage {name:<17} {seconds:8.1f} s{memory}", flush=True)
            write(figures)
            return out

        tokenizers = root / "tokenizer"
        for stage in TOKENIZER_STAGES:
            start = params.stage(stage).start_from
            paths = StagePaths(data=root / "shards", encoder=root / "encoder", out=tokenizers / stage,
                               previous=tokenizers / start if start else None, checkpoints=root / "ck")
            result = timed(stage, lambda paths=paths, stage=stage: run_tokenizer_stage(
                stage, params, paths, register=False, progress=False))
            figures[f"{stage}_seconds_per_step"] = result.metrics["train_seconds"] / steps
        source = tokenizers / params.cache_latents.tokenizer
        timed("cache_latents", lambda: cache_latents(source, root / "shards", root / "latents", params.cache_latents,
                                                     progress=False, runtime=params.runtime))
        metrics = timed("train_dit", lambda: run_train_dit(params, DiTPaths(
            latents=root / "latents", tokenizer=source, out=root / "dit", checkpoints=root / "ck"),
            register=False, progress=False))
        figures["train_dit_seconds_per_step"] = metrics["train_seconds"] / steps
        figures["train_dit_compiled"] = metrics["compiled"]
        timed("fid_reference", lambda: build_reference(root / "shards", root / "encoder", root / "reference",
                                                       params.evaluate, progress=False, runtime=params.runtime))
        evaluated = timed("evaluate", lambda: run_evaluate(params, EvalPaths(
            data=root / "shards", encoder=root / "encoder", reference=root / "reference", tokenizers=tokenizers,
            dit=root / "dit", out=root / "eval", metrics=root / "metrics.json", plots=root / "plots"),
            register=False, progress=False))
        figures["evaluate_gfid_cfg"] = evaluated["diffusion"]["gfid_cfg"]

        # the text-to-image branch on the same shards (every synthetic image has a caption)
        text = root / "t2i" / "text"
        timed("text_features", lambda: cache_text_features(root / "shards", text, params.text,
                                                           device=resolve_device(params.runtime), progress=False))
        timed("t2i_latents", lambda: cache_t2i_latents(params, tokenizers, root / "shards", root / "t2i" / "latents",
                                                       progress=False))
        trained = timed("train_t2i", lambda: run_train_t2i(params, T2IPaths(
            latents=root / "t2i" / "latents", text=text, tokenizers=tokenizers, out=root / "t2i" / "models",
            checkpoints=root / "ck"), register=False, progress=False))
        first = trained[params.t2i.tokenizers[0]]
        figures["train_t2i_seconds_per_step"] = first["train_seconds"] / steps
        figures["train_t2i_parameters"] = first["parameters"]
        t2i = timed("evaluate_t2i", lambda: run_evaluate_t2i(params, T2IEvalPaths(
            data=root / "shards", encoder=root / "encoder", text=text, models=root / "t2i" / "models",
            out=root / "t2i" / "eval", metrics=root / "t2i" / "metrics.json"), register=False, progress=False))
        figures["evaluate_t2i_models"] = len(t2i["models"])
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="configs/tiny.yaml's shapes (a CPU, about a minute)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per stage (default: 3)")
    parser.add_argument("--text-source", help="text.source for the text-to-image stages (default: the preset's)")
    parser.add_argument("--stand-in-weights", action="store_true",
                        help="the installed FID Inception is device_bundle.py's random stand-in: accept its sha1 "
                        "(the figures it gives mean nothing; the timings stand)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.stand_in_weights:
        from aligntok.eval import inception
        from aligntok.fileio import file_digest

        inception.WEIGHTS_SHA1 = file_digest(inception.locate_weights(), "sha1")
        print("FID Inception and text encoder: random stand-ins of the same architecture (device_bundle.py)",
              flush=True)
    preset = REPO / "configs" / ("tiny.yaml" if args.tiny else "imagenet256.yaml")
    batch, images = (4, 48) if args.tiny else (32, 256)
    def write(figures: dict[str, Any]) -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"preset": preset.name, "torch": torch.__version__,
                                             "stand_in_weights": args.stand_in_weights, **figures}, indent=2) + "\n")

    write(run(preset, args.steps, batch, images, args.text_source, write))
    return 0


if __name__ == "__main__":
    sys.exit(main())

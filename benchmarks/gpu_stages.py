"""The pipeline's own stage code on this machine's device, a few steps each, at a preset's shapes.

gpu_check.py times the models; this runs the stages themselves (`run_tokenizer_stage` for every row,
`cache_latents`, `run_train_dit`, `build_reference`, `run_evaluate`) with the preset's architectures, image
size, precision and fast paths, on a small synthetic image folder and with the counts cut to a few steps,
so that a GPU box shows in a minute or two whether every stage places its work on the device and what one
step costs. The encoder is the preset's architecture randomly initialised (`random:`), as no weights may be
downloaded, and the DiT runs eagerly (gpu_check.py times its compiled step). Per stage: wall seconds, seconds
per training step and peak device memory.

    python benchmarks/gpu_stages.py [--tiny] [--json PATH]
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

from aligntok.config import TOKENIZER_STAGE_SECTIONS, Params, load_params  # noqa: E402


def synthetic_folder(root: Path, side: int, per_class: int, classes: int = 4, seed: int = 0) -> Path:
    """An ImageNet-layout folder of smooth random colour fields (PNG, `side` px), `per_class` per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((side, side), Image.BICUBIC)
            image.save(folder / f"{i:04d}.png")
    return root


def cut_params(preset: Path, folder: Path, steps: int, batch: int, images: int) -> Params:
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
                                 "evaluate.probe_val_images": images // 4, "evaluate.batch_size": batch}
    for stage in TOKENIZER_STAGE_SECTIONS:
        overrides |= {f"{stage}.steps": steps, f"{stage}.batch_size": batch, f"{stage}.warmup_steps": 0,
                      f"{stage}.checkpoint_every": steps, f"{stage}.val_images": images // 4,
                      f"{stage}.image_every": 10 * steps, f"{stage}.losses.gan_start": 0}
    return load_params(preset, overrides)


def run(preset: Path, steps: int, batch: int, images: int) -> dict[str, Any]:
    from aligntok.data.ingest import ingest
    from aligntok.diffusion.latents import cache_latents
    from aligntok.diffusion.train import DiTPaths, run_train_dit
    from aligntok.encoder import export_encoder
    from aligntok.eval.evaluate import EvalPaths, run_evaluate
    from aligntok.eval.reference import build_reference
    from aligntok.tokenizer.stages import StagePaths, run_tokenizer_stage

    cuda = torch.cuda.is_available()
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-stages-") as tmp:
        root = Path(tmp)
        base = load_params(preset)
        folder = synthetic_folder(root / "images", base.data.resolution, per_class=images // 2)  # 2x images in all
        params = cut_params(preset, folder, steps, batch, images)
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
            return out

        tokenizers = root / "tokenizer"
        for stage in TOKENIZER_STAGE_SECTIONS:
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
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="configs/tiny.yaml's shapes (a CPU, about a minute)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per stage (default: 3)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    preset = REPO / "configs" / ("tiny.yaml" if args.tiny else "imagenet256.yaml")
    batch, images = (4, 48) if args.tiny else (32, 256)
    figures = run(preset, args.steps, batch, images)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"preset": preset.name, **figures}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

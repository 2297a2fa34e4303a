"""How far bf16 autocast of the tokenizers and the DiT moves the evaluation's figures: numerics, not speed.

On CUDA, `evaluate` runs the tokenizers' encode/decode and the DiT's sampling under `runtime.autocast` (bf16),
and the FID Inception and the FD encoder in float32. This measures what that costs in the figures, with the
stage's own functions (`evaluate_tokenizer`, `SampleFeatures`) on the models `make run` trained: every
tokenizer's rFID, PSNR, SSIM and FD_dinov2 on the same validation images, and the DiT's gFID with guidance on
the same seeds, once in float32 and once under bf16 autocast. bf16 rounding is the same arithmetic on a CPU
with bf16 units as on a GPU, so the CPU measures it (this one's kernels differ from cuDNN's in summation order,
not in precision).

    python benchmarks/eval_bf16.py [--samples N] [--json reports/eval_bf16.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import cpu_model  # noqa: E402

from aligntok.config import load_params  # noqa: E402
from aligntok.data.loader import load_split  # noqa: E402
from aligntok.distributed import Placement  # noqa: E402
from aligntok.eval.evaluate import ProbeSets, SampleFeatures, evaluate_tokenizer, fd  # noqa: E402
from aligntok.eval.fd_encoder import EncoderFeatures  # noqa: E402
from aligntok.eval.inception import InceptionFeatures  # noqa: E402
from aligntok.eval.reference import load_reference  # noqa: E402

FIGURES = ("rfid", "psnr", "ssim", "fd_dinov2")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=None, help="gFID samples (default: evaluate.gen_samples)")
    parser.add_argument("--json", type=Path, default=REPO / "reports" / "eval_bf16.json")
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    cfg = params.evaluate
    ref = load_reference(REPO / "data" / "fid_reference", cfg)
    inception = InceptionFeatures(channels_last=params.runtime.channels_last, backend=params.runtime.fid_backend)
    encoder = EncoderFeatures(REPO / "models" / "encoder")
    val = load_split(REPO / "data" / "shards", "val", limit=cfg.recon_images)
    probe = ProbeSets(train=load_split(REPO / "data" / "shards", "train", limit=64),
                      val=load_split(REPO / "data" / "shards", "val", limit=32))
    places = {"float32": Placement(), "bf16": Placement(autocast_dtype=torch.bfloat16)}
    out = REPO / "benchmarks" / "out" / "eval_bf16"
    report: dict = {"machine": cpu_model(), "torch": torch.__version__, "recon_images": cfg.recon_images,
                    "tokenizers": {}, "diffusion": {}}
    print(f"{cpu_model()}, torch {torch.__version__}; {cfg.recon_images} reconstructions per tokenizer", flush=True)
    for name in cfg.tokenizers:
        folder = REPO / "models" / "tokenizer" / name
        row = {}
        for precision, place in places.items():
            start = time.perf_counter()
            found = evaluate_tokenizer(name, folder, val, probe, ref, inception, encoder, cfg, out / precision, {},
                                       False, place)
            row[precision] = {k: found[k] for k in FIGURES} | {"seconds": time.perf_counter() - start}
        row["change"] = {k: row["bf16"][k] - row["float32"][k] for k in FIGURES}
        report["tokenizers"][name] = row
        print(f"{name:<17} " + "  ".join(f"{k} {row['float32'][k]:.4g} -> {row['bf16'][k]:.4g} "
                                         f"({row['change'][k]:+.3g})" for k in FIGURES), flush=True)

    from aligntok.diffusion.api import DiffusionModel

    samples = args.samples or cfg.gen_samples
    for precision, place in places.items():
        start = time.perf_counter()
        features = SampleFeatures(DiffusionModel.load(REPO / "models" / "dit"), inception, encoder, cfg, False, place)
        feats, _, _ = features.get(params.sample.steps, params.sample.cfg_scale, samples)
        report["diffusion"][precision] = {"gfid_cfg": fd(feats, ref["train"]), "seconds": time.perf_counter() - start}
    change = report["diffusion"]["bf16"]["gfid_cfg"] - report["diffusion"]["float32"]["gfid_cfg"]
    report["diffusion"]["change"] = {"gfid_cfg": change}
    report["diffusion"]["samples"] = samples
    print(f"DiT gFID (cfg {params.sample.cfg_scale:g}, {params.sample.steps} steps, {samples} samples) "
          f"{report['diffusion']['float32']['gfid_cfg']:.4g} -> {report['diffusion']['bf16']['gfid_cfg']:.4g} "
          f"({change:+.3g})", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

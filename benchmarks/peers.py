"""Side-by-side speed of aligntok's models against the diffusers models users would pick instead, in one process.

Each benchmark warms both sides up, then times them alternately (ours, peer, ours, peer, ...) so that a
machine whose load changes during the run slows both alike; the figure is the median of the repeats and the
ratio is ours / peer (higher = we are faster). Same batch, dtype (float32) and thread count on both sides;
every model is randomly initialised (no weights needed).

- tokenizer encode / decode at 256x256: configs/imagenet256.yaml (DINOv2 ViT-L/14 + adapter; the 42M decoder)
  against diffusers' AutoencoderKL in the SD-VAE configuration; and the embedded default (32x32 images,
  ViT-S/14 at 112 px) against the same SD-VAE at 32x32.
- diffusion training step (forward, MSE loss, backward, AdamW step), samples/s: our LightningDiT against
  diffusers' DiTTransformer2DModel at the same width, depth, heads and token count (patch 1 on the latent).
  Three rows per size: both eager; ours compiled (how `train_dit` runs with params.yaml's `runtime.compile`)
  against the peer as it comes; both compiled. Compilation happens in the untimed warm-up.
- data loading, images/s: our WebDataset shards (written once by `ingest` with the paper preset's data section:
  256 px, JPEG q95) read with 2 decode threads (`runtime.decode_threads`), against torchvision's ImageFolder +
  DataLoader with 2 worker processes decoding the original photos (../shared/data/imagenet-sample), both ending
  in 256x256 float tensors.
- sampling, images/s: 50 Euler steps with classifier-free guidance (one forward of [cond; uncond] per step),
  our `aligntok.diffusion.flow.sample` against the same loop over DiTTransformer2DModel written as diffusers'
  DiTPipeline does it, with diffusers' FlowMatchEulerDiscreteScheduler; both eager, then both compiled.

    pip install -e '.[bench]'
    python benchmarks/peers.py                      # ~10 minutes on 2 cores; writes reports/benchmarks.{md,json}
    python benchmarks/peers.py --quick              # tiny sizes, seconds (what tests/test_benchmarks.py runs)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from common import cpu_model  # noqa: E402  (benchmarks/, the script's own folder)

from aligntok.config import Params, load_params  # noqa: E402  (Params: type hints)
from aligntok.diffusion.dit import PRESETS, LightningDiT  # noqa: E402
from aligntok.diffusion.flow import sample  # noqa: E402
from aligntok.encoder.vit import create_random_encoder  # noqa: E402
from aligntok.tokenizer.model import build_tokenizer  # noqa: E402


@dataclass
class Result:
    benchmark: str
    unit: str
    ours: str
    peer: str
    ours_rate: float
    peer_rate: float
    repeats: int
    items: int

    @property
    def ratio(self) -> float:
        return self.ours_rate / self.peer_rate


def compare(benchmark: str, unit: str, items: int, ours: tuple[str, Callable[[], object]],
            peer: tuple[str, Callable[[], object]], repeats: int) -> Result:
    """Median items/s of each side, timed alternately after one warm-up call each."""
    ours[1]()
    peer[1]()
    times: dict[str, list[float]] = {"ours": [], "peer": []}
    for _ in range(repeats):
        for side, (_, fn) in (("ours", ours), ("peer", peer)):
            start = time.perf_counter()
            fn()
            times[side].append(time.perf_counter() - start)
    result = Result(benchmark, unit, ours[0], peer[0], items / statistics.median(times["ours"]),
                    items / statistics.median(times["peer"]), repeats, items)
    print(f"{benchmark:<34} ours {result.ours_rate:9.2f} {unit:<10} peer {result.peer_rate:9.2f}   "
          f"x{result.ratio:.2f}", flush=True)
    return result


# --- tokenizers ---------------------------------------------------------------------------------------------

def our_tokenizer(params: Params) -> nn.Module:
    torch.manual_seed(0)
    vit, desc = create_random_encoder(params.encoder.arch or "vit_small_patch14_dinov2", params.encoder.depth,
                                      params.encoder.image_size)
    return build_tokenizer(params.tokenizer, params.latent, vit, desc, params.data.resolution).eval()


def sd_vae(size: int) -> nn.Module:
    """diffusers' AutoencoderKL as Stable Diffusion's VAE is configured (f8, 4 latent channels), random init."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                         block_out_channels=(128, 256, 512, 512), sample_size=size,
                         down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4).eval()


def bench_tokenizer(name: str, params: Params, batch: int, repeats: int) -> list[Result]:
    ours, peer = our_tokenizer(params), sd_vae(params.data.resolution)
    size = params.data.resolution
    images = torch.rand(batch, 3, size, size)
    with torch.inference_mode():
        z_ours = ours.encode(images)
        z_peer = peer.encode(images * 2 - 1).latent_dist.mode()
        return [
            compare(f"{name} encode {size}px", "images/s", batch, ("aligntok " + name, lambda: ours.encode(images)),
                    ("diffusers AutoencoderKL (SD-VAE)", lambda: peer.encode(images * 2 - 1).latent_dist.mode()),
                    repeats),
            compare(f"{name} decode {size}px", "images/s", batch, ("aligntok " + name, lambda: ours.decode(z_ours)),
                    ("diffusers AutoencoderKL (SD-VAE)", lambda: peer.decode(z_peer).sample), repeats),
        ]


# --- diffusion transformers ---------------------------------------------------------------------------------

def dit_pair(preset: str, channels: int, side: int, classes: int) -> tuple[nn.Module, nn.Module]:
    """Our LightningDiT and diffusers' DiT at the same depth, width, heads and token count (patch 1)."""
    from diffusers import DiTTransformer2DModel

    shape = PRESETS[preset]
    torch.manual_seed(0)
    ours = LightningDiT(input_size=side, in_channels=channels, num_classes=classes, class_dropout=0.1,
                        qk_norm=False, **shape)
    peer = DiTTransformer2DModel(num_attention_heads=shape["num_heads"],
                                 attention_head_dim=shape["hidden_size"] // shape["num_heads"],
                                 in_channels=channels, out_channels=channels, num_layers=shape["depth"],
                                 sample_size=side, patch_size=1, num_embeds_ada_norm=classes + 1,
                                 norm_num_groups=1)
    return ours, peer


def compiled(module: nn.Module) -> Callable[..., object]:
    """`torch.compile` as the pipeline applies it (`aligntok.runtime.CompiledOrEager`: eager if it cannot)."""
    from aligntok.runtime import CompiledOrEager

    return CompiledOrEager(module, type(module).__name__)


def bench_dit_training(preset: str, channels: int, side: int, batch: int, repeats: int,
                       steps_per_call: int = 3, with_compiled: bool = True) -> list[Result]:
    """Three rows: both eager; ours compiled (as params.yaml's `runtime.compile` trains) against the peer eager
    (what a user of each gets out of the box); both compiled."""
    ours, peer = dit_pair(preset, channels, side, classes=10)
    x, t, y = torch.randn(batch, channels, side, side), torch.rand(batch), torch.randint(0, 10, (batch,))
    target = torch.randn_like(x)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_peer = torch.optim.AdamW(peer.parameters(), lr=1e-4)

    def train_ours(forward: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(steps_per_call):
                loss = torch.nn.functional.mse_loss(forward(x, t, y), target)
                opt_ours.zero_grad(set_to_none=True)
                loss.backward()
                opt_ours.step()
        return run

    def train_peer(forward: Callable[..., object]) -> Callable[[], None]:
        def run() -> None:  # diffusers' timestep is the discrete index; its output is the prediction
            for _ in range(steps_per_call):
                out = forward(x, timestep=(t * 999).long(), class_labels=y).sample
                loss = torch.nn.functional.mse_loss(out, target)
                opt_peer.zero_grad(set_to_none=True)
                loss.backward()
                opt_peer.step()
        return run

    ours.train()
    peer.train()
    n_ours = sum(p.numel() for p in ours.parameters()) / 1e6
    n_peer = sum(p.numel() for p in peer.parameters()) / 1e6
    name, ours_name = f"DiT train step {preset} {side}x{side}x{channels}", f"aligntok LightningDiT ({n_ours:.1f}M)"
    peer_name = f"diffusers DiTTransformer2DModel ({n_peer:.1f}M)"
    items = batch * steps_per_call
    results = [compare(f"{name}, both eager", "samples/s", items, (ours_name, train_ours(ours)),
                       (peer_name, train_peer(peer)), repeats)]
    if not with_compiled:
        return results
    ours_compiled, peer_compiled = compiled(ours), compiled(peer)
    return results + [
        compare(f"{name}, ours compiled", "samples/s", items, (ours_name + " compiled", train_ours(ours_compiled)),
                (peer_name, train_peer(peer)), repeats),
        compare(f"{name}, both compiled", "samples/s", items, (ours_name + " compiled", train_ours(ours_compiled)),
                (peer_name + " compiled", train_peer(peer_compiled)), repeats),
    ]


def bench_sampling(preset: str, channels: int, side: int, batch: int, steps: int, repeats: int,
                   with_compiled: bool = True) -> list[Result]:
    """Both eager (how `evaluate` and `aligntok sample` run), then both compiled."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    ours, peer = dit_pair(preset, channels, side, classes=10)
    ours.eval()
    peer.eval()
    labels = torch.randint(0, 10, (batch,))
    null = torch.full_like(labels, 10)

    def sample_ours(model: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            sample(model, labels, (channels, side, side), steps=steps, cfg_scale=4.0, seed=0)
        return run

    def sample_peer(model: Callable[..., object]) -> Callable[[], None]:
        def run() -> None:  # DiTPipeline's loop: [cond; uncond] in one forward, guidance, scheduler step
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
            scheduler.set_timesteps(steps)
            latents = torch.randn(batch, channels, side, side, generator=torch.Generator().manual_seed(0))
            class_labels = torch.cat([labels, null])
            for timestep in scheduler.timesteps:
                model_input = torch.cat([latents, latents])
                out = model(model_input, timestep=timestep.expand(2 * batch), class_labels=class_labels).sample
                cond, uncond = out.chunk(2)
                latents = scheduler.step(uncond + 4.0 * (cond - uncond), timestep, latents).prev_sample
        return run

    name = f"sampling {preset} {steps} Euler steps, CFG"
    ours_name, peer_name = "aligntok flow.sample", "diffusers DiT loop (FlowMatchEuler)"
    with torch.inference_mode():
        results = [compare(f"{name}, both eager", "images/s", batch, (ours_name, sample_ours(ours)),
                           (peer_name, sample_peer(peer)), repeats)]
    if with_compiled:
        with torch.no_grad():  # compiled graphs are traced outside inference mode
            ours_c, peer_c = torch.compile(ours), torch.compile(peer)  # modules: flow.sample reads attributes
            results.append(compare(f"{name}, both compiled", "images/s", batch,
                                   (ours_name + " compiled", sample_ours(ours_c)),
                                   (peer_name + " compiled", sample_peer(peer_c)), repeats))
    return results


def bench_data_loading(photos: Path, workers: int, batch: int, repeats: int, limit: int | None) -> Result:
    """Images/s of one pass over the same photos at 256x256 (decoded, resized, centre-cropped, to float):
    our shards (ingested once, untimed) read by `load_split` + `ImageSet.batch`, against torchvision's
    ImageFolder + DataLoader doing the decode and resize every pass, with `workers` loader processes."""
    import shutil
    import tempfile

    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from aligntok.data.ingest import ingest
    from aligntok.data.loader import load_split
    from aligntok.data.reader import read_dataset_info

    tmp = Path(tempfile.mkdtemp(prefix="aligntok-bench-"))
    folder = tmp / "folder"
    files = sorted(photos.glob("*.JPEG"))[:limit]
    for path in files:  # ImageFolder wants one folder per class: the synset prefix of the file name
        (folder / path.name.split("_", 1)[0]).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / path.name.split("_", 1)[0] / path.name)  # ingest refuses outside links
    # the paper preset's data section (256 px, JPEG q95: how photos are stored for training), read with as many
    # decode threads as the peer has loader processes
    cfg = load_params(REPO / "configs" / "imagenet256.yaml").data.model_copy(
        update={"val_fraction": 0.01, "val_source": None, "workers": workers, "min_side": 16})
    ingest(f"imagefolder:{folder}", tmp / "shards", cfg, progress=False)

    def ours() -> int:  # both splits: every photo, as the peer reads them
        seen = 0
        for split in [name for name, shards in read_dataset_info(tmp / "shards")["shards"].items() if shards]:
            images = load_split(tmp / "shards", split, decode_threads=workers)
            for start in range(0, len(images), batch):
                x, _ = images.batch(torch.arange(start, min(start + batch, len(images))))
                seen += len(x)
        return seen

    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(256), transforms.ToTensor()])
    loader = DataLoader(datasets.ImageFolder(folder, transform=transform), batch_size=batch,
                        num_workers=workers, persistent_workers=False)

    def peer() -> int:
        return sum(len(x) for x, _ in loader)

    try:
        n = ours()
        assert n == len(files), f"the shards hold {n} of {len(files)} photos"
        return compare(f"data loading {len(files)} photos at 256px", "images/s", n,
                       (f"aligntok shards (JPEG q{cfg.jpeg_quality}): load_split + ImageSet.batch "
                        f"({workers} decode threads)", ours),
                       (f"torchvision ImageFolder + DataLoader ({workers} workers)", peer), repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_report(results: list[Result], header: dict[str, str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {**header, "results": [asdict(r) | {"ratio": r.ratio} for r in results]}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["# Benchmarks against peers", "",
             "Written by `python benchmarks/peers.py` (see its docstring for the method). Ratio = ours / peer "
             "(higher is better for us); medians of alternating repeats in one process.", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += ["", "| benchmark | ours | peer | ours | peer | ratio |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.benchmark} | {r.ours} | {r.peer} | {r.ours_rate:.2f} {r.unit} | "
                     f"{r.peer_rate:.2f} {r.unit} | x{r.ratio:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repeat (a smoke test)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per side (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "benchmarks",
                        help="report path without suffix (.md and .json are written)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers

    header = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": cpu_model(),
              "threads": str(torch.get_num_threads()), "torch": torch.__version__, "diffusers": diffusers.__version__,
              "command": " ".join(["python", "benchmarks/peers.py", *sys.argv[1:]])}
    print(", ".join(f"{k} {v}" for k, v in header.items()), flush=True)
    repeats = 1 if args.quick else args.repeats
    embedded = load_params(REPO / "params.yaml")
    results = []
    photos = REPO.parent / "shared" / "data" / "imagenet-sample"
    if args.quick:
        results += bench_tokenizer("embedded default", embedded, batch=2, repeats=repeats)
        if photos.is_dir():
            results.append(bench_data_loading(photos, workers=1, batch=8, repeats=repeats, limit=24))
        results += bench_dit_training("LightningDiT-T/1", 32, 8, batch=8, repeats=repeats, steps_per_call=1,
                                      with_compiled=False)  # compiling takes a minute
        results += bench_sampling("LightningDiT-T/1", 32, 8, batch=2, steps=5, repeats=repeats, with_compiled=False)
    else:
        paper = load_params(REPO / "configs" / "imagenet256.yaml")
        results += bench_tokenizer("imagenet256 preset", paper, batch=2, repeats=repeats)
        results += bench_tokenizer("embedded default", embedded, batch=64, repeats=repeats)
        for preset in ("LightningDiT-T/1", "LightningDiT-S/1"):
            results += bench_dit_training(preset, 32, 8, batch=64, repeats=repeats)
        results += bench_sampling("LightningDiT-T/1", 32, 8, batch=16, steps=50, repeats=repeats)
        if photos.is_dir():
            results.append(bench_data_loading(photos, workers=2, batch=64, repeats=repeats, limit=None))
        else:
            print(f"data loading: skipped, {photos} not present")
    write_report(results, header, args.out)
    print(f"wrote {args.out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

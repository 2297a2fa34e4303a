"""A tokenizer stage's data path at 5,000 / 50,000 / 200,000 records: peak memory and images/s.

The records are the 500 shared ImageNet photos (`../shared/data/imagenet-sample`) resized and centre-cropped
to 256 px and re-encoded as JPEG q95 (the paper preset's ingest format), cycled to the record count, written
as ingest writes shards (tar of `.jpg`/`.cls`/`.json`, `.idx` record index, `dataset.json` with per-shard
counts, 10,000 records a shard), and the same bytes as one file a record in an ImageFolder tree for the peer.

Each measurement runs in a fresh process (peak RSS is per process) and reads `--steps` random batches of
`--batch` images with `--workers` loader processes, decoded to float (B, 3, 256, 256):

- `aligntok`: `load_split` (the mapped `ShardReader`) + `StepBatches` (a `DataLoader` whose batch sampler
  yields `batch_indices(seed, step)`), what `align_latent` & co. run;
- `imagefolder`: torchvision `ImageFolder` + `DataLoader` (random order, as many epochs as the steps need) at the
  same batch and workers, decoding
  each JPEG file with `ToTensor` (no resize: the files are already 256 px, as the shards are).

Reported per run: images/s, wall and CPU seconds (the process and its workers), peak RSS of the main process
(VmHWM) and the largest of its workers, and at the end the main process's private (RssAnon) and file-backed
(RssFile: mapped shard pages, shared with every process mapping them) resident memory. The page cache is warm
(the files were just written). Then a scale table for ImageNet derived from the measured bytes per record.

    python benchmarks/data_path.py                        # 5k / 50k / 200k records (~6.6 GB of shards)
    python benchmarks/data_path.py --records 2000 5000 --steps 20 --json benchmarks/out/data_path.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import cpu_model  # noqa: E402

PHOTOS = REPO.parent / "shared" / "data" / "imagenet-sample"
SHARD_RECORDS = 10_000
IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000
LATENT_BYTES = 32 * 16 * 16 * 4
"""One cached latent of the paper (16x16x32 float32); the cache holds two per record (plain and flipped)."""


def encoded_pool(photos: Path, side: int = 256, quality: int = 95) -> list[tuple[bytes, int]]:
    """The photos as `side` px JPEG q`quality` bytes (resize shorter side, centre crop), with a label each."""
    from PIL import Image

    pool = []
    files = sorted(photos.glob("*.JPEG"))
    if not files:
        raise SystemExit(f"{photos}: no *.JPEG photos (the shared test images)")
    for label, path in enumerate(files):
        image = Image.open(path).convert("RGB")
        scale = side / min(image.size)
        image = image.resize((max(side, round(image.width * scale)), max(side, round(image.height * scale))),
                             Image.BICUBIC)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        buffer = io.BytesIO()
        image.crop((left, top, left + side, top + side)).save(buffer, format="JPEG", quality=quality)
        pool.append((buffer.getvalue(), label))
    return pool


def write_dataset(folder: Path, pool: list[tuple[bytes, int]], records: int) -> dict[str, Any]:
    """Shards + indexes + dataset.json of `records` records cycling over `pool`; and the ImageFolder tree."""
    from aligntok.data.shards import INDEX_FORMAT, write_index

    folder.mkdir(parents=True)
    (folder / "pool").mkdir()
    for i, (data, label) in enumerate(pool):
        (folder / "pool" / f"{i:04d}.jpg").write_bytes(data)
    names, counts = [], []
    for first in range(0, records, SHARD_RECORDS):
        name = f"train-{len(names):06d}.tar"
        with tarfile.open(folder / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(first, min(first + SHARD_RECORDS, records)):
                data, label = pool[i % len(pool)]
                key = f"{i:016x}"
                entries = {"cls": str(label % 1000).encode(), "jpg": data,
                           "json": json.dumps({"key": key, "label": label % 1000}).encode()}
                for ext in sorted(entries):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mode = len(entries[ext]), 0o444
                    tar.addfile(info, io.BytesIO(entries[ext]))
        counts.append(write_index(folder / name))
        names.append(name)
    info = {"source": "benchmark", "classes": [f"c{i:03d}" for i in range(1000)], "resolution": 256,
            "image_format": "jpeg", "counts": {"train": records, "val": 0}, "shards": {"train": names, "val": []},
            "index": {"format": INDEX_FORMAT, "records": {"train": counts, "val": []}}}
    (folder / "dataset.json").write_text(json.dumps(info))
    tree = folder / "imagefolder"
    for i in range(records):  # one file per record as ImageFolder wants, each a copy (as the shards hold copies:
        label = pool[i % len(pool)][1] % 1000  # hard links would let the peer read 500 files from a hot cache)
        (tree / f"c{label:03d}").mkdir(parents=True, exist_ok=True)
        (tree / f"c{label:03d}" / f"{i:07d}.jpg").write_bytes(pool[i % len(pool)][0])
    shard_bytes = sum((folder / name).stat().st_size for name in names)
    index_bytes = sum((folder / name.replace(".tar", ".idx")).stat().st_size for name in names)
    return {"records": records, "shards": len(names), "shard_bytes": shard_bytes, "index_bytes": index_bytes}


def _resident() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def measure(peer: str, folder: Path, batch: int, steps: int, workers: int, warmup: int) -> dict[str, Any]:
    """One peer's run in this process: `warmup` untimed batches, then `steps` timed ones."""
    import torch

    torch.set_num_threads(1)
    if peer == "aligntok":
        from aligntok.data.loader import StepBatches, load_split

        batches = StepBatches(load_split(folder, "train"), batch, seed=0, steps=warmup + steps, workers=workers)
        next_batch = iter(range(warmup + steps)).__next__

        def read() -> int:
            return len(batches(next_batch())[0])
    else:
        from torch.utils.data import DataLoader
        from torchvision import datasets, transforms

        from torch.utils.data import RandomSampler

        files = datasets.ImageFolder(folder / "imagefolder", transform=transforms.ToTensor())
        sampler = RandomSampler(files, num_samples=batch * (warmup + steps),  # several epochs if need be
                                generator=torch.Generator().manual_seed(0))
        loader = DataLoader(files, batch_size=batch, sampler=sampler, num_workers=workers,
                            prefetch_factor=4 if workers else None)  # as StepBatches
        iterator = iter(loader)

        def read() -> int:
            return len(next(iterator)[0])
    for _ in range(warmup):
        read()
    cpu0, wall0 = os.times(), time.perf_counter()
    seen = sum(read() for _ in range(steps))
    wall, cpu1 = time.perf_counter() - wall0, os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system) + \
          (cpu1.children_user - cpu0.children_user) + (cpu1.children_system - cpu0.children_system)
    resident = _resident()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # workers that have exited
    return {"peer": peer, "images": seen, "wall_s": round(wall, 3), "images_per_s": round(seen / wall, 1),
            "peak_rss_mb": round(resident["VmHWM"] / 2**20, 1), "rss_anon_mb": round(resident["RssAnon"] / 2**20, 1),
            "rss_file_mb": round(resident["RssFile"] / 2**20, 1), "cpu_s_in_process": round(cpu, 2),
            "workers_peak_rss_mb_at_exit": round(children / 2**20, 1)}


def _worker(args: argparse.Namespace) -> None:
    result = measure(args.peer, Path(args.folder), args.batch, args.steps, args.workers, args.warmup)
    print(json.dumps(result))


def run_in_process(peer: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", "--peer", peer, "--folder", str(folder), "--batch",
               str(args.batch), "--steps", str(args.steps), "--workers", str(args.workers), "--warmup", str(args.warmup)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{peer} on {folder}: exit {done.returncode}\n{done.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2)  # whole process
    result["workers_peak_rss_mb"] = round(after.ru_maxrss / 1024, 1)  # largest resident child of this bench so far
    return result


def scale_table(sizes: list[dict[str, Any]], runs: list[dict[str, Any]], workers: int) -> list[dict[str, str]]:
    """ImageNet figures, each derived from a measured one (named in `basis`)."""
    biggest = max(sizes, key=lambda s: s["records"])
    per_record = biggest["shard_bytes"] / biggest["records"]
    per_index = biggest["index_bytes"] / biggest["records"]
    ours = [r for r in runs if r["peer"] == "aligntok" and r["records"] == biggest["records"]][0]
    anon = max(r["rss_anon_mb"] for r in runs if r["peer"] == "aligntok")
    return [
        {"figure": "shard bytes per 256 px JPEG q95 record (tar headers and padding included)",
         "value": f"{per_record / 1e3:.1f} KB", "basis": f"measured: {biggest['shard_bytes']} B / {biggest['records']} records"},
        {"figure": "ImageNet train shards", "value": f"{IMAGENET_TRAIN * per_record / 1e9:.1f} GB in "
         f"{-(-IMAGENET_TRAIN // SHARD_RECORDS)} shards", "basis": f"{IMAGENET_TRAIN} x bytes per record"},
        {"figure": "ImageNet val shards (official 50,000)", "value": f"{IMAGENET_VAL * per_record / 1e9:.2f} GB",
         "basis": f"{IMAGENET_VAL} x bytes per record"},
        {"figure": "record indexes (.idx) for ImageNet train", "value": f"{IMAGENET_TRAIN * per_index / 1e6:.0f} MB",
         "basis": f"measured {per_index:.1f} B a record (npy header included)"},
        {"figure": "ImageNet latent cache (16x16x32 float32, plain + flipped, + int64 label)",
         "value": f"{IMAGENET_TRAIN * (2 * LATENT_BYTES + 8) / 1e9:.1f} GB",
         "basis": f"{IMAGENET_TRAIN} x (2 x {LATENT_BYTES} + 8) B"},
        {"figure": "private memory of one rank's data path, any dataset size",
         "value": f"<= {anon:.0f} MB (8 ranks: <= {8 * anon / 1e3:.1f} GB a node)",
         "basis": "measured RssAnon of the reading process (flat across sizes, see above); "
                  "the shards' pages are page cache, shared by every rank of the node"},
        {"figure": f"images/s the reader sustains with {workers} workers (this 2-core CPU)",
         "value": f"{ours['images_per_s']:.0f} images/s ({ours['images_per_s'] / max(workers, 1):.0f} per worker)",
         "basis": "measured above at the largest size"},
        {"figure": "data rate one H200 needs",
         "value": "not measured: no GPU was available, so no H200 step time (tokenizer or DiT-XL/1) exists to "
                  "divide by. Needed rate = global batch per GPU / step time; workers needed = that rate / the "
                  "per-worker rate above (a GPU node's cores decode at their own per-core rate, not this CPU's)",
         "basis": "-"},
    ]


def markdown(report: dict[str, Any]) -> str:
    """The report as a page: the runs, the ratios and the ImageNet scale table."""
    lines = ["# The data path at scale", "",
             f"Written by `{report['command'].strip()}` on {report['date']}, {report['cpu']} ({report['cores']} cores), "
             f"in {report['wall_s']} s wall / {report['cpu_s']} s CPU. Method: the script's docstring. Batch "
             f"{report['batch']}, {report['steps']} timed batches a run, {report['workers']} loader workers for both "
             "peers; the records are the 500 shared ImageNet photos at 256 px JPEG q95, cycled.", "",
             "| records | shards (GB) | peer | images/s | wall s | CPU s | peak RSS MB | RssAnon MB | RssFile MB |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    sizes = {s["records"]: s for s in report["sizes"]}
    for run in report["runs"]:
        size = sizes[run["records"]]
        lines.append(f"| {run['records']:,} | {size['shards']} ({size['shard_bytes'] / 1e9:.2f}) | {run['peer']} | "
                     f"{run['images_per_s']:.0f} | {run['wall_s']:.1f} | {run['cpu_s']:.1f} | {run['peak_rss_mb']:.0f} | "
                     f"{run['rss_anon_mb']:.0f} | {run['rss_file_mb']:.0f} |")
    ratios = ", ".join(f"{n:,}: {r:.2f}x" for n, r in report["throughput_ratio_vs_imagefolder"].items())
    lines += ["", f"- images/s of the mapped shards + `StepBatches` over ImageFolder + DataLoader: {ratios} "
              "(target >= 1x).",
              f"- peak RSS of the aligntok reading process across sizes: spread {report['aligntok_peak_rss_spread_mb']} "
              f"MB ({report['aligntok_peak_rss_spread_pct']}%). CPU s counts the process and its workers; the "
              "machine is shared and noisy, so compare the peers only as ratios within this run.", "",
              "## ImageNet at this layout", "", "| figure | value | basis |", "|---|---|---|"]
    lines += [f"| {row['figure']} | {row['value']} | {row['basis']} |" for row in report["scale"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, nargs="+", default=[5_000, 50_000, 200_000])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=80, help="timed batches per run (default 80)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first (worker start-up)")
    parser.add_argument("--workers", type=int, default=2, help="loader processes of both peers (default 2)")
    parser.add_argument("--photos", type=Path, default=PHOTOS)
    parser.add_argument("--tmp", type=Path, default=None, help="where the datasets are written (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=REPO / "reports" / "data_path.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)
    started, cpu_started = time.perf_counter(), os.times()
    tmp = Path(tempfile.mkdtemp(prefix="aligntok-datapath-", dir=args.tmp))
    try:
        pool = encoded_pool(args.photos)
        print(f"pool: {len(pool)} photos at 256 px JPEG q95, {sum(len(d) for d, _ in pool) / len(pool) / 1e3:.1f} KB "
              "mean", flush=True)
        sizes, runs = [], []
        for records in args.records:
            folder = tmp / f"n{records}"
            sizes.append(write_dataset(folder, pool, records))
            for peer in ("aligntok", "imagefolder"):
                result = {"records": records, **run_in_process(peer, folder, args)}
                runs.append(result)
                print(f"{records:>7} records  {peer:<11} {result['images_per_s']:>7.1f} images/s  wall "
                      f"{result['wall_s']:.1f} s  cpu {result['cpu_s']:.1f} s  peak RSS {result['peak_rss_mb']:.0f} MB  "
                      f"anon {result['rss_anon_mb']:.0f} MB  file {result['rss_file_mb']:.0f} MB", flush=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ours = [r for r in runs if r["peer"] == "aligntok"]
    peers = {r["records"]: r for r in runs if r["peer"] == "imagefolder"}
    ratios = {r["records"]: round(r["images_per_s"] / peers[r["records"]]["images_per_s"], 3) for r in ours}
    peaks = [r["peak_rss_mb"] for r in ours]
    cpu = os.times()
    report = {
        "command": "python benchmarks/data_path.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_model(), "cores": os.cpu_count(),
        "batch": args.batch, "steps": args.steps, "workers": args.workers, "sizes": sizes, "runs": runs,
        "throughput_ratio_vs_imagefolder": ratios,
        "aligntok_peak_rss_spread_mb": round(max(peaks) - min(peaks), 1),
        "aligntok_peak_rss_spread_pct": round(100 * (max(peaks) - min(peaks)) / min(peaks), 1),
        "scale": scale_table(sizes, runs, args.workers),
        "wall_s": round(time.perf_counter() - started, 1),
        "cpu_s": round(cpu.user + cpu.system + cpu.children_user + cpu.children_system
                       - cpu_started.user - cpu_started.system - cpu_started.children_user
                       - cpu_started.children_system, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    args.json.with_suffix(".md").write_text(markdown(report))
    print(f"ratio aligntok / ImageFolder images/s: {ratios}; aligntok peak RSS spread "
          f"{report['aligntok_peak_rss_spread_mb']} MB ({report['aligntok_peak_rss_spread_pct']}%) -> {args.json}")


if __name__ == "__main__":
    main()

"""Ingest throughput (images/s): `aligntok.data.ingest` against a naive loop, in one run.

Workloads:
- Fashion-MNIST (70,000 28×28 greyscale images, or `--limit`) at resolution 32, PNG;
- the shared ImageNet sample (500 JPEG photos) at resolution 256, PNG, as an image folder.

Peers, run on the same inputs one after another:
- `naive loop`: what a first script does: decode, convert to RGB, resize, centre-crop,
  encode, `webdataset.ShardWriter`, all in one process; no hashing, probing, dedupe,
  split or manifest;
- `aligntok workers=0`: the full ingest (policy, dedupe, split, manifest) in one process;
- `aligntok workers=N`: the same with N worker processes.

Times are wall-clock, end to end (worker start-up and file writing included); CPU
seconds (this process and its workers) show the cost when other jobs share the cores.
Both write PNG: the naive loop at Pillow's default zlib level 6, aligntok at level 1.

    python benchmarks/ingest_throughput.py                 # everything
    python benchmarks/ingest_throughput.py --limit 10000 --workers 2 --json benchmarks/out/ingest.json
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from aligntok.config import DataConfig  # noqa: E402
from aligntok.data.ingest import ingest  # noqa: E402
from aligntok.data.sources import FASHION_MNIST_FILES  # noqa: E402

IMAGENET_SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample"


@dataclass
class Row:
    workload: str
    method: str
    images: int
    seconds: float
    cpu_seconds: float
    """User+system time of this process and its (finished) worker processes."""

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import pyarrow.parquet  # noqa: F401 - import cost (and webdataset's torch) outside every timing
    import webdataset  # noqa: F401
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as scratch:
        scratch_dir = Path(scratch)
        if not args.skip_fashion:
            rows += bench_fashion(args, scratch_dir)
        if not args.skip_imagenet:
            rows += bench_imagenet(args, scratch_dir)
    print(format_table(rows))
    print(f"\n{machine()}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": machine(), "rows": [{**asdict(r), "images_per_s": r.images_per_s} for r in rows]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes for the parallel run (default 2)")
    parser.add_argument("--limit", type=int, default=None, help="Fashion-MNIST images to use (default: all 70,000)")
    parser.add_argument("--fashion-mnist-dir", default=DataConfig().fashion_mnist_dir)
    parser.add_argument("--imagenet-dir", type=Path, default=IMAGENET_SAMPLE, help="folder of JPEG photos")
    parser.add_argument("--skip-fashion", action="store_true")
    parser.add_argument("--skip-imagenet", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def bench_fashion(args: argparse.Namespace, scratch: Path) -> list[Row]:
    folder = Path(args.fashion_mnist_dir)
    if not folder.is_dir():
        print(f"skipping Fashion-MNIST: {folder} absent (apt-get install dataset-fashion-mnist)", file=sys.stderr)
        return []
    cfg = DataConfig(fashion_mnist_dir=str(folder), resolution=32)
    name = "Fashion-MNIST 28->32"
    rows = [_timed(name, "naive loop", lambda: _naive(_fashion_arrays(folder, args.limit), scratch / "naive-f", 32))]
    rows += _aligntok_rows(name, "fashion-mnist", cfg, args.workers, args.limit, scratch)
    return rows


def bench_imagenet(args: argparse.Namespace, scratch: Path) -> list[Row]:
    files = sorted(args.imagenet_dir.glob("*.JPEG")) if args.imagenet_dir.is_dir() else []
    if not files:
        print(f"skipping ImageNet sample: no JPEGs in {args.imagenet_dir}", file=sys.stderr)
        return []
    root = scratch / "imagefolder"
    for path in files:  # one class folder per WordNet id, as in ImageNet
        (root / path.name.split("_")[0]).mkdir(parents=True, exist_ok=True)
        (root / path.name.split("_")[0] / path.name).symlink_to(path)
    cfg = DataConfig(resolution=256)
    name = "ImageNet sample ->256"
    labelled = ((Image.open(path), index) for index, path in enumerate(files))
    rows = [_timed(name, "naive loop", lambda: _naive(labelled, scratch / "naive-i", 256))]
    rows += _aligntok_rows(name, f"imagefolder:{root}", cfg, args.workers, None, scratch)
    return rows


def _aligntok_rows(
    name: str, source: str, cfg: DataConfig, workers: int, limit: int | None, scratch: Path
) -> list[Row]:
    rows = []
    for count in (0, workers):
        out = scratch / f"aligntok-{count}"
        run_cfg = cfg.model_copy(update={"workers": count})
        run = lambda: ingest(source, out, run_cfg, progress=False, limit=limit).inputs  # noqa: E731, B023
        rows.append(_timed(name, f"aligntok workers={count}", run))
        shutil.rmtree(out)
    return rows


def _fashion_arrays(folder: Path, limit: int | None) -> Iterator[tuple[Image.Image, int]]:
    count = 0
    for images_name, labels_name in FASHION_MNIST_FILES:
        with gzip.open(folder / images_name) as f:
            images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(folder / labels_name) as f:
            labels = np.frombuffer(f.read(), np.uint8, offset=8)
        for pixels, label in zip(images, labels, strict=True):
            if limit is not None and count >= limit:
                return
            count += 1
            yield Image.fromarray(pixels), int(label)


def _naive(images: Iterator[tuple[Image.Image, int]], out: Path, resolution: int) -> int:
    """The textbook loop: PIL resize + centre crop, PNG, webdataset.ShardWriter; returns the count."""
    from webdataset import ShardWriter

    out.mkdir(parents=True)
    count = 0
    with ShardWriter(str(out / "train-%06d.tar"), maxcount=10_000, verbose=0) as writer:
        for image, label in images:
            image = image.convert("RGB")
            scale = resolution / min(image.size)
            width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
            image = image.resize((width, height), Image.Resampling.BICUBIC)
            left, top = (width - resolution) // 2, (height - resolution) // 2
            image = image.crop((left, top, left + resolution, top + resolution))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            writer.write({"__key__": f"{count:08d}", "png": buffer.getvalue(), "cls": label})
            count += 1
    shutil.rmtree(out)
    return count


def _timed(workload: str, method: str, run: Callable[[], int]) -> Row:
    cpu, start = _cpu_seconds(), time.perf_counter()
    count = run()
    return Row(workload, method, count, time.perf_counter() - start, _cpu_seconds() - cpu)


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def format_table(rows: list[Row]) -> str:
    lines = [
        "| workload | method | images | wall s | images/s | vs naive | CPU s | CPU ms/image |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    naive = {row.workload: row.images_per_s for row in rows if row.method == "naive loop"}
    for row in rows:
        ratio = row.images_per_s / naive[row.workload] if row.workload in naive else float("nan")
        lines.append(
            f"| {row.workload} | {row.method} | {row.images} | {row.seconds:.1f} | {row.images_per_s:.0f} "
            f"| {ratio:.2f}x | {row.cpu_seconds:.1f} | {1000 * row.cpu_seconds / row.images:.2f} |"
        )
    return "\n".join(lines)


def machine() -> dict[str, object]:
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()}


if __name__ == "__main__":
    raise SystemExit(main())

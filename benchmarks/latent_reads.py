"""train_dit's latent reads/s: the memory-mapped latent cache (`load_latents`) against the old in-memory tensors.

A synthetic cache in the writer's format (`latents-NNNNNN.safetensors` shards written with
`atomic_save_safetensors` and `cache_latents`' metadata, `stats.json` from the same statistics code) of
`--records` records of the paper's latent (32, 16, 16) float32, plain and flipped. One worker process per
peer reads the same steps with `batch_for_step` at batch `--batch` (samples/s, each sample one latent):

- `mapped`: `aligntok.diffusion.latents.load_latents`, the shards mapped read-only, each batch's rows gathered
  from the maps (what train_dit does now);
- `in-memory`: every shard read (`safetensors.torch.load_file`) and concatenated (`torch.cat`), batches
  gathered with `torch.where` over both views indexed as `latent[indices]` (what `load_latents` did before;
  kept here only): the baseline of the target;
- `in-memory-index-select`: the same tensors gathered with `index_select`, a faster CPU kernel than advanced
  indexing, so that the ratio is also shown against the best in-memory gather, not only the old one.

The shards are read once first, so the page cache is warm; each worker then touches all of its data once (the
mapped one every page of its maps, as after a first epoch) and runs `--warmup` untimed steps. Repeats are
interleaved (the peers in turn, the order rotating), each on the same `--steps` steps, the other workers idle.
Reported: samples/s (median over the repeats), the ratio mapped / in-memory (target >= 0.9), wall and CPU
seconds of the timed steps, and each worker's peak RSS (VmHWM) and, at the end, its private (RssAnon) and
file-backed (RssFile, the page cache's pages, shared by every process that maps them) resident memory. The
batches of all peers are checked to be equal bit for bit.

    python benchmarks/latent_reads.py                      # 20,000 records (1.3 GB), batch 256
    python benchmarks/latent_reads.py --records 4000 --repeats 3 --json benchmarks/out/latent_reads.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout
sys.path.insert(0, str(REPO / "benchmarks"))

from common import cpu_model  # noqa: E402

from aligntok.data.loader import batch_indices, step_generator  # noqa: E402
from aligntok.diffusion.latent_writer import _write_stats, view_partial  # noqa: E402
from aligntok.diffusion.latents import (FORMAT, STATS, LatentNormalizer, load_latents, read_stats,  # noqa: E402
                                        shard_name)
from aligntok.fileio import atomic_save_safetensors  # noqa: E402

LATENT_SHAPE = (32, 16, 16)
"""The paper's latent: 16x16 grid, 32 channels (ImageNet's cache holds 1.28 M of these, twice)."""
CLASSES = 1000
PEERS = ("mapped", "in-memory", "in-memory-index-select")
BASELINE = "in-memory"
"""The peer the target ratio is against: the code train_dit ran before the cache was mapped."""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return serve(args)
    keep = args.dir is not None
    folder = args.dir or Path(tempfile.mkdtemp(prefix="latent-reads-"))
    try:
        return measure(args, folder)
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000, help="records in the synthetic cache (default "
                        "20,000: 1.3 GB of latents, both views)")
    parser.add_argument("--shard-size", type=int, default=1000, help="records per shard (cache_latents' default)")
    parser.add_argument("--batch", type=int, default=256, help="samples per step (default 256)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per repeat (default 40)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per peer (default 5)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per worker first (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per worker (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=None,
                        help="cache folder: reused when it holds this cache, else written (default: a temporary "
                             "folder under $TMPDIR, removed afterwards)")
    parser.add_argument("--json", type=Path, default=REPO / "reports" / "latent_reads.json")
    parser.add_argument("--worker", choices=PEERS, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- the synthetic cache


def write_cache(folder: Path, records: int, shard_size: int, seed: int) -> float:
    """Shards and stats.json as `cache_latents` writes them (random latents); -> seconds taken. Reuses a
    folder whose stats.json already describes this cache."""
    stats = folder / STATS
    if stats.is_file():
        found = read_stats(folder)
        if found.get("images") == records and found.get("latent_shape") == list(LATENT_SHAPE) and \
                len(found.get("shards", [])) == -(-records // shard_size):
            print(f"reusing the cache in {folder}", flush=True)
            return 0.0
    need = 2 * records * int(np.prod(LATENT_SHAPE)) * 4
    free = shutil.disk_usage(folder).free
    if free < 1.1 * need:
        raise SystemExit(f"{folder}: {free / 1e9:.1f} GB free, the cache needs {need / 1e9:.1f} GB; "
                         "pass fewer --records or another --dir")
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    sha = "0" * 64
    partials = []
    num_shards = -(-records // shard_size)
    for index in range(num_shards):
        n = min(shard_size, records - index * shard_size)
        views = [torch.from_numpy(rng.standard_normal((n, *LATENT_SHAPE), dtype=np.float32)) for _ in range(2)]
        labels = torch.from_numpy(rng.integers(0, CLASSES, n, dtype=np.int64))
        keys = [f"{index * shard_size + i:016x}" for i in range(n)]
        metadata = {"format": FORMAT, "index": str(index), "count": str(n), "keys": json.dumps(keys),
                    "tokenizer_sha256": sha}
        atomic_save_safetensors({"latent": views[0], "latent_flip": views[1], "label": labels},
                                folder / shard_name(index), metadata)
        partials.append((index, [view_partial(z) for z in views]))
    info = {"classes": [f"class{c:04d}" for c in range(CLASSES)]}
    _write_stats(folder, num_shards, partials, info, "synthetic", sha, LATENT_SHAPE)
    seconds = time.perf_counter() - start
    print(f"wrote {num_shards} shards ({records} records, {need / 1e9:.2f} GB) in {seconds:.1f} s", flush=True)
    return seconds


def warm_page_cache(folder: Path) -> float:
    """Read every file of the cache once, so that both peers start from a warm page cache; -> seconds."""
    start = time.perf_counter()
    for path in sorted(folder.iterdir()):
        with path.open("rb") as stream:
            while stream.read(1 << 24):
                pass
    return time.perf_counter() - start


# ---------------------------------------------------------------------------- the peers


class InMemoryLatents:
    """The old `load_latents`: every shard read and concatenated; batches by `torch.where` over both views."""

    def __init__(self, folder: Path, index_select: bool = False) -> None:
        from safetensors.torch import load_file

        self.index_select = index_select
        stats = read_stats(folder)
        parts: dict[str, list[torch.Tensor]] = {"latent": [], "latent_flip": [], "label": []}
        for name in stats["shards"]:
            tensors = load_file(str(folder / name))
            for key, values in parts.items():
                values.append(tensors[key])
        self.latent = torch.cat(parts["latent"])  # (N, C, h, w)
        self.latent_flip = torch.cat(parts["latent_flip"])  # (N, C, h, w)
        self.label = torch.cat(parts["label"])  # (N,)
        self.normalizer = LatentNormalizer.load(folder / STATS)

    def __len__(self) -> int:
        return self.label.shape[0]

    def batch_for_step(self, step: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices = batch_indices(len(self), batch_size, seed, step)  # (B,)
        flips = (torch.rand(batch_size, generator=step_generator(seed, step, "flip")) < 0.5).view(-1, 1, 1, 1)
        if self.index_select:
            z = torch.where(flips, self.latent_flip.index_select(0, indices), self.latent.index_select(0, indices))
        else:
            z = torch.where(flips, self.latent_flip[indices], self.latent[indices])  # (B, C, h, w)
        return self.normalizer.normalise(z), self.label[indices]


def open_peer(peer: str, folder: Path) -> Any:
    """The peer's latent set, every byte of its data touched once (resident, as after a first epoch)."""
    if peer.startswith("in-memory"):
        return InMemoryLatents(folder, index_select=peer == "in-memory-index-select")
    latents = load_latents(folder)
    for shard in range(len(latents.shards)):
        for array in latents.views(shard).values():
            array.reshape(-1)[:: max(1, 4096 // array.itemsize)].sum()  # one read per page: fault the map in
    return latents


def memory_mb() -> dict[str, float]:
    """This process's peak RSS (VmHWM), private (RssAnon) and file-backed (RssFile) resident memory, in MB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return {"peak_rss_mb": fields.get("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_anon_mb": fields.get("RssAnon", float("nan")), "rss_file_mb": fields.get("RssFile", float("nan"))}


def serve(args: argparse.Namespace) -> int:
    """A worker: open the peer, then answer one JSON command per stdin line with one JSON line on stdout."""
    torch.set_num_threads(args.threads)
    baseline = memory_mb()["rss_anon_mb"]  # the interpreter, torch and numpy: before any latent
    start = time.perf_counter()
    latents = open_peer(args.worker, args.dir)
    opened = {"open_seconds": time.perf_counter() - start, "baseline_rss_anon_mb": baseline, **memory_mb()}
    for step in range(args.warmup):
        latents.batch_for_step(10_000_000 + step, args.batch, args.seed)
    print(json.dumps(opened), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        steps = range(command["first"], command["stop"])
        if command["op"] == "time":
            wall, cpu = time.perf_counter(), time.process_time()
            for step in steps:
                latents.batch_for_step(step, args.batch, args.seed)
            reply = {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}
        else:  # "digest": the batches' bytes, to check both peers read the same
            digest = hashlib.sha256()
            for step in steps:
                z, y = latents.batch_for_step(step, args.batch, args.seed)
                digest.update(z.numpy().tobytes())
                digest.update(y.numpy().tobytes())
            reply = {"sha256": digest.hexdigest()}
        print(json.dumps({**reply, **memory_mb()}), flush=True)
    return 0


class Worker:
    """One peer's worker process, driven over its stdin/stdout."""

    def __init__(self, peer: str, folder: Path, args: argparse.Namespace) -> None:
        command = [sys.executable, __file__, "--worker", peer, "--dir", str(folder), "--batch", str(args.batch),
                   "--warmup", str(args.warmup), "--threads", str(args.threads), "--seed", str(args.seed)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.opened = self._reply()

    def _reply(self) -> dict[str, Any]:
        line = self.process.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise SystemExit(f"the {self.process.args[3]} worker exited ({self.process.wait()})")
        return json.loads(line)

    def ask(self, op: str, first: int, stop: int) -> dict[str, Any]:
        message = json.dumps({"op": op, "first": first, "stop": stop})
        self.process.stdin.write(message + "\n")  # type: ignore[union-attr]
        self.process.stdin.flush()  # type: ignore[union-attr]
        return self._reply()

    def close(self) -> None:
        self.process.stdin.close()  # type: ignore[union-attr]
        self.process.wait(timeout=60)


# ---------------------------------------------------------------------------- the measurement


def measure(args: argparse.Namespace, folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    write_seconds = write_cache(folder, args.records, args.shard_size, args.seed)
    cache_bytes = sum(p.stat().st_size for p in folder.iterdir())
    warm_seconds = warm_page_cache(folder)
    print(f"{cpu_model()}, torch {torch.__version__}, numpy {np.__version__}, {args.threads} thread(s); "
          f"{args.records} records {LATENT_SHAPE} float32 (+ flips) in {-(-args.records // args.shard_size)} "
          f"shards, {cache_bytes / 1e9:.2f} GB; batch {args.batch}, {args.repeats} x {args.steps} steps",
          flush=True)
    workers = {peer: Worker(peer, folder, args) for peer in PEERS}
    timings: dict[str, list[dict[str, Any]]] = {peer: [] for peer in PEERS}
    try:
        for repeat in range(args.repeats):
            first = repeat * args.steps
            for peer in PEERS[repeat % len(PEERS):] + PEERS[:repeat % len(PEERS)]:  # rotate which goes first
                timings[peer].append(workers[peer].ask("time", first, first + args.steps))
            line = "  ".join(f"{peer} {args.steps * args.batch / timings[peer][-1]['seconds']:,.0f} samples/s"
                             for peer in PEERS)
            print(f"repeat {repeat + 1}/{args.repeats}: {line}", flush=True)
        digests = {peer: workers[peer].ask("digest", 0, args.repeats * args.steps) for peer in PEERS}
    finally:
        for worker in workers.values():
            worker.close()

    samples = args.steps * args.batch
    report: dict[str, Any] = {
        "benchmark": "train_dit latent reads (batch_for_step): mapped cache vs in-memory tensors",
        "command": " ".join(["python benchmarks/latent_reads.py", *argv_of(args)]),
        "machine": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__, "numpy": np.__version__,
        "threads": args.threads, "records": args.records, "latent_shape": list(LATENT_SHAPE),
        "shard_size": args.shard_size, "shards": -(-args.records // args.shard_size), "cache_bytes": cache_bytes,
        "batch": args.batch, "steps_per_repeat": args.steps, "repeats": args.repeats, "warmup_steps": args.warmup,
        "write_seconds": write_seconds, "page_cache_warm_seconds": warm_seconds, "peers": {},
    }
    for peer in PEERS:
        rates = [samples / t["seconds"] for t in timings[peer]]
        last = timings[peer][-1]
        report["peers"][peer] = {
            "samples_per_s": statistics.median(rates), "samples_per_s_repeats": rates,
            "wall_seconds": sum(t["seconds"] for t in timings[peer]),
            "cpu_seconds": sum(t["cpu_seconds"] for t in timings[peer]),
            "cpu_ms_per_step": 1000 * sum(t["cpu_seconds"] for t in timings[peer]) / (args.repeats * args.steps),
            "open_seconds": workers[peer].opened["open_seconds"],
            "peak_rss_mb": last["peak_rss_mb"], "rss_anon_mb": last["rss_anon_mb"], "rss_file_mb": last["rss_file_mb"],
            "baseline_rss_anon_mb": workers[peer].opened["baseline_rss_anon_mb"],
            "cache_rss_anon_mb": last["rss_anon_mb"] - workers[peer].opened["baseline_rss_anon_mb"],
        }
    ratios = [i["seconds"] / m["seconds"] for m, i in zip(timings["mapped"], timings[BASELINE])]  # rate ratios
    rate = {peer: row["samples_per_s"] for peer, row in report["peers"].items()}
    ratio = rate["mapped"] / rate[BASELINE]
    best = rate["mapped"] / rate["in-memory-index-select"]
    same = len({d["sha256"] for d in digests.values()}) == 1
    report.update(baseline=BASELINE, ratio=ratio, ratio_repeats=ratios, ratio_vs_index_select=best, target=0.9,
                  meets_target=ratio >= 0.9, bit_for_bit=same)

    print("\n| peer | samples/s (median) | wall | CPU | CPU/step | open | peak RSS | private RSS (+ over imports) "
          "| file RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for peer, row in report["peers"].items():
        print(f"| {peer} | {row['samples_per_s']:,.0f} | {row['wall_seconds']:.2f} s | {row['cpu_seconds']:.2f} s | "
              f"{row['cpu_ms_per_step']:.2f} ms | {row['open_seconds']:.2f} s | {row['peak_rss_mb']:,.0f} MB | "
              f"{row['rss_anon_mb']:,.0f} MB (+{row['cache_rss_anon_mb']:,.0f}) | {row['rss_file_mb']:,.0f} MB |")
    print(f"\nmapped / {BASELINE}: {ratio:.2f}x (repeats {', '.join(f'{r:.2f}' for r in ratios)}; target >= 0.9: "
          f"{'met' if ratio >= 0.9 else 'NOT met'}); mapped / in-memory-index-select: {best:.2f}x; "
          f"batches equal bit for bit: {same}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"-> {args.json}")
    return 0 if same else 1


def argv_of(args: argparse.Namespace) -> list[str]:
    """The options this run was given that differ from the defaults (for the report's `command`)."""
    defaults = vars(parse_args([]))
    out = []
    for key, value in vars(args).items():
        if key != "worker" and value != defaults[key]:
            out += [f"--{key.replace('_', '-')}", str(value)]
    return out


if __name__ == "__main__":
    sys.exit(main())

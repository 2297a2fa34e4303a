"""Our overhead around the models: latent caching against its bare forward, and a no-op `dvc repro`.

- cache_latents: images/s of `aligntok.diffusion.latent_writer.cache_latents` (read shards, decode, encode every
  image and its flip, write latent shards, channel statistics) against the bare forward it cannot beat:
  the same tokenizer's `encode` on the same already-decoded batches and their flips (the ceiling). Ratio =
  ours / ceiling; the gap is our overhead. Uses the checkout's `data/shards` and stage-3 tokenizer (run
  `dvc repro cache_latents` first).
- no-op `dvc repro` in this checkout (everything up to date): wall seconds, median of 3 (target: under 3 s).
- `--prefect`: the tiny preset's whole DAG run by the Prefect flow (flows/pipeline.py, with its lock, parent
  run and summary) against `dvc repro` of the same DAG, each in a fresh copy of this checkout (target: the
  flow adds under 10%). Twice: with the temporary server a bare `python flows/pipeline.py` starts (its
  start-up is inside the timing), and against a Prefect server already running, as deployments run.

    python benchmarks/pipeline_overhead.py --images 2000 --json benchmarks/out/overhead.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aligntok.config import load_params  # noqa: E402
from aligntok.data.loader import load_split  # noqa: E402
from aligntok.diffusion.latent_writer import cache_latents  # noqa: E402
from aligntok.tokenizer.api import Tokenizer  # noqa: E402


def bench_cache(images: int, batch: int) -> dict[str, float]:
    shards, tokenizer = REPO / "data" / "shards", REPO / "models" / "tokenizer" / "refine_decoder"
    if not (shards / "dataset.json").is_file() or not (tokenizer / "tokenizer.safetensors").is_file():
        raise SystemExit("run `dvc repro cache_latents` first: data/shards and models/tokenizer/refine_decoder")
    cfg = load_params(REPO / "params.yaml").cache_latents.model_copy(
        update={"max_images": images, "batch_size": batch, "shard_size": 1000})
    out = Path(tempfile.mkdtemp(prefix="aligntok-cache-bench-"))
    try:
        start = time.perf_counter()
        cache_latents(tokenizer, shards, out / "latents", cfg, progress=False)
        ours = images / (time.perf_counter() - start)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    data = load_split(shards, "train", limit=images)
    model = Tokenizer.load(tokenizer, batch_size=batch)
    decoded = [data.batch(torch.arange(s, min(s + batch, images)))[0] for s in range(0, images, batch)]
    start = time.perf_counter()
    with torch.inference_mode():
        for x in decoded:
            model.encode(x)
            model.encode(torch.flip(x, dims=[3]))
    ceiling = images / (time.perf_counter() - start)
    print(f"cache_latents {ours:8.1f} images/s; bare encode of the same batches and flips {ceiling:8.1f} images/s; "
          f"ratio {ours / ceiling:.2f}", flush=True)
    return {"cache_latents_images_per_s": ours, "bare_forward_images_per_s": ceiling, "cache_ratio": ours / ceiling}


def bench_noop_repro(repeats: int = 3) -> dict[str, float]:
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or "dvc"
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = subprocess.run([dvc, "repro"], cwd=REPO, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if result.returncode != 0 or "Running stage" in result.stdout:
            raise SystemExit(f"`dvc repro` was not a no-op here:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    seconds = statistics.median(times)
    print(f"no-op dvc repro {seconds:.2f} s (median of {repeats}; target under 3 s)", flush=True)
    return {"noop_dvc_repro_seconds": seconds}


def _checkout(root: Path) -> Path:
    """A fresh git copy of this checkout's code (what `git ls-files` lists; no data, models or reports)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in files:
        if (REPO / name).is_file() and not name.startswith(("data/", "models/", "reports/")):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.email=b@example.com", "-c", "user.name=b", "commit", "-qm", "bench"]):
        subprocess.run(command, cwd=root, check=True, capture_output=True)
    return root


def bench_prefect() -> dict[str, float]:
    import os

    bin_dir = str(Path(sys.executable).parent)
    tmp = Path(tempfile.mkdtemp(prefix="aligntok-flow-bench-"))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PREFECT_HOME": str(tmp / "prefect"),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    env.pop("MLFLOW_TRACKING_URI", None)
    try:
        direct, flow = _checkout(tmp / "direct"), _checkout(tmp / "flow")
        aligntok = [sys.executable, "-m", "aligntok", "--params", "configs/tiny.yaml", "config", "--out", "params.yaml"]
        subprocess.run(aligntok, cwd=direct, env=env, check=True, capture_output=True)
        start = time.perf_counter()
        subprocess.run(["dvc", "repro"], cwd=direct, env=env, check=True, capture_output=True)
        seconds_direct = time.perf_counter() - start
        start = time.perf_counter()
        subprocess.run([sys.executable, "flows/pipeline.py", "--preset", "configs/tiny.yaml", "--no-promote"],
                       cwd=flow, env=env, check=True, capture_output=True)
        seconds_flow = time.perf_counter() - start
        with running_prefect_server(tmp / "server", env) as api:  # started before the clock, as a deployment's is
            served = _checkout(tmp / "served")
            start = time.perf_counter()
            subprocess.run([sys.executable, "flows/pipeline.py", "--preset", "configs/tiny.yaml", "--no-promote"],
                           cwd=served, env={**env, "PREFECT_API_URL": api}, check=True, capture_output=True)
            seconds_served = time.perf_counter() - start
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    overhead, overhead_served = seconds_flow / seconds_direct - 1, seconds_served / seconds_direct - 1
    print(f"tiny DAG: dvc repro {seconds_direct:.1f} s; Prefect flow with its temporary server {seconds_flow:.1f} s "
          f"({100 * overhead:+.1f}%); against a running server {seconds_served:.1f} s ({100 * overhead_served:+.1f}%) "
          f"(target under 10%)", flush=True)
    return {"tiny_dvc_repro_seconds": seconds_direct, "tiny_prefect_flow_seconds": seconds_flow,
            "prefect_overhead": overhead, "tiny_prefect_flow_running_server_seconds": seconds_served,
            "prefect_overhead_running_server": overhead_served}


@contextlib.contextmanager
def running_prefect_server(root: Path, env: dict[str, str]) -> Iterator[str]:
    """`prefect server start` on a free loopback port (own PREFECT_HOME, SQLite); yields its API URL once healthy."""
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root.mkdir(parents=True, exist_ok=True)
    server_env = {**env, "PREFECT_HOME": str(root / "home"), "PREFECT_UI_ENABLED": "false"}
    log = (root / "server.log").open("w")
    process = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                                "--port", str(port)], env=server_env, stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2).read()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"prefect server did not come up; see {root / 'server.log'}") from None
                time.sleep(1)
        yield api
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="training images cached (default: 2000)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prefect", action="store_true", help="also the Prefect flow against dvc repro (~6 min)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    figures = bench_cache(args.images, args.batch) | bench_noop_repro()
    if args.prefect:
        figures |= bench_prefect()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

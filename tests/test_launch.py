"""The stage commands as a user runs them on several processes: `runtime.nproc_per_node` re-launches a stage as
torchrun ranks (one registered version, one checkpoint, one printed result), an outer `torchrun` runs the same
command unchanged, a failing rank ends the job with its own error line, and a placement that cannot exist fails
before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from aligntok.config import CacheLatentsConfig

from support.tiny import TINY_MODEL, make_inputs

ROW = {"train": ["adapter", "decoder"], "steps": 4, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 2,
       "val_images": 6, "losses": {"gan": 0.5, "gan_start": 1, "perceptual": 0.0}}
RAW = {**TINY_MODEL, "align_latent": ROW,
       "dit": {"preset": "LightningDiT-T/1"},
       "train_dit": {"steps": 4, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 2, "log_every": 2,
                     "sample_every": 4},
       "sample": {"steps": 2, "cfg_scale": 1.5}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from aligntok.diffusion.latent_writer import cache_latents
    from aligntok.config import parse_params
    from aligntok.tokenizer.stages import StagePaths, run_tokenizer_stage

    root = tmp_path_factory.mktemp("launch")
    data, encoder = make_inputs(root)
    report = root / "validation.json"  # the shards passed `validate`
    report.write_text('{"success": true, "data_dir": "data", "failed": []}')
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(RAW))
    run_tokenizer_stage("align_latent", parse_params(RAW), StagePaths(data=data, encoder=encoder,
                        out=root / "tokenizer", checkpoints=root / "ck-setup"), register=False, progress=False)
    cache_latents(root / "tokenizer", data, root / "latents", CacheLatentsConfig(max_images=None, batch_size=8,
                  shard_size=10), progress=False)
    return {"root": root, "data": data, "encoder": encoder, "validation": report, "params": params,
            "tokenizer": root / "tokenizer", "latents": root / "latents"}


def env(tmp: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**clean, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}


def aligntok(setup: dict[str, Path], tmp: Path, *argv: str, launcher: list[str] | None = None,
             timeout: int = 300) -> subprocess.CompletedProcess[str]:
    command = [*(launcher or [sys.executable, "-m"]), "aligntok", "--params", str(setup["params"]), *argv]
    return subprocess.run(command, cwd=tmp, env=env(tmp), capture_output=True, text=True, timeout=timeout)


def stage_args(setup: dict[str, Path], out: Path, checkpoints: Path) -> list[str]:
    return ["align_latent", "--data", str(setup["data"]), "--encoder", str(setup["encoder"]), "--out", str(out),
            "--checkpoints", str(checkpoints), "--validation", str(setup["validation"]), "--no-progress"]


def test_nproc_per_node_2_relaunches_one_stage_as_two_ranks_that_register_once(setup: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    import mlflow

    run = aligntok(setup, tmp_path, "--set", "runtime.nproc_per_node=2",
                   *stage_args(setup, tmp_path / "two", tmp_path / "ck"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "launching 2 processes" in run.stderr
    assert "[rank 1/2]" in run.stderr and "[rank 0/2]" in run.stderr  # both ranks ran, their lines tagged
    printed = json.loads(run.stdout)  # the result is printed once, by rank 0
    assert printed["receipt"]["version"] == "1"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions("name='aligntok-tokenizer'")
    assert [str(v.version) for v in versions] == ["1"]  # one version, not one per rank
    runs = client.search_runs([client.get_experiment_by_name("aligntok").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert len(list((tmp_path / "ck" / "align_latent").glob("*.safetensors"))) == 1
    assert json.loads((tmp_path / "two" / "receipt.json").read_text())["version"] == "1"


def test_an_outer_torchrun_runs_the_stage_command_unchanged_and_matches_one_process(setup: dict[str, Path],
                                                                                   tmp_path: Path) -> None:
    args = ["train_dit", "--latents", str(setup["latents"]), "--tokenizer", str(setup["tokenizer"]),
            "--no-register", "--no-progress"]
    one = aligntok(setup, tmp_path, *args, "--out", str(tmp_path / "one"), "--checkpoints", str(tmp_path / "ck1"))
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    two = aligntok(setup, tmp_path, *args, "--out", str(tmp_path / "two"), "--checkpoints", str(tmp_path / "ck2"),
                   launcher=torchrun)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "launching" not in two.stderr  # already a rank: no second launch
    assert json.loads(two.stdout)["train_dit"]["world_size"] == 2.0
    a, b = load_file(str(tmp_path / "one" / "dit.safetensors")), load_file(str(tmp_path / "two" / "dit.safetensors"))
    worst = max(float((a[k] - b[k]).abs().max() / max(a[k].abs().max().item(), 1e-6)) for k in a)
    assert worst <= 1e-3, worst


def test_a_failing_rank_ends_the_job_with_its_own_error_line(setup: dict[str, Path], tmp_path: Path) -> None:
    """Rank 1 of cache_latents reads the second ingest shard, which is damaged here; rank 0 is fine."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    tar = data / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[:3000])  # truncated mid-record
    run = aligntok(setup, tmp_path, "--set", "runtime.nproc_per_node=2", "--set", "cache_latents.max_images=null",
                   "--set", "cache_latents.shard_size=10", "cache_latents", "--tokenizer", str(setup["tokenizer"]),
                   "--data", str(data), "--validation", str(setup["validation"]), "--out", str(tmp_path / "latents"),
                   "--no-progress")
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("aligntok cache_latents: error: rank 1: ") and "train-000001.tar" in last, run.stderr[-3000:]
    assert "Traceback" not in run.stderr


def test_cuda_without_a_gpu_fails_before_any_work_in_one_line(setup: dict[str, Path], tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for extra in (["--set", "runtime.device=cuda"], ["--set", "runtime.device=cuda", "--set",
                                                      "runtime.nproc_per_node=2"]):
        run = aligntok(setup, tmp_path, *extra, *stage_args(setup, tmp_path / "out", tmp_path / "ck"))
        assert run.returncode == 1
        lines = run.stderr.strip().splitlines()
        assert lines == ["aligntok align_latent: error: runtime.device: 'cuda', but this machine has no usable CUDA "
                         f"device (torch {torch.__version__} sees none); use runtime.device: auto or cpu"], run.stderr
        assert not (tmp_path / "ck").exists() and not (tmp_path / "out").exists()


def test_nproc_per_node_reads_auto_and_the_launcher_override(monkeypatch: pytest.MonkeyPatch) -> None:
    from aligntok.config import RuntimeConfig
    from aligntok.distributed import NPROC_ENV, DeviceError, resolve_nproc, visible_gpus

    monkeypatch.delenv(NPROC_ENV, raising=False)
    assert resolve_nproc(RuntimeConfig()) == 1
    assert resolve_nproc(RuntimeConfig(nproc_per_node="auto")) == max(1, visible_gpus())
    assert resolve_nproc(RuntimeConfig(nproc_per_node=3)) == 3
    monkeypatch.setenv(NPROC_ENV, "4")
    assert resolve_nproc(RuntimeConfig(nproc_per_node=1)) == 4
    monkeypatch.setenv(NPROC_ENV, "many")
    with pytest.raises(DeviceError, match="ALIGNTOK_NPROC_PER_NODE: 'many' is neither 'auto' nor a number"):
        resolve_nproc(RuntimeConfig())


@pytest.mark.slow  # the whole tiny DAG, every GPU stage as two ranks: ~2.5 min; `make test-slow`
def test_dvc_repro_of_the_tiny_preset_at_two_processes_runs_the_whole_dag(tmp_path: Path) -> None:
    import mlflow

    from test_integration import workspace

    repo = workspace(tmp_path / "repo")
    environment = {**env(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    setup = subprocess.run([sys.executable, "-m", "aligntok", "--params", "configs/tiny.yaml", "--set",
                            "runtime.nproc_per_node=2", "config", "--out", "params.yaml"], cwd=repo, env=environment,
                           capture_output=True, text=True, timeout=120)
    assert setup.returncode == 0, setup.stderr
    repro = subprocess.run(["dvc", "repro"], cwd=repo, env=environment, capture_output=True, text=True,
                           timeout=1800)
    assert repro.returncode == 0, (repro.stdout + repro.stderr)[-4000:]
    output = repro.stdout + repro.stderr
    launched = {line.split(": launching")[0].split()[-1] for line in output.splitlines() if ": launching 2" in line}
    assert launched == {"align_latent", "align_perceptual", "refine_decoder", "vae_baseline", "cache_latents",
                        "train_dit", "fid_reference", "evaluate"}
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert set(metrics["tokenizer"]) == {"align_latent", "align_perceptual", "refine_decoder", "vae_baseline"}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = {name: len(client.search_model_versions(f"name='{name}'"))
                for name in ("aligntok-tokenizer", "aligntok-vae-baseline", "aligntok-dit")}
    assert versions == {"aligntok-tokenizer": 3, "aligntok-vae-baseline": 1, "aligntok-dit": 1}  # one per stage
    status = subprocess.run(["dvc", "status"], cwd=repo, env=environment, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout

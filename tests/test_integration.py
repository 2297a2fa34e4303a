"""Integration: the pipeline deployed to a real Prefect server, tracking and registering through a real MLflow
server on a real PostgreSQL, with the tiny preset; then promotion and loading `@champion` through the server.

One stack serves the module (PostgreSQL cluster -> MLflow server and Prefect server, all on loopback ports of
their own). The deployment test triggers the on-demand deployment twice at once on one checkout: one run
works, the other waits for the checkout's pipeline lock and then finds DVC's outputs up to date.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from aligntok.data.shards import iter_records, record_image_key
from aligntok.tokenizer.api import Tokenizer
from PIL import Image

from conftest import REPO
from servers import TELEMETRY_OFF, free_port, mlflow_server, postgres_cluster, prefect_api, prefect_server, start, stop, tail

pytestmark = pytest.mark.integration

POOL = "aligntok-test-pool"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
REGISTERING = {"align_latent": "aligntok-tokenizer", "align_perceptual": "aligntok-tokenizer",
               "refine_decoder": "aligntok-tokenizer", "vae_baseline": "aligntok-vae-baseline",
               "train_dit": "aligntok-dit"}


def workspace(root: Path) -> Path:
    """A git checkout of the project as it is now (committed or not), as a team member would have."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in files:
        source = REPO / name
        if source.is_file() and not name.startswith(("data/", "models/", "reports/")):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "snapshot"]):
        subprocess.run(command, cwd=root, check=True, capture_output=True)
    return root


@dataclass
class Stack:
    root: Path
    mlflow: str
    prefect_api: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("stack")
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, **TELEMETRY_OFF, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
           "PREFECT_HOME": str(root / "client-home"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with postgres_cluster(root / "pg", ["mlflow", "prefect"]) as pg:
        with mlflow_server(root / "mlflow", pg.url("mlflow", "postgresql+psycopg2"), env) as mlflow_url, \
                prefect_server(root / "prefect", pg.url("prefect", "postgresql+asyncpg"), env) as api:
            env |= {"MLFLOW_TRACKING_URI": mlflow_url, "PREFECT_API_URL": api}
            yield Stack(root, mlflow_url, api, env)


def run(command: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-3000:]}" \
                                   f"\n{result.stderr[-3000:]}"
    return result


def wait_flow_run(api: str, run_id: str, timeout: float, worker_log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = prefect_api(api, f"flow_runs/{run_id}")
        if state["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        time.sleep(2)
    pytest.fail(f"flow run {run_id} not finished after {timeout:g} s; worker log:\n{tail(worker_log, 80)}")


def warnings_of(api: str, run_id: str) -> list[str]:
    logs = prefect_api(api, "logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}, "level": {"ge_": 30}},
                                            "limit": 200})
    return [entry["message"] for entry in logs]


@pytest.fixture(scope="module")
def deployed(stack: Stack) -> dict[str, Any]:
    """prefect.yaml deployed to the server, a process worker, and two on-demand runs triggered at once."""
    repo = workspace(stack.root / "checkout")
    env = {**stack.env, "ALIGNTOK_REPO": str(repo), "ALIGNTOK_WORK_POOL": POOL, "PREFECT_WORKER_QUERY_SECONDS": "2"}
    run(["prefect", "work-pool", "create", POOL, "--type", "process"], env, repo)
    deploy = run(["prefect", "--no-prompt", "deploy", "--all"], env, repo)
    worker_log = stack.root / "worker.log"
    worker = start(["prefect", "worker", "start", "--pool", POOL, "--type", "process"], worker_log, env, cwd=repo)
    try:
        ids = []
        for _ in range(2):
            out = run(["prefect", "deployment", "run", "aligntok-pipeline/on-demand",
                       "--params", json.dumps({"preset": "configs/tiny.yaml", "retry_delay_seconds": 5})], env, repo)
            ids.append(UUID.search(out.stdout).group(0))
        states = [wait_flow_run(stack.prefect_api, run_id, 900, worker_log) for run_id in ids]
    finally:
        stop(worker)
    return {"repo": repo, "env": env, "ids": ids, "states": states, "deploy_output": deploy.stdout,
            "worker_log": worker_log}


def test_deployments_registered_with_the_nightly_schedule(deployed: dict[str, Any], stack: Stack) -> None:
    nightly = prefect_api(stack.prefect_api, "deployments/name/aligntok-pipeline/nightly-retrain")
    (schedule,) = nightly["schedules"]
    assert schedule["schedule"]["cron"] == "30 2 * * *" and schedule["schedule"]["timezone"] == "Europe/Berlin"
    assert schedule["active"] and nightly["work_pool_name"] == POOL
    assert nightly["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == \
        str(deployed["repo"])
    promote = prefect_api(stack.prefect_api, "deployments/name/aligntok-promote/promote")
    assert promote["parameters"] == {"model": "aligntok-tokenizer", "version": "@stage3"}


def test_two_runs_at_once_take_turns_and_leave_a_clean_checkout(deployed: dict[str, Any], stack: Stack) -> None:
    repo, api = deployed["repo"], stack.prefect_api
    for run_id, state in zip(deployed["ids"], deployed["states"], strict=True):
        assert state["state_type"] == "COMPLETED", f"flow run {run_id}: {state['state']}\n{tail(deployed['worker_log'], 120)}"
    summaries = []
    for run_id in deployed["ids"]:
        artifacts = prefect_api(api, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
        (summary,) = [a for a in artifacts if a["key"] == "pipeline-summary"]
        summaries.append(summary["data"])
    worked = [s for s in summaries if "| train_dit | ran |" in s]
    waited = [s for s in summaries if "| train_dit | skipped |" in s]
    assert len(worked) == 1 and len(waited) == 1, summaries
    for stage in REGISTERING:
        assert f"| {stage} | ran |" in worked[0] and f"| {stage} | skipped |" in waited[0]
    assert "aligntok-tokenizer v3" in worked[0] and "params: configs/tiny.yaml" in worked[0]
    assert "promoted: aligntok-tokenizer v3 promoted to @champion" in worked[0]
    waiting_run = deployed["ids"][summaries.index(waited[0])]
    assert any("another pipeline run holds" in line for line in warnings_of(api, waiting_run))
    # DVC's outputs are there and up to date
    for out in ("models/tokenizer/refine_decoder/tokenizer.safetensors", "models/dit", "data/latents",
                "reports/metrics.json", "dvc.lock"):
        assert (repo / out).exists(), out
    status = run(["dvc", "status", "--json"], deployed["env"], repo)
    assert json.loads(status.stdout) == {}
    # the registry: one READY version per registering stage, each named by the receipt DVC keeps
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=stack.mlflow, registry_uri=stack.mlflow)
    versions = client.search_model_versions("name LIKE 'aligntok-%'")
    assert sorted(v.name for v in versions) == sorted(REGISTERING.values())
    assert all(v.status == "READY" for v in versions)
    receipt = json.loads((repo / "models/tokenizer/refine_decoder/receipt.json").read_text())
    assert receipt["tracking_uri"] == stack.mlflow
    assert str(client.get_model_version_by_alias("aligntok-tokenizer", "champion").version) == receipt["version"]


def _clone_version(client: Any, model: str, of: Any, **changes: float) -> str:
    """A new version of `model` over the same (real) model files as `of`, its figures changed by `changes`."""
    tags = {k: v for k, v in of.tags.items() if k.startswith(("eval_", "val_"))}
    tags |= {k: f"{v:g}" for k, v in changes.items()}
    return str(client.create_model_version(model, source=of.source, run_id=of.run_id, tags=tags).version)


def test_promotion_through_the_server_and_the_champion_encodes_real_images(deployed: dict[str, Any], stack: Stack,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    repo, env = deployed["repo"], deployed["env"]
    client = mlflow.MlflowClient(tracking_uri=stack.mlflow, registry_uri=stack.mlflow)
    champion = client.get_model_version_by_alias("aligntok-tokenizer", "champion")
    rfid = float(champion.tags["eval_rfid"])
    worse = _clone_version(client, "aligntok-tokenizer", champion, eval_rfid=rfid + 25.0)
    refused = subprocess.run(["aligntok", "promote", "aligntok-tokenizer", worse], env=env, cwd=repo,
                             capture_output=True, text=True)
    assert refused.returncode == 1
    line = refused.stderr.strip().splitlines()[-1]
    assert f"aligntok-tokenizer v{worse} refused: eval_rfid" in line and "by 25 " in line
    assert str(client.get_model_version_by_alias("aligntok-tokenizer", "champion").version) == str(champion.version)
    assert client.get_model_version("aligntok-tokenizer", worse).tags["promotion.decision"] == "refused"

    better = _clone_version(client, "aligntok-tokenizer", champion, eval_rfid=rfid - 10.0)
    accepted = run(["aligntok", "promote", "aligntok-tokenizer", better, "--reason", "integration"], env, repo)
    assert "promoted to @champion" in accepted.stdout
    assert str(client.get_model_version_by_alias("aligntok-tokenizer", "previous").version) == str(champion.version)
    run(["aligntok", "rollback", "aligntok-tokenizer"], env, repo)
    assert str(client.get_model_version_by_alias("aligntok-tokenizer", "champion").version) == str(champion.version)

    # models:/aligntok-tokenizer@champion through the server, on real images (the run's own validation shard)
    shard = sorted((repo / "data/shards").glob("val-*.tar"))[0]
    images = []
    for record in iter_records(shard):
        images.append(np.asarray(Image.open(io.BytesIO(record[record_image_key(record)])).convert("RGB")))
        if len(images) == 4:
            break
    batch = np.stack(images)
    # through the environment, as downstream code would (mlflow.set_tracking_uri would pin the URI for every
    # later test of this process)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", stack.mlflow)
    model = mlflow.pyfunc.load_model("models:/aligntok-tokenizer@champion")
    latents = model.predict({"op": "encode", "images": batch})
    decoded = model.predict({"op": "decode", "latents": latents})
    assert latents.shape[0] == 4 and decoded.shape == (4, 3, 32, 32)
    assert np.isfinite(decoded).all() and decoded.min() >= 0.0 and decoded.max() <= 1.0
    local = Tokenizer.load(repo / "models/tokenizer/refine_decoder")  # the same weights as the champion's
    expected = local.encode(torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0).numpy()
    np.testing.assert_allclose(latents, expected, rtol=0, atol=1e-5)


def test_unreachable_tracking_server_is_retried_then_fails_clearly(stack: Stack, tmp_path: Path) -> None:
    repo = workspace(tmp_path / "checkout")
    env = {**stack.env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    result = subprocess.run([sys.executable, "flows/pipeline.py", "--targets", "encoder", "--retries", "2",
                             "--retry-delay", "0"], env=env, cwd=repo, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("aligntok pipeline: error: MLflow tracking server")
    assert (result.stdout + result.stderr).count("does not answer") >= 3  # the first try and two retries
    assert "Running stage" not in result.stdout + result.stderr  # no stage started without its server


def test_a_failing_stage_fails_the_flow_with_its_own_error_and_is_not_retried(stack: Stack, tmp_path: Path) -> None:
    repo = workspace(tmp_path / "checkout")
    (repo / "configs" / "broken.yaml").write_text(yaml.safe_dump(
        {"data": {"fashion_mnist_dir": str(tmp_path / "missing"), "max_images": 10}}))
    result = subprocess.run([sys.executable, "flows/pipeline.py", "--targets", "ingest", "--preset",
                             "configs/broken.yaml", "--retries", "2", "--retry-delay", "0"],
                            env=stack.env, cwd=repo, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert re.match(r"aligntok pipeline: error: stage ingest failed \(exit \d+\): aligntok ingest: error: ", last), last
    assert "Fashion-MNIST files missing" in last
    assert output.count("dvc repro --single-item ingest") == 1  # one attempt: not retried

"""Integration: the nightly deployment on a real Prefect server, tracking and registering through a real MLflow
server on a real PostgreSQL, its artifacts and the DVC remote on a real S3 server, with the tiny preset on an
image folder that gains images; then promotion and loading `@champion` through the servers.

One stack serves the module (PostgreSQL cluster -> MLflow server and Prefect server; an S3 server; all on
loopback ports of their own). The nightly deployment runs twice at once (one run works in the deployment's
workspace, the other waits for it and finds nothing changed), then once after new images arrived (it
re-ingests, retrains, evaluates and decides promotion). Each run is a commit on the run branch, pushed with
its outputs, that a fresh clone reproduces as a no-op; the deployed checkout is never written to.
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

from support.paths import REPO
from support.servers import (TELEMETRY_OFF, S3, free_port, mlflow_server, postgres_cluster, prefect_api, prefect_server,
                     s3_server, start, stop, tail)

pytestmark = pytest.mark.integration

POOL = "aligntok-test-pool"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
REGISTERING = {"align_latent": "aligntok-tokenizer", "align_perceptual": "aligntok-tokenizer",
               "refine_decoder": "aligntok-tokenizer", "vae_baseline": "aligntok-vae-baseline",
               "train_dit": "aligntok-dit"}
ARTIFACTS_BUCKET, ARTIFACTS_PREFIX = "aligntok-mlflow", "artifacts"  # the MLflow server's --artifacts-destination


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
    s3: S3


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("stack")
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, **TELEMETRY_OFF, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
           "PREFECT_HOME": str(root / "client-home"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with s3_server(root / "s3", env) as s3, postgres_cluster(root / "pg", ["mlflow", "prefect"]) as pg:
        s3.make_bucket(ARTIFACTS_BUCKET)
        env |= s3.env()  # the MLflow server writes the artifacts; clients and workers get the same S3 view
        with mlflow_server(root / "mlflow", pg.url("mlflow", "postgresql+psycopg2"), env,
                           artifacts=f"s3://{ARTIFACTS_BUCKET}/{ARTIFACTS_PREFIX}") as mlflow_url, \
                prefect_server(root / "prefect", pg.url("prefect", "postgresql+asyncpg"), env) as api:
            env |= {"MLFLOW_TRACKING_URI": mlflow_url, "PREFECT_API_URL": api}
            yield Stack(root, mlflow_url, api, env, s3)


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


NIGHTLY = "nightly-retrain"
BRANCH = f"aligntok-runs/{NIGHTLY}"
DVC_BUCKET = "aligntok-dvc"
FIRST_IMAGES, NEW_IMAGES = 400, 40
"""The image folder the nightly runs read: 40 Fashion-MNIST images a class, then 4 more a class."""


def write_images(folder: Path, start: int, count: int) -> None:
    """Fashion-MNIST training images `start`..`start + count - 1` as PNGs in class folders (10 classes, in turn)."""
    import gzip

    from aligntok.config import DataConfig

    raw = Path(DataConfig().fashion_mnist_dir)
    with gzip.open(raw / "train-images-idx3-ubyte.gz") as handle:
        images = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    for index in range(start, start + count):
        label = index % 10  # balanced classes (not the file's labels: only the folders name classes here)
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index]).save(folder / f"class{label}" / f"{index:05d}.png")


def nightly_preset(repo: Path, source: Path) -> str:
    """configs/nightly-test.yaml: the tiny preset reading `source`, committed with the project."""
    preset = yaml.safe_load((repo / "configs" / "tiny.yaml").read_text())
    preset["data"] |= {"source": f"imagefolder:{source}", "val_fraction": 0.2}
    preset["validate"] |= {"max_class_imbalance": 2.0}  # 32 train images a class, give or take the split
    (repo / "configs" / "nightly-test.yaml").write_text(yaml.safe_dump(preset, sort_keys=False))
    return "configs/nightly-test.yaml"


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def trigger(env: dict[str, str], repo: Path, preset: str) -> str:
    out = run(["prefect", "deployment", "run", f"aligntok-pipeline/{NIGHTLY}",
               "--params", json.dumps({"preset": preset, "retry_delay_seconds": 5})], env, repo)
    return UUID.search(out.stdout).group(0)


def summary_of(api: str, run_id: str) -> str:
    artifacts = prefect_api(api, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    (summary,) = [a for a in artifacts if a["key"] == "pipeline-summary"]
    return summary["data"]


@pytest.fixture(scope="module")
def deployed(stack: Stack) -> dict[str, Any]:
    """A team's setup, then three nightly runs through the deployment.

    The project is pushed to a bare git `origin`, its DVC remote is an S3 bucket (infra/dvc-remote.sh), and
    prefect.yaml is deployed with a process worker. The nightly deployment is triggered twice at once on a
    folder of 400 images (one run works, the other waits for the workspace and finds nothing changed); then
    40 images are added and it is triggered once more."""
    origin, source = stack.root / "origin.git", stack.root / "source"
    repo = workspace(stack.root / "checkout")
    write_images(source, 0, FIRST_IMAGES)
    preset = nightly_preset(repo, source)
    stack.s3.make_bucket(DVC_BUCKET)
    remote_env = {**stack.env, "S3_BUCKET": DVC_BUCKET, "S3_ACCESS_KEY_ID": stack.s3.access_key,
                  "S3_SECRET_ACCESS_KEY": stack.s3.secret_key, "S3_ENDPOINT_URL": stack.s3.endpoint}
    run(["bash", "infra/dvc-remote.sh"], remote_env, repo)
    git(repo, "add", "-A")
    git(repo, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "team setup: preset, DVC remote")
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True, capture_output=True)
    git(repo, "remote", "add", "origin", str(origin))
    git(repo, "push", "-q", "origin", "HEAD")
    checkout_files = {path: path.read_bytes() for path in sorted(repo.rglob("*")) if path.is_file()
                      and ".git" not in path.parts and ".dvc" not in path.parts}
    env = {**stack.env, "ALIGNTOK_REPO": str(repo), "ALIGNTOK_WORK_POOL": POOL, "PREFECT_WORKER_QUERY_SECONDS": "2",
           "ALIGNTOK_LOCK_DIR": str(stack.root / "locks")}
    run(["prefect", "work-pool", "create", POOL, "--type", "process"], env, repo)
    deploy = run(["prefect", "--no-prompt", "deploy", "--all"], env, repo)
    worker_log = stack.root / "worker.log"
    worker = start(["prefect", "worker", "start", "--pool", POOL, "--type", "process"], worker_log, env, cwd=repo)
    try:
        ids = [trigger(env, repo, preset) for _ in range(2)]
        states = [wait_flow_run(stack.prefect_api, run_id, 900, worker_log) for run_id in ids]
        write_images(source, FIRST_IMAGES, NEW_IMAGES)
        ids.append(trigger(env, repo, preset))
        states.append(wait_flow_run(stack.prefect_api, ids[-1], 900, worker_log))
    finally:
        stop(worker)
    return {"repo": repo, "env": env, "ids": ids, "states": states, "deploy_output": deploy.stdout,
            "worker_log": worker_log, "origin": origin, "checkout_files": checkout_files,
            "workspace": repo / ".dvc" / "tmp" / "workspaces" / NIGHTLY}


def test_deployments_registered_with_the_nightly_schedule(deployed: dict[str, Any], stack: Stack) -> None:
    nightly = prefect_api(stack.prefect_api, f"deployments/name/aligntok-pipeline/{NIGHTLY}")
    (schedule,) = nightly["schedules"]
    assert schedule["schedule"]["cron"] == "30 2 * * *" and schedule["schedule"]["timezone"] == "Europe/Berlin"
    assert schedule["active"] and nightly["work_pool_name"] == POOL
    assert nightly["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == \
        str(deployed["repo"])
    promote = prefect_api(stack.prefect_api, "deployments/name/aligntok-promote/promote")
    assert promote["parameters"] == {"model": "aligntok-tokenizer", "version": "@stage3"}


def test_two_runs_at_once_take_turns_and_the_second_finds_nothing_changed(deployed: dict[str, Any],
                                                                         stack: Stack) -> None:
    api = stack.prefect_api
    for run_id, state in zip(deployed["ids"], deployed["states"], strict=True):
        assert state["state_type"] == "COMPLETED", f"flow run {run_id}: {state['state']}\n{tail(deployed['worker_log'], 120)}"
    summaries = [summary_of(api, run_id) for run_id in deployed["ids"][:2]]
    worked = [s for s in summaries if "| train_dit | ran |" in s]
    waited = [s for s in summaries if "| train_dit | skipped |" in s]
    assert len(worked) == 1 and len(waited) == 1, summaries
    for stage in ("ingest", "validate", *REGISTERING):
        assert f"| {stage} | ran |" in worked[0] and f"| {stage} | skipped |" in waited[0]
    assert "| snapshot | source changed |" in worked[0] and "| snapshot | source unchanged |" in waited[0]
    assert not re.search(r"\| (ran|restored) \|", waited[0]), waited[0]  # every stage skipped
    assert "aligntok-tokenizer v3" in worked[0] and "params: configs/nightly-test.yaml" in worked[0]
    assert "promoted: aligntok-tokenizer v3 promoted to @champion" in worked[0]
    waiting_run = deployed["ids"][summaries.index(waited[0])]
    assert any("another pipeline run holds workspace" in line for line in warnings_of(api, waiting_run))


def test_new_data_reruns_ingest_and_all_after_it_and_promotion_is_decided(deployed: dict[str, Any],
                                                                          stack: Stack) -> None:
    state = deployed["states"][2]
    assert state["state_type"] == "COMPLETED", f"{state['state']}\n{tail(deployed['worker_log'], 120)}"
    summary = summary_of(stack.prefect_api, deployed["ids"][2])
    assert "| snapshot | source changed |" in summary
    for stage in ("ingest", "validate", *REGISTERING, "cache_latents", "fid_reference", "evaluate"):
        assert f"| {stage} | ran |" in summary, summary
    assert "| encoder | skipped |" in summary  # its inputs did not change
    assert re.search(r"- (promoted|refused): aligntok-tokenizer v6 ", summary), summary
    manifest = deployed["workspace"] / "data" / "shards" / "dataset.json"
    assert json.loads(manifest.read_text())["counts"]["inputs"] == FIRST_IMAGES + NEW_IMAGES


def test_the_deployed_checkout_is_left_as_it_was(deployed: dict[str, Any]) -> None:
    repo = deployed["repo"]
    assert git(repo, "status", "--porcelain") == ""
    now = {path: path.read_bytes() for path in sorted(repo.rglob("*")) if path.is_file()
           and ".git" not in path.parts and ".dvc" not in path.parts}
    assert now == deployed["checkout_files"]  # no params.yaml rewritten, no outputs written here
    assert not (repo / "models").exists() or not any((repo / "models").rglob("*.safetensors"))


def test_each_run_is_a_pushed_commit_and_a_fresh_clone_of_the_last_reproduces_as_a_no_op(
        deployed: dict[str, Any], stack: Stack, tmp_path: Path) -> None:
    origin, env = deployed["origin"], deployed["env"]
    last = git(origin, "rev-parse", BRANCH)
    subjects = git(origin, "log", "--format=%s", "--first-parent", BRANCH).splitlines()
    assert len([s for s in subjects if s.startswith("aligntok run ")]) >= 1
    parents = git(origin, "rev-list", "--parents", "-n", "1", last).split()[1:]
    assert len(parents) == 2  # the ref's commit and the previous run
    runs = git(origin, "rev-list", "--count", "--grep=^aligntok run ", BRANCH)
    assert runs == "3"
    assert "imagefolder:" in git(origin, "show", f"{last}:params.yaml")
    assert git(origin, "show", f"{last}:dvc.lock") == \
        (deployed["workspace"] / "dvc.lock").read_text().strip()
    assert any(key.startswith("dvc/files/md5/") for key in stack.s3.keys(DVC_BUCKET, "dvc/"))
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True, capture_output=True)
    git(clone, "checkout", "-q", last)
    shutil.copyfile(deployed["repo"] / ".dvc" / "config.local", clone / ".dvc" / "config.local")  # per machine
    run(["dvc", "pull", "-q"], env, clone, timeout=600)
    repro = run(["dvc", "repro"], env, clone, timeout=600)
    ran = re.findall(r"Running stage '([a-z_]+)'", repro.stdout)
    assert ran == ["snapshot"], repro.stdout[-3000:]  # it always runs, and finds the source unchanged
    assert git(clone, "status", "--porcelain") == ""
    assert (clone / "models/tokenizer/refine_decoder/tokenizer.safetensors").read_bytes() == \
        (deployed["workspace"] / "models/tokenizer/refine_decoder/tokenizer.safetensors").read_bytes()


def test_registry_versions_say_where_they_came_from(deployed: dict[str, Any], stack: Stack) -> None:
    import hashlib

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=stack.mlflow, registry_uri=stack.mlflow)
    origin, work = deployed["origin"], deployed["workspace"]
    last = git(origin, "rev-parse", BRANCH)
    fingerprint = hashlib.sha256((work / "data" / "source.json").read_bytes()).hexdigest()
    receipt = json.loads((work / "models/tokenizer/refine_decoder/receipt.json").read_text())
    version = client.get_model_version("aligntok-tokenizer", receipt["version"])
    assert version.tags["aligntok.run_commit"] == last
    assert version.tags["aligntok.run_branch"] == BRANCH and version.tags["aligntok.git_remote"] == str(origin)
    assert version.tags["aligntok.source_fingerprint"] == fingerprint
    assert version.tags["aligntok.deployment"] == NIGHTLY
    assert "models:/aligntok-tokenizer/" in version.description and last in version.description
    assert "eval_rfid" in version.description
    assert client.get_registered_model("aligntok-tokenizer").description.startswith("Image tokenizer")
    parent = client.get_run(client.get_run(version.run_id).data.tags["mlflow.parentRunId"])
    assert parent.data.tags["aligntok.run_commit"] == last
    lineage = run(["aligntok", "lineage", f"aligntok-tokenizer/{receipt['version']}"], deployed["env"],
                  deployed["repo"]).stdout
    assert f"run commit     {last} on branch {BRANCH}" in lineage and f"git checkout {last}" in lineage
    assert f"git clone {origin}" in lineage and "dvc pull" in lineage and fingerprint in lineage


def _clone_version(client: Any, model: str, of: Any, **changes: float) -> str:
    """A new version of `model` over the same (real) model files as `of`, its figures changed by `changes`."""
    tags = {k: v for k, v in of.tags.items() if k.startswith(("eval_", "val_"))}
    tags |= {k: f"{v:g}" for k, v in changes.items()}
    return str(client.create_model_version(model, source=of.source, run_id=of.run_id, tags=tags).version)


def _model_prefix(client: Any, version: Any) -> str:
    """The bucket prefix of a version's logged model (--serve-artifacts maps mlflow-artifacts:/<experiment>/<run>/
    artifacts onto the destination)."""
    experiment = client.get_run(version.run_id).info.experiment_id
    return f"{ARTIFACTS_PREFIX}/{experiment}/{version.run_id}/artifacts/model/"


def test_promotion_through_the_server_and_the_champion_encodes_real_images(deployed: dict[str, Any], stack: Stack,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
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
    shard = sorted((deployed["workspace"] / "data/shards").glob("val-*.tar"))[0]
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
    # the champion's files read straight from the bucket (not through MLflow) give the same latents
    folder = tmp_path / "champion"
    folder.mkdir()
    prefix = _model_prefix(client, champion) + "artifacts/"
    for name in ("tokenizer.safetensors", "tokenizer.json"):
        (folder / name).write_bytes(stack.s3.read(ARTIFACTS_BUCKET, prefix + name))
    local = Tokenizer.load(folder)
    expected = local.encode(torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0).numpy()
    np.testing.assert_allclose(latents, expected, rtol=0, atol=1e-5)


def test_registered_model_files_are_objects_in_the_bucket(deployed: dict[str, Any], stack: Stack) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=stack.mlflow, registry_uri=stack.mlflow)
    out = deployed["workspace"] / "models/tokenizer/refine_decoder"
    receipt = json.loads((out / "receipt.json").read_text())  # the last run's stage 3 version
    version = client.get_model_version("aligntok-tokenizer", receipt["version"])
    assert receipt["run_id"] == version.run_id
    model = _model_prefix(client, version)
    keys = stack.s3.keys(ARTIFACTS_BUCKET, model)
    assert f"{model}MLmodel" in keys, keys
    assert f"{model}artifacts/tokenizer.safetensors" in keys, keys
    # the weights in the bucket are the bytes the stage wrote into its DVC out
    assert stack.s3.read(ARTIFACTS_BUCKET, f"{model}artifacts/tokenizer.safetensors") == \
        (out / "tokenizer.safetensors").read_bytes()
    assert not (stack.root / "mlflow" / "artifacts").exists()  # nothing went to the server's local folder


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
    # the source's fingerprint is taken first, and finds the source missing
    assert re.match(r"aligntok pipeline: error: stage snapshot failed \(exit \d+\): aligntok snapshot: error: ", last), last
    assert "Fashion-MNIST files missing" in last
    assert output.count("dvc repro --single-item snapshot") == 1  # one attempt: not retried

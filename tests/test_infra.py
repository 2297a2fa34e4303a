"""infra/: the compose stack and Kubernetes manifests agree with each other, with .env.example and with the way
the integration tests run the same servers. No servers and no network here."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO

INFRA = REPO / "infra"
VARIABLE = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::?[-?][^}]*)?\}")


def compose() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    return {key: value for key, value in pairs}


def command_text(service: dict[str, Any]) -> str:
    command = service.get("command", [])
    return " ".join(command) if isinstance(command, list) else str(command)


def test_every_variable_of_the_compose_file_is_in_env_example_and_secrets_are_placeholders() -> None:
    text = (INFRA / "compose.yaml").read_text()
    used = set(VARIABLE.findall(text))
    documented = env_example()
    assert used and used <= set(documented), f"not in .env.example: {sorted(used - set(documented))}"
    assert set(documented) <= used, f"in .env.example but unused: {sorted(set(documented) - used)}"
    for secret in ("POSTGRES_PASSWORD", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY"):
        assert documented[secret] == "change-me"
        assert re.search(r"\$\{" + secret + r":\?", text), f"{secret} must fail clearly when unset"


def test_published_ports_bind_the_host_loopback_unless_asked() -> None:
    published = []
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            published.append(name)
            host = re.match(r"\$\{([A-Z0-9_]+_BIND):-([0-9.]+)\}:", str(port))
            assert host, f"{name}: port {port!r} does not start with a ${{..._BIND:-127.0.0.1}} host"
            assert host.group(2) == "127.0.0.1" and env_example()[host.group(1)] == "127.0.0.1"
    assert {"mlflow", "prefect-server"} <= set(published)
    assert "postgres" not in published  # the database is reached over the compose network only


def test_mlflow_is_configured_as_the_integration_test_runs_it() -> None:
    services = compose()["services"]
    mlflow = services["mlflow"]
    command = command_text(mlflow)
    assert "--serve-artifacts" in command and '--artifacts-destination "s3://${S3_BUCKET}/mlflow"' in command
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert "@postgres:5432/mlflow" in mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert "--allowed-hosts" in command and "mlflow:5000" in command
    assert mlflow["depends_on"]["createbuckets"]["condition"] == "service_completed_successfully"
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "psycopg2-binary" in (INFRA / "mlflow.Dockerfile").read_text()
    assert "mc mb --ignore-existing" in command_text(services["createbuckets"])
    integration = (REPO / "tests" / "test_integration.py").read_text()
    assert 'pg.url("mlflow", "postgresql+psycopg2")' in integration  # the same driver as here
    assert '"--serve-artifacts"' in (REPO / "tests" / "servers.py").read_text()


def test_prefect_server_on_postgres_and_a_process_worker_pointed_at_both_servers() -> None:
    services = compose()["services"]
    server = services["prefect-server"]
    assert server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert server["image"].endswith(":3.9.1-python3.11")  # the Prefect of pyproject.toml
    assert '"prefect==3.9.1"' in (REPO / "pyproject.toml").read_text()
    worker = services["prefect-worker"]
    assert "--type process" in command_text(worker)
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["environment"]["ALIGNTOK_REPO"] == "/opt/aligntok"
    assert "WORKDIR /opt/aligntok" in (INFRA / "Dockerfile").read_text()
    for name in ("mlflow", "prefect-server", "prefect-worker"):
        env = services[name]["environment"]
        assert env["DO_NOT_TRACK"] == "true" and env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false", name


def test_postgres_init_creates_the_databases_the_servers_use() -> None:
    init = (INFRA / "postgres" / "init.sh").read_text()
    urls = " ".join(str(s.get("environment", {})) for s in compose()["services"].values())
    for database in re.findall(r"@postgres:5432/(\w+)", urls):
        assert re.search(rf"\b{database}\b", init.split("for database in", 1)[1].splitlines()[0]), database


def test_compose_config_validates_where_a_client_exists() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no docker compose client on this machine")
    result = subprocess.run([docker, "compose", "-f", str(INFRA / "compose.yaml"), "--env-file",
                             str(INFRA / ".env.example"), "config", "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_kubernetes_work_pool_template_requests_gpus() -> None:
    template = json.loads((INFRA / "k8s" / "prefect-work-pool.json").read_text())
    manifest = template["job_configuration"]["job_manifest"]
    assert manifest["kind"] == "Job" and manifest["apiVersion"] == "batch/v1"
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "{{ image }}" and container["args"] == "{{ command }}"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    variables = template["variables"]["properties"]
    assert variables["gpus"]["type"] == "integer" and variables["gpus"]["default"] >= 1
    # every {{ placeholder }} of the job configuration is a declared variable
    placeholders = set(re.findall(r"\{\{ (\w+) \}\}", json.dumps(template["job_configuration"])))
    assert placeholders <= set(variables), sorted(placeholders - set(variables))
    claims = {v["persistentVolumeClaim"]["claimName"] for v in manifest["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {yaml.safe_load((INFRA / "k8s" / "pvc.yaml").read_text())["metadata"]["name"]}


def test_the_pytorchjob_runs_train_dit_under_torchrun_on_gpus_on_every_replica() -> None:
    job = yaml.safe_load((INFRA / "k8s" / "train-dit-pytorchjob.yaml").read_text())
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    for role, spec in replicas.items():
        (container,) = spec["template"]["spec"]["containers"]
        assert container["name"] == "pytorch", role
        assert container["command"] == ["torchrun"] and container["args"][:2] == ["-m", "aligntok"]
        assert "train_dit" in container["args"], role
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus == int(job["spec"]["nprocPerNode"]), role  # one process per GPU
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train_dit"]["cmd"]
    args = replicas["Master"]["template"]["spec"]["containers"][0]["args"]
    for flag in ("--latents", "--out", "--metrics"):  # the same paths as the DVC stage
        assert f"{flag} {args[args.index(flag) + 1]}" in stage

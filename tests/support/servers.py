"""Real servers for the integration tests, each on a loopback port of its own, stopped afterwards.

A server that does not come up fails the test with the tail of its log; nothing here skips. PostgreSQL comes
from Debian's `postgresql` package (installed by `make setup`), MLflow, Prefect and the S3 API (moto's server
mode, standing in for infra/'s MinIO) from the virtualenv.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

TELEMETRY_OFF = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                 "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 60) -> str:
    text = path.read_text(errors="replace") if path.is_file() else "(no log)"
    return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])


def wait_http(url: str, process: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    """Poll `url` until it answers 200; fail with the log if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode} before answering {url}; its log:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{what} did not answer {url} within {timeout:g} s; its log:\n{tail(log)}")


def stop(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group, then SIGKILL what is left."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    except ProcessLookupError:
        pass


def start(command: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    handle = open(log, "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            start_new_session=True)


@contextmanager
def serving(command: list[str], log: Path, env: dict[str, str], health: str, what: str) -> Iterator[None]:
    """Run a server until the block ends; fail (with its log) unless `health` answers within 180 s."""
    process = start(command, log, env)
    try:
        wait_http(health, process, log, 180, what)
        yield
    finally:
        stop(process)


def serve_http(handler: Any) -> Iterator[str]:
    """A threaded HTTP server of `handler` on a loopback port, for a `for url in serve_http(...)` block (a
    generator, so a fixture can yield from inside it); yields its base URL, shut down afterwards."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --- PostgreSQL ------------------------------------------------------------------------------------------------

def postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL server binaries not found under /usr/lib/postgresql: install Debian's `postgresql` "
                    "package (`make setup` runs infra/install-system-packages.sh)")
    return found[-1].parent


@dataclass
class Postgres:
    port: int
    user: str
    password: str

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"


@contextmanager
def postgres_cluster(root: Path, databases: list[str]) -> Iterator[Postgres]:
    """A throwaway cluster (initdb + pg_ctl) on a loopback port, password-authenticated, with `databases`."""
    bin_dir = postgres_bin()
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:  # the cluster's user must reach it: pytest's tmp folders are private to root
        root = Path(tempfile.mkdtemp(prefix="aligntok-pg-"))
    data, sockets, log = root / "data", root / "sockets", root / "postgres.log"
    sockets.mkdir(exist_ok=True)
    password = secrets.token_hex(12)
    pwfile = root / "pwfile"
    pwfile.write_text(password + "\n")
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: the package's `postgres` user owns the cluster
        shutil.chown(root, "postgres")
        for path in (sockets, pwfile):
            shutil.chown(path, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    init = subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "aligntok", "--auth=scram-sha-256",
                           f"--pwfile={pwfile}", "--encoding=UTF8", "--locale=C"], capture_output=True, text=True)
    if init.returncode:
        pytest.fail(f"initdb failed ({init.returncode}):\n{init.stdout[-3000:]}\n{init.stderr[-3000:]}")
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={sockets} -c fsync=off"
    started = subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                              "-w", "-t", "60", "start"], capture_output=True, text=True)
    if started.returncode:
        pytest.fail(f"pg_ctl start failed ({started.returncode}): {started.stderr}\n{tail(log)}")
    env = {**os.environ, "PGPASSWORD": password}
    try:
        for name in databases:
            made = subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "aligntok", name],
                                  capture_output=True, text=True, env=env)
            if made.returncode:
                pytest.fail(f"createdb {name} failed: {made.stderr}\n{tail(log)}")
        yield Postgres(port, "aligntok", password)
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True)
        if as_user:
            shutil.rmtree(root, ignore_errors=True)


# --- MLflow --------------------------------------------------------------------------------------------------

@contextmanager
def mlflow_server(root: Path, backend: str, env: dict[str, str], artifacts: str | None = None) -> Iterator[str]:
    """`mlflow server` on PostgreSQL, serving artifacts from `artifacts` (a URL such as `s3://bucket/prefix`,
    whose credentials and endpoint `env` carries; default: a local folder under `root`); yields its URL."""
    root.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), root / "mlflow-server.log"
    command = [shutil.which("mlflow", path=env["PATH"]) or "mlflow", "server", "--host", "127.0.0.1",
               "--port", str(port), "--backend-store-uri", backend, "--serve-artifacts",
               "--artifacts-destination", artifacts or (root / "artifacts").as_uri(), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    with serving(command, log, env, f"{url}/health", "mlflow server"):
        yield url


# --- S3 ------------------------------------------------------------------------------------------------------

@dataclass
class S3:
    """An S3 API on loopback. moto accepts any credentials: these fixed ones only have to agree everywhere."""

    endpoint: str
    access_key: str = "aligntok-test"
    secret_key: str = "aligntok-test-secret"
    region: str = "us-east-1"  # the one region whose CreateBucket needs no LocationConstraint

    def env(self) -> dict[str, str]:
        """What a client needs: boto3 and DVC read the AWS_* variables (AWS_ENDPOINT_URL since botocore 1.31),
        MLflow's S3 artifact store reads MLFLOW_S3_ENDPOINT_URL."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": self.region, "AWS_ENDPOINT_URL": self.endpoint,
                "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def client(self) -> Any:
        import boto3  # only the tests that use S3 pay for it

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region)

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in `bucket` under `prefix`, sorted."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def read(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()


@contextmanager
def s3_server(root: Path, env: dict[str, str]) -> Iterator[S3]:
    """moto's S3 server (in memory: nothing outlives the block) on a loopback port."""
    root.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), root / "s3-server.log"
    command = [shutil.which("moto_server", path=env["PATH"]) or "moto_server", "-H", "127.0.0.1", "-p", str(port)]
    endpoint = f"http://127.0.0.1:{port}"
    with serving(command, log, env, f"{endpoint}/moto-api/", "moto S3 server"):
        yield S3(endpoint)


# --- Prefect -------------------------------------------------------------------------------------------------

@contextmanager
def prefect_server(root: Path, database: str, env: dict[str, str]) -> Iterator[str]:
    """`prefect server start` on a loopback port with its own PREFECT_HOME and database; yields the API URL."""
    root.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), root / "prefect-server.log"
    server_env = {**env, "PREFECT_HOME": str(root / "home"), "PREFECT_API_DATABASE_CONNECTION_URL": database,
                  "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
                  "PREFECT_UI_ENABLED": "false"}
    command = [shutil.which("prefect", path=env["PATH"]) or "prefect", "server", "start", "--host", "127.0.0.1",
               "--port", str(port)]
    api = f"http://127.0.0.1:{port}/api"
    with serving(command, log, server_env, f"{api}/health", "prefect server"):
        yield api


def prefect_api(api: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """GET (or POST `body` to) the Prefect REST API."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{api}/{path}", data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())

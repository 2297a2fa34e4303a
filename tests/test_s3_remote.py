"""Integration: a DVC remote on a real S3 API (moto's server on loopback), as the team's `team` remote on MinIO.

A tiny git + DVC project pushes its one stage's output; a fresh clone, given only the per-machine
`.dvc/config.local`, pulls the same bytes and has nothing to rerun. infra/dvc-remote.sh configures such a remote.
The clients get no AWS_* variables: the endpoint and credentials must come from `.dvc/config.local`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from support.paths import REPO
from support.servers import TELEMETRY_OFF, S3, s3_server

pytestmark = pytest.mark.integration

OUT = "out/data.bin"
# 64 KiB of fixed pseudo-random bytes: the same on every run, so a rerun would not show as a change in content
GENERATE = ("import pathlib, random; pathlib.Path('out').mkdir(exist_ok=True); "
            "pathlib.Path('out/data.bin').write_bytes(random.Random(0).randbytes(65536))")


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**clean, **TELEMETRY_OFF, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Iterator[S3]:
    with s3_server(tmp_path_factory.mktemp("s3"), env) as server:
        yield server


def run(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-3000:]}" \
                                   f"\n{result.stderr[-3000:]}"
    return result


def project(root: Path, env: dict[str, str]) -> Path:
    """git init + dvc init + a one-stage dvc.yaml, reproduced (not yet committed)."""
    root.mkdir(parents=True)
    run(["git", "init", "-q"], env, root)
    run(["dvc", "init", "-q"], env, root)
    (root / "dvc.yaml").write_text(yaml.safe_dump(
        {"stages": {"generate": {"cmd": f'python -c "{GENERATE}"', "outs": [OUT]}}}))
    run(["dvc", "repro"], env, root)
    return root


def commit(root: Path, env: dict[str, str], message: str) -> None:
    run(["git", "add", "-A"], env, root)
    run(["git", "commit", "-qm", message], env, root)


def object_key(root: Path) -> str:
    """Where DVC 3 keeps the output in a remote: files/md5/<first 2 hex digits>/<the rest>."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    (out,) = lock["stages"]["generate"]["outs"]
    return f"dvc/files/md5/{out['md5'][:2]}/{out['md5'][2:]}"


def test_a_fresh_clone_pulls_identical_outputs_and_reruns_nothing(s3: S3, env: dict[str, str],
                                                                 tmp_path: Path) -> None:
    s3.make_bucket("team-pull")
    origin = project(tmp_path / "origin", env)
    run(["dvc", "remote", "add", "-d", "team", "s3://team-pull/dvc"], env, origin)
    for option, value in (("endpointurl", s3.endpoint), ("access_key_id", s3.access_key),
                          ("secret_access_key", s3.secret_key)):
        run(["dvc", "remote", "modify", "--local", "team", option, value], env, origin)
    run(["dvc", "push"], env, origin)
    commit(origin, env, "generate, pushed")
    assert s3.keys("team-pull", "dvc/") == [object_key(origin)]

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], env, tmp_path)
    assert not (clone / OUT).exists() and not (clone / ".dvc" / "cache").exists()  # only S3 can supply it
    assert not (clone / ".dvc" / "config.local").exists()  # git-ignored: credentials stay on their machine
    shutil.copy2(origin / ".dvc" / "config.local", clone / ".dvc" / "config.local")
    run(["dvc", "pull"], env, clone)
    assert (clone / OUT).read_bytes() == (origin / OUT).read_bytes()
    assert json.loads(run(["dvc", "status", "--json"], env, clone).stdout) == {}
    repro = run(["dvc", "repro"], env, clone)
    assert "Running stage" not in repro.stdout and "didn't change" in repro.stdout, repro.stdout


def test_dvc_remote_script_configures_a_working_remote(s3: S3, env: dict[str, str], tmp_path: Path) -> None:
    s3.make_bucket("team-script")
    root = project(tmp_path / "project", env)
    script_env = {**env, "S3_BUCKET": "team-script", "S3_ACCESS_KEY_ID": s3.access_key,
                  "S3_SECRET_ACCESS_KEY": s3.secret_key, "S3_ENDPOINT_URL": s3.endpoint}
    configured = run(["bash", str(REPO / "infra" / "dvc-remote.sh")], script_env, root)
    assert f"at {s3.endpoint}" in configured.stdout
    shared, local = (root / ".dvc" / "config").read_text(), (root / ".dvc" / "config.local").read_text()
    assert "s3://team-script/dvc" in shared and "remote = team" in shared
    assert s3.secret_key not in shared and s3.endpoint not in shared  # committed: URL only
    assert s3.secret_key in local and s3.endpoint in local
    run(["dvc", "push"], env, root)  # without S3_* or AWS_* in the environment: the config alone reaches S3
    assert s3.keys("team-script", "dvc/") == [object_key(root)]
    assert json.loads(run(["dvc", "status", "--cloud", "--json"], env, root).stdout) == {}

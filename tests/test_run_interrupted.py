"""A pipeline run whose process is killed mid-stage leaves a workspace the next run completes, with the same
outputs as an uninterrupted run (slow: three runs of the tiny preset through flows/pipeline.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from support.servers import TELEMETRY_OFF, tail
from test_integration import workspace

pytestmark = pytest.mark.slow

KILL_AT = "align_perceptual"
"""The stage the first run is killed in, after its first checkpoint: it resumes, it does not restart."""


def flow_command(name: str) -> list[str]:
    return [sys.executable, "flows/pipeline.py", "--preset", "configs/tiny.yaml", "--no-track", "--no-push",
            "--workspace", name, "--retries", "0"]


def outputs(lock: Path) -> dict[str, str]:
    """Every stage's outs (path -> md5) in a dvc.lock."""
    stages = yaml.safe_load(lock.read_text())["stages"]
    return {out["path"]: out["md5"] for stage in stages.values() for out in stage.get("outs", [])}


def test_a_killed_run_is_completed_by_the_next_with_the_outputs_of_an_uninterrupted_one(tmp_path: Path) -> None:
    repo = workspace(tmp_path / "checkout")
    env = {**os.environ, **TELEMETRY_OFF, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
           "ALIGNTOK_LOCK_DIR": str(tmp_path / "locks")}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = tmp_path / "killed.log"
    checkpoints = repo / ".dvc/tmp/workspaces/interrupted/checkpoints" / KILL_AT
    with open(log, "wb") as handle:
        process = subprocess.Popen(flow_command("interrupted"), cwd=repo, env=env, stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 900
    while not list(checkpoints.glob("*.safetensors")):
        assert process.poll() is None, f"the run ended before {KILL_AT} checkpointed:\n{tail(log)}"
        assert time.monotonic() < deadline, f"no {KILL_AT} checkpoint after 900 s:\n{tail(log)}"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the worker, its dvc and the stage, mid-stage
    process.wait(30)

    done = subprocess.run(flow_command("interrupted"), cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert re.search(rf"{KILL_AT}: resum\w* (from|at) step [1-9]", done.stdout + done.stderr), \
        "the killed stage did not resume from its checkpoint"
    clean = subprocess.run(flow_command("uninterrupted"), cwd=repo, env=env, capture_output=True, text=True,
                           timeout=1200)
    assert clean.returncode == 0, (clean.stdout + clean.stderr)[-4000:]

    resumed = outputs(repo / ".dvc/tmp/workspaces/interrupted/dvc.lock")
    uninterrupted = outputs(repo / ".dvc/tmp/workspaces/uninterrupted/dvc.lock")
    assert set(resumed) == set(uninterrupted) and len(resumed) > 10
    differ = {path for path in resumed if resumed[path] != uninterrupted[path]}
    assert not differ, f"outputs that differ from an uninterrupted run: {sorted(differ)}"
    branch = subprocess.run(["git", "log", "--format=%s", "aligntok-runs/interrupted"], cwd=repo, capture_output=True,
                            text=True, check=True).stdout
    assert branch.count("aligntok run ") == 1  # the killed run left no commit; the completing run did
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout == ""

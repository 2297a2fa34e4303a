"""Prefect flow: the whole pipeline, one task per DVC stage, in dvc.yaml's order.

Each task runs `dvc repro --single-item <stage>`, so DVC's cache, lock and lineage hold:
a stage whose inputs did not change is skipped by DVC, not by Prefect. The flow opens
the MLflow parent run and hands its id to the stages (ALIGNTOK_PARENT_RUN_ID), which
nest their runs under it. Retries are for infrastructure only (another DVC process
holding the repo lock), never for a failing stage.

    python flows/pipeline.py            # against Prefect's temporary local server
    python flows/pipeline.py --stages ingest validate
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

from aligntok.telemetry import disable_telemetry

# An entry point may set the environment at import (the library never does): telemetry off before
# Prefect reads its settings and before MLflow or a `dvc` subprocess starts.
disable_telemetry()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from aligntok.dag import stage_order  # noqa: E402
from aligntok.tracking import PARENT_RUN_ENV, StageRun  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

LOCK_MESSAGE = "Unable to acquire lock"


class StageFailed(RuntimeError):
    pass


def _lock_contention(task, task_run, state) -> bool:
    """Retry only when DVC could not take the repo lock (another `dvc` is running)."""
    try:
        state.result()
    except StageFailed as exc:
        return LOCK_MESSAGE in str(exc)
    return False


@task(retries=3, retry_delay_seconds=30, retry_condition_fn=_lock_contention, cache_policy=NO_CACHE)
def run_stage(stage: str, parent_run_id: str | None) -> str:
    logger = get_run_logger()
    env = dict(os.environ)
    if parent_run_id:
        env[PARENT_RUN_ENV] = parent_run_id
    command = ["dvc", "repro", "--single-item", stage]
    logger.info("%s", " ".join(command))
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    for line in (result.stdout + result.stderr).splitlines()[-40:]:
        logger.info("%s | %s", stage, line)
    if result.returncode != 0:
        raise StageFailed(f"stage {stage} failed (exit {result.returncode}): {result.stderr[-2000:]}")
    return stage


@flow(name="aligntok-pipeline", log_prints=True)
def pipeline(stages: list[str] | None = None, track: bool = True) -> list[str]:
    """Run `stages` (default: all of dvc.yaml, in dependency order); returns the stages run."""
    order = stage_order(REPO / "dvc.yaml")
    unknown = set(stages or []) - set(order)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; dvc.yaml has {order}")
    selected = [s for s in order if stages is None or s in stages]
    parent = StageRun("pipeline", {"stages": selected}) if track else None
    try:
        for stage in selected:
            run_stage(stage, parent.run_id if parent else None)
    except BaseException:
        if parent:
            parent.finish("FAILED")
        raise
    if parent:
        parent.finish()
    return selected


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the aligntok pipeline as a Prefect flow.")
    parser.add_argument("--stages", nargs="*", help="subset of dvc.yaml stages (default: all)")
    parser.add_argument("--no-track", action="store_true", help="no MLflow parent run")
    args = parser.parse_args()
    os.chdir(REPO)
    pipeline(stages=args.stages, track=not args.no_track)


if __name__ == "__main__":
    main()

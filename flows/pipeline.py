"""Prefect flow: the whole pipeline in a workspace of its own, one task per DVC stage; then the run is
committed, pushed, recorded on its registry versions, and offered to gated promotion.

A run never works in the checkout it was started from (aligntok.ops.workspace):

1. the run's workspace (a git worktree of the checkout at `ref`, one per deployment, sharing the DVC cache)
   is taken under its lock, so two runs of one deployment take turns and two deployments coexist;
2. it is reset to the ref with the deployment's last results (dvc.lock, metrics) and a `preset` applied
   there, never to the checkout's params.yaml; the outputs are pulled (or checked out of the cache);
3. each stage runs as `dvc repro --single-item <stage>`: DVC skips what did not change (the `snapshot`
   stage fingerprints the data source, so new data reruns `ingest` and what follows); `force` retrains
   from step 0 (ALIGNTOK_RETRAIN);
4. the result is a commit on the branch `aligntok-runs/<workspace>`; outputs go to the DVC remote, the
   branch to the git remote; the commit, the source fingerprint and the deployment are tagged on the MLflow
   parent run and on every version the run registered, which get descriptions;
5. after `evaluate` ran, `promote.pipeline_candidates` are offered to flows/promote.py;
6. a markdown artifact `pipeline-summary` says what ran, what it made, and each promotion decision.

Only infrastructure failures are retried (DVC's lock held by another `dvc`, a server that refuses
connections), never a failing stage, whose own error line fails the flow.

    python flows/pipeline.py                                  # Prefect's temporary local server
    python flows/pipeline.py --targets train_dit --force      # train_dit and what it needs, retrained
    python flows/pipeline.py --preset configs/tiny.yaml       # the whole DAG in minutes
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # a worker runs this file by path; `flows.promote` lives beside it
    sys.path.insert(0, str(REPO))

from aligntok.telemetry import disable_telemetry  # noqa: E402

# An entry point may set the environment at import (the library never does): telemetry off before
# Prefect reads its settings and before MLflow or a `dvc` subprocess starts.
disable_telemetry()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from aligntok.ops import workspace as ws  # noqa: E402
from aligntok.errors import AligntokError  # noqa: E402
from aligntok.locks import LockBusy, file_lock  # noqa: E402
from aligntok.ops.pipeline_run import (  # noqa: E402
    SNAPSHOT,
    InfrastructureError,
    StageFailed,
    apply_preset,
    error_line,
    find_preset,
    is_infrastructure,
    params_origin,
    repro_command,
    run_commit_message,
    select_stages,
    stage_metrics,
    stage_receipts,
    stage_status,
    stream,
    summary_markdown,
)
from aligntok.train.checkpoint import RETRAIN_ENV  # noqa: E402
from aligntok.ops.tracking import PARENT_RUN_ENV  # noqa: E402


def _infrastructure_failure(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: retry infrastructure failures only."""
    try:
        state.result()
    except StageFailed as exc:
        return exc.infrastructure
    except InfrastructureError:
        return True
    except ws.WorkspaceError as exc:  # a DVC lock held by another `dvc`, an object store that went away
        return is_infrastructure(str(exc))
    except Exception:  # noqa: BLE001 - anything else is the stage's own failure
        return False
    return False


@task(cache_policy=NO_CACHE, retry_condition_fn=_infrastructure_failure)
def check_tracking_server() -> str:
    """A tracking server that does not answer fails here, before any stage (and is retried)."""
    from aligntok.ops.tracking import TrackingUnavailable, check_tracking_server as check

    try:
        return check()
    except TrackingUnavailable as exc:
        raise InfrastructureError(str(exc)) from None


@task(cache_policy=NO_CACHE, retry_condition_fn=_infrastructure_failure)
def open_parent_run(settings: dict[str, Any]) -> str:
    from aligntok.ops.tracking import StageRun

    try:
        return StageRun("pipeline", settings).run_id
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a server that went away
        if is_infrastructure(str(exc)):
            raise InfrastructureError(f"cannot open the MLflow parent run: {exc}") from None
        raise


@task(cache_policy=NO_CACHE, retry_condition_fn=_infrastructure_failure)
def run_stage(stage: str, repo: str, force: bool, parent_run_id: str | None) -> dict[str, Any]:
    """`dvc repro --single-item [--force] STAGE` in `repo`, its output streamed to the Prefect log."""
    logger = get_run_logger()
    env = dict(os.environ)
    env.pop(RETRAIN_ENV, None)
    if parent_run_id:
        env[PARENT_RUN_ENV] = parent_run_id
    from prefect.runtime import task_run

    if force and task_run.run_count <= 1:  # a retry after an infrastructure failure resumes the forced run
        env[RETRAIN_ENV] = "1"
    command = repro_command(stage, force)
    logger.info("%s", " ".join(command))
    fingerprint = Path(repo) / ws.SOURCE_FINGERPRINT
    before = fingerprint.read_bytes() if stage == SNAPSHOT and fingerprint.is_file() else None
    start = time.perf_counter()
    code, output = stream(command, Path(repo), env, lambda line: logger.info("%s | %s", stage, line))
    seconds = time.perf_counter() - start
    if code != 0:
        for line in output.splitlines()[-30:]:
            logger.error("%s | %s", stage, line)
        raise StageFailed(stage, code, error_line(output), is_infrastructure(output))
    status = stage_status(stage, output)
    if stage == SNAPSHOT:  # it runs every time: what counts is whether the fingerprint moved
        status = "source unchanged" if before == fingerprint.read_bytes() else "source changed"
    receipts = stage_receipts(Path(repo), stage) if status == "ran" else []
    return {"stage": stage, "status": status, "seconds": round(seconds, 1),
            "versions": [f"{r['model']} v{r['version']}" for r in receipts], "receipts": receipts,
            "metrics": stage_metrics(Path(repo), stage)}


@task(cache_policy=NO_CACHE, retry_condition_fn=_infrastructure_failure)
def prepare_workspace(checkout: str, name: str, ref: str | None, preset: str | None) -> tuple[ws.Workspace, str]:
    """The run's workspace at `ref` with the last run's results, `preset` applied, outputs in place; and how
    they were put there."""
    workspace = ws.prepare(Path(checkout), name, ref)
    if preset:
        apply_preset(workspace.path, find_preset(preset, workspace.path, Path(checkout)), preset)
    return workspace, ws.restore_outputs(workspace)


@task(cache_policy=NO_CACHE, retry_condition_fn=_infrastructure_failure)
def publish(workspace: ws.Workspace, message: str, git_remote: str | None, push: bool) -> dict[str, Any]:
    """The run commit, then the pushes (outputs first)."""
    commit = ws.commit_run(workspace, message)
    pushed = ws.push(workspace, git_remote) if push else ["not pushed (push=False)"]
    return {"commit": commit, "pushed": pushed}


def promote_candidates(repo: Path, stages: list[str]) -> list[dict[str, Any]]:
    """Offer each candidate stage's registered version to the promotion flow; refusals do not fail the run."""
    from aligntok.ops.tracking import tracking_uri

    from flows.promote import promote_version

    decisions = []
    for stage in stages:
        for receipt in stage_receipts(repo, stage):
            if receipt["tracking_uri"] != tracking_uri():
                decisions.append({"outcome": "skipped", "message": f"{receipt['model']} v{receipt['version']} was "
                                  f"registered at {receipt['tracking_uri']}, not at {tracking_uri()}"})
                continue
            try:
                decisions.append(promote_version(receipt["model"], receipt["version"],
                                                 reason=f"pipeline run after evaluate ({stage})",
                                                 params=str(repo / "params.yaml"), fail_on_refusal=False))
            except AligntokError as exc:  # e.g. no rules for the model: the run's stages still stand
                decisions.append({"outcome": "error", "message": str(exc)})
    return decisions


def _run_names() -> tuple[str, str]:
    """(workspace name, flow run name): the deployment's name, or `manual` for a run started by hand."""
    from prefect.runtime import deployment, flow_run

    return (deployment.name or "manual"), (flow_run.get_name() or str(flow_run.get_id()))


@flow(name="aligntok-pipeline", log_prints=True)
def pipeline(targets: list[str] | None = None, preset: str | None = None, force: bool = False,
             promote: bool = True, track: bool = True, ref: str | None = None, workspace: str | None = None,
             push: bool = True, git_remote: str = "origin", lock_timeout: float = 6 * 3600,
             infra_retries: int = 3, retry_delay_seconds: float = 30.0) -> dict[str, Any]:
    """Reproduce `targets` (default: all of dvc.yaml) and what they depend on, in the run's own workspace.

    preset: a params file (e.g. configs/tiny.yaml; of the ref, else of the checkout) applied in the workspace.
    force: rerun the selected stages even where DVC finds nothing changed, training from step 0.
    promote: after `evaluate` ran, offer `promote.pipeline_candidates` to the gated promotion.
    ref: the branch, tag or commit to run (default: the checkout's branch).
    workspace: the workspace's name (default: the deployment's name, `manual` for a run by hand).
    push / git_remote: push outputs to the DVC default remote and the run branch to this git remote.
    lock_timeout: seconds to wait for another run of the same workspace before failing.
    infra_retries / retry_delay_seconds: retries of infrastructure failures (never of a failing stage)."""
    logger = get_run_logger()
    checkout = REPO
    if not os.environ.get("MLFLOW_TRACKING_URI"):  # the default registry is the checkout's, not the workspace's
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{checkout / 'mlflow.db'}"
    default_name, run_name = _run_names()
    name = workspace or default_name
    holder = (f"pid {os.getpid()} on {socket.gethostname()}, flow run {run_name}, "
              f"since {datetime.now(UTC).isoformat(timespec='seconds')}")
    retrying = {"retries": infra_retries, "retry_delay_seconds": retry_delay_seconds}
    rows: list[dict[str, Any]] = []
    promotions: list[dict[str, Any]] = []
    header = {"outcome": "failed", "checkout": str(checkout), "deployment": name, "flow run": run_name,
              "force": str(force)}
    start, parent = time.perf_counter(), None
    lock_path = ws.lock_file(checkout, name)
    try:
        with file_lock(lock_path, holder=holder, what=f"workspace {name}", timeout=lock_timeout,
                       on_wait=lambda other: logger.warning("another pipeline run holds workspace %s (%s); waiting "
                                                            "up to %g s", name, other, lock_timeout)):
            work, restored = prepare_workspace.with_options(**retrying)(str(checkout), name, ref, preset)
            header |= {"workspace": str(work.path), "ref": f"{work.ref} ({work.commit[:12]})",
                       "previous run": work.previous[:12] if work.previous else "none", "outputs": restored}
            dirty = ws.dirty_files(checkout)
            if dirty and not ref:
                logger.warning("the checkout has uncommitted changes (%s): the run uses the committed %s",
                               ", ".join(dirty[:5]), work.ref)
            header["params"] = params_origin(work.path)
            selected = select_stages(work.path, targets)
            header["stages"] = ", ".join(selected)
            uri = check_tracking_server.with_options(**retrying)() if track else None
            header["tracking"] = uri or "off"
            parent = (open_parent_run.with_options(**retrying)(
                {"stages": selected, "preset": preset, "force": force, "ref": work.ref, "workspace": name})
                if track else None)
            header["mlflow parent run"] = parent or "none"
            for stage in selected:
                try:
                    rows.append(run_stage.with_options(**retrying)(stage, str(work.path), force, parent))
                except StageFailed as exc:
                    rows.append({"stage": stage, "status": f"failed: {exc.error}"})
                    raise
            fingerprint = work.source_fingerprint()
            header["source fingerprint"] = fingerprint or "none"
            published = publish.with_options(**retrying)(work, run_commit_message(header, rows), git_remote, push)
            header["run commit"] = f"{published['commit']} on {work.branch}"
            header["pushed"] = "; ".join(published["pushed"])
            created = [(r["model"], r["version"]) for row in rows for r in row.get("receipts", [])]
            if parent:
                from aligntok.ops.provenance import RunRecord, record_run
                from aligntok.ops.tracking import client

                record_run(RunRecord(published["commit"], work.branch, work.commit,
                                     ws.git_remote_url(checkout, git_remote) if push else None,
                                     fingerprint, name, run_name, parent), created)
                client().set_terminated(parent, "FINISHED")
            if promote and track and any(r["stage"] in ("evaluate", "evaluate_t2i") and r["status"] == "ran"
                                      for r in rows):
                from aligntok.config import load_params

                candidates = load_params(work.path / "params.yaml").promote.pipeline_candidates
                promotions = promote_candidates(work.path, candidates)
            elif promote:
                promotions = [{"outcome": "skipped", "message": "neither evaluate nor evaluate_t2i ran in this flow run"
                               + ("" if track else " (tracking off)")}]
            header["outcome"] = "completed"
    finally:
        header["wall seconds"] = f"{time.perf_counter() - start:.0f}"
        if header["outcome"] == "failed" and parent:
            from aligntok.ops.tracking import client

            client().set_terminated(parent, "FAILED")
        summary = summary_markdown(rows, promotions, header)
        create_markdown_artifact(key="pipeline-summary", markdown=summary,
                                 description=f"aligntok pipeline {header['outcome']}")
    return {"stages": [{k: v for k, v in r.items() if k != "receipts"} for r in rows], "promotions": promotions,
            "summary": summary, **header}


def main() -> int:
    parser = argparse.ArgumentParser(description="Run the aligntok pipeline as a Prefect flow (one task per DVC "
                                     "stage) in a workspace of its own, commit and push the result, then offer "
                                     "the new versions for promotion.")
    parser.add_argument("--targets", nargs="*", metavar="STAGE",
                        help="stages to reproduce, with what they depend on (default: all of dvc.yaml)")
    parser.add_argument("--preset", help="params file applied in the workspace, e.g. configs/tiny.yaml")
    parser.add_argument("--force", action="store_true", help="rerun the selected stages, training from step 0")
    parser.add_argument("--ref", help="branch, tag or commit to run (default: the checkout's branch)")
    parser.add_argument("--workspace", help="workspace name under .dvc/tmp/workspaces/ (default: manual)")
    parser.add_argument("--no-push", action="store_true", help="commit the run on its branch, push nothing")
    parser.add_argument("--git-remote", default="origin", help="git remote for the run branch (default: origin)")
    parser.add_argument("--no-promote", action="store_true", help="do not offer new versions for promotion")
    parser.add_argument("--no-track", action="store_true", help="no MLflow parent run, no promotion")
    parser.add_argument("--lock-timeout", type=float, default=6 * 3600,
                        help="seconds to wait for another run of the same workspace (default: 6 h)")
    parser.add_argument("--retries", type=int, default=3, help="retries of infrastructure failures (default: 3)")
    parser.add_argument("--retry-delay", type=float, default=30.0, help="seconds between them (default: 30)")
    args = parser.parse_args()
    os.chdir(REPO)
    try:
        result = pipeline(targets=args.targets, preset=args.preset, force=args.force, promote=not args.no_promote,
                          track=not args.no_track, ref=args.ref, workspace=args.workspace, push=not args.no_push,
                          git_remote=args.git_remote, lock_timeout=args.lock_timeout, infra_retries=args.retries,
                          retry_delay_seconds=args.retry_delay)
    except (StageFailed, InfrastructureError, LockBusy, AligntokError, ValueError, OSError) as exc:
        print(f"aligntok pipeline: error: {exc}", file=sys.stderr)  # the log above has the details
        return 1
    print(result["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

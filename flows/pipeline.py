"""Prefect flow: the whole pipeline, one task per DVC stage, in dvc.yaml's order; then gated promotion.

Each task runs `dvc repro --single-item <stage>`, so DVC's cache, lock and lineage hold: a stage whose inputs
did not change is skipped by DVC, not by Prefect. The flow

- takes the checkout's pipeline lock first, so that two runs on one checkout (a schedule and an on-demand
  run) take turns: the second waits (up to `lock_timeout` seconds), then finds DVC's outputs up to date;
- with `preset`, writes that preset's resolved parameters to params.yaml before running (DVC reads params
  from that one file; `git checkout params.yaml` returns to the default);
- opens the MLflow parent run and hands its id to the stages (ALIGNTOK_PARENT_RUN_ID);
- retries a stage only for infrastructure failures (DVC's repo lock held by another `dvc`, a tracking server
  that refuses connections), never for a failing stage, whose own error line fails the flow;
- after `evaluate` ran, offers the versions of `promote.pipeline_candidates` to flows/promote.py;
- ends with a markdown artifact `pipeline-summary`: each stage run or skipped by DVC, its duration, the
  registry versions it created, its key metrics, and each promotion decision.

    python flows/pipeline.py                                  # Prefect's temporary local server
    python flows/pipeline.py --targets train_dit --force      # train_dit and what it needs, forced
    python flows/pipeline.py --preset configs/tiny.yaml       # the whole DAG in minutes
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
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

from aligntok.dag import stage_order, stage_paths, upstream  # noqa: E402
from aligntok.errors import AligntokError  # noqa: E402
from aligntok.tracking import PARENT_RUN_ENV  # noqa: E402

LOCK_FILE = Path(".dvc") / "tmp" / "aligntok-pipeline.lock"
"""The checkout's pipeline lock (beside DVC's own), held for a whole flow run."""

INFRASTRUCTURE_SIGNS = (
    "Unable to acquire lock",  # another `dvc` holds the repo lock
    "Connection refused",
    "Failed to establish a new connection",
    "Max retries exceeded",
    "Connection reset by peer",
    "RemoteDisconnected",
    "Temporary failure in name resolution",
)
"""Output of a failed stage that says the machinery failed, not the stage: these failures are retried."""

KEY_METRICS = ("val_psnr", "val_ssim", "rfid", "lp_top1", "gfid_cfg", "gfid_nocfg", "final_loss")
"""The figures the summary shows, by name, wherever they sit in a stage's metrics JSON."""


class StageFailed(RuntimeError):
    """A stage exited non-zero; the message is its own error line."""

    def __init__(self, stage: str, code: int, error: str, infrastructure: bool) -> None:
        super().__init__(f"stage {stage} failed (exit {code}): {error}")
        self.stage, self.code, self.error, self.infrastructure = stage, code, error, infrastructure


class InfrastructureError(RuntimeError):
    """A server or lock the pipeline needs is unavailable (retried)."""


class PipelineBusy(RuntimeError):
    """Another pipeline run held the checkout for longer than `lock_timeout`."""


def _infrastructure_failure(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: retry infrastructure failures only."""
    try:
        state.result()
    except StageFailed as exc:
        return exc.infrastructure
    except InfrastructureError:
        return True
    except Exception:  # noqa: BLE001 - anything else is the stage's own failure
        return False
    return False


def error_line(output: str) -> str:
    """The line that says why a stage failed: aligntok's one-line error, else DVC's, else the last line."""
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines() if line.strip()]
    for marker in (": error: ", "Error: ", "ERROR: "):
        found = [line for line in lines if marker in line and "%|" not in line]
        if found:
            return found[-1]
    return lines[-1] if lines else "(no output)"


def stage_receipts(repo: Path, stage: str) -> list[dict[str, Any]]:
    """The registry receipts (receipt.json) among a stage's outputs."""
    found = []
    for out in stage_paths(repo / "dvc.yaml", stage, "outs"):
        receipt = repo / out / "receipt.json"
        if receipt.is_file():
            found.append(json.loads(receipt.read_text()))
    return found


def stage_metrics(repo: Path, stage: str) -> dict[str, float]:
    """The KEY_METRICS found in a stage's metrics files (nested keys joined by dots)."""
    found: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, (int, float)) and prefix.rsplit(".", 1)[-1] in KEY_METRICS:
            found[prefix] = float(value)

    for path in stage_paths(repo / "dvc.yaml", stage, "metrics"):
        if (repo / path).is_file():
            walk("", json.loads((repo / path).read_text()))
    return found


@task(cache_policy=NO_CACHE, retry_condition_fn=_infrastructure_failure)
def check_tracking_server() -> str:
    """A tracking server that does not answer fails here, before any stage (and is retried)."""
    from aligntok.tracking import tracking_uri

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as response:
                response.read()
        except (urllib.error.URLError, OSError) as exc:
            raise InfrastructureError(f"MLflow tracking server {uri} does not answer: "
                                      f"{getattr(exc, 'reason', exc)}") from None
    return uri


@task(cache_policy=NO_CACHE, retry_condition_fn=_infrastructure_failure)
def open_parent_run(settings: dict[str, Any]) -> str:
    from aligntok.tracking import StageRun

    try:
        return StageRun("pipeline", settings).run_id
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a server that went away
        if any(sign in str(exc) for sign in INFRASTRUCTURE_SIGNS):
            raise InfrastructureError(f"cannot open the MLflow parent run: {exc}") from None
        raise


@task(cache_policy=NO_CACHE, retry_condition_fn=_infrastructure_failure)
def run_stage(stage: str, repo: str, force: bool, parent_run_id: str | None) -> dict[str, Any]:
    """`dvc repro --single-item [--force] STAGE`, its output streamed to the Prefect log."""
    logger = get_run_logger()
    env = dict(os.environ)
    if parent_run_id:
        env[PARENT_RUN_ENV] = parent_run_id
    command = ["dvc", "repro", "--single-item", *(["--force"] if force else []), stage]
    logger.info("%s", " ".join(command))
    start = time.perf_counter()
    tail: deque[str] = deque(maxlen=400)
    with subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as process:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.rstrip("\n").rsplit("\r", 1)[-1]  # the last state of a progress bar
            tail.append(line)
            if line.strip() and "%|" not in line:
                logger.info("%s | %s", stage, line)
    seconds = time.perf_counter() - start
    output = "\n".join(tail)
    if process.returncode != 0:
        infrastructure = any(sign in output for sign in INFRASTRUCTURE_SIGNS)
        for line in list(tail)[-30:]:
            logger.error("%s | %s", stage, line)
        raise StageFailed(stage, process.returncode, error_line(output), infrastructure)
    ran = f"Running stage '{stage}'" in output
    return {"stage": stage, "status": "ran" if ran else "skipped", "seconds": round(seconds, 1),
            "versions": [f"{r['model']} v{r['version']}" for r in stage_receipts(Path(repo), stage)] if ran else [],
            "metrics": stage_metrics(Path(repo), stage)}


def _logger() -> Any:
    """The flow run's logger inside a run, else this module's."""
    import logging

    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("aligntok.pipeline")


@contextmanager
def pipeline_lock(repo: Path, timeout: float, holder: str) -> Iterator[None]:
    """Hold the checkout's pipeline lock; wait for it up to `timeout` seconds, then raise `PipelineBusy`."""
    logger = _logger()
    path = repo / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline, told = time.monotonic() + timeout, False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                other = handle.read().strip() or "another process"
                if time.monotonic() >= deadline:
                    raise PipelineBusy(f"{repo}: another pipeline run holds the checkout ({other}); gave up after "
                                       f"waiting {timeout:g} s (flow parameter lock_timeout)") from None
                if not told:
                    logger.warning("another pipeline run holds %s (%s); waiting up to %g s", repo, other, timeout)
                    told = True
                time.sleep(1.0)
        handle.seek(0)
        handle.truncate()
        handle.write(holder)
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def apply_preset(repo: Path, preset: str) -> str:
    """Write `preset`'s resolved parameters to params.yaml (a bad preset fails here, naming the key)."""
    from aligntok.config import load_params, params_yaml
    from aligntok.fileio import atomic_write_text

    path = (repo / preset) if not Path(preset).is_absolute() else Path(preset)
    params = load_params(path)
    atomic_write_text(repo / "params.yaml", params_yaml(params, preset))
    return preset


def params_origin(repo: Path) -> str:
    """Where params.yaml's values come from: the preset named in its header, or the committed file."""
    first = (repo / "params.yaml").read_text().splitlines()[:1]
    if first and first[0].startswith("# Written from "):
        return first[0].removeprefix("# Written from ").split(" ", 1)[0]
    changed = subprocess.run(["git", "status", "--porcelain", "params.yaml"], cwd=repo, capture_output=True,
                             text=True).stdout.strip()
    return "params.yaml (uncommitted changes)" if changed else "params.yaml"


def select_stages(repo: Path, targets: list[str] | None) -> list[str]:
    order = stage_order(repo / "dvc.yaml")
    unknown = sorted(set(targets or []) - set(order))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; dvc.yaml has {order}")
    return order if not targets else upstream(repo / "dvc.yaml", targets)


def summary_markdown(rows: list[dict[str, Any]], promotions: list[dict[str, Any]], header: dict[str, str]) -> str:
    lines = [f"# aligntok pipeline: {header['outcome']}", ""]
    lines += [f"- {key}: {value}" for key, value in header.items() if key != "outcome"]
    lines += ["", "| stage | DVC | seconds | registry versions | key metrics |", "|---|---|---|---|---|"]
    for row in rows:
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in row.get("metrics", {}).items()) or "-"
        lines.append(f"| {row['stage']} | {row['status']} | {row.get('seconds', '-')} | "
                     f"{', '.join(row.get('versions', [])) or '-'} | {metrics} |")
    lines += ["", "## Promotion", ""]
    lines += [f"- {p['outcome']}: {p['message']}" for p in promotions] or ["- none offered"]
    return "\n".join(lines) + "\n"


def promote_candidates(repo: Path, stages: list[str]) -> list[dict[str, Any]]:
    """Offer each candidate stage's registered version to the promotion flow; refusals do not fail the run."""
    from aligntok.tracking import tracking_uri

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


@flow(name="aligntok-pipeline", log_prints=True)
def pipeline(targets: list[str] | None = None, preset: str | None = None, force: bool = False,
             promote: bool = True, track: bool = True, lock_timeout: float = 6 * 3600,
             infra_retries: int = 3, retry_delay_seconds: float = 30.0) -> dict[str, Any]:
    """Reproduce `targets` (default: all of dvc.yaml) and what they depend on, one task per DVC stage.

    preset: a params file (e.g. configs/tiny.yaml) written to params.yaml before the run.
    force: rerun the selected stages even where DVC finds nothing changed.
    promote: after `evaluate` ran, offer `promote.pipeline_candidates` to the gated promotion.
    lock_timeout: seconds to wait for another pipeline run on this checkout before failing.
    infra_retries / retry_delay_seconds: retries of infrastructure failures (never of a failing stage)."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    repo = REPO
    selected = select_stages(repo, targets)
    holder = (f"pid {os.getpid()} on {socket.gethostname()}, flow run {flow_run.get_name() or flow_run.get_id()}, "
              f"since {datetime.now(UTC).isoformat(timespec='seconds')}")
    retrying = {"retries": infra_retries, "retry_delay_seconds": retry_delay_seconds}
    rows: list[dict[str, Any]] = []
    promotions: list[dict[str, Any]] = []
    header = {"outcome": "failed", "checkout": str(repo), "stages": ", ".join(selected), "force": str(force)}
    start, parent = time.perf_counter(), None
    try:
        with pipeline_lock(repo, lock_timeout, holder):
            if preset:
                apply_preset(repo, preset)
                logger.info("params.yaml <- %s (resolved)", preset)
            header["params"] = params_origin(repo)
            uri = check_tracking_server.with_options(**retrying)() if track else None
            header["tracking"] = uri or "off"
            parent = (open_parent_run.with_options(**retrying)({"stages": selected, "preset": preset, "force": force})
                      if track else None)
            for stage in selected:
                try:
                    rows.append(run_stage.with_options(**retrying)(stage, str(repo), force, parent))
                except StageFailed as exc:
                    rows.append({"stage": stage, "status": f"failed: {exc.error}"})
                    raise
            if parent:
                from aligntok.tracking import client

                client().set_terminated(parent, "FINISHED")
            if promote and track and any(r["stage"] == "evaluate" and r["status"] == "ran" for r in rows):
                from aligntok.config import load_params

                candidates = load_params(repo / "params.yaml").promote.pipeline_candidates
                promotions = promote_candidates(repo, candidates)
            elif promote:
                promotions = [{"outcome": "skipped", "message": "evaluate did not run in this flow run"
                               + ("" if track else " (tracking off)")}]
            header["outcome"] = "completed"
    finally:
        header["wall seconds"] = f"{time.perf_counter() - start:.0f}"
        if header["outcome"] == "failed" and parent:
            from aligntok.tracking import client

            client().set_terminated(parent, "FAILED")
        summary = summary_markdown(rows, promotions, header)
        create_markdown_artifact(key="pipeline-summary", markdown=summary,
                                 description=f"aligntok pipeline {header['outcome']}")
    return {"stages": rows, "promotions": promotions, "summary": summary, **header}


def main() -> int:
    parser = argparse.ArgumentParser(description="Run the aligntok pipeline as a Prefect flow (one task per "
                                     "DVC stage), then offer the new versions for promotion.")
    parser.add_argument("--targets", nargs="*", metavar="STAGE",
                        help="stages to reproduce, with what they depend on (default: all of dvc.yaml)")
    parser.add_argument("--preset", help="params file written to params.yaml first, e.g. configs/tiny.yaml")
    parser.add_argument("--force", action="store_true", help="rerun the selected stages even if nothing changed")
    parser.add_argument("--no-promote", action="store_true", help="do not offer new versions for promotion")
    parser.add_argument("--no-track", action="store_true", help="no MLflow parent run, no promotion")
    parser.add_argument("--lock-timeout", type=float, default=6 * 3600,
                        help="seconds to wait for another run on this checkout (default: 6 h)")
    parser.add_argument("--retries", type=int, default=3, help="retries of infrastructure failures (default: 3)")
    parser.add_argument("--retry-delay", type=float, default=30.0, help="seconds between them (default: 30)")
    args = parser.parse_args()
    os.chdir(REPO)
    try:
        result = pipeline(targets=args.targets, preset=args.preset, force=args.force, promote=not args.no_promote,
                          track=not args.no_track, lock_timeout=args.lock_timeout, infra_retries=args.retries,
                          retry_delay_seconds=args.retry_delay)
    except (StageFailed, InfrastructureError, PipelineBusy, AligntokError, ValueError, OSError) as exc:
        print(f"aligntok pipeline: error: {exc}", file=sys.stderr)  # the log above has the details
        return 1
    print(result["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

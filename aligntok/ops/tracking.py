"""Every MLflow call of the project lives here.

Runs are addressed by explicit run ids through `MlflowClient` (MLflow's fluent "active
run" is thread-local and easy to leak between stages). The tracking URI comes from
`MLFLOW_TRACKING_URI`, else a SQLite file in the working directory (the repo root under
DVC); a SQLite registry keeps its artifacts in `mlartifacts/` beside its file. Nothing is configured at import.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aligntok.errors import AligntokError
from aligntok.ops.model_card import MODEL_DESCRIPTIONS, version_description

log = logging.getLogger(__name__)

EXPERIMENT = "aligntok"
PARENT_RUN_ENV = "ALIGNTOK_PARENT_RUN_ID"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


class LineageError(AligntokError):
    """A model reference names no version of the registry."""


class TrackingUnavailable(ConnectionError):
    """The tracking server does not answer."""


def check_tracking_server(timeout: float = 10) -> str:
    """The tracking URI, after its server answered `/health` (a local SQLite store always does); raises
    `TrackingUnavailable` naming the server and why."""
    import urllib.error
    import urllib.request

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
                response.read()
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingUnavailable(f"MLflow tracking server {uri} does not answer: "
                                      f"{getattr(exc, 'reason', exc)}") from None
    return uri


def client() -> Any:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())


def experiment_id(mlflow_client: Any, name: str = EXPERIMENT) -> str:
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):  # a local registry keeps its artifacts beside its database file
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return mlflow_client.create_experiment(name, artifact_location=location)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)


class StageRun:
    """One MLflow run for one pipeline stage (nested under `ALIGNTOK_PARENT_RUN_ID` if set)."""

    def __init__(self, stage: str, params: dict[str, Any], tags: dict[str, str] | None = None,
                 resume_run_id: str | None = None) -> None:
        self.client = client()
        if resume_run_id and self._reopen(resume_run_id):
            return
        all_tags = {"stage": stage, "git_commit": git_commit(), "mlflow.runName": stage, **(tags or {})}
        parent = os.environ.get(PARENT_RUN_ENV)
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(experiment_id(self.client), tags=all_tags, run_name=stage)
        self.run_id: str = run.info.run_id
        flat: dict[str, str] = {}
        _flatten("", params, flat)
        items = list(flat.items())
        from mlflow.entities import Param

        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in items[start:start + 100]])
        log.info("MLflow run %s (%s) at %s", self.run_id, stage, tracking_uri())

    @classmethod
    def for_checkpoint(cls, stage: str, params: dict[str, Any], checkpoint: Path) -> StageRun:
        """The run of a training stage: the one its checkpoint's sidecar names when that run can continue
        (a resumed stage logs into the run it started), else a new one."""
        sidecar = Path(checkpoint).with_suffix(".json")
        resumed = json.loads(sidecar.read_text()).get("mlflow_run_id") if sidecar.is_file() else None
        return cls(stage, params, resume_run_id=resumed)

    def _reopen(self, run_id: str) -> bool:
        """Continue an interrupted run of the same checkpoint instead of starting a new one."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False
        if run.info.lifecycle_stage != "active":
            return False
        self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        log.info("MLflow run %s resumed at %s", run_id, tracking_uri())
        return True

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in values.items() if np.isfinite(v)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def image(self, image: np.ndarray, name: str) -> None:
        """Log an (H, W, 3) uint8 image as `images/<name>`."""
        self.client.log_image(self.run_id, image, artifact_file=f"images/{name}")

    def artifact(self, path: Path, folder: str | None = None) -> None:
        """Log a file, or a folder's files under `folder`."""
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), folder)
        else:
            self.client.log_artifact(self.run_id, str(path), folder)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


@dataclass(frozen=True)
class Receipt:
    """What a registering stage writes as its DVC out: which registry entry it created."""

    run_id: str
    model: str
    version: str
    alias: str | None
    tracking_uri: str

    def write(self, path: Path) -> None:
        from aligntok.fileio import atomic_write_text

        atomic_write_text(path, json.dumps(asdict(self), indent=2) + "\n")


def register_pyfunc(
    run: StageRun,
    *,
    model_name: str,
    code_path: Path,
    artifacts: dict[str, Path],
    tags: dict[str, str],
    alias: str | None,
) -> Receipt:
    """Log a pyfunc model "from code" (`code_path` calls `mlflow.models.set_model`) over
    the given artifact files, register it as a new version of `model_name`, tag it and
    point `alias` at it. Weights travel as files (safetensors); nothing is pickled."""
    import mlflow
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            path=str(local), python_model=str(code_path),
            artifacts={k: str(v) for k, v in artifacts.items()}, pip_requirements=[],
        )
        run.client.log_artifacts(run.run_id, str(local), "model")
    try:
        run.client.create_registered_model(model_name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    version = run.client.create_model_version(
        model_name, source=f"runs:/{run.run_id}/model", run_id=run.run_id, tags=tags,
    ).version
    if alias:
        run.client.set_registered_model_alias(model_name, alias, version)
    describe_version(model_name, str(version), run.client)
    log.info("registered %s version %s%s", model_name, version, f" as @{alias}" if alias else "")
    return Receipt(run_id=run.run_id, model=model_name, version=str(version), alias=alias,
                   tracking_uri=tracking_uri())


def download_model_files(uri: str, dest: Path | None = None) -> Path:
    """Fetch a registered model (`models:/name@alias`) and return its artifacts folder."""
    import mlflow

    target = dest or Path(tempfile.mkdtemp(prefix="aligntok-model-"))
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=uri, dst_path=str(target), tracking_uri=tracking_uri(), registry_uri=tracking_uri()))
    artifacts = local / "artifacts"
    if not artifacts.is_dir():
        shutil.rmtree(target, ignore_errors=True)
        raise FileNotFoundError(f"{uri}: no artifacts folder in the downloaded model")
    return artifacts


def not_in_store(exc: BaseException) -> bool:
    """Whether `exc` is MLflow's answer for a run or version its tracking store does not hold."""
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def metric_history(run_id: str) -> list[dict[str, float]] | None:
    """Every metric a run logged, one row per step: [{"step": s, "loss": ..., "l1": ...}, ...] (sorted by step);
    None when the tracking store has no such run (outputs restored by DVC from a run tracked elsewhere)."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client()
    rows: dict[int, dict[str, float]] = {}
    try:
        logged = mlflow_client.get_run(run_id).data.metrics
    except MlflowException as exc:
        if not not_in_store(exc):
            raise
        return None
    for key in sorted(logged):
        for point in mlflow_client.get_metric_history(run_id, key):
            rows.setdefault(int(point.step), {"step": float(point.step)})[key] = float(point.value)
    keys = sorted({k for row in rows.values() for k in row} - {"step"})
    return [{"step": int(row["step"]), **{k: row.get(k, "") for k in keys}} for _, row in sorted(rows.items())]


def tag_model_version(model: str, version: str, tags: dict[str, str]) -> None:
    """Set tags on a registered model version (the promotion step reads the `eval_*` ones) and rewrite its
    description, which shows its figures."""
    mlflow_client = client()
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(model, str(version), key, value)
    describe_version(model, str(version), mlflow_client)


def set_run_tags(run_id: str, tags: dict[str, str]) -> None:
    mlflow_client = client()
    for key, value in tags.items():
        mlflow_client.set_tag(run_id, key, value)


def describe_version(model: str, version: str, mlflow_client: Any = None) -> None:
    """Write the registry descriptions of `model` (if it has none) and of its `version` (from its tags now):
    what it is, its figures, how to load it, where it came from (aligntok.ops.model_card)."""
    mlflow_client = mlflow_client or client()
    if not mlflow_client.get_registered_model(model).description and model in MODEL_DESCRIPTIONS:
        mlflow_client.update_registered_model(model, description=MODEL_DESCRIPTIONS[model])
    found = mlflow_client.get_model_version(model, version)
    aliases = sorted(getattr(found, "aliases", None) or [])
    mlflow_client.update_model_version(model, version, description=version_description(model, found, aliases))


def model_version(model: str, *, alias: str | None = None, number: str | None = None) -> tuple[Any, Any]:
    """The registry version `model@alias` or `model/number`, and the MLflow run that logged it (or None).
    A name, alias or version the registry lacks raises `LineageError`."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client()
    ref = f"{model}@{alias}" if alias else f"{model}/{number}"
    try:
        version = (mlflow_client.get_model_version_by_alias(model, alias) if alias
                   else mlflow_client.get_model_version(model, str(number)))
    except MlflowException as exc:
        raise LineageError(f"{ref}: not in the registry at {tracking_uri()} ({str(exc).splitlines()[0]})") from None
    try:
        run = mlflow_client.get_run(version.run_id) if version.run_id else None
    except MlflowException:
        run = None
    return version, run

"""What a pipeline flow run needs besides orchestration (flows/pipeline.py holds only that).

- `select_stages`, `apply_preset`, `params_origin`: which stages, with which parameters;
- `repro_command`, `stream`, `stage_status`, `error_line`, `is_infrastructure`: running one DVC stage and
  reading what DVC said about it;
- `stage_receipts`, `stage_metrics`: the registry versions and key figures a stage left in its outputs;
- `summary_markdown`, `run_commit_message`: the run's summary artifact and the message of its run commit.
"""

from __future__ import annotations

import json
import subprocess
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aligntok.ops.dag import stage_order, stage_paths, upstream
from aligntok.errors import AligntokError

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

SNAPSHOT = "snapshot"
"""The always-run stage that fingerprints the data source: it 'runs' every time, and its result says whether
the source changed."""


class StageFailed(RuntimeError):
    """A stage exited non-zero; the message is its own error line."""

    def __init__(self, stage: str, code: int, error: str, infrastructure: bool) -> None:
        super().__init__(f"stage {stage} failed (exit {code}): {error}")
        self.stage, self.code, self.error, self.infrastructure = stage, code, error, infrastructure


class InfrastructureError(RuntimeError):
    """A server or lock the pipeline needs is unavailable (retried)."""


def is_infrastructure(output: str) -> bool:
    return any(sign in output for sign in INFRASTRUCTURE_SIGNS)


def error_line(output: str) -> str:
    """The line that says why a stage failed: aligntok's one-line error, else DVC's, else the last line."""
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines() if line.strip()]
    for marker in (": error: ", "Error: ", "ERROR: "):
        found = [line for line in lines if marker in line and "%|" not in line]
        if found:
            return found[-1]
    return lines[-1] if lines else "(no output)"


def repro_command(stage: str, force: bool) -> list[str]:
    return ["dvc", "repro", "--single-item", *(["--force"] if force else []), stage]


def stage_status(stage: str, output: str) -> str:
    """What DVC did with `stage`: `ran`, `restored` (from its run cache, not run) or `skipped` (up to date)."""
    if f"Stage '{stage}' is cached - skipping run" in output:
        return "restored"
    return "ran" if f"Running stage '{stage}'" in output else "skipped"


def stream(command: list[str], cwd: Path, env: dict[str, str], on_line: Callable[[str], None],
           keep: int = 400) -> tuple[int, str]:
    """Run `command`, handing each output line (a progress bar's last state, bars themselves skipped) to
    `on_line`; returns the exit code and the last `keep` lines."""
    tail: deque[str] = deque(maxlen=keep)
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as process:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.rstrip("\n").rsplit("\r", 1)[-1]
            tail.append(line)
            if line.strip() and "%|" not in line:
                on_line(line)
    return process.returncode, "\n".join(tail)


def select_stages(repo: Path, targets: list[str] | None) -> list[str]:
    order = stage_order(repo / "dvc.yaml")
    unknown = sorted(set(targets or []) - set(order))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; dvc.yaml has {order}")
    return order if not targets else upstream(repo / "dvc.yaml", targets)


def find_preset(preset: str, *folders: Path) -> Path:
    """`preset` as given if absolute, else the first of `folders` that holds it (the run's ref first)."""
    if Path(preset).is_absolute():
        return Path(preset)
    for folder in folders:
        if (folder / preset).is_file():
            return folder / preset
    raise AligntokError(f"preset {preset}: no such file in {' or '.join(str(f) for f in folders)}")


def apply_preset(repo: Path, preset: Path, origin: str) -> None:
    """Write `preset`'s resolved parameters to `repo`/params.yaml (a bad preset fails here, naming the key)."""
    from aligntok.config import load_params, params_yaml
    from aligntok.fileio import atomic_write_text

    atomic_write_text(repo / "params.yaml", params_yaml(load_params(preset), origin))


def params_origin(repo: Path) -> str:
    """Where params.yaml's values come from: the preset named in its header, or the committed file."""
    first = (repo / "params.yaml").read_text().splitlines()[:1]
    if first and first[0].startswith("# Written from "):
        return first[0].removeprefix("# Written from ").split(" ", 1)[0]
    changed = subprocess.run(["git", "status", "--porcelain", "params.yaml"], cwd=repo, capture_output=True,
                             text=True).stdout.strip()
    return "params.yaml (uncommitted changes)" if changed else "params.yaml"


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


def run_commit_message(header: dict[str, str], rows: list[dict[str, Any]]) -> str:
    """The run commit's message: a subject naming what ran, then the run's facts as trailers."""
    ran = [r["stage"] for r in rows if r["status"] == "ran" and r["stage"] != SNAPSHOT]
    subject = (f"aligntok run {header.get('flow run', '?')}: " +
               (f"{len(ran)} stage(s) ran ({', '.join(ran)})" if ran else "nothing changed"))
    versions = [v for r in rows for v in r.get("versions", [])]
    facts = {"Deployment": header.get("deployment"), "Ref": header.get("ref"), "Params": header.get("params"),
             "Source-Fingerprint": header.get("source fingerprint"), "MLflow-Parent-Run": header.get("mlflow parent run"),
             "Registered": ", ".join(versions) or None}
    return subject + "\n\n" + "\n".join(f"{k}: {v}" for k, v in facts.items() if v) + "\n"

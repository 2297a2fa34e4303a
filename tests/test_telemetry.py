"""Telemetry is off for `aligntok`, `python -m aligntok`, `flows/` and `dvc` run directly, not only under
`make` (whose exports the tests' conftest also sets, so each check here runs in a clean subprocess)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from aligntok.telemetry import TELEMETRY_OFF, disable_telemetry

from support.paths import REPO

SHOW_ENV = f"import json, os; print(json.dumps({{k: os.environ.get(k) for k in {sorted(TELEMETRY_OFF)!r}}}))"


def run_clean(code: str) -> str:
    """Run `python -c code` in the repo with none of the opt-out variables set; returns its last stdout line."""
    env = {k: v for k, v in os.environ.items() if k not in TELEMETRY_OFF and k != "DVC_TEST"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_the_cli_turns_telemetry_off_at_import() -> None:
    assert json.loads(run_clean("import aligntok.cli; " + SHOW_ENV)) == TELEMETRY_OFF


def test_the_package_alone_sets_nothing() -> None:
    """The library has no side effects at import; only the entry points set the environment."""
    assert set(json.loads(run_clean("import aligntok.config, aligntok.telemetry; " + SHOW_ENV)).values()) == {None}


def test_the_pipeline_flow_turns_telemetry_off_before_prefect_reads_it() -> None:
    code = ("import flows.pipeline, json, os; from prefect.settings import get_current_settings; "
            "print(json.dumps([get_current_settings().server.analytics_enabled, "
            f"{{k: os.environ.get(k) for k in {sorted(TELEMETRY_OFF)!r}}}]))")
    assert json.loads(run_clean(code)) == [False, TELEMETRY_OFF]


def test_dvc_run_by_hand_reads_analytics_off_from_the_repo() -> None:
    assert run_clean("from dvc.analytics import is_enabled; print(is_enabled())") == "False"
    result = subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics"], cwd=REPO,
                            env={k: v for k, v in os.environ.items() if k not in TELEMETRY_OFF},
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "false", result.stderr


def test_an_explicit_choice_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TELEMETRY_OFF:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")
    disable_telemetry()
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"
    assert {k: os.environ[k] for k in TELEMETRY_OFF if k != "MLFLOW_DISABLE_TELEMETRY"} == {
        k: v for k, v in TELEMETRY_OFF.items() if k != "MLFLOW_DISABLE_TELEMETRY"}


def test_makefile_exports_the_same_variables() -> None:
    exported = dict(re.findall(r"^export (\w+) := (\S+)$", (REPO / "Makefile").read_text(), flags=re.MULTILINE))
    assert {k: v for k, v in exported.items() if k in TELEMETRY_OFF or "ANALYTICS" in k or "TELEMETRY" in k
            or "TRACK" in k} == TELEMETRY_OFF

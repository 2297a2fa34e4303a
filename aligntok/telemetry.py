"""Usage telemetry off for every tool the pipeline touches (MLflow, Prefect, DVC, Great Expectations).

The library itself sets nothing at import; the entry points (`aligntok.cli`, `flows/*.py`) call
`disable_telemetry()` when they are imported, before any of those tools is, so `aligntok`, `python -m
aligntok` and `python flows/pipeline.py` send nothing whether or not they run under `make`. The
variables reach the `dvc` and `torchrun` subprocesses through the environment; `dvc` run by hand reads
`core.analytics = false` from `.dvc/config`.
"""

from __future__ import annotations

import os

TELEMETRY_OFF: dict[str, str] = {
    "DO_NOT_TRACK": "true",  # the cross-tool convention (consoledonottrack.com)
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
}
"""The opt-out variable of each tool and its "off" value (the Makefile exports the same)."""


def disable_telemetry() -> None:
    """Set each opt-out variable that the environment does not already set (an explicit choice wins)."""
    for name, value in TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)

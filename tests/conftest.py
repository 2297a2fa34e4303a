"""Pytest hooks and fixtures shared by every test: telemetry off, the `imagenet_sample` fixture, the gpu skip.

Shared helpers (paths, the tiny model, datasets, servers) live in `support/`, imported as `support.<module>`;
this folder is on sys.path through this file (pytest's default prepend import mode)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support.paths import IMAGENET_SAMPLE

for _name, _value in {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
}.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture
def imagenet_sample() -> Path:
    """The shared folder of real ImageNet photos; tests using it skip where it is absent."""
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"{IMAGENET_SAMPLE} not present")
    return IMAGENET_SAMPLE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

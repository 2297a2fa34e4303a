"""Paths the tests read: the checkout itself and the shared folder of real ImageNet photos beside it."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository root (tests/support/paths.py -> the checkout)."""
IMAGENET_SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample"

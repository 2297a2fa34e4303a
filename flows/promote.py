"""Prefect flows: gated promotion and rollback in the MLflow registry (the logic is `aligntok.ops.promote`).

The `promote` deployment of prefect.yaml runs `promote_version`; the pipeline flow calls it after `evaluate`
with `fail_on_refusal=False`, so that a refused candidate is a recorded outcome of the run, not a failure.

    python flows/promote.py aligntok-tokenizer @stage3 [--force] [--reason TEXT]
    python flows/promote.py aligntok-tokenizer --rollback
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

from aligntok.telemetry import disable_telemetry  # noqa: E402

disable_telemetry()

from prefect import flow, get_run_logger  # noqa: E402

from aligntok.config import load_params  # noqa: E402
from aligntok.ops.promote import PromotionRefused, promote, rollback  # noqa: E402


def _params_path(params: str) -> Path:
    path = Path(params)
    return path if path.is_absolute() else REPO / path


@flow(name="aligntok-promote")
def promote_version(model: str, version: str, force: bool = False, reason: str | None = None,
                    params: str = "params.yaml", fail_on_refusal: bool = True) -> dict[str, Any]:
    """Move `model`'s @champion to `version` (a number or @alias) if its metrics pass the gate of `params`.

    A refusal fails the flow run with the one-line reason unless `fail_on_refusal` is false; either way it is
    recorded on the version. Returns the decision."""
    logger = get_run_logger()
    rules = load_params(_params_path(params)).promote
    try:
        decision = promote(model, str(version), rules, force=force, reason=reason)
    except PromotionRefused as refused:
        logger.warning("%s", refused)
        if fail_on_refusal:
            raise
        return refused.decision.to_dict()
    logger.info("%s", decision.message)
    return decision.to_dict()


@flow(name="aligntok-rollback")
def rollback_champion(model: str, reason: str | None = None, params: str = "params.yaml") -> dict[str, Any]:
    """Swap `model`'s @champion and @previous."""
    decision = rollback(model, load_params(_params_path(params)).promote, reason=reason)
    get_run_logger().info("%s", decision.message)
    return decision.to_dict()


def main() -> int:
    parser = argparse.ArgumentParser(description="Gated promotion (or rollback) as a Prefect flow run.")
    parser.add_argument("model", help="registered model, e.g. aligntok-tokenizer")
    parser.add_argument("version", nargs="?", help="version number or @alias (not with --rollback)")
    parser.add_argument("--force", action="store_true", help="promote even if the gate refuses")
    parser.add_argument("--reason", help="recorded on the version with the decision")
    parser.add_argument("--rollback", action="store_true", help="swap @champion and @previous instead")
    parser.add_argument("--params", default="params.yaml", help="where the rules are (default: params.yaml)")
    args = parser.parse_args()
    if args.rollback:
        rollback_champion(args.model, reason=args.reason, params=args.params)
        return 0
    if not args.version:
        parser.error("VERSION is required unless --rollback")
    result = promote_version(args.model, args.version, force=args.force, reason=args.reason, params=args.params,
                             return_state=True)
    return 0 if result.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())

"""The pipeline's stage order, read from `dvc.yaml` (the single source of truth for the DAG)."""

from __future__ import annotations

from pathlib import Path

import yaml


def _paths(entries: list) -> list[str]:
    """DVC lists entries as plain strings or one-key mappings ({path: options})."""
    out = []
    for entry in entries or []:
        out.extend([entry] if isinstance(entry, str) else list(entry))
    return [p.rstrip("/") for p in out]


def _produces(out: str, dep: str) -> bool:
    return dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")


def stage_order(dvc_yaml: Path | str = "dvc.yaml") -> list[str]:
    """Stages in an order where every stage comes after the stages whose outs it depends on.

    Ties keep the order of `dvc.yaml`. Raises ValueError on a cycle.
    """
    stages = yaml.safe_load(Path(dvc_yaml).read_text())["stages"]
    outs = {name: _paths(s.get("outs")) + _paths(s.get("metrics")) for name, s in stages.items()}
    needs = {
        name: {other for other in stages if other != name
               for dep in _paths(s.get("deps")) for out in outs[other] if _produces(out, dep)}
        for name, s in stages.items()
    }
    order: list[str] = []
    while len(order) < len(stages):
        ready = [n for n in stages if n not in order and needs[n] <= set(order)]
        if not ready:
            raise ValueError(f"{dvc_yaml}: dependency cycle among {sorted(set(stages) - set(order))}")
        order.append(ready[0])
    return order

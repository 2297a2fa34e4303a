"""The one reader of `dvc.yaml` (the single source of truth for the DAG): stages, their order and paths."""

from __future__ import annotations

import re
from pathlib import Path

import yaml


TEMPLATE = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


def _paths(entries: list, values: dict | None = None) -> list[str]:
    """DVC lists entries as plain strings or one-key mappings ({path: options}); `${a.b}` is read from
    `values` (params.yaml), as DVC's templating does."""
    out = []
    for entry in entries or []:
        out.extend([entry] if isinstance(entry, str) else list(entry))
    return [TEMPLATE.sub(lambda m: str(_lookup(values or {}, m.group(1))), p).rstrip("/") for p in out]


def _lookup(values: dict, dotted: str) -> object:
    node: object = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "${" + dotted + "}"  # unresolved: matches nothing
        node = node[part]
    return node


def stages(dvc_yaml: Path | str = "dvc.yaml") -> dict[str, dict]:
    """The stage definitions of dvc.yaml, by name, as written (`${...}` unresolved)."""
    return yaml.safe_load(Path(dvc_yaml).read_text())["stages"]


def _load(dvc_yaml: Path | str) -> tuple[dict, dict]:
    """The stages of dvc.yaml and the params.yaml beside it (for `${...}`)."""
    path = Path(dvc_yaml)
    params_file = path.with_name("params.yaml")
    values = yaml.safe_load(params_file.read_text()) if params_file.is_file() else {}
    return stages(path), values or {}


def _needs(stages: dict, values: dict) -> dict[str, set[str]]:
    """For each stage, the stages whose outs it depends on."""
    outs = {name: _paths(s.get("outs"), values) + _paths(s.get("metrics"), values) for name, s in stages.items()}
    return {
        name: {other for other in stages if other != name
               for dep in _paths(s.get("deps"), values) for out in outs[other] if _produces(out, dep)}
        for name, s in stages.items()
    }


def _produces(out: str, dep: str) -> bool:
    return dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")


def stage_order(dvc_yaml: Path | str = "dvc.yaml") -> list[str]:
    """Stages in an order where every stage comes after the stages whose outs it depends on.

    Ties keep the order of `dvc.yaml`. Raises ValueError on a cycle.
    """
    stages, values = _load(dvc_yaml)
    needs = _needs(stages, values)
    order: list[str] = []
    while len(order) < len(stages):
        ready = [n for n in stages if n not in order and needs[n] <= set(order)]
        if not ready:
            raise ValueError(f"{dvc_yaml}: dependency cycle among {sorted(set(stages) - set(order))}")
        order.append(ready[0])
    return order


def upstream(dvc_yaml: Path | str, targets: list[str]) -> list[str]:
    """`targets` and every stage they depend on (directly or not), in `stage_order`."""
    stages, values = _load(dvc_yaml)
    unknown = sorted(set(targets) - set(stages))
    if unknown:
        raise ValueError(f"{dvc_yaml}: unknown stages {unknown}; it has {sorted(stages)}")
    needs = _needs(stages, values)
    needed, todo = set(), list(targets)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += sorted(needs[name])
    return [name for name in stage_order(dvc_yaml) if name in needed]


def stage_paths(dvc_yaml: Path | str, stage: str, key: str) -> list[str]:
    """The paths a stage lists under `key` (`deps`, `outs`, `metrics`, ...), `${...}` resolved."""
    stages, values = _load(dvc_yaml)
    return _paths(stages[stage].get(key), values)


def git_tracked_outputs(dvc_yaml: Path | str = "dvc.yaml") -> list[str]:
    """Outputs DVC does not cache (`cache: false`): metrics and plots that git versions instead."""
    found = []
    for stage in stages(dvc_yaml).values():
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key) or []:
                if isinstance(entry, dict):
                    found += [path.rstrip("/") for path, options in entry.items()
                              if (options or {}).get("cache") is False]
    return found

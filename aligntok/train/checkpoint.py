"""Checkpoints: one safetensors file (weights, optimiser moments, RNG) + a JSON sidecar.

Everything needed to resume bit-for-bit lives in the safetensors file, which is written
to a temporary name, fsynced and renamed (and the folder fsynced), so neither a crash nor a
power loss leaves a half-written checkpoint. Optimiser hyper-parameters (JSON-able) go in the
file's metadata; nothing is pickled. A checkpoint that cannot be read or does not fit the
model is reported as `CorruptCheckpointError` before anything is changed, so the caller can
move it aside and start over.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from aligntok.errors import AligntokError
from aligntok.fileio import atomic_save_safetensors, durable_write

log = logging.getLogger(__name__)

CORRUPT_SUFFIX = ".corrupt"
_TEMP = re.compile(r"^\..+\.tmp-\d+$")
"""Temporary names of `aligntok.fileio.atomic_write` (`.<name>.tmp-<pid>`)."""


class CorruptCheckpointError(AligntokError, RuntimeError):
    """A checkpoint file that cannot be read, or whose tensors do not fit the state it should restore."""


def optimizer_to_flat(prefix: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    """Split an optimiser state dict into tensors (`prefix.state.<idx>.<key>`) and JSON-able groups."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{prefix}.state.{index}.{key}"] = value
    return tensors, state["param_groups"]


def optimizer_from_flat(prefix: str, optimizer: torch.optim.Optimizer,
                        tensors: dict[str, torch.Tensor], groups: Any) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    head = f"{prefix}.state."
    for name, value in tensors.items():
        if name.startswith(head):
            index, key = name[len(head):].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


@dataclass
class TrainState:
    """What a checkpoint holds, by role: modules, optimisers, and where the loop stood."""

    step: int
    modules: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)


def save_checkpoint(path: Path, state: TrainState, sidecar: dict[str, Any]) -> None:
    """Write `path` (.safetensors) and `path.with_suffix('.json')`, each atomically."""
    tensors: dict[str, torch.Tensor] = {}
    for role, module in state.modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{role}.{key}"] = value
    groups: dict[str, Any] = {}
    for role, optimizer in state.optimizers.items():
        flat, groups[role] = optimizer_to_flat(f"optim.{role}", optimizer)
        tensors.update(flat)
    tensors["rng.torch"] = torch.get_rng_state()
    metadata = {"step": str(state.step), "optimizer_groups": json.dumps(groups)}
    atomic_save_safetensors(tensors, path, metadata)
    text = json.dumps({"step": state.step, **sidecar}, indent=2)
    durable_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(text))


def read_step(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return int(handle.metadata()["step"])


def _read_checked(path: Path, state: TrainState) -> tuple[dict[str, torch.Tensor], dict[str, str], Any]:
    """Read `path` and check it against `state` (roles, keys, shapes, optimiser groups); changes nothing."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    tensors = load_file(str(path))
    int(metadata["step"])
    groups = json.loads(metadata["optimizer_groups"])
    if "rng.torch" not in tensors:
        raise KeyError("rng.torch")
    for role, module in state.modules.items():
        head = f"{role}."
        stored = {k[len(head):]: v.shape for k, v in tensors.items() if k.startswith(head)}
        expected = {k: v.shape for k, v in module.state_dict().items()}
        if stored != expected:
            wrong = sorted(set(stored) ^ set(expected)) or sorted(k for k in stored if stored[k] != expected[k])
            raise ValueError(f"role {role!r} does not fit the model: {wrong[:3]}")
    for role, optimizer in state.optimizers.items():
        sizes = [len(g["params"]) for g in groups[role]]
        if sizes != [len(g["params"]) for g in optimizer.param_groups]:
            raise ValueError(f"optimiser {role!r} has parameter groups of sizes {sizes}")
    return tensors, metadata, groups


def load_checkpoint(path: Path, state: TrainState) -> int:
    """Restore modules, optimisers and the torch RNG from `path`; returns the step it holds.

    Raises `CorruptCheckpointError` (with `state` untouched) when the file cannot be read or does not fit."""
    try:
        tensors, metadata, groups = _read_checked(path, state)
    except MemoryError:  # the machine's problem, not the file's
        raise
    except Exception as exc:  # safetensors, JSON, a missing key, a wrong shape: all mean "unusable"
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CorruptCheckpointError(f"{path}: unusable checkpoint ({type(exc).__name__}: {reason})") from None
    for role, module in state.modules.items():
        head = f"{role}."
        module.load_state_dict({k[len(head):]: v for k, v in tensors.items() if k.startswith(head)})
    for role, optimizer in state.optimizers.items():
        optimizer_from_flat(f"optim.{role}", optimizer, tensors, groups[role])
    torch.set_rng_state(tensors["rng.torch"])
    state.step = int(metadata["step"])
    return state.step


def move_aside(path: Path) -> Path:
    """Rename a checkpoint and its sidecar to `<name>.corrupt` (kept for inspection); returns the new path."""
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    os.replace(path, target)
    sidecar = path.with_suffix(".json")
    if sidecar.exists():
        os.replace(sidecar, sidecar.with_name(sidecar.name + CORRUPT_SUFFIX))
    return target


STALE = "stale"
"""Sub-folder of a stage's checkpoint folder where checkpoints of other fingerprints are set aside."""


def set_aside(paths: list[Path], stale: Path) -> list[Path]:
    """Move the entries of one fingerprint (`<key>.*`) into `stale/`, under `<key>-N.*` for the first N whose
    names are all free when some are taken there: nothing set aside earlier is overwritten, and a checkpoint
    keeps its sidecar's number. Returns the new paths."""
    key = paths[0].name.partition(".")[0]
    stale.mkdir(exist_ok=True)
    tag, n = key, 0
    while any((stale / (tag + p.name[len(key):])).exists() for p in paths):
        n += 1
        tag = f"{key}-{n}"
    moved = []
    for path in paths:
        moved.append(stale / (tag + path.name[len(key):]))
        os.replace(path, moved[-1])
    return moved


def clean_checkpoint_folder(checkpoint: Path) -> list[str]:
    """Tidy a stage's checkpoint folder for `checkpoint`: checkpoints, sidecars and snapshot folders of other
    fingerprints (their inputs, params or code changed) and their moved-aside files go to `stale/` (kept, not
    deleted: they may be a long run's progress; under `<fingerprint>-N.*` when the name is taken there), and
    temporary files of interrupted writes are removed. Says so in one line.
    Returns the names it moved or removed."""
    folder, key = checkpoint.parent, checkpoint.stem
    if not folder.is_dir():
        return []
    keep = {checkpoint.name, checkpoint.with_suffix(".json").name}
    others: dict[str, list[Path]] = {}
    moved, removed = [], []
    for path in sorted(folder.iterdir()):
        if path.name in keep or path.name == STALE or path.name.startswith(f"{key}."):
            continue
        if path.is_file() and _TEMP.match(path.name):
            path.unlink()
            removed.append(path.name)
        elif (path.is_file() and path.suffix in (".safetensors", ".json", CORRUPT_SUFFIX)) or \
                (path.is_dir() and path.suffix == ".snapshots"):  # the DiT's kept snapshots of that fingerprint
            others.setdefault(path.name.partition(".")[0], []).append(path)
            moved.append(path.name)
    for paths in others.values():
        set_aside(paths, folder / STALE)
    if moved:
        log.warning("%s: set %d checkpoint files of other fingerprints (their params, inputs or code differ) "
                    "aside in %s: %s; delete them once they are not needed", folder, len(moved), folder / STALE,
                    ", ".join(moved))
    if removed:
        log.info("%s: removed %d temporary files of interrupted writes: %s", folder, len(removed), ", ".join(removed))
    return moved + removed


RETRAIN_ENV = "ALIGNTOK_RETRAIN"
"""Set to 1 to retrain a resumable stage from step 0 (the pipeline flow sets it for a forced stage): its
checkpoint is set aside in `stale/` (`set_aside_for_retraining`) instead of resumed from, and `cache_latents`
re-encodes every shard. Unset (or 0): resume."""


def retrain_requested() -> bool:
    """Whether `RETRAIN_ENV` asks for a retrain from step 0; a value other than 1, 0 or empty fails, naming it."""
    value = os.environ.get(RETRAIN_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise AligntokError(f"{RETRAIN_ENV}={value!r}: set it to 1 to retrain from step 0, or 0 (or unset it) "
                            "to resume from the checkpoint")
    return value == "1"


def set_aside_for_retraining(checkpoint: Path, stage: str) -> list[Path]:
    """Move `checkpoint`, its sidecar and every other entry named `<fingerprint>.*` (moved-aside `.corrupt` files,
    the DiT's snapshot folder) into `stale/`, kept, not deleted; under `<fingerprint>-N.*` when an earlier retrain
    left those names there. Says where in one warning line; returns the new paths (none without a checkpoint)."""
    folder, key = checkpoint.parent, checkpoint.stem
    ours = sorted(p for p in folder.iterdir() if p.name.startswith(f"{key}.")) if folder.is_dir() else []
    if not ours:
        return []
    try:
        step = f"step {read_step(checkpoint)}" if checkpoint.is_file() else "no usable checkpoint"
    except Exception:  # unreadable: it goes aside all the same
        step = "an unreadable checkpoint"
    stale = folder / STALE
    moved = set_aside(ours, stale)
    log.warning("%s: %s=1, retraining from step 0: set the earlier run (%s) aside in %s: %s", stage, RETRAIN_ENV,
                step, stale, ", ".join(p.name for p in moved))
    return moved


def module_weights(path: Path, role: str) -> dict[str, torch.Tensor]:
    """The state dict of one role (e.g. 'model' or 'ema') from a checkpoint file."""
    head = f"{role}."
    return {k[len(head):]: v for k, v in load_file(str(path)).items() if k.startswith(head)}

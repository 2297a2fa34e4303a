"""Checkpoints: one safetensors file (weights, optimiser moments, RNG) + a JSON sidecar.

Everything needed to resume bit-for-bit lives in the safetensors file, which is written
to a temporary name and renamed, so a crash never leaves a half-written checkpoint.
Optimiser hyper-parameters (JSON-able) go in the file's metadata; nothing is pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from aligntok.fileio import atomic_write, atomic_write_text


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=metadata))


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
    atomic_write_text(path.with_suffix(".json"), json.dumps({"step": state.step, **sidecar}, indent=2))


def read_step(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return int(handle.metadata()["step"])


def load_checkpoint(path: Path, state: TrainState) -> int:
    """Restore modules, optimisers and the torch RNG from `path`; returns the step it holds."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    for role, module in state.modules.items():
        head = f"{role}."
        module.load_state_dict({k[len(head):]: v for k, v in tensors.items() if k.startswith(head)})
    groups = json.loads(metadata["optimizer_groups"])
    for role, optimizer in state.optimizers.items():
        optimizer_from_flat(f"optim.{role}", optimizer, tensors, groups[role])
    torch.set_rng_state(tensors["rng.torch"])
    state.step = int(metadata["step"])
    return state.step


def module_weights(path: Path, role: str) -> dict[str, torch.Tensor]:
    """The state dict of one role (e.g. 'model' or 'ema') from a checkpoint file."""
    head = f"{role}."
    return {k[len(head):]: v for k, v in load_file(str(path)).items() if k.startswith(head)}

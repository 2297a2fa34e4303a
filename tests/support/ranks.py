"""Run a function as N ranks of a real gloo process group on the CPU, as torchrun would start them."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """`fn(*args)` in `world_size` fresh processes with torchrun's variables set (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR/PORT) and one torch thread each; returns each rank's return value, by rank.
    `fn` must be a module-level function (the processes are spawned, not forked); a failing rank fails the call."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="ranks-") as folder:
        mp.spawn(_rank, args=(world_size, free_port(), fn, args, folder), nprocs=world_size, join=True)
        return [pickle.loads((Path(folder) / f"{rank}.pkl").read_bytes()) for rank in range(world_size)]


def _rank(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, folder: str) -> None:
    import torch

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    result = fn(*args)
    (Path(folder) / f"{rank}.pkl").write_bytes(pickle.dumps(result))

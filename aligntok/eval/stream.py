"""Batches evaluated across the ranks and streamed, in batch order, into sinks on rank 0.

`aligntok.distributed.map_batches` gathers every batch's outputs once, at the end, so rank 0 holds all of
them at once (and, under several ranks, a padded copy of each rank's share). Here the batches run in rounds of
W (batch i on rank i mod W, as there); after each round rank 0 receives the round's outputs, in batch order,
and hands each output to its sink: a `FeatureAccumulator` (FID statistics in one D x D matrix, whatever N) or
`Rows` (per-image scores, features a probe needs whole, the uint8 images of a grid). Rank 0 therefore sees
the rows one process would, in the same order, and holds only what its sinks keep.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import torch

from aligntok.distributed import Placement


class Sink(Protocol):
    def add(self, batch: torch.Tensor) -> None:
        """Take the next rows (B, ...) in batch order; B may be 0."""


class Rows:
    """A sink that keeps every row it is given: `tensor` (N, ...) in batch order."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []

    def add(self, batch: torch.Tensor) -> None:
        self.parts.append(batch)

    @property
    def tensor(self) -> torch.Tensor:
        if not self.parts:
            raise ValueError("Rows: no batch was added")
        return torch.cat(self.parts)


def stream_batches(compute: Callable[[int], dict[str, torch.Tensor]], sinks: Mapping[str, Sink], count: int,
                   place: Placement, desc: str = "", progress: bool = True,
                   rows: Callable[[int], int] | None = None) -> None:
    """Run `compute(i)` -> {name: (b_i, ...) CPU tensor} for batches i < `count`, batch i on rank i mod W, and
    feed each name's rows to `sinks[name]` on rank 0 in batch order (the other ranks' sinks stay empty).
    Every rank must call it with the same `count` (each round is a collective). `rows(i)`: batch i's size,
    for the progress bar (images of all ranks, with rate and ETA)."""
    from tqdm import tqdm

    world = place.world_size
    total = sum(rows(i) for i in range(count)) if rows is not None else count
    with tqdm(total=total, desc=desc, unit="img" if rows is not None else "batch", leave=False,
              disable=not (progress and place.is_main and desc)) as bar:
        for start in range(0, count, world):
            in_round = min(world, count - start)
            out = compute(start + place.rank) if place.rank < in_round else None
            for name, sink in sinks.items():
                mine = [out[name]] if out is not None else []
                gathered = place.gather_batches(mine, in_round)  # (rows of the round's batches, ...) on rank 0
                if place.is_main and gathered is not None:
                    sink.add(gathered)
            bar.update(sum(rows(i) for i in range(start, start + in_round)) if rows is not None else in_round)

"""Placement and process groups: where a stage runs (`runtime.device`), with how many processes, and how
they agree (`runtime.nproc_per_node`, `runtime.collective_timeout_s`).

Every stage that runs torch asks `placed(runtime)` for a `Placement` and does everything through it:

- the device: `auto` is `cuda:LOCAL_RANK` where CUDA exists, else the CPU; `cuda` without a visible GPU
  fails before any work (`check_device`, one line); on CUDA, TF32 matmuls and convolutions are on;
- the process group: NCCL on CUDA, gloo on the CPU, created from torchrun's variables (`RANK`,
  `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`) when `WORLD_SIZE` > 1 by the first stage of the process, and
  kept until the process exits (a second rendezvous on the same port could reach a peer's closing store);
- precision: bf16 autocast on CUDA (`runtime.autocast: auto`), parameters and optimiser state in float32;
- data: `to_device` moves a CPU batch (pinned, non-blocking on CUDA). Random draws stay on the CPU
  generators of `aligntok.data.loader.step_generator`, so a step's global batch is a pure function of
  (seed, step) at any world size, and each rank takes `rank_slice` of it;
- collectives that keep N ranks equal to one process: `mean` of a gradient (the adaptive GAN weight),
  `mean_floats` of the logged losses, `gather_batches` of per-batch results in batch order (evaluation:
  batch i runs on rank i mod W, `my_batches`).

With one process every collective is the identity, so the same code is the single-process path.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from aligntok.errors import AligntokError

if TYPE_CHECKING:
    from aligntok.config import RuntimeConfig

log = logging.getLogger(__name__)

NPROC_ENV = "ALIGNTOK_NPROC_PER_NODE"
"""Overrides `runtime.nproc_per_node` for one launch (`auto` or a number), as torchrun's own
`PET_NPROC_PER_NODE` does: the Kubernetes work pool sets it so that a pod uses all of its GPUs whatever the
params say. It changes how many processes run, never what a stage computes, so DVC need not see it."""


class DeviceError(AligntokError, RuntimeError):
    """The placement `runtime:` asks for does not exist on this machine."""


class DistInfo(NamedTuple):
    rank: int
    world_size: int
    local_rank: int


def dist_info() -> DistInfo:
    """This process's place under torchrun: the process group if one is initialised, else the
    `RANK` / `WORLD_SIZE` / `LOCAL_RANK` variables torchrun sets (0, 1, 0 without them)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank)
    return DistInfo(int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1), local_rank)


def is_launched_rank() -> bool:
    """True inside a process that a launcher (torchrun, our own re-launch, a PyTorchJob) started as one rank."""
    return "WORLD_SIZE" in os.environ


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_nproc(cfg: RuntimeConfig) -> int:
    """Processes per node: `$ALIGNTOK_NPROC_PER_NODE` if set, else `runtime.nproc_per_node`; `auto` = the
    visible GPUs (1 without any)."""
    value: int | str = os.environ.get(NPROC_ENV) or cfg.nproc_per_node
    where = NPROC_ENV if os.environ.get(NPROC_ENV) else "runtime.nproc_per_node"
    if value == "auto":
        return max(1, visible_gpus())
    try:
        count = int(value)
    except ValueError:
        raise DeviceError(f"{where}: {value!r} is neither 'auto' nor a number of processes") from None
    if count < 1:
        raise DeviceError(f"{where}: {count} processes; at least 1")
    return count


def resolve_device(cfg: RuntimeConfig, local_rank: int = 0) -> torch.device:
    """`runtime.device` for the process of `local_rank`: auto -> cuda:LOCAL_RANK where CUDA exists, else cpu."""
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    gpus = visible_gpus()
    if gpus == 0:
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = f"CUDA_VISIBLE_DEVICES={hidden!r}" if hidden is not None else f"torch {torch.__version__} sees none"
        raise DeviceError(f"runtime.device: 'cuda', but this machine has no usable CUDA device ({why}); "
                          "use runtime.device: auto or cpu")
    if local_rank >= gpus:
        raise DeviceError(f"runtime.device: local rank {local_rank} has no GPU of its own: {gpus} visible "
                          f"(run at most {gpus} processes per node)")
    return torch.device("cuda", local_rank)


def check_device(cfg: RuntimeConfig, nproc: int | None = None) -> torch.device:
    """Fail before any work when the placement cannot exist: CUDA asked for where there is none, or more
    processes per node than GPUs on CUDA. Returns the device of local rank 0."""
    device = resolve_device(cfg, int(os.environ.get("LOCAL_RANK", "0") or 0))
    if device.type == "cuda" and nproc is not None and nproc > visible_gpus():
        raise DeviceError(f"runtime.nproc_per_node: {nproc} processes on CUDA, but {visible_gpus()} GPUs are visible")
    return device


@dataclass(frozen=True)
class Placement:
    """Where this process runs and who its peers are. `Placement()` is one process on the CPU."""

    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    autocast_dtype: torch.dtype | None = None
    """bf16 where `runtime.autocast` turns it on (CUDA under `auto`), else None (float32)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def _collective_device(self) -> torch.device:
        """NCCL moves CUDA tensors only; gloo moves CPU tensors."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # ------------------------------------------------------------------------------------------ placement
    def to_device(self, value: Any) -> Any:
        """A CPU batch (a tensor, or tuples/lists/dicts/dataclasses of them) on this device; on CUDA the
        copy is pinned and non-blocking. Other values pass through."""
        if isinstance(value, torch.Tensor):
            if self.device.type != "cuda" or value.device == self.device:
                return value.to(self.device)
            source = value.pin_memory() if value.device.type == "cpu" else value
            return source.to(self.device, non_blocking=True)
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
            return type(value)(*(self.to_device(v) for v in value))
        if isinstance(value, (tuple, list)):
            return type(value)(self.to_device(v) for v in value)
        if isinstance(value, dict):
            return {k: self.to_device(v) for k, v in value.items()}
        if is_dataclass(value) and not isinstance(value, type):
            return replace(value, **{f.name: self.to_device(getattr(value, f.name)) for f in fields(value)})
        return value

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast on this device when `autocast_dtype` is set, else a no-op."""
        from aligntok.runtime import autocast_for

        return autocast_for(self.autocast_dtype, self.device)

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` in DistributedDataParallel when there are several ranks (gradients averaged in the
        backward), else `module` itself. Its trainable parameters must be set (`requires_grad`) first."""
        if not self.distributed or not any(p.requires_grad for p in module.parameters()):
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    # ---------------------------------------------------------------------------------------- the batch
    def check_split(self, batch_size: int, key: str = "the global batch") -> None:
        """Refuse a global batch that does not split evenly over the ranks, naming its params `key`."""
        if batch_size % self.world_size:
            raise AligntokError(f"{key}: {batch_size} does not split over {self.world_size} processes "
                                "(runtime.nproc_per_node x nodes)")

    def rank_slice(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of `batch_size` (which must split evenly)."""
        self.check_split(batch_size)
        part = batch_size // self.world_size
        return slice(self.rank * part, (self.rank + 1) * part)

    def my_batches(self, count: int) -> range:
        """The batches of `count` that this rank evaluates: i with i mod W == rank."""
        return range(self.rank, count, self.world_size)

    # -------------------------------------------------------------------------------------- collectives
    def barrier(self) -> None:
        if self.distributed:
            if self.device.type == "cuda":
                torch.distributed.barrier(device_ids=[self.device.index])
            else:
                torch.distributed.barrier()

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over the ranks (a new tensor; `tensor` itself with one process)."""
        if not self.distributed:
            return tensor
        total = tensor.detach().to(self._collective_device, copy=True)
        torch.distributed.all_reduce(total)
        return (total / self.world_size).to(tensor.device)

    def mean_floats(self, values: dict[str, float]) -> dict[str, float]:
        """Each float averaged over the ranks (every rank must pass the same keys, in the same order)."""
        if not self.distributed or not values:
            return values
        reduced = self.mean(torch.tensor(list(values.values()), dtype=torch.float64))
        return dict(zip(values, reduced.tolist()))

    def broadcast_int(self, value: int) -> int:
        """Rank 0's `value`, on every rank."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self._collective_device)
        torch.distributed.broadcast(tensor, src=0)
        return int(tensor.item())

    def gather_batches(self, mine: Sequence[torch.Tensor], count: int) -> torch.Tensor | None:
        """Per-batch results (b_i, ...) of the batches `my_batches(count)` gives this rank, in that order ->
        on rank 0 all `count` of them concatenated in batch order (other ranks: None). Batches may differ in
        rows (the last one); the trailing shape and dtype must be the same everywhere."""
        if len(mine) != len(self.my_batches(count)):
            raise ValueError(f"rank {self.rank}: {len(mine)} results for {len(self.my_batches(count))} batches")
        if not self.distributed:
            return torch.cat(list(mine)) if mine else None
        device = self._collective_device
        local = torch.cat(list(mine)) if mine else None
        # shapes first (rows per batch, trailing shape, dtype), so that every rank can pad to the largest
        rows = [int(t.shape[0]) for t in mine]
        meta: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(meta, (rows, None if local is None else (tuple(local.shape[1:]),
                                                                                   local.dtype)))
        trailing, dtype = next(m[1] for m in meta if m[1] is not None)
        longest = max(sum(m[0]) for m in meta)
        padded = torch.zeros((longest, *trailing), dtype=dtype, device=device)
        if local is not None:
            padded[: local.shape[0]] = local.to(device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, padded)
        if not self.is_main:
            return None
        by_batch: dict[int, torch.Tensor] = {}
        for rank, (part, (counts, _)) in enumerate(zip(parts, meta)):
            start = 0
            for index, n in zip(range(rank, count, self.world_size), counts):
                by_batch[index] = part[start:start + n].cpu()
                start += n
        return torch.cat([by_batch[i] for i in range(count)])


@contextlib.contextmanager
def placed(cfg: RuntimeConfig) -> Iterator[Placement]:
    """This process's `Placement` for one stage: device set, process group joined (when launched as one
    of several ranks), and on success a barrier before the stage returns, so no rank leaves while rank 0
    still writes. The process group is created by the first call and reused by later stages of the same
    process; it is destroyed when the process exits. Destroying it after each stage would race: rank 1 could
    start the next rendezvous on MASTER_PORT while rank 0's store of the last one is still closing, and
    its connection would then be cut ("Failed to recv, got 0 bytes")."""
    from aligntok.runtime import autocast_dtype

    info = dist_info()
    device = resolve_device(cfg, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for float32 matmuls and convolutions
        torch.backends.cudnn.allow_tf32 = True
    if info.world_size > 1 and not torch.distributed.is_initialized():
        if not torch.distributed.is_available():
            raise DeviceError(f"WORLD_SIZE={info.world_size}, but this torch build has no torch.distributed")
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.collective_timeout_s),
                                             **({"device_id": device} if device.type == "cuda" else {}))
        atexit.register(_destroy_process_group)
        log.info("rank %d/%d joined the %s process group on %s", info.rank, info.world_size, backend, device)
    place = Placement(device=device, rank=dist_info().rank, world_size=dist_info().world_size,
                      local_rank=info.local_rank, autocast_dtype=autocast_dtype(cfg, device))
    yield place  # on an exception the group is left to end with the process: the peers see it go only after
    place.barrier()  # this rank has recorded its error (`aligntok.launch`), so the launcher reports the cause


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def map_batches(compute: Callable[[int], dict[str, torch.Tensor]], names: Sequence[str], count: int,
                place: Placement, desc: str = "", progress: bool = True,
                rows: Callable[[int], int] | None = None) -> dict[str, torch.Tensor] | None:
    """Evaluate `count` batches across the ranks: `compute(i)` -> {name: (b_i, ...) CPU tensor} runs for the
    batches i of `place.my_batches(count)`; rank 0 gets each of `names` concatenated in batch order, so the
    result is the one-process result whatever the world size (other ranks: None). `rows(i)`: batch i's
    size, for the progress bar (rank 0's batches)."""
    from tqdm import tqdm

    mine = place.my_batches(count)
    results: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    total = sum(rows(i) for i in mine) if rows is not None else None
    with tqdm(total=total, desc=desc, unit="img" if rows is not None else "batch", leave=False,
              disable=not (progress and place.is_main and desc)) as bar:
        for index in mine:
            out = compute(index)
            for name in names:
                results[name].append(out[name])
            bar.update(rows(index) if rows is not None else 1)
    gathered = {name: place.gather_batches(results[name], count) for name in names}
    return gathered if place.is_main else None

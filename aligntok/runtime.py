"""Fast paths: how a stage runs, not what it computes (params.yaml `runtime:`, `RuntimeConfig`).

Each switch was kept on by default only where `benchmarks/` measured a gain on the 2-core CPU the
embedded default targets (figures in docs/performance.md and reports/):

- `threads`: torch's intra-op threads per process. The default divides the usable cores by the
  processes of this machine's torchrun group (`LOCAL_WORLD_SIZE`), so N ranks never oversubscribe.
- `channels_last`: the convolutional networks (decoder, VAE encoder, discriminator, perceptual network,
  the FID Inception) run on NHWC tensors, which oneDNN convolves without reordering.
- `compile`: `torch.compile` of the DiT's training forward; when compilation is unavailable (no C++
  compiler, an unsupported op) the stage warns once and continues in eager mode.
- `autocast`: bf16 autocast where bf16 is fast (CUDA); this CPU has no bf16 units, so `auto` leaves
  it off here.
- `decode_threads`: a batch's images are decoded by a small thread pool (Pillow releases the GIL).
- `prefetch`: batches prepared ahead of the training step by a background thread.

`record_resources` appends what one stage process cost (wall and CPU seconds, peak RSS) to the file
named by `ALIGNTOK_RESOURCE_LOG`; `make run` sets it and `benchmarks/stage_resources.py` tabulates it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from aligntok.config import RuntimeConfig

log = logging.getLogger(__name__)

RESOURCE_LOG_ENV = "ALIGNTOK_RESOURCE_LOG"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """Usable cores divided among this machine's torchrun processes (at least 1)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, usable_cores() // max(local, 1))


def configure_threads(cfg: RuntimeConfig) -> int:
    """Set torch's intra-op threads from `runtime.threads` (None: `default_threads`); returns the count."""
    threads = cfg.threads or default_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def channels_last(enabled: bool, *modules: nn.Module | None) -> None:
    """Move the 4-D weights of `modules` to NHWC in place when `enabled` (None entries are skipped)."""
    if enabled:
        for module in modules:
            if module is not None:
                module.to(memory_format=torch.channels_last)


def nhwc(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    """A (B, C, H, W) tensor in NHWC memory order when `enabled` (same values, same shape)."""
    return x.contiguous(memory_format=torch.channels_last) if enabled and x.ndim == 4 else x


class CompiledOrEager:
    """Calls `torch.compile(module)`, and falls back to `module` itself for good when compiling fails.

    Compilation happens at the first call, so that is where a missing compiler shows; the failure is
    logged once as a warning (with its first line) and the call is repeated in eager mode. The module's
    parameters are shared, so optimisers, EMA and checkpoints see one set of weights either way.
    """

    def __init__(self, module: nn.Module, name: str, enabled: bool = True) -> None:
        self.module, self.name = module, name
        self.compiled: Callable[..., Any] | None = None
        self.eager_reason: str | None = None if enabled else "runtime.compile is off"
        if enabled:
            try:
                self.compiled = torch.compile(module)
            except Exception as exc:  # noqa: BLE001 - any failure means: run eagerly
                self._fall_back(exc)

    def _fall_back(self, exc: BaseException) -> None:
        cause = getattr(exc, "inner_exception", None) or exc  # BackendCompilerFailed wraps the compiler's error
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300]
        log.warning("%s: torch.compile is unavailable (%s: %s); continuing in eager mode",
                    self.name, type(cause).__name__, first)
        self.compiled, self.eager_reason = None, f"{type(cause).__name__}: {first}"

    @property
    def is_compiled(self) -> bool:
        return self.compiled is not None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - compile errors surface at the first call
                if not _is_compile_failure(exc):
                    raise
                self._fall_back(exc)
        return self.module(*args, **kwargs)


def _is_compile_failure(exc: BaseException) -> bool:
    """An error raised by dynamo/inductor while compiling, as opposed to one of the model itself."""
    try:
        from torch._dynamo.exc import BackendCompilerFailed, TorchRuntimeError, Unsupported
    except ImportError:  # pragma: no cover - torch without dynamo
        return False
    compile_errors: tuple[type[BaseException], ...] = (BackendCompilerFailed, Unsupported)
    if isinstance(exc, compile_errors):
        return True
    # a C++ toolchain problem reaches us as a plain error from torch._inductor's codecache
    return not isinstance(exc, TorchRuntimeError) and "torch._inductor" in _traceback_modules(exc)


def _traceback_modules(exc: BaseException) -> str:
    tb, names = exc.__traceback__, []
    while tb is not None:
        names.append(tb.tb_frame.f_globals.get("__name__", ""))
        tb = tb.tb_next
    return " ".join(names)


def autocast_dtype(cfg: RuntimeConfig, device: torch.device) -> torch.dtype | None:
    """bf16 when `runtime.autocast` asks for it (`auto`: on CUDA only), else None (float32)."""
    if cfg.autocast == "off" or (cfg.autocast == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def autocast(cfg: RuntimeConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast context of `autocast_dtype`, or a no-op."""
    return autocast_for(autocast_dtype(cfg, device), device)


def autocast_for(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast to `dtype` on `device`'s type, or a no-op for None (`aligntok.distributed.Placement.autocast`)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


class Prefetcher:
    """`batches(step)` for the coming steps, prepared `depth` steps ahead by one background thread.

    `batches` must be a pure function of the step (the training loop's contract), so prefetching changes
    only when a batch is built, never which batch a step sees. `depth` 0 calls it inline.
    """

    def __init__(self, batches: Callable[[int], Any], depth: int) -> None:
        self.batches, self.depth = batches, depth
        self.pending: dict[int, Any] = {}
        self.pool = None
        if depth > 0:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aligntok-prefetch")

    def __call__(self, step: int, last: int) -> Any:
        """The batch of `step`; queues steps up to min(step + depth, last - 1)."""
        if self.pool is None:
            return self.batches(step)
        for ahead in range(step, min(step + self.depth, last - 1) + 1):
            if ahead not in self.pending:
                self.pending[ahead] = self.pool.submit(self.batches, ahead)
        return self.pending.pop(step).result()

    def close(self) -> None:
        if self.pool is not None:
            for future in self.pending.values():
                future.cancel()
            self.pool.shutdown(wait=True)
            self.pending.clear()


# --------------------------------------------------------------------------------------------- resources
def _process_start_time() -> float | None:
    """Wall-clock time this process started (Linux /proc), so interpreter and import time count too."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + int(fields[19]) / ticks  # field 22 of stat: starttime
    except (OSError, ValueError, IndexError):
        return None


_STARTED = _process_start_time() or time.time()


def resource_record(command: str, exit_code: int) -> dict[str, Any]:
    """What this process cost so far: wall and CPU seconds (its children included) and peak RSS in MB."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    scale = 1024 if sys.platform != "darwin" else 1  # ru_maxrss: KiB on Linux, bytes on macOS
    return {
        "command": command, "exit_code": exit_code, "started": round(_STARTED, 3), "ended": round(time.time(), 3),
        "wall_seconds": round(time.time() - _STARTED, 2),
        "user_seconds": round(own.ru_utime + children.ru_utime, 2),
        "system_seconds": round(own.ru_stime + children.ru_stime, 2),
        "peak_rss_mb": round(own.ru_maxrss * scale / 2**20, 1),
        "children_peak_rss_mb": round(children.ru_maxrss * scale / 2**20, 1),
        "threads": torch.get_num_threads(), "rank": int(os.environ.get("RANK", "0") or 0),
    }


def record_resources(command: str, exit_code: int) -> Path | None:
    """Append `resource_record` as one JSON line to `$ALIGNTOK_RESOURCE_LOG`, when that is set."""
    target = os.environ.get(RESOURCE_LOG_ENV)
    if not target:
        return None
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:  # one short line per process: appends from ranks do not interleave
        handle.write(json.dumps(resource_record(command, exit_code)) + "\n")
    return path

"""Launching a stage on several processes: the same command, alone or as N ranks.

`aligntok <stage> ...` with `runtime.nproc_per_node` > 1 (or `auto` on a GPU box) re-launches itself as N
local ranks with torch's elastic launcher, the engine of `torchrun --standalone` (`relaunch`), so that
`dvc repro` on an 8-GPU box uses all eight with the commands `dvc.yaml` already has. Under an outer
launcher (`torchrun`, a PyTorchJob), `WORLD_SIZE` is set and the command runs as the rank it was given.

Errors: a rank that fails writes its own one-line error to `$ALIGNTOK_ERROR_DIR/rank-<R>.json` (and, under
torchrun, to torchelastic's error file, which torchrun prints as the root cause). The launcher ends the
job with the line of the rank that failed first with an error of its own, not with the "connection closed"
its peers then see in their collectives.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

ERROR_DIR_ENV = "ALIGNTOK_ERROR_DIR"


def record_rank_error(command: str, exc: BaseException, peer: bool = False) -> None:
    """What a failing rank leaves for its launcher: the one-line error, with the rank and the time. `peer`: the
    error only says that another rank went away (a collective lost its peer)."""
    from aligntok.errors import AligntokError, one_line

    if isinstance(exc, KeyboardInterrupt):
        message = "interrupted"
    elif isinstance(exc, (AligntokError, FileNotFoundError)):  # bad input: its line says it all
        message = one_line(exc)
    else:  # a bug: its type too (the rank printed the traceback)
        message = f"{type(exc).__name__}: {one_line(exc)}"
    rank = int(os.environ.get("RANK", "0") or 0)
    folder = os.environ.get(ERROR_DIR_ENV)
    if folder and Path(folder).is_dir():
        record = {"rank": rank, "time": time.time(), "command": command, "error": message,
                  "type": type(exc).__name__, "peer": peer}
        (Path(folder) / f"rank-{rank}.json").write_text(json.dumps(record))
    if os.environ.get("TORCHELASTIC_ERROR_FILE") and not isinstance(exc, KeyboardInterrupt):
        try:  # torchrun prints this file as the failure's root cause
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

            ErrorHandler().record_exception(exc)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - reporting must never mask the error itself
            pass


def first_failure(folder: Path) -> dict | None:
    """The error record of the rank that failed first, if any rank wrote one; a rank that only lost its peer
    counts after every rank with an error of its own (its peer may close the connection before it records)."""
    records = []
    for path in sorted(Path(folder).glob("rank-*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return min(records, key=lambda r: (bool(r.get("peer")), r["time"])) if records else None


def relaunch(argv: list[str], nproc: int, command: str) -> int:
    """Run `python -m aligntok <argv>` as `nproc` local ranks (torchrun --standalone); returns the exit code.

    Output of the ranks goes to this process's stdout/stderr as it comes. When a rank fails, the others are
    stopped and this prints `aligntok <command>: error: rank R: <its error line>`."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for noisy in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)  # its lines repeat what the ranks and we say
    errors = Path(tempfile.mkdtemp(prefix="aligntok-ranks-"))
    os.environ[ERROR_DIR_ENV] = str(errors)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"aligntok-{uuid.uuid4().hex[:12]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)
    log.info("%s: launching %d processes (runtime.nproc_per_node)", command, nproc)
    try:
        elastic_launch(config, sys.executable)("-m", "aligntok", *argv)
        return 0
    except ChildFailedError as exc:
        first = first_failure(errors)
        if first is not None:
            print(f"aligntok {command}: error: rank {first['rank']}: {first['error']}", file=sys.stderr)
        else:  # killed by a signal, or died before it could say why
            rank, failure = exc.get_first_failure()
            print(f"aligntok {command}: error: rank {rank} exited with code {failure.exitcode} "
                  f"({failure.signal_name() if failure.exitcode < 0 else 'no error recorded'})", file=sys.stderr)
        return 1
    finally:
        os.environ.pop(ERROR_DIR_ENV, None)
        shutil.rmtree(errors, ignore_errors=True)

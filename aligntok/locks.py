"""The project's one file lock: an flock on a file that names its holder.

    with file_lock(folder / ".ingest.lock", holder=f"pid {os.getpid()}", what="this ingest folder"):
        ...  # nobody else holds it here

- The lock is an `fcntl.flock` on `path`; once taken, the file holds `holder` (one line, e.g. pid, host and
  run), so whoever finds the lock taken can say who has it (`LockBusy.holder`).
- `timeout` 0 fails at once with `LockBusy`; > 0 polls every `poll` seconds until the deadline, calling
  `on_wait(holder)` once, when it first has to wait, and raises `LockBusy` when the deadline passes.
- The kernel drops an flock with its process, so a lock file left by a process that died holds no lock: it is
  taken over, and `on_take_over(text it held)` is called (default: a warning naming that text).
- On release the file is removed while the flock is still held, so no one can be between open and flock;
  a waiter that had opened the removed file notices (it is no longer the file at `path`) and opens again.
- The file is opened with O_NOFOLLOW and O_CLOEXEC: a link planted at `path` is never followed (`LockError`),
  and child processes do not inherit the lock.

flock locks belong to an open file, not to a process: two `file_lock`s on one path exclude each other in one
process too (threads), and the lock is not re-entrant. They hold between processes on one host, or hosts
whose file system shares flocks (a local disk does; NFS and other network file systems may not).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from aligntok.errors import AligntokError

log = logging.getLogger(__name__)

UNKNOWN_HOLDER = "unknown"
"""`LockBusy.holder` when the lock file names no one (its holder has not written its name yet)."""
_HOLDER_CHARS = 200


class LockError(AligntokError):
    """A lock file that cannot be opened: a missing folder, no permission, a link planted at its path."""


class LockBusy(LockError):
    """Someone else holds the lock (past `timeout`, when one was given).

    `path`: the lock file; `holder`: the text found in it (one line, or `UNKNOWN_HOLDER`); `what`: what the lock
    guards, as the caller named it; `timeout`: the seconds waited (0: did not wait)."""

    def __init__(self, path: Path, holder: str, what: str, timeout: float) -> None:
        waited = f"; gave up after waiting {timeout:g} s" if timeout > 0 else ""
        super().__init__(f"{path}: {what} is held by another process ({holder}){waited}")
        self.path, self.holder, self.what, self.timeout = path, holder, what, timeout


@contextmanager
def file_lock(path: Path, *, holder: str, what: str, timeout: float = 0, poll: float = 0.2,
              on_wait: Callable[[str], None] | None = None,
              on_take_over: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the flock on `path` (created if missing; its folder must exist) while the body runs.

    `holder`: who we are, written into the file (one line). `what`: what the lock guards, for messages ("the
    checkout", "promotions of m"). `timeout`: seconds to wait for another holder, 0 to fail at once. Raises
    `LockBusy` when another holder keeps it, `LockError` when the file cannot be opened."""
    path = Path(path)
    fd = _acquire(path, what, timeout, poll, on_wait)
    try:
        if previous := _read_holder(fd):  # released locks are removed: this one's holder died holding it
            (on_take_over or (lambda text: _warn_take_over(path, text)))(previous)
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, " ".join(holder.split()).encode("utf-8", "replace"))
    except BaseException:
        _release(path, fd)
        raise
    try:
        yield
    finally:
        _release(path, fd)


def _acquire(path: Path, what: str, timeout: float, poll: float, on_wait: Callable[[str], None] | None) -> int:
    """An open descriptor of the file at `path`, flocked; waits up to `timeout` s for another holder."""
    deadline, waiting = time.monotonic() + timeout, False
    while True:
        fd = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _read_holder(fd) or UNKNOWN_HOLDER
            os.close(fd)
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockBusy(path, other, what, timeout) from None
            if not waiting and on_wait is not None:
                on_wait(other)
            waiting = True
            time.sleep(min(poll, left))
            continue
        except OSError as exc:  # e.g. a file system without flocks
            os.close(fd)
            raise LockError(f"{path}: cannot lock the lock file ({exc.strerror or exc})") from None
        except BaseException:
            os.close(fd)
            raise
        if _is_at(fd, path):
            return fd
        os.close(fd)  # its holder released (removed) it between our open and flock: open the new one


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise LockError(f"{path}: cannot open the lock file ({exc.strerror or exc})") from None


def _read_holder(fd: int) -> str:
    """The holder the file names, as one line of at most `_HOLDER_CHARS` characters ('' when empty)."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = " ".join(os.read(fd, 4 * _HOLDER_CHARS).decode("utf-8", "replace").split())
    return text if len(text) <= _HOLDER_CHARS else text[: _HOLDER_CHARS - 3] + "..."


def _is_at(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is (still) the file at `path`."""
    try:
        on_disk = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _release(path: Path, fd: int) -> None:
    try:
        if _is_at(fd, path):  # (someone may have removed ours, and another taken a new one)
            path.unlink(missing_ok=True)  # still holding the flock, so no one can be between open and flock
    finally:
        os.close(fd)


def _warn_take_over(path: Path, previous: str) -> None:
    log.warning("%s: taking over the lock of %s, which no longer holds it", path, previous)

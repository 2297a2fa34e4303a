"""`aligntok.locks.file_lock`: fail at once or wait, the holder named, a dead holder's file taken over, no links."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from aligntok.errors import AligntokError
from aligntok.locks import LockBusy, LockError, file_lock


def hold_in_thread(path: Path, holder: str) -> tuple[threading.Event, threading.Thread]:
    """Hold the lock on a thread (a second open file: flock excludes it) until the returned event is set."""
    held, release = threading.Event(), threading.Event()

    def run() -> None:
        with file_lock(path, holder=holder, what="the thing"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=run)
    thread.start()
    assert held.wait(10)
    return release, thread


def test_a_held_lock_fails_at_once_naming_path_and_holder(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    release, thread = hold_in_thread(path, "pid 1 on box,\nflow run first")
    start = time.monotonic()
    with pytest.raises(LockBusy) as busy:
        with file_lock(path, holder="second", what="the thing"):
            pass
    assert time.monotonic() - start < 0.5
    assert isinstance(busy.value, AligntokError)
    assert str(busy.value) == f"{path}: the thing is held by another process (pid 1 on box, flow run first)"
    assert (busy.value.path, busy.value.holder, busy.value.timeout) == (path, "pid 1 on box, flow run first", 0)
    release.set()
    thread.join()
    assert not path.exists()  # removed on release
    with file_lock(path, holder="third", what="the thing"):
        assert path.read_text() == "third"


def test_a_waiter_is_told_once_then_gives_up_at_the_deadline(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    release, thread = hold_in_thread(path, "first")
    told: list[str] = []
    start = time.monotonic()
    with pytest.raises(LockBusy, match=r"held by another process \(first\); gave up after waiting 0.5 s"):
        with file_lock(path, holder="second", what="the thing", timeout=0.5, poll=0.05, on_wait=told.append):
            pass
    assert 0.5 <= time.monotonic() - start < 2
    assert told == ["first"]
    release.set()
    thread.join()


def test_a_waiter_takes_the_lock_when_it_is_released(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    release, thread = hold_in_thread(path, "first")
    told: list[str] = []
    threading.Timer(0.3, release.set).start()
    with file_lock(path, holder="second", what="the thing", timeout=10, poll=0.05, on_wait=told.append):
        assert path.read_text() == "second"
    assert told == ["first"]
    thread.join()


def test_the_lock_excludes_another_process(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    child = textwrap.dedent(f"""
        import sys, time
        from aligntok.locks import file_lock
        with file_lock({str(path)!r}, holder="pid child", what="the thing"):
            print("held", flush=True)
            sys.stdin.readline()
    """)
    process = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        with pytest.raises(LockBusy, match=r"\(pid child\)"):
            with file_lock(path, holder="me", what="the thing"):
                pass
    finally:
        process.communicate("go\n", timeout=10)
    with file_lock(path, holder="me", what="the thing"):
        pass


def test_a_dead_holders_file_is_taken_over_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "x.lock"
    path.write_text("pid 999999 on gone\n")  # what a killed holder leaves: no flock, its name still inside
    with caplog.at_level(logging.WARNING, logger="aligntok.locks"):
        with file_lock(path, holder="me", what="the thing"):
            assert path.read_text() == "me"
    assert f"{path}: taking over the lock of pid 999999 on gone" in caplog.text
    seen: list[str] = []
    path.write_text("old")
    with file_lock(path, holder="me", what="the thing", on_take_over=seen.append):
        pass
    assert seen == ["old"]


def test_a_link_planted_at_the_lock_path_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me\n")
    path = tmp_path / "x.lock"
    path.symlink_to(tmp_path / "precious.txt")
    with pytest.raises(LockError, match=r"x.lock: cannot open the lock file"):
        with file_lock(path, holder="me", what="the thing"):
            pass
    assert (tmp_path / "precious.txt").read_text() == "keep me\n"
    with pytest.raises(LockError, match=r"cannot open the lock file \(No such file or directory\)"):
        with file_lock(tmp_path / "missing" / "x.lock", holder="me", what="the thing"):
            pass


def test_the_body_raising_releases_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    with pytest.raises(ZeroDivisionError):
        with file_lock(path, holder="me", what="the thing"):
            1 / 0
    assert not path.exists()
    with file_lock(path, holder="again", what="the thing"):
        assert os.path.exists(path)

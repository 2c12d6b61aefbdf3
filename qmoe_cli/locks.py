"""Exclusive locks that the OS releases when their holder dies: one writer per output directory,
one builder per native extension.

`fcntl.flock` locks belong to an open file description, so a process killed with SIGKILL drops
its locks with its file descriptors: nothing can go stale, and no pid has to be guessed alive
or dead. The descriptor is not inherited by child processes (Python's default), so a compiler
left running by a killed build does not keep its lock. The lock file holds its owner's pid and
command, for the message a refused process prints; the owner removes it on release, so a
finished run leaves nothing behind (a killed one leaves an unlocked file that the next run reuses).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import QmoeError


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its lock file says (pid None: it has not written it yet)."""

    pid: int | None
    command: str

    def describe(self) -> str:
        return f"{self.command} (pid {self.pid})" if self.pid else self.command


def try_lock(path: Path, command: str) -> int | Holder:
    """Take the lock `path` (created if needed) without waiting: our descriptor, which holds it
    until `release`; or the current holder when another process has it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            return holder
        # The previous holder may have removed the file between our open and our flock: then we
        # hold a lock nobody else can see, and must lock the file that is there now.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": command}).encode(), 0)
            except BaseException:
                os.close(fd)
                raise
            return fd
        os.close(fd)


def release(path: Path, fd: int) -> None:
    """Remove the lock file and drop the lock (in this order: see `try_lock`)."""
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _read_holder(fd: int) -> Holder:
    # The holder writes its pid right after locking: give it a moment.
    for _ in range(20):
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            info = None
        if isinstance(info, dict) and isinstance(info.get("pid"), int):
            return Holder(info["pid"], str(info.get("command", "qmoe")))
        time.sleep(0.01)
    return Holder(None, "qmoe process")


def output_lock_path(directory: Path) -> Path:
    """The lock file of output `directory`: `.NAME.lock` beside it (and its `.NAME.partial`)."""
    return directory.with_name(f".{directory.name}.lock")


@contextmanager
def output_lock(directory: Path, command: str) -> Iterator[None]:
    """Be the only qmoe process writing `directory` (and its partial run) while inside.

    QmoeError "another qmoe compress (pid N) is writing D" when another process is; creates
    `directory`'s parent if needed (as writing the output would).
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    path = output_lock_path(directory)
    got = try_lock(path, command)
    if isinstance(got, Holder):
        raise QmoeError(f"{directory}: another {got.describe()} is writing {directory}; wait for it to finish "
                        "or stop it")
    try:
        yield
    finally:
        release(path, got)


@contextmanager
def waiting_lock(path: Path, command: str, timeout_s: float, waiting: str) -> Iterator[None]:
    """Hold the lock `path` while inside, waiting up to `timeout_s` for another holder.

    `waiting` is printed (once, on stderr, with the holder) if we have to wait; QmoeError naming
    the lock and its holder after `timeout_s` seconds.
    """
    deadline = time.monotonic() + timeout_s
    said = False
    while True:
        got = try_lock(path, command)
        if not isinstance(got, Holder):
            break
        if time.monotonic() >= deadline:
            raise QmoeError(f"timed out after {timeout_s:g} s waiting for the lock {path}, held by "
                            f"{got.describe()}; if that process is stuck, stop it and rerun")
        if not said:
            print(f"{waiting} (held by {got.describe()}, lock {path})", file=sys.stderr, flush=True)
            said = True
        time.sleep(0.2)
    try:
        yield
    finally:
        release(path, got)

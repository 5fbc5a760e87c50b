"""One run per run folder: an advisory lock held for as long as a run writes there.

Two runs of the same config (or the same ``train.run_name``) would otherwise interleave their
metrics.jsonl rows and overwrite each other's checkpoints. The lock is ``flock`` on
``<run folder>/.lock``: the kernel drops it when the process dies, so a crashed run never
leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from trainers.errors import SmallshotError

LOCK_NAME = ".lock"


class RunFolderBusy(SmallshotError):
    """Another process is running in this run folder."""


@contextlib.contextmanager
def flock(path: Path, *, wait: bool = True) -> Iterator[int]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) and yield its descriptor.
    ``wait=False`` raises BlockingIOError at once when another process holds it. The kernel
    releases the lock when the descriptor closes or its process dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock, or raise RunFolderBusy naming the process that holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    with contextlib.ExitStack() as held:
        try:
            fd = held.enter_context(flock(path, wait=False))
        except BlockingIOError:
            raise RunFolderBusy(f"run folder {run_dir} is in use by another run "
                                f"({_holder(path)}); wait for it to end, or set "
                                f"train.run_name=... to run beside it") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "since": time.time()}).encode())
        yield


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        since = time.strftime("%H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"

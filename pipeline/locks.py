"""Advisory file locks (``flock``) for writers that share a store directory without talking to each other.

A lock is held by an open file description, so the kernel releases it when its holder dies (``kill -9``, OOM,
a lost node on NFS once the server notices): a claim of a dead process is recovered simply by taking the lock.
Two locks on the same path conflict within one process too (each :class:`FileLock` opens its own description).
On NFS, Linux emulates ``flock`` with byte-range locks, which the server arbitrates across machines; Lustre needs
its ``flock`` mount option.

The holder writes who it is into the lock file, so that a writer that finds the lock taken can say by whom.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path


class FileLock:
    """An exclusive lock on ``path`` (created if absent; never deleted, since deleting a lock file races)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, blocking: bool = True, record: bool = True) -> bool:
        """Take the lock; returns False when ``blocking`` is off and another holder has it. ``record``: write
        who holds it into the file (off for a mere probe, which must not overwrite the last holder's name)."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        self._fd = fd
        if not record:
            return True
        try:  # who holds it, for the message of whoever finds it taken; best effort (the disk may be full)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode(), 0)
        except OSError:
            pass
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def holder(self) -> str:
        """Who holds (or last held) the lock, in words."""
        for _ in range(20):  # the holder writes its name just after taking the lock: a reader can land in between
            try:
                info = json.loads(self.path.read_text() or "{}")
            except (OSError, ValueError):
                info = {}
            if info:
                return f"pid {info.get('pid')} on {info.get('host')}"
            time.sleep(0.025)
        return "another process"

    def is_free(self) -> bool:
        """True when nobody holds the lock right now (probes by taking and releasing it)."""
        if self._fd is not None:
            return False
        if not self.acquire(blocking=False, record=False):
            return False
        self.release()
        return True

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # a lock must never outlive its owner object
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

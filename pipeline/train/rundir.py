"""The run directory of `pipeline train`: one writer at a time, every write failing with one line that names the
file, and the temporary files of dead writers removed.

A run directory has exactly one writer (its rank 0 holds ``.train.lock``, an ``flock`` that dies with its holder,
like the store's shard claims), so a second `pipeline train` into the same ``--out`` is refused naming the holder
instead of appending a second copy of every step to ``metrics.jsonl``. Since nothing else writes the directory
while the lock is held, every temporary file found in it then belongs to a dead writer and is removed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.locks import FileLock
from pipeline.store import TMP_PREFIX, disk_usage, io_error_message
from pipeline.store import as_os_error as store_os_error

LOCK_FILE = ".train.lock"
OLD_SUFFIX = ".old"  # final.old/: the previous weights while the new ones are moved in
RESUME = "re-run the same `pipeline train` command (it resumes from the last complete checkpoint)"
# Below this much free space a failed torch.save is a full disk: torch reports it without errno ("unexpected pos")
FULL_BELOW_BYTES = 1 << 20


class TrainError(RuntimeError):
    """A run that cannot start or go on as asked; the message says why and what to do."""


def claim(run_dir: Path) -> FileLock:
    """Take the run directory's writer lock, or raise TrainError naming who holds it."""
    lock = FileLock(run_dir / LOCK_FILE)
    with writing(run_dir / LOCK_FILE, "taking the run directory's lock"):
        taken = lock.acquire(blocking=False)
    if not taken:
        raise TrainError(f"{run_dir} is being written by another `pipeline train` ({lock.holder()}); wait for it "
                         "to finish (re-running the same command then resumes or reports the finished run), or use "
                         "another --out")  # fmt: skip
    return lock


def clean_leftovers(run_dir: Path) -> list[str]:
    """Remove what dead writers left (the caller holds the lock): ``*.tmp-*`` files and directories and ``*.old``
    directories. Returns them as ``name (N bytes)``."""
    removed = []
    for p in sorted(run_dir.iterdir()) if run_dir.is_dir() else []:
        if TMP_PREFIX in p.name or p.name.endswith(OLD_SUFFIX):
            size = disk_usage(p)
            with writing(p, "removing a dead writer's temporary file"):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            removed.append(f"{p.name} ({size:,} bytes)")
    return removed


def write_json(path: Path, obj: object) -> None:
    """``path`` replaced atomically by ``obj`` as JSON: a failed write leaves the previous file (or none)."""
    tmp = path.with_name(f".{path.name}{TMP_PREFIX}{os.getpid()}")
    try:
        with writing(path, f"writing {path.name}"):
            tmp.write_text(json.dumps(obj, indent=2, default=str))
            os.replace(tmp, path)
    finally:
        _unlink_quietly(tmp)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # a read-only file system: there is nothing to remove
        pass


def as_os_error(e: BaseException, path: Path) -> OSError | None:
    """The OSError behind a failed write (:func:`pipeline.store.as_os_error`), also where torch's zip writer
    reports it without one ("unexpected pos", "PytorchStreamWriter failed"): a full disk when the file system has
    (almost) no space left; None for anything that is not a failed write."""
    text = str(e)
    if isinstance(e, RuntimeError) and any(t in text for t in ("PytorchStreamWriter", "unexpected pos",
                                                               "inline_container")):  # fmt: skip
        if _free_bytes(path) < FULL_BELOW_BYTES:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return OSError(0, f"torch could not write it ({text.splitlines()[0].strip()})")
    return store_os_error(e)


def _free_bytes(path: Path) -> int:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return 1 << 62
    return st.f_bavail * st.f_frsize


@contextmanager
def writing(path: Path, what: str, then: str = RESUME) -> Iterator[None]:
    """Turns a failed write (a full disk, a quota, a read-only or failing device) into a TrainError naming the
    file, what was being written and what to do."""
    try:
        yield
    except TrainError:
        raise
    except Exception as e:
        err = as_os_error(e, path)
        if err is None:
            raise
        raise TrainError(io_error_message(err, path, what, then)) from e

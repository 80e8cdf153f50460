"""Locks, and the temporary files of dead writers and shards set aside as corrupt."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from pipeline.locks import FileLock
from pipeline.store.format import CORRUPT_PREFIX, LOCKS_DIR, SHARDS_DIR, TMP_PREFIX


def store_lock(root: str | os.PathLike) -> FileLock:
    """Held while store.arrow / target/ are published and while verify records its result."""
    return FileLock(Path(root) / LOCKS_DIR / "store.lock")


def _shard_lock(root: Path, name: str) -> FileLock:
    return FileLock(root / LOCKS_DIR / f"{name}.lock")


_TMP_SHARD = re.compile(re.escape(TMP_PREFIX) + r"(shard-\d+)-")


def clean_leftovers(root: Path) -> list[str]:
    """Remove the temporary files of dead writers; returns their names. The caller holds ``store.lock``, so every
    top-level temporary file is a dead one; a shard's temporary directory is dead when its shard lock is free."""
    removed = []
    for p in sorted(root.glob(f"{TMP_PREFIX}*")):
        _remove(p)
        removed.append(p.name)
    for p in sorted((root / SHARDS_DIR).glob(f"{TMP_PREFIX}*")):
        m = _TMP_SHARD.match(p.name)
        if not m:
            continue
        lock = _shard_lock(root, m.group(1))
        if lock.acquire(blocking=False, record=False):
            try:
                _remove(p)
                removed.append(f"{SHARDS_DIR}/{p.name}")
            finally:
                lock.release()
    return removed


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def find_leftovers(root: str | os.PathLike) -> list[dict]:
    """Temporary files (with whether a live writer owns them) and shards set aside as corrupt, with their sizes."""
    root = Path(root)

    def state(lock: FileLock | None) -> str:
        try:
            return "dead" if lock is None or lock.is_free() else "in use"
        except OSError:  # a read-only store: no lock can be taken to find out
            return "unknown"

    out = []
    for p in sorted(root.glob(f"{TMP_PREFIX}*")):
        out.append((p, state(store_lock(root))))
    for p in sorted((root / SHARDS_DIR).glob(f"{TMP_PREFIX}*")):
        m = _TMP_SHARD.match(p.name)
        out.append((p, state(_shard_lock(root, m.group(1)) if m else None)))
    for p in sorted([*root.glob(f"{CORRUPT_PREFIX}*"), *(root / SHARDS_DIR).glob(f"{CORRUPT_PREFIX}*")]):
        out.append((p, "set aside"))
    return [{"path": str(p.relative_to(root)), "bytes": disk_usage(p), "state": state} for p, state in out]


def describe_leftover(item: dict) -> str:
    what = {"dead": "left by a dead writer; the next `pipeline extract` into this store removes it",
            "in use": "being written by a live process",
            "unknown": "cannot tell whether a live process writes it (the store is not writable here)",
            "set aside": "damaged data set aside when it was redone (see its PROBLEMS.txt); delete it once inspected"}[item["state"]]
    return f"{item['path']} ({item['bytes']:,} bytes): {what}"


def disk_usage(p: Path) -> int:
    """Bytes a file or directory takes on disk (0 when it is gone meanwhile)."""
    try:
        if p.is_dir():
            return sum(q.stat().st_blocks * 512 for q in p.rglob("*") if q.is_file())
        return p.stat().st_blocks * 512
    except OSError:
        return 0

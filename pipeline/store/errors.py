"""Store errors, and the one clean-error path for failed writes (disk full, quota, read-only, failing device)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class StoreError(RuntimeError):
    """A store that cannot be written or read as asked; the message names the file and field."""


_IO_HINTS = {
    errno.ENOSPC: "free space on that file system",
    errno.EDQUOT: "free space or raise the disk quota",
    errno.EROFS: "the file system is read-only: use a writable --out",
    errno.EACCES: "check the permissions",
    errno.EPERM: "check the permissions",
    errno.EIO: "the device reported an I/O error: check it",
}


RERUN = "re-run the same command (committed work is kept, unfinished work is redone)"


def io_error_message(e: OSError, path: str | os.PathLike, what: str, then: str = RERUN) -> str:
    """One line for a failed write: the file, what was being done, the cause, and what to do. A temporary file
    (``.tmp-*``) is not named: the file being written is (the temporary never outlives the failure)."""
    from pipeline.store.format import TMP_PREFIX

    where = e.filename if e.filename and TMP_PREFIX not in str(e.filename) else path
    hint = _IO_HINTS.get(e.errno or 0, "check the file system")
    return f"{where}: {what} failed: {e.strerror or e}; {hint}, then {then}"


# How libraries spell a full disk when they report it without an errno (safetensors' Rust io::Error, messages)
_FULL_DISK_TEXT = ("StorageFull", "code: 28", "os error 28", "Errno 28", "No space left on device")


def as_os_error(e: BaseException) -> OSError | None:
    """The OSError behind a failed write, also where a library reports it as its own error (safetensors) or
    without an errno; None for anything else (a bug keeps its traceback)."""
    if isinstance(e, OSError) and e.errno:
        return e
    text = str(e)
    if any(t in text for t in _FULL_DISK_TEXT):  # a full disk, however it is spelled
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), getattr(e, "filename", None))
    if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
        return OSError(0, text.splitlines()[0] if text else type(e).__name__, getattr(e, "filename", None))
    return None


@contextmanager
def _writing(path: Path, what: str, then: str = RERUN) -> Iterator[None]:
    """Turns a failed write (disk full, quota, read-only or failing device) into a StoreError naming the file."""
    try:
        yield
    except StoreError:
        raise
    except Exception as e:
        err = as_os_error(e)
        if err is None:
            raise
        raise StoreError(io_error_message(err, path, what, then)) from e

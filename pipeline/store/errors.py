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
    """One line for a failed write: the file, what was being done, the cause, and what to do."""
    where = e.filename or path
    hint = _IO_HINTS.get(e.errno or 0, "check the file system")
    return f"{where}: {what} failed: {e.strerror or e}; {hint}, then {then}"


@contextmanager
def _writing(path: Path, what: str, then: str = RERUN) -> Iterator[None]:
    """Turns a failed write (disk full, quota, read-only or failing device) into a StoreError naming the file."""
    from safetensors import SafetensorError

    try:
        yield
    except StoreError:
        raise
    except OSError as e:
        raise StoreError(io_error_message(e, path, what, then)) from e
    except SafetensorError as e:  # safetensors reports I/O failures as its own error, without a path
        code = errno.ENOSPC if "StorageFull" in str(e) or "code: 28" in str(e) else None
        err = OSError(code, os.strerror(code)) if code else OSError(0, str(e))
        raise StoreError(io_error_message(err, path, what, then)) from e

"""``pipeline verify``: re-hash everything, and record the verdict."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

import pyarrow as pa

from pipeline.store.errors import StoreError, _writing
from pipeline.store.format import (
    EDITED_FINGERPRINT,
    SHARDS_DIR,
    STORE_FILE,
    TMP_PREFIX,
    VERIFY_FILE,
    _shard_number,
    _write_arrow,
    array_shapes,
    fingerprint_digest,
    load_store_meta,
    missing_fingerprint_fields,
    shard_name,
)
from pipeline.store.integrity import check_target, open_shard
from pipeline.store.leftovers import store_lock
from pipeline.store.projection import PROJECTION_FILE, load_projection


def verify_store(root: str | os.PathLike, write_result: bool = True) -> list[str]:
    """Re-hash every committed file (shards and target/) and check the store's structure. Returns the problems
    (empty = ok); ``write_result`` records them in verify.arrow (see :func:`record_verify`)."""
    root = Path(root)
    meta = load_store_meta(root)
    fp = meta["fingerprint"]
    problems: list[str] = []
    if fingerprint_digest(fp) != meta["fingerprint_digest"]:
        problems.append(f"{STORE_FILE}: {EDITED_FINGERPRINT}")
    missing = missing_fingerprint_fields(fp)
    if missing:
        problems.append(f"{STORE_FILE}: fingerprint incomplete, missing {', '.join(missing)}")
    problems += check_target(root, meta["format_version"], full=True)[1]
    for name, record in (fp.get("projection") or {}).items():
        try:
            load_projection(root, record, name)
        except ValueError as e:
            problems.append(f"{PROJECTION_FILE}: {str(e).split(': ', 1)[-1]}")
    try:
        fields = array_shapes(fp)
    except (KeyError, TypeError) as e:
        problems.append(f"{STORE_FILE}: the fingerprint does not describe the arrays ({e})")
        fields = None
    seen = set()
    for path in sorted((root / SHARDS_DIR).glob("shard-*")) if fields is not None else []:
        try:
            seen.add(_shard_number(path))
        except StoreError:
            problems.append(f"{path.name}: unexpected directory in {SHARDS_DIR}/")
            continue
        problems += [f"{path.name}: {p}" for p in open_shard(path, meta["fingerprint_digest"], fields, full=True, plan=meta["plan"])[1]]
    for m in sorted(set(range(meta["plan"]["shards"])) - seen):
        problems.append(f"{shard_name(m)}: not committed (store incomplete)")
    if write_result:
        record_verify(root, problems)
    return problems


def record_verify(root: str | os.PathLike, problems: list[str]) -> None:
    """Write verify.arrow (ok, checked_at, problems) atomically under store.lock; a failed write leaves nothing
    behind and raises StoreError naming the cause."""
    root = Path(root)
    table = pa.table({"ok": [not problems], "checked_at": [time.time()], "problems": [json.dumps(problems)]})
    tmp = root / f"{TMP_PREFIX}{VERIFY_FILE}-{socket.gethostname()}-{os.getpid()}"
    try:
        with _writing(root / VERIFY_FILE, "recording the verify result", "run `pipeline verify` again"), store_lock(root):
            _write_arrow(tmp, table)
            os.replace(tmp, root / VERIFY_FILE)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only file system (EROFS even for a file that was never created)
            pass


def bad_shards_of(problems: list[str]) -> set[int]:
    """Shard numbers named by verify problems (``shard-NNNNN: ...``)."""
    return {int(m.group(1)) for p in problems if (m := re.match(r"shard-(\d+):", p))}

"""Commit records and the checks run on them: what opening, reading and `verify` compare against."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.store.dtypes import storage_dtype
from pipeline.store.errors import StoreError
from pipeline.store.format import (
    COMMIT_FILE,
    COMMIT_SCHEMA,
    INDEX_FILE,
    STORE_FILE,
    TARGET_DIR,
    TENSORS_DIR,
    _fsync_dir,
    _meta_json,
    _read_arrow,
    _shard_number,
    _write_arrow,
    chunk_key,
    sha256_file,
)


def _write_commit_record(directory: Path, meta: dict, files: list[Path] | None = None) -> None:
    """fsync and sha256 every file of ``directory``, then write its commit.arrow and fsync it and the directories."""
    files = files if files is not None else sorted(p for p in directory.rglob("*") if p.is_file())
    rows = [{"path": p.relative_to(directory).as_posix(), "bytes": p.stat().st_size, "sha256": h}
            for p, h in zip(files, _sync_and_hash(files), strict=True)]  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=COMMIT_SCHEMA).replace_schema_metadata(
        {"pipeline": json.dumps(meta, sort_keys=True)})
    _write_arrow(directory / COMMIT_FILE, table)
    with open(directory / COMMIT_FILE, "rb") as f:
        os.fsync(f.fileno())
    for d in sorted({p.parent for p in files} | {directory}, key=lambda q: -len(q.parts)):
        _fsync_dir(d)


def _sync_and_hash(files: list[Path]) -> list[str]:
    """fsync + sha256 of each file, several at once (hashlib and fsync release the GIL)."""
    def one(p: Path) -> str:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        return sha256_file(p)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, files))


@dataclass
class ShardInfo:
    shard: int
    path: Path
    stats: dict
    index: dict[str, np.ndarray]
    arrays: dict[str, dict] = field(default_factory=dict)  # zarr metadata per field
    files: dict[str, tuple[int, str]] = field(default_factory=dict)  # commit record: path -> (bytes, sha256)


# Three levels (README "Integrity"): opening checks what needs no full read (open_shard, check_target); training
# re-hashes each chunk file on its first read (StoreReader verify_reads); `verify` re-hashes every file (full=True).

FOREIGN_SHARD = "committed under fingerprint digest"


def _is_chunk(rel: str) -> bool:
    parts = rel.split("/")
    return len(parts) >= 4 and parts[0] == TENSORS_DIR and parts[2] == "c"


def _commit_rows(path: Path) -> tuple[dict, dict[str, tuple[int, str]]]:
    """(metadata, {path: (bytes, sha256)}) of a commit record; StoreError when unreadable."""
    table = _read_arrow(path)
    try:
        return _meta_json(table, path), {r["path"]: (int(r["bytes"]), str(r["sha256"])) for r in table.to_pylist()}
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{path}: not a commit record ({e})") from e


def _file_problems(root: Path, files: dict[str, tuple[int, str]], rehash) -> list[str]:
    """Every recorded file present with its recorded size; those ``rehash(rel)`` picks also with their sha256."""
    problems = []
    for rel, (size, sha) in sorted(files.items()):
        try:
            actual = (root / rel).stat().st_size
        except FileNotFoundError:
            problems.append(f"{rel}: listed in the commit record but missing")
            continue
        if actual != size:
            problems.append(f"{rel}: size {actual} != recorded {size}")
        elif rehash(rel) and sha256_file(root / rel) != sha:
            problems.append(f"{rel}: checksum mismatch (sha256 differs from the commit record)")
    return problems


def _unlisted(root: Path, files: dict) -> list[str]:
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {COMMIT_FILE}
    return [f"{rel}: file not in the commit record" for rel in sorted(present - set(files))]


def open_shard(path: Path, store_digest: str, fields: dict, full: bool = False) -> tuple[ShardInfo | None, list[str]]:
    """Check one committed shard and load its small files. Without ``full`` (opening for training: milliseconds
    per shard) every listed file must exist with its recorded size and the small ones (array metadata, index,
    counts) are re-hashed; the index must tile arrays whose shapes and chunk files match the fingerprint. ``full``
    (`verify`) re-hashes the chunks too, looks for unlisted files and recounts the loss mask. Problems are
    strings relative to the shard directory; the info is None when there are any."""
    try:
        stats, files = _commit_rows(path / COMMIT_FILE)
    except StoreError:
        return None, [f"{COMMIT_FILE}: unreadable (truncated or corrupt)"]
    if stats.get("fingerprint_digest") != store_digest:
        return None, [f"{FOREIGN_SHARD} {stats.get('fingerprint_digest')}, but {STORE_FILE} records {store_digest} "
                      "(the shard belongs to another extraction, or store.arrow was edited)"]  # fmt: skip
    problems = _file_problems(path, files, lambda rel: full or not _is_chunk(rel))
    if full:
        problems += _unlisted(path, files)
    if problems:
        return None, problems
    if INDEX_FILE not in files:
        return None, [f"{INDEX_FILE}: not in the commit record (the shard was committed incomplete)"]
    index = _read_arrow(path / INDEX_FILE)
    try:
        idx = {c: index[c].to_numpy(zero_copy_only=False) for c in index.column_names}
        offsets, lengths = idx["offset"].astype(np.int64), idx["length"].astype(np.int64)
        loss = idx["loss_tokens"].astype(np.int64)
    except KeyError as e:
        return None, [f"{INDEX_FILE}: column {e} missing"]
    total = int(lengths.sum())
    if len(lengths) and (lengths.min() < 1 or not np.array_equal(offsets, np.cumsum(lengths) - lengths)):
        problems.append(f"{INDEX_FILE}: offsets/lengths do not tile the arrays (first offset {offsets[0]}, "
                        f"{int((lengths < 1).sum())} empty samples)")  # fmt: skip
    if len(loss) and (loss.min() < 0 or (loss > lengths).any()):
        problems.append(f"{INDEX_FILE}: loss_tokens outside [0, length]")
    if stats.get("tokens") != total or stats.get("samples") != len(lengths):
        problems.append(f"{INDEX_FILE}: {len(lengths)} samples/{total} tokens, commit says "
                        f"{stats.get('samples')}/{stats.get('tokens')}")  # fmt: skip
    arrays, layout = tensor_layout({rel: size for rel, (size, _) in files.items()},
                                   lambda rel: json.loads((path / rel).read_text()), fields, total)  # fmt: skip
    problems += layout
    if full and not problems and total:
        import zarr

        mask = zarr.open_array(str(path / TENSORS_DIR / "loss_mask"), mode="r")[:]
        if not np.array_equal(np.add.reduceat(mask.astype(np.int64), offsets), loss):
            problems.append(f"{INDEX_FILE}: loss_tokens disagree with tensors/loss_mask")
    if problems:
        return None, problems
    return ShardInfo(_shard_number(path), path, stats, idx, arrays, files), []


def tensor_layout(sizes: dict[str, int], read_json: Callable[[str], dict], fields: dict,
                  total: int) -> tuple[dict[str, dict], list[str]]:  # fmt: skip
    """The arrays' Zarr metadata, and the problems that make them not hold ``total`` rows of each field as the
    fingerprint prescribes: wrong shape, dtype or chunking, a chunk file missing, an uncompressed chunk of the wrong
    size. ``sizes``: {relative path: bytes} of the shard's files; ``read_json(rel)`` reads one of them."""
    arrays, problems = {}, []
    for name, (tail, logical) in fields.items():
        rel = f"{TENSORS_DIR}/{name}/zarr.json"
        if rel not in sizes:
            problems.append(f"{rel}: missing (the shard's tensors are incomplete)")
            continue
        try:
            meta = read_json(rel)
            shape, dtype = tuple(meta["shape"]), np.dtype(meta["data_type"])
            chunks = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
            compressed = len(meta["codecs"]) > 1
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{rel}: unreadable array metadata ({type(e).__name__}: {e})")
            continue
        if shape != (total, *tail):
            problems.append(f"{rel}: shape {shape}, but the index and fingerprint need {(total, *tail)}")
            continue
        if dtype != storage_dtype(logical):
            problems.append(f"{rel}: dtype {dtype}, the fingerprint needs {storage_dtype(logical)}")
            continue
        if len(chunks) != len(shape) or chunks[0] < 1 or chunks[1:] != tail:
            problems.append(f"{rel}: chunk shape {chunks} does not fit the array shape {shape}")
            continue
        n, want = -(-total // chunks[0]), int(np.prod(chunks)) * dtype.itemsize
        for c in range(n):
            key = chunk_key(name, c, len(tail))
            size = sizes.get(key)
            if size is None:
                problems.append(f"{key}: missing ({n} chunks of {chunks[0]} rows hold {total} rows)")
            elif not compressed and size != want:
                problems.append(f"{key}: {size} bytes, an uncompressed chunk {chunks} of {dtype} has {want}")
        arrays[name] = meta
    return arrays, problems


def check_target(root: Path, format_version: int, full: bool = False) -> tuple[dict[str, tuple[int, str]], list[str]]:
    """``target/`` against its commit record (format 2): every file present with its size, the small ones (config,
    tokenizer) re-hashed, the weights too with ``full``. Format 1 recorded no checksums: only presence is checked.
    Returns the record and the problems (paths relative to the store)."""
    target = root / TARGET_DIR
    if not target.is_dir():
        return {}, [f"{TARGET_DIR}/: missing (the extraction never finished publishing it)"]
    if not (target / COMMIT_FILE).exists():
        if format_version >= 2:
            return {}, [f"{TARGET_DIR}/{COMMIT_FILE}: missing"]
        return {}, [f"{TARGET_DIR}/{n}: missing" for n in ("config.json", "weights.safetensors")
                    if not (target / n).is_file()]  # fmt: skip
    try:
        _, files = _commit_rows(target / COMMIT_FILE)
    except StoreError:
        return {}, [f"{TARGET_DIR}/{COMMIT_FILE}: unreadable (truncated or corrupt)"]
    problems = _file_problems(target, files, lambda rel: full or not rel.endswith(".safetensors"))
    if full:
        problems += _unlisted(target, files)
    problems += [f"{n}: missing from the commit record" for n in ("config.json", "weights.safetensors")
                 if n not in files]  # fmt: skip
    return files, [f"{TARGET_DIR}/{p}" for p in problems]

"""Writing a store: :class:`StoreWriter` publishes the store and target pieces, :class:`ShardWriter` one shard."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
import uuid
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline import __version__
from pipeline.locks import FileLock
from pipeline.store.dtypes import _compressors, _finite, encode_field, storage_dtype
from pipeline.store.errors import StoreError, _writing
from pipeline.store.format import (
    COMMIT_FILE,
    CORRUPT_PREFIX,
    COUNTS_FILE,
    FORMAT_VERSION,
    INDEX_FILE,
    INDEX_SCHEMA,
    MAX_LISTED_SKIPS,
    SHARDS_DIR,
    STORE_FILE,
    TARGET_DIR,
    TENSORS_DIR,
    TMP_PREFIX,
    VERIFY_FILE,
    SampleMeta,
    TargetPieces,
    _fsync_dir,
    _write_arrow,
    array_shapes,
    canonical_json,
    diff_fingerprints,
    field_shapes,
    fingerprint_digest,
    missing_fingerprint_fields,
    read_store_meta,
    shard_name,
)
from pipeline.store.integrity import (
    FOREIGN_SHARD,
    _commit_rows,
    _write_commit_record,
    check_target,
    open_shard,
    tensor_layout,
)
from pipeline.store.leftovers import _shard_lock, clean_leftovers, store_lock


class StoreWriter:
    """Creates (or re-opens, for resume / more workers) a store and hands out shard writers.

    Workers that share the directory coordinate through flock files under ``.locks/``: ``store.lock`` while
    ``store.arrow``/``target/`` are published (and while ``verify`` records its result), ``shard-NNNNN.lock`` for as
    long as a worker writes that shard. A lock dies with its holder, so whatever temporary file exists while its lock
    is free was left by a dead process and is removed (:meth:`clean_leftovers`).
    """

    def __init__(self, root: str | os.PathLike, fingerprint: dict, plan: dict, target: TargetPieces,
                 rank: int = 0, world_size: int = 1, io_workers: int | None = None):  # fmt: skip
        missing = missing_fingerprint_fields(fingerprint)
        if missing:
            raise StoreError(f"fingerprint incomplete, missing: {', '.join(missing)}")
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.digest = fingerprint_digest(fingerprint)
        self.plan = plan
        self.rank, self.world_size = rank, world_size
        self.fields = field_shapes(fingerprint)
        self.arrays = array_shapes(fingerprint)
        # Chunk compression and writes run in this pool, overlapped with the caller (the forward passes) and with
        # each other; 0 writes in the calling thread.
        self.io_workers = min(8, os.cpu_count() or 1) if io_workers is None else io_workers
        self._pool: ThreadPoolExecutor | None = None
        self.repaired_target: list[str] = []
        self.repaired_store_file: str | None = None
        with _writing(self.root, "creating the store directory"):
            (self.root / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        with store_lock(self.root):
            self.cleaned = clean_leftovers(self.root)
            self._publish_store_file()
            self._publish_target(target)

    def io_submit(self, fn, *args) -> Future:
        """Run ``fn(*args)`` in the write pool (or now, with ``io_workers=0``)."""
        if self.io_workers == 0:
            fut: Future = Future()
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - surfaced by fut.result() like a pooled error
                fut.set_exception(e)
            return fut
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.io_workers, thread_name_prefix="store-io")
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        """Stop the write pool (shards in progress must have been committed or aborted)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # The first worker creates store.arrow; later ones (resume, other ranks) must agree with it.
    def _publish_store_file(self) -> None:
        final = self.root / STORE_FILE
        if final.exists():
            self._set_aside_damaged_store_file(final)
        if not final.exists():
            tmp = self.root / f"{TMP_PREFIX}{STORE_FILE}-{socket.gethostname()}-{os.getpid()}"
            table = pa.table({
                "format_version": pa.array([FORMAT_VERSION], pa.int32()),
                "fingerprint": [canonical_json(self.fingerprint)],
                "fingerprint_digest": [self.digest],
                "plan": [canonical_json(self.plan)],
                "created_by": [canonical_json({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
                                               "code_version": __version__})],
            })  # fmt: skip
            try:
                with _writing(self.root / STORE_FILE, "writing the store metadata"):
                    _write_arrow(tmp, table)
                    with open(tmp, "rb") as f:
                        os.fsync(f.fileno())
                    try:
                        os.link(tmp, final)  # atomic and never replaces
                    except FileExistsError:
                        pass
                    _fsync_dir(self.root)
            finally:
                tmp.unlink(missing_ok=True)
        meta = read_store_meta(self.root)
        diffs = diff_fingerprints(meta["fingerprint"], self.fingerprint)
        if diffs:
            old = meta["format_version"] < FORMAT_VERSION
            raise StoreError(
                f"{final}: this store was extracted with a different fingerprint; refusing to mix. "
                "Differing fields:\n  " + "\n  ".join(diffs) + "\nUse a new --out directory for a different extraction."
                + (f"\nIt is a format {meta['format_version']} store: `pipeline convert {self.root} --out NEW` "
                   f"rewrites it as format {FORMAT_VERSION}." if old else "")
            )  # fmt: skip
        if meta["plan"] != self.plan:
            raise StoreError(f"{final}: shard plan {meta['plan']} differs from this run's {self.plan}")

    def _set_aside_damaged_store_file(self, final: Path) -> None:
        """A damaged store.arrow (unreadable, or its fingerprint edited) is set aside, to be rewritten from this run's
        fingerprint, when every committed shard was committed under this run's digest: this run then describes
        them exactly. Otherwise the store is refused."""
        try:
            read_store_meta(self.root)
            return
        except StoreError as e:
            damage = str(e)
        digests = {s.get("fingerprint_digest") for s in self.committed_stats(skip_unreadable=True)}
        if digests - {self.digest}:
            raise StoreError(f"{damage} (and its shards were committed under another fingerprint than this run's, "
                             "so it cannot be rewritten from this run)")  # fmt: skip
        dest = self.root / f"{CORRUPT_PREFIX}{STORE_FILE}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        with _writing(dest, "setting the damaged store.arrow aside"):
            os.rename(final, dest)
        self.repaired_store_file = damage

    def _publish_target(self, target: TargetPieces) -> None:
        """``target/`` with its own commit record (format 2): the checksums `verify` re-hashes and readers size-check."""
        from safetensors.torch import save_file

        final = self.root / TARGET_DIR
        if final.exists():
            _, problems = check_target(self.root, FORMAT_VERSION, full=True)
            if not problems:
                return
            # Rebuilt from the model below; the damaged copy is kept for inspection.
            dest = self.root / f"{CORRUPT_PREFIX}{TARGET_DIR}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
            with _writing(dest, "setting the damaged target pieces aside"):
                os.rename(final, dest)
                (dest / "PROBLEMS.txt").write_text("\n".join(problems) + "\n")
            self.repaired_target = problems
        tmp = self.root / f"{TMP_PREFIX}{TARGET_DIR}-{socket.gethostname()}-{os.getpid()}"
        try:
            with _writing(self.root / TARGET_DIR, "writing the target pieces"):
                tmp.mkdir()
                (tmp / "config.json").write_text(json.dumps(target.config, indent=2, sort_keys=True))
                save_file({k: v.detach().cpu().contiguous() for k, v in target.weights.items()},
                          str(tmp / "weights.safetensors"), metadata={"format": "pt"})  # fmt: skip
                target.tokenizer.save_pretrained(str(tmp / "tokenizer"))
                _write_commit_record(tmp, {"target": True, "fingerprint_digest": self.digest})
                os.rename(tmp, final)  # under store.lock: nobody else publishes it meanwhile
                _fsync_dir(self.root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def shard_dir(self, shard: int) -> Path:
        return self.root / SHARDS_DIR / shard_name(shard)

    def shard_state(self, shard: int, full: bool = False) -> tuple[str, list[str]]:
        """``("absent", [])``, ``("committed", [])``, or ``("corrupt", problems)`` when a committed shard fails the
        cheap open checks (a file missing or resized, metadata changed, arrays not covering the index), or with
        ``full`` any check of `verify`."""
        path = self.shard_dir(shard)
        if not path.exists():
            return "absent", []
        if not (path / COMMIT_FILE).exists():  # not made by the commit protocol; it would block the rename
            return "corrupt", [f"{COMMIT_FILE}: missing (the directory is not a committed shard)"]
        _, problems = open_shard(path, self.digest, self.arrays, full=full, plan=self.plan)
        foreign = [p for p in problems if p.startswith(FOREIGN_SHARD)]
        if foreign:
            raise StoreError(f"{path}: {foreign[0]}")
        return ("corrupt", problems) if problems else ("committed", [])

    def is_committed(self, shard: int) -> bool:
        return self.shard_state(shard)[0] == "committed"

    def claim(self, shard: int, blocking: bool = True) -> FileLock | None:
        """The exclusive right to write ``shard`` (None when ``blocking`` is off and another live process holds
        it). Held until the shard is committed or aborted; released by the kernel if this process dies."""
        lock = _shard_lock(self.root, shard_name(shard))
        with _writing(lock.path, "taking the shard lock"):
            taken = lock.acquire(blocking=blocking)
        return lock if taken else None

    def claim_holder(self, shard: int) -> str:
        return _shard_lock(self.root, shard_name(shard)).holder()

    def committed_stats(self, skip_unreadable: bool = False) -> list[dict]:
        """The commit statistics of every committed shard (from the commit records' metadata)."""
        out = []
        for path in sorted((self.root / SHARDS_DIR).glob("shard-*")):
            if (path / COMMIT_FILE).exists():
                try:
                    out.append(_commit_rows(path / COMMIT_FILE)[0])
                except StoreError:
                    if not skip_unreadable:
                        raise
        return out

    def forget_verify(self) -> None:
        """Drop verify.arrow once shards it judged were redone: it no longer describes the store."""
        with _writing(self.root / VERIFY_FILE, "removing the stale verify result"), store_lock(self.root):
            (self.root / VERIFY_FILE).unlink(missing_ok=True)

    def set_aside(self, shard: int, problems: list[str]) -> Path:
        """Move a committed shard that failed its checks out of the way (kept for inspection, never read)."""
        path = self.shard_dir(shard)
        dest = path.with_name(f"{CORRUPT_PREFIX}{path.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
        with _writing(dest, "setting a corrupt shard aside"):
            os.rename(path, dest)
            (dest / "PROBLEMS.txt").write_text("\n".join(problems) + "\n")
            _fsync_dir(path.parent)
        return dest

    def begin_shard(self, shard: int, records: tuple[int, int], expected_tokens: int | None = None,
                    claim: FileLock | None = None) -> ShardWriter:  # fmt: skip
        """A writer for ``shard``, holding its claim (taken here, waiting if need be, unless passed in).
        ``expected_tokens`` (the tokenized length of its samples) lets the chunk length divide the shard almost
        exactly; without it chunks are ``chunk_tokens`` long."""
        claim = claim or self.claim(shard, blocking=True)
        shards = self.root / SHARDS_DIR
        # Holding the claim, every temporary directory of this shard belongs to a dead writer.
        for stale in shards.glob(f"{TMP_PREFIX}{shard_name(shard)}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = shards / f"{TMP_PREFIX}{shard_name(shard)}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            return ShardWriter(self, shard, tmp, records, expected_tokens, claim)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            claim.release()
            raise


class ShardWriter:
    """Appends samples token-major to one shard's Zarr arrays; `commit` publishes the shard atomically.

    ``append`` casts/quantizes and buffers in the calling thread; every whole chunk that fills is compressed and
    written by the store's write pool while the caller goes on (chunk-aligned regions: writes never touch the
    same file). ``commit`` waits for them.
    """

    def __init__(self, store: StoreWriter, shard: int, tmp: Path, records: tuple[int, int],
                 expected_tokens: int | None = None, claim: FileLock | None = None):  # fmt: skip
        import zarr
        from zarr.storage import LocalStore

        self.store, self.shard, self.tmp, self.records = store, shard, tmp, records
        self.claim = claim
        self.chunk = chunk_length(expected_tokens, int(store.fingerprint["sharding"]["chunk_tokens"]))
        codec = store.fingerprint["sharding"]["codec"]
        self.arrays = {}
        with self._writing("creating the shard's arrays"):
            tmp.mkdir(parents=True)
            group = zarr.open_group(LocalStore(str(tmp / TENSORS_DIR)), mode="w")
            for name, (tail, logical) in store.arrays.items():
                dt = storage_dtype(logical)
                self.arrays[name] = group.create_array(  # sized for the expected rows: no metadata rewrite per flush
                    name, shape=(expected_tokens or 0, *tail), chunks=(self.chunk, *tail), dtype=dt, fill_value=0,
                    compressors=_compressors(codec, dt.itemsize, logical), config={"write_empty_chunks": True},
                    attributes={"pipeline_dtype": logical},
                )  # fmt: skip
        self.pending: dict[str, list[np.ndarray]] = {n: [] for n in store.arrays}
        self.pending_rows = 0
        self.written_rows = 0  # rows handed to the writes: whole chunks until the final flush
        self.writes: list[Future] = []
        self.index_rows: list[dict] = []
        self.counts: Counter[int] = Counter()
        self.skipped: Counter[str] = Counter()
        self.skipped_records: list[dict] = []
        self.quarantined: list[dict] = []
        self.started = time.time()
        self.failed: BaseException | None = None

    @property
    def tokens(self) -> int:
        return self.written_rows + self.pending_rows

    def _writing(self, what: str):
        # named by where the shard goes: its temporary directory is gone once the failure is reported
        return _writing(self.store.shard_dir(self.shard), f"{what} (shard {self.shard})")

    def skip(self, source_index: int, record_id: str, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        if len(self.skipped_records) < MAX_LISTED_SKIPS:
            self.skipped_records.append({"source_index": source_index, "record_id": record_id,
                                         "reason": reason, "detail": detail})  # fmt: skip

    def append(self, meta: SampleMeta, tensors: dict[str, torch.Tensor]) -> bool:
        """Store one sample; returns False (and quarantines it) when a tensor is not finite after the cast."""
        if self.failed is not None:
            raise StoreError(f"{self.tmp}: shard {self.shard} was abandoned after a failed write ({self.failed})")
        if set(tensors) != set(self.store.fields):
            raise StoreError(f"shard {self.shard}: sample {meta.sample_id} has fields {sorted(tensors)}, "
                             f"store expects {sorted(self.store.fields)}")  # fmt: skip
        length = int(tensors["input_ids"].shape[0])
        stored = {}
        for name, t in tensors.items():
            if t.shape[0] != length or tuple(t.shape[1:]) != self.store.fields[name][0]:
                raise StoreError(f"shard {self.shard}: sample {meta.sample_id} field {name} has shape "
                                 f"{tuple(t.shape)}, expected ({length}, *{self.store.fields[name][0]})")  # fmt: skip
            logical = self.store.fields[name][1]
            arrays = encode_field(name, t, logical)
            if t.is_floating_point() and not all(_finite(a, self.store.arrays[n][1]) for n, a in arrays.items()):
                self.quarantined.append({"sample_id": meta.sample_id, "record_id": meta.record_id, "field": name,
                                         "reason": f"non-finite values after cast to {logical}"})
                return False
            stored.update(arrays)
        loss_tokens = int(stored["loss_mask"].sum())
        self.counts.update(stored["input_ids"][stored["loss_mask"]].tolist())
        self.index_rows.append({"sample_id": meta.sample_id, "source_index": meta.source_index,
                                "record_id": meta.record_id, "offset": self.tokens, "length": length,
                                "loss_tokens": loss_tokens, "truncated": meta.truncated})  # fmt: skip
        for name, arr in stored.items():
            self.pending[name].append(arr)
        self.pending_rows += length
        if self.pending_rows >= self.chunk:
            try:
                with self._writing("writing tensors"):
                    self._flush(final=False)
                    self._raise_failed_writes()
            except BaseException as e:  # half-flushed buffers cannot be trusted: give the shard up entirely
                self.failed = e
                self.abort()
                raise
        return True

    def _flush(self, final: bool) -> None:
        rows = self.pending_rows if final else (self.pending_rows // self.chunk) * self.chunk
        if rows == 0:
            return
        start = self.written_rows
        grow = any(start + rows > arr.shape[0] for arr in self.arrays.values())
        if grow:  # more rows than the tokenized length promised: resize only with no write in flight
            self._wait_writes()
        for name, parts in self.pending.items():
            block = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
            arr = self.arrays[name]
            if grow:
                arr.resize((start + rows, *arr.shape[1:]))
            # chunk-aligned: whole chunks written, none read back
            self.writes.append(self.store.io_submit(_write_rows, arr, start, block[:rows]))
            self.pending[name] = [block[rows:]] if rows < len(block) else []
        self.pending_rows -= rows
        self.written_rows += rows

    def _wait_writes(self) -> None:
        """Wait for every write in flight, then re-raise the first that failed (disk full, ...) in this thread. All
        of them: a write still running after an abort removed the directory would create it again (Zarr makes the
        chunk's parent directories), leaving a temporary directory of a dead writer behind."""
        writes, self.writes = self.writes, []
        failed = [e for e in (fut.exception() for fut in writes) if e is not None]
        if failed:
            raise failed[0]

    def _raise_failed_writes(self) -> None:
        # a pooled write that already failed (disk full) stops the shard at the next append, not only at commit;
        # finished writes are dropped so that each append looks only at the few still in flight
        for fut in self.writes:
            if fut.done() and fut.exception() is not None:
                raise fut.exception()
        self.writes = [fut for fut in self.writes if not fut.done()]

    def _wait_writes_quietly(self) -> None:
        for fut in self.writes:
            fut.exception()
        self.writes = []

    def abort(self) -> None:
        self._wait_writes_quietly()  # no pooled write may recreate files under a removed directory
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.claim is not None:
            self.claim.release()

    def commit(self) -> dict:
        """Flush, check completeness, checksum, fsync and rename into place. Returns the commit statistics.
        Whatever happens, the claim on the shard is released (a failed commit leaves no temporary directory)."""
        if self.failed is not None:
            self.abort()
            raise StoreError(f"{self.tmp}: shard {self.shard} was abandoned after a failed write ({self.failed})")
        try:
            with self._writing("committing"):
                stats = self._commit()
        except BaseException:
            self.abort()  # releases the claim too
            raise
        if self.claim is not None:
            self.claim.release()
        return stats

    def _commit(self) -> dict:
        self._flush(final=True)
        self._wait_writes()  # re-raises a failed pooled write (disk full, ...) here, inside `_writing`
        for arr in self.arrays.values():
            if arr.shape[0] != self.written_rows:  # fewer rows than expected: quarantined samples
                arr.resize((self.written_rows, *arr.shape[1:]))
        index = pa.Table.from_pylist(self.index_rows, schema=INDEX_SCHEMA)
        _write_arrow(self.tmp / INDEX_FILE, index)
        ids = np.array(sorted(self.counts), dtype=np.int32)
        counts = pa.table({"token_id": pa.array(ids, pa.int32()),
                           "count": pa.array([self.counts[int(i)] for i in ids], pa.int64())})  # fmt: skip
        _write_arrow(self.tmp / COUNTS_FILE, counts)
        files = sorted(p for p in self.tmp.rglob("*") if p.is_file())
        sizes = {p.relative_to(self.tmp).as_posix(): p.stat().st_size for p in files}
        _, problems = tensor_layout(sizes, lambda rel: json.loads((self.tmp / rel).read_text()), self.store.arrays,
                                    self.written_rows)  # fmt: skip
        if problems:  # never publish a shard whose files do not add up (a file lost under a running writer)
            raise StoreError(f"{self.tmp}: shard {self.shard} is incomplete, not committed: {problems[0]}"
                             f"{f' (+{len(problems) - 1} more)' if len(problems) > 1 else ''}; re-run the same "
                             "command to redo it")  # fmt: skip
        stats = {
            "shard": self.shard, "fingerprint_digest": self.store.digest,
            "samples": len(self.index_rows), "tokens": self.tokens,
            "loss_tokens": int(sum(r["loss_tokens"] for r in self.index_rows)),
            "skipped": dict(sorted(self.skipped.items())), "skipped_records": self.skipped_records,
            "quarantined": self.quarantined, "records": list(self.records),
            "writer": {"host": socket.gethostname(), "pid": os.getpid(), "rank": self.store.rank,
                       "world_size": self.store.world_size},
            "wall_s": round(time.time() - self.started, 3),
        }  # fmt: skip
        _write_commit_record(self.tmp, stats, files)
        final = self.store.shard_dir(self.shard)
        try:
            os.rename(self.tmp, final)
        except OSError as e:  # a committed shard is never replaced
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise StoreError(f"{final}: already committed by another worker; this copy was discarded") from e
        _fsync_dir(final.parent)
        return stats


def _write_rows(arr: Any, start: int, block: np.ndarray) -> None:
    arr[start:start + len(block)] = block


def chunk_length(expected_tokens: int | None, chunk_tokens: int) -> int:
    """At most ``chunk_tokens``, and dividing ``expected_tokens`` into chunks with less than one row of padding
    per chunk (Zarr v3 stores the edge chunk at full size)."""
    if expected_tokens is None:
        return chunk_tokens
    n_chunks = max(1, -(-expected_tokens // chunk_tokens))
    return max(1, -(-expected_tokens // n_chunks))

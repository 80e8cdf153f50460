"""The feature store: the one module that knows the on-disk format (see storage_layout.md).

Extraction writes through :class:`StoreWriter` / :class:`ShardWriter`; training, inspection and verification read
through :class:`StoreReader` and :func:`verify_store`. Bump ``FORMAT_VERSION`` with any change to what is written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch

from pipeline import __version__
from pipeline.locks import FileLock

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # version 1: no fp8, int32 top-k ids, no target/commit.arrow; everything else reads the same

STORE_FILE = "store.arrow"
VERIFY_FILE = "verify.arrow"
TARGET_DIR = "target"
SHARDS_DIR = "shards"
TENSORS_DIR = "tensors"
INDEX_FILE = "index.arrow"
COUNTS_FILE = "token_counts.arrow"
COMMIT_FILE = "commit.arrow"
TMP_PREFIX = ".tmp-"
LOCKS_DIR = ".locks"  # flock files: store.lock (store.arrow, target/, verify.arrow) and one per shard
CORRUPT_PREFIX = ".corrupt-"  # a committed shard that failed its checks, set aside by the extraction that redid it
MAX_LISTED_SKIPS = 1000

# Logical dtype name -> (zarr/numpy storage dtype, torch dtype).  bf16 and fp8 have no numpy dtype: their bits go
# in uint16 / uint8.
FP8 = "float8_e4m3fn"
HIDDEN_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float16": (np.dtype(np.float16), torch.float16),
    "bfloat16": (np.dtype(np.uint16), torch.bfloat16),
    "float32": (np.dtype(np.float32), torch.float32),
    FP8: (np.dtype(np.uint8), torch.float8_e4m3fn),
}
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_SUFFIX = "_scale"  # fp8 fields carry one fp32 scale per token row (per aux layer) in "<field>_scale"
LOGPROB_DTYPES = ("float32", "float16")
HIDDEN_FIELDS = ("hidden_last", "hidden_aux")
ALWAYS_FIELDS = ("input_ids", "loss_mask", "topk_ids", "topk_logprobs")
CODECS = ("none", "zstd", "blosc")

REQUIRED_FINGERPRINT = (
    "format_version", "code_version", "backend",
    "model.config_sha256", "model.weights_sha256", "model.num_layers", "model.hidden_size", "model.vocab_size",
    "tokenizer.sha256", "tokenizer.chat_template_sha256",
    "layers.aux", "layers.last", "layers.stored",
    "dtypes.hidden", "dtypes.topk_logprobs", "dtypes.input_ids",
    "top_k", "max_length",
    "data.sha256", "data.format", "data.kind", "data.selection",
    "sharding.shard_size", "sharding.chunk_tokens", "sharding.codec",
)  # fmt: skip


class StoreError(RuntimeError):
    """A store that cannot be written or read as asked; the message names the file and field."""


# ---------------------------------------------------------------------------------------------------- helpers


# Recorded for people, not compared: the same model or data may live at another path on another machine.
INFORMATIONAL = frozenset({"model.name", "model.path", "data.path"})


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def digest(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def config_sha256(config: dict) -> str:
    """Hash of a target's HF config, ignoring fields that record who wrote or loaded it rather than what it is
    (the compute dtype is fingerprinted separately as ``model.compute_dtype``)."""
    volatile = {"transformers_version", "_name_or_path", "_commit_hash", "_attn_implementation_autoset", "dtype",
                "torch_dtype"}
    return digest({k: v for k, v in config.items() if k not in volatile})


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: list[Path], root: Path) -> str:
    """One hash over several files, keyed by their path relative to ``root`` (order-independent)."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda q: q.relative_to(root).as_posix()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


def fingerprint_digest(fp: dict) -> str:
    return digest({k: v for k, v in _flatten(fp).items() if k not in INFORMATIONAL})


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def diff_fingerprints(old: dict, new: dict) -> list[str]:
    """Dotted field names whose values differ, with both values (for error messages)."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: store has {a.get(k)!r}, this run has {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in INFORMATIONAL]  # fmt: skip


def missing_fingerprint_fields(fp: dict) -> list[str]:
    flat = _flatten(fp)
    return [k for k in REQUIRED_FINGERPRINT if k not in flat and not any(f.startswith(k + ".") for f in flat)]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_arrow(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _read_arrow(path: Path) -> pa.Table:
    try:
        with pa.memory_map(str(path), "r") as source:
            return ipc.open_file(source).read_all()
    except FileNotFoundError as e:
        raise StoreError(f"{path}: missing") from e
    except (OSError, pa.ArrowInvalid) as e:
        raise StoreError(f"{path}: not a readable Arrow file, truncated or corrupt ({e})") from e


def _meta_json(table: pa.Table, path: Path | None = None) -> dict:
    meta = table.schema.metadata or {}
    try:
        return json.loads(meta.get(b"pipeline", b"{}"))
    except ValueError as e:
        raise StoreError(f"{path or 'an Arrow file'}: corrupt metadata ({e})") from e


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def storage_dtype(logical: str) -> np.dtype:
    if logical in HIDDEN_DTYPES:
        return HIDDEN_DTYPES[logical][0]
    return np.dtype(logical)


def topk_ids_dtype(vocab_size: int) -> str:
    """Format 2 stores top-k ids as uint16 when every id fits (vocab <= 65,536), else int32."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def quantize_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row float8_e4m3fn: ``(q, scale)`` with ``t ~= q.float() * scale[..., None]`` and
    ``scale = max|row| / 448`` in fp32 (1 for all-zero rows). A row holding NaN/inf gets a non-finite scale."""
    x = t.detach().float()
    amax = x.abs().amax(-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (x / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


@dataclass
class Fp8Rows:
    """Hidden rows already quantized by :func:`quantize_fp8` where they were computed (the GPU), so that one byte
    per value crosses to the host; ``ShardWriter.append`` takes them in place of a float tensor."""

    q: torch.Tensor  # float8_e4m3fn [..., H]
    scale: torch.Tensor  # fp32 [...]

    @classmethod
    def quantize(cls, t: torch.Tensor) -> Fp8Rows:
        return cls(*quantize_fp8(t))

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def is_floating_point(self) -> bool:
        return True

    def to(self, *args, **kwargs) -> Fp8Rows:
        return Fp8Rows(self.q.to(*args, **kwargs), self.scale.to(*args, **kwargs))


# e4m3 bits -> fp32 value: a 256-entry table gathers ~4x faster than torch's fp8 -> fp32 cast on the CPU
_FP8_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()


def dequantize_fp8(q: np.ndarray, scale: np.ndarray) -> torch.Tensor:
    """Stored fp8 bits (uint8) and their row scales -> fp32 values (exactly ``float(e4m3) * scale``)."""
    values = _FP8_VALUES[q]  # a new array: the rows may be a read-only memmap or cached chunk
    np.multiply(values, np.asarray(scale)[..., None], out=values)
    return torch.from_numpy(values)


def encode_field(name: str, t: torch.Tensor | Fp8Rows, logical: str) -> dict[str, np.ndarray]:
    """The stored arrays of one field of one sample: itself, plus ``<name>_scale`` for fp8."""
    if logical == FP8:
        q, scale = (t.q.cpu(), t.scale.cpu()) if isinstance(t, Fp8Rows) else quantize_fp8(t.cpu())
        return {name: q.view(torch.uint8).numpy(), name + SCALE_SUFFIX: scale.numpy()}
    if logical == "uint16" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= 1 << 16):
        raise StoreError(f"{name}: ids outside [0, 65536) cannot be stored as uint16")
    return {name: to_storage(t, logical)}


def to_storage(t: torch.Tensor, logical: str) -> np.ndarray:
    """Cast a tensor to its storage dtype and return the numpy array holding exactly the stored bytes."""
    if logical == "bfloat16":
        return t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    if logical in HIDDEN_DTYPES:
        return t.detach().to("cpu", HIDDEN_DTYPES[logical][1]).contiguous().numpy()
    return t.detach().cpu().numpy().astype(logical, copy=False)


def from_storage(a: np.ndarray, logical: str) -> torch.Tensor:
    """Stored numpy rows -> torch tensor of the logical dtype (one copy; the input may be a read-only memmap).
    uint16 ids come back as int32 (torch supports few operations on uint16)."""
    if logical == "uint16":
        return torch.from_numpy(a.astype(np.int32))
    t = torch.from_numpy(np.array(a, copy=True))
    if logical == "bfloat16":
        return t.view(torch.bfloat16)
    return t


# ---------------------------------------------------------------------------------------------------- writing


@dataclass
class SampleMeta:
    sample_id: int
    source_index: int
    record_id: str
    truncated: bool = False


@dataclass
class TargetPieces:
    """What the store keeps of the target so that training never opens the model directory."""

    config: dict
    weights: dict[str, torch.Tensor]  # embed_tokens.weight, norm.weight, lm_head.weight
    tokenizer: Any  # anything with save_pretrained(dir)


def field_shapes(fp: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Per field: trailing shape (after the token axis) and logical dtype, as the fingerprint prescribes."""
    h, k = fp["model"]["hidden_size"], fp["top_k"]
    hidden = fp["dtypes"]["hidden"]
    shapes: dict[str, tuple[tuple[int, ...], str]] = {
        "input_ids": ((), "int32"),
        "loss_mask": ((), "bool"),
        "topk_ids": ((k,), fp["dtypes"].get("topk_ids", "int32")),  # absent in format 1: int32
        "topk_logprobs": ((k,), fp["dtypes"]["topk_logprobs"]),
    }
    if "hidden_last" in fp["layers"]["stored"]:
        shapes["hidden_last"] = ((h,), hidden)
    if "hidden_aux" in fp["layers"]["stored"]:
        shapes["hidden_aux"] = ((len(fp["layers"]["aux"]), h), hidden)
    return shapes


def array_shapes(fp: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """The Zarr arrays of a shard: one per field, plus an fp32 ``<field>_scale`` (rows x aux layers) per fp8 field."""
    arrays = {}
    for name, (tail, logical) in field_shapes(fp).items():
        arrays[name] = (tail, logical)
        if logical == FP8:
            arrays[name + SCALE_SUFFIX] = (tail[:-1], "float32")
    return arrays


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
                with _writing(tmp, "writing the store metadata"):
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
            raise StoreError(
                f"{final}: this store was extracted with a different fingerprint; refusing to mix. "
                "Differing fields:\n  " + "\n  ".join(diffs) + "\nUse a new --out directory for a different extraction."
            )
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
            with _writing(tmp, "writing the target pieces"):
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
        _, problems = open_shard(path, self.digest, self.arrays, full=full)
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
                    compressors=_compressors(codec, dt.itemsize), config={"write_empty_chunks": True},
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
        return _writing(self.tmp, f"{what} (shard {self.shard})")

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
        writes, self.writes = self.writes, []
        for fut in writes:
            fut.result()  # re-raises a failed write (disk full, ...) in the committing thread

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


INDEX_SCHEMA = pa.schema([
    ("sample_id", pa.int64()), ("source_index", pa.int64()), ("record_id", pa.string()),
    ("offset", pa.int64()), ("length", pa.int32()), ("loss_tokens", pa.int32()), ("truncated", pa.bool_()),
])  # fmt: skip
COMMIT_SCHEMA = pa.schema([("path", pa.string()), ("bytes", pa.int64()), ("sha256", pa.string())])


def _compressors(codec: str, itemsize: int) -> Any:
    from zarr.codecs import BloscCodec, ZstdCodec

    if codec == "none":
        return None
    if codec == "zstd":
        return ZstdCodec(level=3)
    if codec == "blosc":
        return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle" if itemsize <= 2 else "shuffle",
                          typesize=itemsize)  # fmt: skip
    raise StoreError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


def _finite(arr: np.ndarray, logical: str) -> bool:
    if logical == "bfloat16":  # exponent bits all ones = inf or nan
        return not bool(((arr & 0x7F80) == 0x7F80).any())
    if logical == FP8:  # e4m3fn has no inf; NaN is S.1111.111 (its row scale is non-finite too)
        return not bool(((arr & 0x7F) == 0x7F).any())
    return bool(np.isfinite(arr).all())


# ---------------------------------------------------------------------------------------------------- reading


def load_store_meta(root: str | os.PathLike) -> dict:
    """``store.arrow`` parsed, without the integrity checks (``verify`` reports those rather than stopping)."""
    path = Path(root) / STORE_FILE
    if not path.exists():
        raise StoreError(f"{path}: not a feature store (no {STORE_FILE}); run `pipeline extract --out {root}` first")
    try:
        table = _read_arrow(path)
    except StoreError as e:
        raise StoreError(f"{e}; re-run the same `pipeline extract` to rewrite it, or re-extract into a new --out") from e
    try:
        row = table.to_pylist()[0]
        meta = {"format_version": row["format_version"], "fingerprint": json.loads(row["fingerprint"]),
                "fingerprint_digest": row["fingerprint_digest"], "plan": json.loads(row["plan"]),
                "created_by": json.loads(row["created_by"])}  # fmt: skip
    except (IndexError, KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{path}: corrupt store metadata ({type(e).__name__}: {e}); re-run the same `pipeline "
                         "extract` to rewrite it, or re-extract into a new --out") from e  # fmt: skip
    if meta["format_version"] not in READABLE_FORMATS:
        raise StoreError(f"{path}: format_version {meta['format_version']}, this code reads "
                         f"{', '.join(map(str, READABLE_FORMATS))}")  # fmt: skip
    return meta


def read_store_meta(root: str | os.PathLike) -> dict:
    """``store.arrow``, refused when its fingerprint no longer matches the digest the shards were committed under."""
    meta = load_store_meta(root)
    if fingerprint_digest(meta["fingerprint"]) != meta["fingerprint_digest"]:
        raise StoreError(f"{Path(root) / STORE_FILE}: {EDITED_FINGERPRINT}; re-run the same `pipeline extract` to "
                         "rewrite it, or re-extract into a new --out")  # fmt: skip
    return meta


EDITED_FINGERPRINT = ("the fingerprint does not match its recorded digest (the file was edited or is corrupt, so it "
                      "no longer describes what the shards hold)")  # fmt: skip


@dataclass
class ShardInfo:
    shard: int
    path: Path
    stats: dict
    index: dict[str, np.ndarray]
    arrays: dict[str, dict] = field(default_factory=dict)  # zarr metadata per field
    files: dict[str, tuple[int, str]] = field(default_factory=dict)  # commit record: path -> (bytes, sha256)


class StoreReader:
    """Read-only access to a committed store; samples come back as memmap-backed numpy rows.

    Compressed arrays are decoded a whole chunk at a time into a small LRU cache (``cache_chunks`` decoded chunks
    per array, guarded by a lock: the loader's prefetch thread and the trainer's evaluation share a reader), so
    reading the samples of one chunk one after another decodes it once. The loader sizes the cache to its shuffle
    window; see storage_layout.md "Reading".

    Opening checks what costs no full read (see :func:`open_shard`, :func:`check_target`) and refuses a store that
    fails; ``skip_bad_shards`` (for `inspect`) sets such shards aside in ``bad_shards`` instead. ``verify_reads``
    re-hashes each chunk file the first time it is read (and the target weights when loaded) against the commit
    record, so that a changed byte is an error before it reaches a batch.
    """

    DEFAULT_CACHE_CHUNKS = 4

    def __init__(self, root: str | os.PathLike, require_complete: bool = True, verify_reads: bool = False,
                 skip_bad_shards: bool = False):  # fmt: skip
        self.root = Path(root)
        meta = read_store_meta(self.root)
        self.format_version: int = meta["format_version"]
        self.fingerprint: dict = meta["fingerprint"]
        self.digest: str = meta["fingerprint_digest"]
        self.plan: dict = meta["plan"]
        self.fields = field_shapes(self.fingerprint)
        self.arrays = array_shapes(self.fingerprint)
        self.verify_reads = verify_reads
        self.vocab_size = int(self.fingerprint["model"]["vocab_size"])
        self.target_files, self.target_problems = check_target(self.root, self.format_version)
        self.shards: list[ShardInfo] = []
        self.bad_shards: dict[int, list[str]] = {}
        for path in sorted((self.root / SHARDS_DIR).glob("shard-*")):
            if not (path / COMMIT_FILE).exists():
                continue
            info, problems = open_shard(path, self.digest, self.arrays)
            if problems:
                self.bad_shards[_shard_number(path)] = problems
            else:
                self.shards.append(info)
        if not skip_bad_shards:
            self._refuse_problems()
        found = {s.shard for s in self.shards} | set(self.bad_shards)
        missing = sorted(set(range(self.plan["shards"])) - found)
        self.missing_shards = missing
        if require_complete and missing:
            raise StoreError(f"{self.root}: incomplete store, shards not committed: {_ranges(missing)} "
                             f"of {self.plan['shards']} (re-run the same `pipeline extract` to finish it)")  # fmt: skip
        # Global sample table: sample i -> (shard position, offset, length).
        self._shard_of = np.concatenate([np.full(len(s.index["offset"]), k, np.int64)
                                         for k, s in enumerate(self.shards)] or [np.zeros(0, np.int64)])  # fmt: skip
        self.offsets = np.concatenate([s.index["offset"] for s in self.shards] or [np.zeros(0, np.int64)])
        self.lengths = np.concatenate([s.index["length"] for s in self.shards] or [np.zeros(0, np.int32)])
        self.loss_tokens = np.concatenate([s.index["loss_tokens"] for s in self.shards] or [np.zeros(0, np.int32)])
        self.sample_ids = np.concatenate([s.index["sample_id"] for s in self.shards] or [np.zeros(0, np.int64)])
        self._maps: dict[tuple[int, str, int], np.ndarray] = {}
        self._zarr: dict[tuple[int, str], Any] = {}
        self._verified: set[tuple[int, str, int]] = set()
        self.cache_chunks = self.DEFAULT_CACHE_CHUNKS
        self._cache: dict[str, OrderedDict[tuple[int, int], np.ndarray]] = {}
        self._cache_lock = threading.Lock()
        self.decoded_chunks = 0  # chunks decoded so far (the loader's benchmark reports it)

    def _refuse_problems(self) -> None:
        if self.target_problems:
            more = len(self.target_problems) - 1
            raise StoreError(f"{self.root}/{self.target_problems[0]}{f' (+{more} more)' if more else ''}: the target "
                             "pieces are damaged; re-run the same `pipeline extract` to rewrite them")  # fmt: skip
        if self.bad_shards:
            shard, problems = next(iter(self.bad_shards.items()))
            total = sum(len(p) for p in self.bad_shards.values())
            raise StoreError(f"{self.root / SHARDS_DIR / shard_name(shard)}/{problems[0]}: shard {shard} is damaged "
                             f"({total} problem(s) in {len(self.bad_shards)} shard(s): `pipeline verify {self.root}` "
                             "lists them); re-run the same `pipeline extract` to redo it")  # fmt: skip

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def has(self) -> set[str]:
        return set(self.fields)

    @property
    def aux_layers(self) -> list[int]:
        return list(self.fingerprint["layers"]["aux"])

    @property
    def hidden_dtype(self) -> str:
        return self.fingerprint["dtypes"]["hidden"]

    def compressed(self, name: str) -> bool:
        """Whether array ``name`` has a codec after ``bytes`` (reads decode whole chunks)."""
        return len(self.shards[0].arrays[name]["codecs"]) > 1 if self.shards else False

    def chunk_rows(self, k: int) -> int:
        """Rows per chunk of shard position ``k`` (the same for every array of a shard)."""
        return int(self.shards[k].arrays["input_ids"]["chunk_grid"]["configuration"]["chunk_shape"][0])

    def home_chunks(self) -> tuple[np.ndarray, np.ndarray]:
        """Per sample: (shard position, chunk holding its first row); the unit the loader shuffles."""
        chunk = np.array([self.chunk_rows(k) for k in range(len(self.shards))], np.int64)
        return self._shard_of, self.offsets // chunk[self._shard_of] if len(self) else self.offsets

    def read(self, i: int, fields: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Rows of sample ``i`` in storage dtype (bf16 as uint16 bits, fp8 as uint8 bits plus ``<field>_scale``);
        views into memmaps where possible."""
        k = int(self._shard_of[i])
        start, length = int(self.offsets[i]), int(self.lengths[i])
        out = {}
        for name in fields or tuple(self.fields):
            if name not in self.fields:
                raise StoreError(f"{self.root}: field {name!r} not stored (stored: {', '.join(self.fields)})")
            out[name] = self._rows(k, name, start, start + length)
            if name in TOKEN_ID_FIELDS:
                self._check_token_ids(k, name, i, out[name])
            if self.fields[name][1] == FP8:
                out[name + SCALE_SUFFIX] = self._rows(k, name + SCALE_SUFFIX, start, start + length)
        return out

    def _check_token_ids(self, k: int, name: str, i: int, rows: np.ndarray) -> None:
        # A flipped bit in an id would otherwise surface as an IndexError deep inside an embedding lookup.
        if rows.size == 0:
            return
        lo, hi = int(rows.min()), int(rows.max())
        if lo >= 0 and hi < self.vocab_size:
            return
        info = self.shards[k]
        j = int(i - np.searchsorted(self._shard_of, k))
        rid = info.index["record_id"][j] if "record_id" in info.index else "?"
        raise StoreError(f"{info.path / TENSORS_DIR / name}: sample {j} of shard {info.shard} (record {rid!r}) holds "
                         f"token id {lo if lo < 0 else hi}, outside the vocabulary [0, {self.vocab_size}): the shard "
                         "is corrupt; run `pipeline verify` and re-run the same `pipeline extract` to redo it")  # fmt: skip

    def sample(self, i: int, fields: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """Sample ``i`` as torch tensors of the logical dtypes (one copy out of the memmaps); fp8 fields come
        back decoded to fp32 (stored value times its row scale)."""
        rows = self.read(i, fields)
        out = {}
        for name in fields or tuple(self.fields):
            logical = self.fields[name][1]
            if logical == FP8:
                out[name] = dequantize_fp8(rows[name], rows[name + SCALE_SUFFIX])
            else:
                out[name] = from_storage(rows[name], logical)
        return out

    def _rows(self, k: int, name: str, start: int, stop: int) -> np.ndarray:
        meta = self.shards[k].arrays[name]
        chunk = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
        compressed = len(meta["codecs"]) > 1
        parts = []
        for c in range(start // chunk, (stop - 1) // chunk + 1 if stop > start else start // chunk):
            m = self._decoded_chunk(k, name, c) if compressed else self._chunk_map(k, name, c, meta)
            lo, hi = max(start - c * chunk, 0), min(stop - c * chunk, chunk)
            parts.append(m[lo:hi])
        if not parts:
            return (self._decoded_chunk(k, name, 0) if compressed else self._chunk_map(k, name, 0, meta))[:0]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _decoded_chunk(self, k: int, name: str, c: int) -> np.ndarray:
        """Chunk ``c`` of array ``name`` of shard position ``k``, decoded once and kept in the LRU cache."""
        with self._cache_lock:
            lru = self._cache.setdefault(name, OrderedDict())
            hit = lru.get((k, c))
            if hit is not None:
                lru.move_to_end((k, c))
                return hit
            data = self._decode_chunk(k, name, c)
            data.flags.writeable = False  # shared by every sample of the chunk
            self.decoded_chunks += 1
            lru[(k, c)] = data
            while len(lru) > max(1, self.cache_chunks):
                lru.popitem(last=False)
            return data

    def _decode_chunk(self, k: int, name: str, c: int) -> np.ndarray:
        """One whole chunk, decoded with numcodecs straight from its file when the codec chain is the one this
        module writes (``bytes`` little endian + zstd/blosc: 2.6x faster than a Zarr slice, bench/store.py), else
        through Zarr. The edge chunk keeps its full stored length."""
        meta = self.shards[k].arrays[name]
        names = [cd["name"] for cd in meta["codecs"]]
        shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        path = self._chunk_file(k, name, c, meta)  # present, recorded size, checksum on first read: never zeros
        endian = meta["codecs"][0].get("configuration", {}).get("endian", "little")
        if len(names) == 2 and names[0] == "bytes" and endian == "little" and names[1] in ("zstd", "blosc"):
            import numcodecs

            codec = numcodecs.Zstd() if names[1] == "zstd" else numcodecs.Blosc()
            return np.frombuffer(codec.decode(path.read_bytes()), dtype=dtype).reshape(shape)
        key = (k, name)
        if key not in self._zarr:
            import zarr

            self._zarr[key] = zarr.open_array(str(self.shards[k].path / TENSORS_DIR / name), mode="r")
        arr = self._zarr[key]
        return np.array(arr[c * shape[0]:(c + 1) * shape[0]])  # exactly one chunk: zarr decodes it once

    def _chunk_map(self, k: int, name: str, c: int, meta: dict) -> np.ndarray:
        key = (k, name, c)
        m = self._maps.get(key)
        if m is None:
            shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
            dtype = np.dtype(meta["data_type"]).newbyteorder("<")
            m = np.memmap(self._chunk_file(k, name, c, meta), dtype=dtype, mode="r", shape=shape)
            self._maps[key] = m
        return m

    def _chunk_file(self, k: int, name: str, c: int, meta: dict) -> Path:
        """The chunk's file, present with its recorded size (and, with ``verify_reads``, its checksum, once)."""
        info = self.shards[k]
        rel = chunk_key(name, c, len(meta["shape"]) - 1)
        path = info.path / rel
        recorded = info.files.get(rel)
        where = f"{path}: shard {info.shard}'s chunk {c} of {name}"
        redo = "re-run the same `pipeline extract` to redo the shard"
        if recorded is None:
            raise StoreError(f"{where} is not in the shard's commit record; {redo}")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise StoreError(f"{where} is missing (it is listed in the commit record); {redo}") from None
        if size != recorded[0]:
            raise StoreError(f"{where} has {size} bytes, the commit record says {recorded[0]}; {redo}")
        if self.verify_reads and (k, name, c) not in self._verified:
            if sha256_file(path) != recorded[1]:
                raise StoreError(f"{where} changed after it was written (sha256 differs from the commit record); {redo}")
            self._verified.add((k, name, c))
        return path

    # ---- target pieces and frequencies
    @property
    def target_dir(self) -> Path:
        return self.root / TARGET_DIR

    @property
    def tokenizer_dir(self) -> Path:
        return self.target_dir / "tokenizer"

    def target_config(self) -> dict:
        path = self.target_dir / "config.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise StoreError(f"{path}: unreadable ({e}); re-run the same `pipeline extract` to rewrite it") from e

    def target_weights(self) -> dict[str, torch.Tensor]:
        """The frozen target pieces; checked against ``target/commit.arrow`` first when ``verify_reads`` is on (the
        whole file is read to load it anyway)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.target_dir / "weights.safetensors"
        recorded = self.target_files.get("weights.safetensors")
        if self.verify_reads and recorded is not None and sha256_file(path) != recorded[1]:
            raise StoreError(f"{path}: changed after it was written (sha256 differs from {TARGET_DIR}/{COMMIT_FILE}); "
                             "re-run the same `pipeline extract` to rewrite the target pieces")  # fmt: skip
        try:
            return load_file(str(path))
        except (OSError, SafetensorError) as e:
            raise StoreError(f"{path}: unreadable ({e}); re-run the same `pipeline extract` to rewrite it") from e

    def token_counts(self) -> np.ndarray:
        counts = np.zeros(self.vocab_size, np.int64)
        for s in self.shards:
            t = _read_arrow(s.path / COUNTS_FILE)
            ids = t["token_id"].to_numpy()
            if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
                raise StoreError(f"{s.path / COUNTS_FILE}: token id outside the vocabulary [0, {self.vocab_size}); "
                                 "re-run the same `pipeline extract` to redo the shard")  # fmt: skip
            np.add.at(counts, ids, t["count"].to_numpy())
        return counts

    def last_verify(self) -> dict | None:
        return self.last_verify_of(self.root)

    @staticmethod
    def last_verify_of(root: str | os.PathLike) -> dict | None:
        """The result `pipeline verify` last recorded in ``root`` (None if it never ran)."""
        path = Path(root) / VERIFY_FILE
        if not path.exists():
            return None
        try:
            row = _read_arrow(path).to_pylist()[0]
            return {"ok": row["ok"], "checked_at": row["checked_at"], "problems": json.loads(row["problems"])}
        except (IndexError, KeyError, ValueError) as e:
            raise StoreError(f"{path}: unreadable ({e}); delete it and run `pipeline verify` again") from e


TOKEN_ID_FIELDS = frozenset({"input_ids", "topk_ids"})


def _ranges(ids: list[int]) -> str:
    out, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


def _shard_number(path: Path) -> int:
    try:
        return int(path.name.split("-")[1])
    except (IndexError, ValueError):
        raise StoreError(f"{path}: unexpected directory in {SHARDS_DIR}/ (shard directories are shard-NNNNN); "
                         "move it out of the store") from None  # fmt: skip


def chunk_key(name: str, c: int, trailing_dims: int) -> str:
    """Path of chunk ``c`` of a field's array, relative to the shard (Zarr v3 default keys, ``/`` separator; no axis
    but the token axis is chunked, so every other index is 0)."""
    return f"{TENSORS_DIR}/{name}/c/{c}" + "/0" * trailing_dims


# ---------------------------------------------------------------------------------------------------- integrity
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


# ---- locks, temporary files and write errors


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
    return [{"path": str(p.relative_to(root)), "bytes": _du(p), "state": state} for p, state in out]


def describe_leftover(item: dict) -> str:
    what = {"dead": "left by a dead writer; the next `pipeline extract` into this store removes it",
            "in use": "being written by a live process",
            "unknown": "cannot tell whether a live process writes it (the store is not writable here)",
            "set aside": "damaged data set aside when it was redone (see its PROBLEMS.txt); delete it once inspected"}[item["state"]]
    return f"{item['path']} ({item['bytes']:,} bytes): {what}"


def _du(p: Path) -> int:
    try:
        if p.is_dir():
            return sum(q.stat().st_blocks * 512 for q in p.rglob("*") if q.is_file())
        return p.stat().st_blocks * 512
    except OSError:
        return 0


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
# ---------------------------------------------------------------------------------------------------- re-encode

_PRECISION = {"float32": 3, "float16": 2, "bfloat16": 2, FP8: 1}


def reencode_store(src: str | os.PathLike, dst: str | os.PathLike, *, hidden_dtype: str | None = None,
                   codec: str | None = None, logprob_dtype: str | None = None, io_workers: int | None = None,
                   progress: bool = False) -> dict:  # fmt: skip
    """Write a complete store again with other storage dtypes / codec, without running the target.

    Samples go through the same :class:`ShardWriter` as extraction (casts, fp8 quantization, chunking, commits)
    and the fingerprint is the source's with ``dtypes``/``sharding.codec``/``format_version`` replaced, so the
    result is what ``pipeline extract`` with those flags writes whenever the source holds the values the target
    computed (stored in its compute dtype or wider). Precision only goes down (fp32 -> bf16/fp16 -> fp8);
    re-running resumes (committed shards are kept). Returns ``inspect_store(dst)``.
    """
    from tqdm import tqdm

    reader = StoreReader(src)
    fp = json.loads(json.dumps(reader.fingerprint))
    old_hidden, old_lp = fp["dtypes"]["hidden"], fp["dtypes"]["topk_logprobs"]
    hidden_dtype, logprob_dtype = hidden_dtype or old_hidden, logprob_dtype or old_lp
    if hidden_dtype not in HIDDEN_DTYPES:
        raise StoreError(f"hidden dtype {hidden_dtype!r}: choose one of {', '.join(HIDDEN_DTYPES)}")
    if logprob_dtype not in LOGPROB_DTYPES:
        raise StoreError(f"log-prob dtype {logprob_dtype!r}: choose one of {', '.join(LOGPROB_DTYPES)}")
    if _PRECISION[hidden_dtype] > _PRECISION[old_hidden] or (hidden_dtype != old_hidden and
                                                             _PRECISION[hidden_dtype] == _PRECISION[old_hidden]):
        raise StoreError(f"{src}: hidden states are stored as {old_hidden}; re-encoding them as {hidden_dtype} "
                         "would not give what an extraction writes (re-extract instead)")  # fmt: skip
    if _PRECISION[logprob_dtype] > _PRECISION[old_lp]:
        raise StoreError(f"{src}: log-probs are stored as {old_lp}; cannot re-encode them as {logprob_dtype}")
    fp["format_version"] = FORMAT_VERSION
    fp["dtypes"].update(hidden=hidden_dtype, topk_logprobs=logprob_dtype,
                        topk_ids=topk_ids_dtype(int(fp["model"]["vocab_size"])))  # fmt: skip
    fp["sharding"]["codec"] = codec or fp["sharding"]["codec"]
    target = TargetPieces(reader.target_config(), reader.target_weights(), _CopyDir(reader.tokenizer_dir))
    writer = StoreWriter(dst, fp, reader.plan, target, io_workers=io_workers)
    bar = tqdm(total=len(reader), desc=f"re-encode {Path(dst).name}", disable=not progress, unit="sample")
    first = 0
    for s in reader.shards:
        n = len(s.index["offset"])
        if not writer.is_committed(s.shard):
            sw = writer.begin_shard(s.shard, tuple(s.stats["records"]), expected_tokens=int(s.stats["tokens"]))
            sw.skipped.update(s.stats.get("skipped", {}))
            sw.skipped_records = list(s.stats.get("skipped_records", []))
            sw.quarantined = list(s.stats.get("quarantined", []))
            for j in range(n):
                i = first + j
                meta = SampleMeta(int(s.index["sample_id"][j]), int(s.index["source_index"][j]),
                                  str(s.index["record_id"][j]), bool(s.index["truncated"][j]))  # fmt: skip
                if not sw.append(meta, reader.sample(i)):
                    raise StoreError(f"{src}: sample {meta.sample_id} ({meta.record_id!r}) is not finite as "
                                     f"{hidden_dtype}")  # fmt: skip
                bar.update(1)
            sw.commit()
        else:
            bar.update(n)
        first += n
    writer.close()
    bar.close()
    return inspect_store(dst)


class _CopyDir:
    """A tokenizer stand-in for :class:`TargetPieces`: ``save_pretrained`` copies the stored tokenizer files."""

    def __init__(self, path: Path):
        self.path = path

    def save_pretrained(self, out: str) -> None:
        shutil.copytree(self.path, out, dirs_exist_ok=True)


# ---------------------------------------------------------------------------------------------------- inspect / verify


def inspect_store(root: str | os.PathLike) -> dict:
    """Counts, bytes per field and per token, and per-shard status, for `pipeline inspect`."""
    reader = StoreReader(root, require_complete=False, skip_bad_shards=True)
    field_bytes: Counter[str] = Counter()
    shards = []
    skipped: Counter[str] = Counter()
    quarantined = 0
    for s in reader.shards:
        for rel, (size, _) in s.files.items():
            top = rel.split("/")
            field_bytes[top[1] if top[0] == TENSORS_DIR else "metadata"] += size
        skipped.update(s.stats.get("skipped", {}))
        quarantined += len(s.stats.get("quarantined", []))
        shards.append({"shard": s.shard, "status": "committed", "samples": s.stats["samples"],
                       "tokens": s.stats["tokens"], "bytes": sum(size for size, _ in s.files.values())})  # fmt: skip
    for shard, problems in reader.bad_shards.items():
        shards.append({"shard": shard, "status": "corrupt", "samples": 0, "tokens": 0, "bytes": 0,
                       "problems": problems})  # fmt: skip
    for m in reader.missing_shards:
        status = "in progress" if list((reader.root / SHARDS_DIR).glob(f"{TMP_PREFIX}{shard_name(m)}-*")) else "missing"
        shards.append({"shard": m, "status": status, "samples": 0, "tokens": 0, "bytes": 0})
    shards.sort(key=lambda r: r["shard"])
    tokens = int(reader.lengths.sum())
    target_bytes = sum(p.stat().st_size for p in reader.target_dir.rglob("*") if p.is_file())
    try:
        verify = reader.last_verify()
    except StoreError:
        verify = None
    return {
        "path": str(reader.root),
        "format_version": reader.format_version,
        "hidden_dtype": reader.hidden_dtype,
        "codec": reader.fingerprint["sharding"]["codec"],
        "samples": len(reader),
        "tokens": tokens,
        "loss_tokens": int(reader.loss_tokens.sum()),
        "loss_token_share": float(reader.loss_tokens.sum() / tokens) if tokens else 0.0,
        "bytes": int(sum(field_bytes.values()) + target_bytes),
        "bytes_per_field": dict(sorted(field_bytes.items())),
        "bytes_per_token": {k: v / tokens for k, v in sorted(field_bytes.items())} if tokens else {},
        # tensors + per-shard metadata, the figure compared with other layouts (target pieces excluded)
        "bytes_per_token_total": sum(field_bytes.values()) / tokens if tokens else 0.0,
        "target_bytes": target_bytes,
        "target_problems": reader.target_problems,
        "skipped": dict(sorted(skipped.items())),
        "quarantined": quarantined,
        "shards": shards,
        "complete": not reader.missing_shards and not reader.bad_shards and not reader.target_problems,
        "last_verify": verify,
        "leftovers": find_leftovers(reader.root),
        "fingerprint": reader.fingerprint,
        "fingerprint_digest": reader.digest,
        "plan": reader.plan,
    }


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
        problems += [f"{path.name}: {p}" for p in open_shard(path, meta["fingerprint_digest"], fields, full=True)[1]]
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
        tmp.unlink(missing_ok=True)


def bad_shards_of(problems: list[str]) -> set[int]:
    """Shard numbers named by verify problems (``shard-NNNNN: ...``)."""
    return {int(m.group(1)) for p in problems if (m := re.match(r"shard-(\d+):", p))}

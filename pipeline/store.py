"""The feature store: the one module that knows the on-disk format (see storage_layout.md).

Extraction writes through :class:`StoreWriter` / :class:`ShardWriter`; training, inspection and verification read
through :class:`StoreReader` and :func:`verify_store`. Bump ``FORMAT_VERSION`` with any change to what is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch

from pipeline import __version__

FORMAT_VERSION = 1

STORE_FILE = "store.arrow"
VERIFY_FILE = "verify.arrow"
TARGET_DIR = "target"
SHARDS_DIR = "shards"
TENSORS_DIR = "tensors"
INDEX_FILE = "index.arrow"
COUNTS_FILE = "token_counts.arrow"
COMMIT_FILE = "commit.arrow"
TMP_PREFIX = ".tmp-"
MAX_LISTED_SKIPS = 1000

# Logical dtype name -> (zarr/numpy storage dtype, torch dtype).  bf16 has no numpy dtype: its bits go in uint16.
HIDDEN_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float16": (np.dtype(np.float16), torch.float16),
    "bfloat16": (np.dtype(np.uint16), torch.bfloat16),
    "float32": (np.dtype(np.float32), torch.float32),
}
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
    with pa.memory_map(str(path), "r") as source:
        return ipc.open_file(source).read_all()


def _meta_json(table: pa.Table) -> dict:
    meta = table.schema.metadata or {}
    return json.loads(meta.get(b"pipeline", b"{}"))


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def storage_dtype(logical: str) -> np.dtype:
    if logical in HIDDEN_DTYPES:
        return HIDDEN_DTYPES[logical][0]
    return np.dtype(logical)


def to_storage(t: torch.Tensor, logical: str) -> np.ndarray:
    """Cast a tensor to its storage dtype and return the numpy array holding exactly the stored bytes."""
    if logical == "bfloat16":
        return t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    if logical in HIDDEN_DTYPES:
        return t.detach().to("cpu", HIDDEN_DTYPES[logical][1]).contiguous().numpy()
    return t.detach().cpu().numpy().astype(logical, copy=False)


def from_storage(a: np.ndarray, logical: str) -> torch.Tensor:
    """Stored numpy rows -> torch tensor of the logical dtype (one copy; the input may be a read-only memmap)."""
    t = torch.from_numpy(np.array(a, copy=True))
    if logical == "bfloat16":
        return t.view(torch.bfloat16)
    return t


def target_files_digest(target_dir: Path) -> dict[str, str]:
    return {p.relative_to(target_dir).as_posix(): sha256_file(p)
            for p in sorted(target_dir.rglob("*")) if p.is_file()}  # fmt: skip


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
        "topk_ids": ((k,), "int32"),
        "topk_logprobs": ((k,), fp["dtypes"]["topk_logprobs"]),
    }
    if "hidden_last" in fp["layers"]["stored"]:
        shapes["hidden_last"] = ((h,), hidden)
    if "hidden_aux" in fp["layers"]["stored"]:
        shapes["hidden_aux"] = ((len(fp["layers"]["aux"]), h), hidden)
    return shapes


class StoreWriter:
    """Creates (or re-opens, for resume / more workers) a store and hands out shard writers."""

    def __init__(self, root: str | os.PathLike, fingerprint: dict, plan: dict, target: TargetPieces,
                 rank: int = 0, world_size: int = 1):  # fmt: skip
        missing = missing_fingerprint_fields(fingerprint)
        if missing:
            raise StoreError(f"fingerprint incomplete, missing: {', '.join(missing)}")
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.digest = fingerprint_digest(fingerprint)
        self.plan = plan
        self.rank, self.world_size = rank, world_size
        self.fields = field_shapes(fingerprint)
        (self.root / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        self._publish_store_file()
        self._publish_target(target)

    # The first worker creates store.arrow; later ones (resume, other ranks) must agree with it.
    def _publish_store_file(self) -> None:
        final = self.root / STORE_FILE
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
            _write_arrow(tmp, table)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            try:
                os.link(tmp, final)  # atomic and never replaces: of two racing workers exactly one wins
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
            _fsync_dir(self.root)
        meta = read_store_meta(self.root)
        diffs = diff_fingerprints(meta["fingerprint"], self.fingerprint)
        if diffs:
            raise StoreError(
                f"{final}: this store was extracted with a different fingerprint; refusing to mix. "
                "Differing fields:\n  " + "\n  ".join(diffs) + "\nUse a new --out directory for a different extraction."
            )
        if meta["plan"] != self.plan:
            raise StoreError(f"{final}: shard plan {meta['plan']} differs from this run's {self.plan}")

    def _publish_target(self, target: TargetPieces) -> None:
        from safetensors.torch import save_file

        final = self.root / TARGET_DIR
        if final.exists():
            return
        tmp = self.root / f"{TMP_PREFIX}{TARGET_DIR}-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(target.config, indent=2, sort_keys=True))
        save_file({k: v.detach().cpu().contiguous() for k, v in target.weights.items()},
                  str(tmp / "weights.safetensors"), metadata={"format": "pt"})  # fmt: skip
        target.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        try:
            os.rename(tmp, final)
        except OSError:  # another worker published it first
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(self.root)

    def shard_dir(self, shard: int) -> Path:
        return self.root / SHARDS_DIR / shard_name(shard)

    def is_committed(self, shard: int) -> bool:
        commit = self.shard_dir(shard) / COMMIT_FILE
        if not commit.exists():
            return False
        meta = _meta_json(_read_arrow(commit))
        if meta.get("fingerprint_digest") != self.digest:
            raise StoreError(f"{commit}: committed with fingerprint {meta.get('fingerprint_digest')}, "
                             f"store has {self.digest}")  # fmt: skip
        return True

    def begin_shard(self, shard: int, records: tuple[int, int], expected_tokens: int | None = None) -> ShardWriter:
        """A writer for ``shard``. ``expected_tokens`` (the tokenized length of its samples) lets the chunk
        length divide the shard almost exactly; without it chunks are ``chunk_tokens`` long."""
        shards = self.root / SHARDS_DIR
        # Leftovers of a crashed writer of this shard: never committed, safe to remove.
        for stale in shards.glob(f"{TMP_PREFIX}{shard_name(shard)}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = shards / f"{TMP_PREFIX}{shard_name(shard)}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        return ShardWriter(self, shard, tmp, records, expected_tokens)


class ShardWriter:
    """Appends samples token-major to one shard's Zarr arrays; `commit` publishes the shard atomically."""

    def __init__(self, store: StoreWriter, shard: int, tmp: Path, records: tuple[int, int],
                 expected_tokens: int | None = None):  # fmt: skip
        import zarr
        from zarr.storage import LocalStore

        self.store, self.shard, self.tmp, self.records = store, shard, tmp, records
        self.chunk = chunk_length(expected_tokens, int(store.fingerprint["sharding"]["chunk_tokens"]))
        tmp.mkdir(parents=True)
        group = zarr.open_group(LocalStore(str(tmp / TENSORS_DIR)), mode="w")
        codec = store.fingerprint["sharding"]["codec"]
        self.arrays = {}
        for name, (tail, logical) in store.fields.items():
            dt = storage_dtype(logical)
            self.arrays[name] = group.create_array(  # sized for the expected rows: no metadata rewrite per flush
                name, shape=(expected_tokens or 0, *tail), chunks=(self.chunk, *tail), dtype=dt, fill_value=0,
                compressors=_compressors(codec, dt.itemsize), config={"write_empty_chunks": True},
                attributes={"pipeline_dtype": logical},
            )  # fmt: skip
        self.pending: dict[str, list[np.ndarray]] = {n: [] for n in store.fields}
        self.pending_rows = 0
        self.written_rows = 0  # rows in zarr: whole chunks until the final flush
        self.index_rows: list[dict] = []
        self.counts: Counter[int] = Counter()
        self.skipped: Counter[str] = Counter()
        self.skipped_records: list[dict] = []
        self.quarantined: list[dict] = []
        self.started = time.time()

    @property
    def tokens(self) -> int:
        return self.written_rows + self.pending_rows

    def skip(self, source_index: int, record_id: str, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        if len(self.skipped_records) < MAX_LISTED_SKIPS:
            self.skipped_records.append({"source_index": source_index, "record_id": record_id,
                                         "reason": reason, "detail": detail})  # fmt: skip

    def append(self, meta: SampleMeta, tensors: dict[str, torch.Tensor]) -> bool:
        """Store one sample; returns False (and quarantines it) when a tensor is not finite after the cast."""
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
            arr = to_storage(t, logical)
            if t.is_floating_point() and not _finite(arr, logical):
                self.quarantined.append({"sample_id": meta.sample_id, "record_id": meta.record_id, "field": name,
                                         "reason": f"non-finite values after cast to {logical}"})
                return False
            stored[name] = arr
        loss_tokens = int(stored["loss_mask"].sum())
        self.counts.update(stored["input_ids"][stored["loss_mask"]].tolist())
        self.index_rows.append({"sample_id": meta.sample_id, "source_index": meta.source_index,
                                "record_id": meta.record_id, "offset": self.tokens, "length": length,
                                "loss_tokens": loss_tokens, "truncated": meta.truncated})  # fmt: skip
        for name, arr in stored.items():
            self.pending[name].append(arr)
        self.pending_rows += length
        if self.pending_rows >= self.chunk:
            self._flush(final=False)
        return True

    def _flush(self, final: bool) -> None:
        rows = self.pending_rows if final else (self.pending_rows // self.chunk) * self.chunk
        if rows == 0:
            return
        start = self.written_rows
        for name, parts in self.pending.items():
            block = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
            arr = self.arrays[name]
            if start + rows > arr.shape[0]:
                arr.resize((start + rows, *arr.shape[1:]))
            arr[start:start + rows] = block[:rows]  # chunk-aligned: whole chunks written, none read back
            self.pending[name] = [block[rows:]] if rows < len(block) else []
        self.pending_rows -= rows
        self.written_rows += rows

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self) -> dict:
        """Flush, checksum, fsync and rename into place. Returns the commit statistics."""
        self._flush(final=True)
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
        rows = [{"path": p.relative_to(self.tmp).as_posix(), "bytes": p.stat().st_size, "sha256": h}
                for p, h in zip(files, _sync_and_hash(files), strict=True)]  # fmt: skip
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
        table = pa.Table.from_pylist(rows, schema=COMMIT_SCHEMA).replace_schema_metadata(
            {"pipeline": json.dumps(stats, sort_keys=True)})
        _write_arrow(self.tmp / COMMIT_FILE, table)
        with open(self.tmp / COMMIT_FILE, "rb") as f:
            os.fsync(f.fileno())
        for d in sorted({p.parent for p in files} | {self.tmp}, key=lambda q: -len(q.parts)):
            _fsync_dir(d)
        final = self.store.shard_dir(self.shard)
        try:
            os.rename(self.tmp, final)
        except OSError as e:  # a committed shard is never replaced
            self.abort()
            raise StoreError(f"{final}: already committed by another worker; this copy was discarded") from e
        _fsync_dir(final.parent)
        return stats


def chunk_length(expected_tokens: int | None, chunk_tokens: int) -> int:
    """At most ``chunk_tokens``, and dividing ``expected_tokens`` into chunks with less than one row of padding
    per chunk (Zarr v3 stores the edge chunk at full size)."""
    if expected_tokens is None:
        return chunk_tokens
    n_chunks = max(1, -(-expected_tokens // chunk_tokens))
    return max(1, -(-expected_tokens // n_chunks))


def _sync_and_hash(files: list[Path]) -> list[str]:
    """fsync + sha256 of each file, several at once (hashlib and fsync release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

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
    return bool(np.isfinite(arr).all())


# ---------------------------------------------------------------------------------------------------- reading


def read_store_meta(root: str | os.PathLike) -> dict:
    path = Path(root) / STORE_FILE
    if not path.exists():
        raise StoreError(f"{path}: not a feature store (no {STORE_FILE}); run `pipeline extract --out {root}` first")
    row = _read_arrow(path).to_pylist()[0]
    if row["format_version"] != FORMAT_VERSION:
        raise StoreError(f"{path}: format_version {row['format_version']}, this code reads {FORMAT_VERSION}")
    return {"format_version": row["format_version"], "fingerprint": json.loads(row["fingerprint"]),
            "fingerprint_digest": row["fingerprint_digest"], "plan": json.loads(row["plan"]),
            "created_by": json.loads(row["created_by"])}  # fmt: skip


@dataclass
class ShardInfo:
    shard: int
    path: Path
    stats: dict
    index: dict[str, np.ndarray]
    arrays: dict[str, dict] = field(default_factory=dict)  # zarr metadata per field


class StoreReader:
    """Read-only access to a committed store; samples come back as memmap-backed numpy rows."""

    def __init__(self, root: str | os.PathLike, require_complete: bool = True):
        self.root = Path(root)
        meta = read_store_meta(self.root)
        self.fingerprint: dict = meta["fingerprint"]
        self.digest: str = meta["fingerprint_digest"]
        self.plan: dict = meta["plan"]
        self.fields = field_shapes(self.fingerprint)
        self.shards: list[ShardInfo] = []
        for path in sorted((self.root / SHARDS_DIR).glob("shard-*")):
            commit = path / COMMIT_FILE
            if not commit.exists():
                continue
            index = _read_arrow(path / INDEX_FILE)
            info = ShardInfo(int(path.name.split("-")[1]), path, _meta_json(_read_arrow(commit)),
                             {c: index[c].to_numpy(zero_copy_only=False) for c in index.column_names})  # fmt: skip
            for name in self.fields:
                info.arrays[name] = json.loads((path / TENSORS_DIR / name / "zarr.json").read_text())
            self.shards.append(info)
        missing = sorted(set(range(self.plan["shards"])) - {s.shard for s in self.shards})
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

    def read(self, i: int, fields: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Rows of sample ``i`` in storage dtype (bf16 as uint16 bits); views into memmaps where possible."""
        k = int(self._shard_of[i])
        start, length = int(self.offsets[i]), int(self.lengths[i])
        out = {}
        for name in fields or tuple(self.fields):
            if name not in self.fields:
                raise StoreError(f"{self.root}: field {name!r} not stored (stored: {', '.join(self.fields)})")
            out[name] = self._rows(k, name, start, start + length)
        return out

    def sample(self, i: int, fields: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """Sample ``i`` as torch tensors of the logical dtypes (one copy out of the memmaps)."""
        return {n: from_storage(a, self.fields[n][1]) for n, a in self.read(i, fields).items()}

    def _rows(self, k: int, name: str, start: int, stop: int) -> np.ndarray:
        meta = self.shards[k].arrays[name]
        if len(meta["codecs"]) > 1:  # compressed: let zarr decode only the overlapping chunks
            key = (k, name)
            if key not in self._zarr:
                import zarr

                self._zarr[key] = zarr.open_array(str(self.shards[k].path / TENSORS_DIR / name), mode="r")
            return self._zarr[key][start:stop]
        chunk = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
        parts = []
        for c in range(start // chunk, (stop - 1) // chunk + 1 if stop > start else start // chunk):
            m = self._chunk_map(k, name, c, meta)
            lo, hi = max(start - c * chunk, 0), min(stop - c * chunk, chunk)
            parts.append(m[lo:hi])
        if not parts:
            return self._chunk_map(k, name, 0, meta)[:0]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _chunk_map(self, k: int, name: str, c: int, meta: dict) -> np.ndarray:
        key = (k, name, c)
        m = self._maps.get(key)
        if m is None:
            shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
            dtype = np.dtype(meta["data_type"]).newbyteorder("<")
            path = self.shards[k].path / TENSORS_DIR / name / "c" / str(c)
            for _ in shape[1:]:
                path = path / "0"
            if path.exists():
                m = np.memmap(path, dtype=dtype, mode="r", shape=shape)
            else:  # zarr omits chunks equal to the fill value when write_empty_chunks is off
                m = np.zeros(shape, dtype)
            self._maps[key] = m
        return m

    # ---- target pieces and frequencies
    @property
    def target_dir(self) -> Path:
        return self.root / TARGET_DIR

    @property
    def tokenizer_dir(self) -> Path:
        return self.target_dir / "tokenizer"

    def target_config(self) -> dict:
        return json.loads((self.target_dir / "config.json").read_text())

    def target_weights(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.target_dir / "weights.safetensors"))

    def token_counts(self) -> np.ndarray:
        counts = np.zeros(int(self.fingerprint["model"]["vocab_size"]), np.int64)
        for s in self.shards:
            t = _read_arrow(s.path / COUNTS_FILE)
            np.add.at(counts, t["token_id"].to_numpy(), t["count"].to_numpy())
        return counts

    def last_verify(self) -> dict | None:
        path = self.root / VERIFY_FILE
        if not path.exists():
            return None
        row = _read_arrow(path).to_pylist()[0]
        return {"ok": row["ok"], "checked_at": row["checked_at"], "problems": json.loads(row["problems"])}


def _ranges(ids: list[int]) -> str:
    out, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


# ---------------------------------------------------------------------------------------------------- inspect / verify


def inspect_store(root: str | os.PathLike) -> dict:
    """Counts, bytes per field and per token, and per-shard status, for `pipeline inspect`."""
    reader = StoreReader(root, require_complete=False)
    field_bytes: Counter[str] = Counter()
    shards = []
    skipped: Counter[str] = Counter()
    quarantined = 0
    for s in reader.shards:
        commit = _read_arrow(s.path / COMMIT_FILE).to_pylist()
        for row in commit:
            top = row["path"].split("/")
            field_bytes[top[1] if top[0] == TENSORS_DIR else "metadata"] += row["bytes"]
        skipped.update(s.stats.get("skipped", {}))
        quarantined += len(s.stats.get("quarantined", []))
        shards.append({"shard": s.shard, "status": "committed", "samples": s.stats["samples"],
                       "tokens": s.stats["tokens"], "bytes": sum(r["bytes"] for r in commit)})  # fmt: skip
    for m in reader.missing_shards:
        status = "in progress" if list((reader.root / SHARDS_DIR).glob(f"{TMP_PREFIX}{shard_name(m)}-*")) else "missing"
        shards.append({"shard": m, "status": status, "samples": 0, "tokens": 0, "bytes": 0})
    shards.sort(key=lambda r: r["shard"])
    tokens = int(reader.lengths.sum())
    target_bytes = sum(p.stat().st_size for p in reader.target_dir.rglob("*") if p.is_file())
    verify = reader.last_verify()
    return {
        "path": str(reader.root),
        "format_version": FORMAT_VERSION,
        "samples": len(reader),
        "tokens": tokens,
        "loss_tokens": int(reader.loss_tokens.sum()),
        "loss_token_share": float(reader.loss_tokens.sum() / tokens) if tokens else 0.0,
        "bytes": int(sum(field_bytes.values()) + target_bytes),
        "bytes_per_field": dict(sorted(field_bytes.items())),
        "bytes_per_token": {k: v / tokens for k, v in sorted(field_bytes.items())} if tokens else {},
        "target_bytes": target_bytes,
        "skipped": dict(sorted(skipped.items())),
        "quarantined": quarantined,
        "shards": shards,
        "complete": not reader.missing_shards,
        "last_verify": verify,
        "fingerprint": reader.fingerprint,
        "fingerprint_digest": reader.digest,
        "plan": reader.plan,
    }


def verify_store(root: str | os.PathLike, write_result: bool = True) -> list[str]:
    """Re-hash every committed file and check index/tensor consistency. Returns the problems (empty = ok)."""
    root = Path(root)
    meta = read_store_meta(root)
    fp = meta["fingerprint"]
    problems: list[str] = []
    missing = missing_fingerprint_fields(fp)
    if missing:
        problems.append(f"{STORE_FILE}: fingerprint incomplete, missing {', '.join(missing)}")
    target = root / TARGET_DIR
    if not (target / "weights.safetensors").exists() or not (target / "config.json").exists():
        problems.append(f"{TARGET_DIR}/: missing target config or weights")
    fields = field_shapes(fp)
    seen = set()
    for path in sorted((root / SHARDS_DIR).glob("shard-*")):
        name = path.name
        try:
            shard = int(name.split("-")[1])
        except ValueError:
            problems.append(f"{name}: unexpected directory in {SHARDS_DIR}/")
            continue
        seen.add(shard)
        problems += [f"{name}: {p}" for p in _verify_shard(path, meta, fields)]
    for m in sorted(set(range(meta["plan"]["shards"])) - seen):
        problems.append(f"{shard_name(m)}: not committed (store incomplete)")
    if write_result:
        table = pa.table({"ok": [not problems], "checked_at": [time.time()], "problems": [json.dumps(problems)]})
        tmp = root / f"{TMP_PREFIX}{VERIFY_FILE}-{os.getpid()}"
        _write_arrow(tmp, table)
        os.replace(tmp, root / VERIFY_FILE)
    return problems


def _verify_shard(path: Path, meta: dict, fields: dict) -> list[str]:
    problems = []
    commit_path = path / COMMIT_FILE
    try:
        commit = _read_arrow(commit_path)
    except (OSError, pa.ArrowInvalid) as e:
        return [f"{COMMIT_FILE} unreadable ({e})"]
    stats = _meta_json(commit)
    if stats.get("fingerprint_digest") != meta["fingerprint_digest"]:
        problems.append("committed under a different fingerprint")
    listed = {r["path"]: r for r in commit.to_pylist()}
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {COMMIT_FILE}
    for rel in sorted(present - set(listed)):
        problems.append(f"{rel}: file not in the commit record")
    for rel, row in sorted(listed.items()):
        p = path / rel
        if not p.exists():
            problems.append(f"{rel}: listed in the commit record but missing")
        elif p.stat().st_size != row["bytes"]:
            problems.append(f"{rel}: size {p.stat().st_size} != recorded {row['bytes']}")
        elif sha256_file(p) != row["sha256"]:
            problems.append(f"{rel}: checksum mismatch (sha256 differs from the commit record)")
    if problems:
        return problems
    # Structure: the index tiles the tensors exactly, and every array has the fingerprint's shape.
    import zarr

    index = _read_arrow(path / INDEX_FILE)
    offsets, lengths = index["offset"].to_numpy(), index["length"].to_numpy()
    total = int(lengths.sum())
    expected_offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else offsets
    if not np.array_equal(offsets, expected_offsets):
        problems.append(f"{INDEX_FILE}: offsets are not contiguous")
    if stats.get("tokens") != total or stats.get("samples") != len(lengths):
        problems.append(f"{INDEX_FILE}: {len(lengths)} samples/{total} tokens, commit says "
                        f"{stats.get('samples')}/{stats.get('tokens')}")  # fmt: skip
    for name, (tail, logical) in fields.items():
        try:
            arr = zarr.open_array(str(path / TENSORS_DIR / name), mode="r")
        except Exception as e:  # noqa: BLE001 - any zarr failure is a problem to report, not to raise
            problems.append(f"{TENSORS_DIR}/{name}: unreadable ({e})")
            continue
        if tuple(arr.shape) != (total, *tail):
            problems.append(f"{TENSORS_DIR}/{name}: shape {tuple(arr.shape)} != expected {(total, *tail)}")
        if np.dtype(arr.dtype.to_native_dtype() if hasattr(arr.dtype, "to_native_dtype") else arr.dtype) != storage_dtype(logical):
            problems.append(f"{TENSORS_DIR}/{name}: dtype {arr.dtype} != expected {storage_dtype(logical)}")
    if not problems:
        mask = zarr.open_array(str(path / TENSORS_DIR / "loss_mask"), mode="r")[:]
        per_sample = np.add.reduceat(mask.astype(np.int64), offsets) if total else np.zeros(0, np.int64)
        if not np.array_equal(per_sample, index["loss_tokens"].to_numpy()):
            problems.append(f"{INDEX_FILE}: loss_tokens disagree with tensors/loss_mask")
    return problems

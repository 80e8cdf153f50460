"""What a store is on disk: names, the fingerprint and its digest, the Arrow files, the fields a fingerprint prescribes.

Bump ``FORMAT_VERSION`` with any change to what is written (storage_layout.md)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
import torch

from pipeline.store.dtypes import SCALE_SUFFIX, SCALED
from pipeline.store.errors import StoreError

FORMAT_VERSION = 5
# version 1: no fp8, int32 top-k ids, no target/commit.arrow; version 2: no projection; version 3: no int7 and no
# dtypes.hidden_aux (hidden_aux in dtypes.hidden); version 4: no q19 and no component scale; everything else reads
# the same
READABLE_FORMATS = (1, 2, 3, 4, 5)

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


HIDDEN_FIELDS = ("hidden_last", "hidden_aux")
ALWAYS_FIELDS = ("input_ids", "loss_mask", "topk_ids", "topk_logprobs")


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
        projected = projection_of(fp, "hidden_aux")
        shapes["hidden_aux"] = ((projected["k"],) if projected else (len(fp["layers"]["aux"]), h),
                                fp["dtypes"].get("hidden_aux", hidden))  # format 4: its own dtype
    return shapes


def projection_of(fp: dict, name: str) -> dict | None:
    """The fingerprint's record of the fixed projection ``name`` is stored under (format 3), or None."""
    return (fp.get("projection") or {}).get(name)


def array_shapes(fp: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """The Zarr arrays of a shard: one per field, plus an fp32 ``<field>_scale`` (rows x aux layers) per fp8/int7/q19
    field."""
    arrays = {}
    for name, (tail, logical) in field_shapes(fp).items():
        arrays[name] = (tail, logical)
        if logical in SCALED:
            arrays[name + SCALE_SUFFIX] = (tail[:-1], "float32")
    return arrays


INDEX_SCHEMA = pa.schema([
    ("sample_id", pa.int64()), ("source_index", pa.int64()), ("record_id", pa.string()),
    ("offset", pa.int64()), ("length", pa.int32()), ("loss_tokens", pa.int32()), ("truncated", pa.bool_()),
])  # fmt: skip
COMMIT_SCHEMA = pa.schema([("path", pa.string()), ("bytes", pa.int64()), ("sha256", pa.string())])


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

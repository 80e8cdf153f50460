"""Reading a committed store: :class:`StoreReader`."""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.store.dtypes import SCALE_SUFFIX, SCALED, dequantize, from_storage
from pipeline.store.errors import StoreError
from pipeline.store.format import (
    COMMIT_FILE,
    COUNTS_FILE,
    SHARDS_DIR,
    TARGET_DIR,
    TENSORS_DIR,
    TOKEN_ID_FIELDS,
    VERIFY_FILE,
    _ranges,
    _read_arrow,
    _shard_number,
    array_shapes,
    chunk_key,
    field_shapes,
    projection_of,
    read_store_meta,
    sha256_file,
    shard_name,
)
from pipeline.store.integrity import ShardInfo, check_target, open_shard
from pipeline.store.projection import PROJECTION_FILE, load_projection


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
        if any(projection_of(self.fingerprint, n) for n in self.fields) and not (self.root / PROJECTION_FILE).exists():
            raise StoreError(f"{self.root / PROJECTION_FILE}: missing; the store's features were written through this "
                             "projection and cannot be read without it (re-extract into a new --out)")  # fmt: skip
        self.shards: list[ShardInfo] = []
        self.bad_shards: dict[int, list[str]] = {}
        for path in sorted((self.root / SHARDS_DIR).glob("shard-*")):
            if not (path / COMMIT_FILE).exists():
                continue
            info, problems = open_shard(path, self.digest, self.arrays, plan=self.plan)
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
        self._projections: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _refuse_problems(self) -> None:
        if self.target_problems:
            more = len(self.target_problems) - 1
            raise StoreError(f"{self.root}/{self.target_problems[0]}{f' (+{more} more)' if more else ''}: the target "
                             "pieces are damaged; re-run the same `pipeline extract` to rewrite them")  # fmt: skip
        if self.bad_shards:
            shard, problems = next(iter(self.bad_shards.items()))
            total = sum(len(p) for p in self.bad_shards.values())
            which = (f"shard {shard} is damaged" if len(self.bad_shards) == 1 else
                     f"shards {_ranges(sorted(self.bad_shards))} are damaged")  # fmt: skip
            raise StoreError(f"{self.root / SHARDS_DIR / shard_name(shard)}/{problems[0]}: {which} "
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
        """Rows of sample ``i`` in storage dtype (bf16 as uint16 bits, fp8/int7/q19 as bytes plus ``<field>_scale``);
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
            if self.fields[name][1] in SCALED:
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
        """Sample ``i`` as torch tensors of the logical dtypes (one copy out of the memmaps); fp8/int7/q19 fields come
        back decoded to fp32 (stored value times its row scale), a projected field with a component scale ``s``
        (format 5) as ``y = stored · s``."""
        rows = self.read(i, fields)
        out = {}
        for name in fields or tuple(self.fields):
            logical = self.fields[name][1]
            if logical in SCALED:
                out[name] = dequantize(rows[name], rows[name + SCALE_SUFFIX], logical)
            else:
                out[name] = from_storage(rows[name], logical)
            scale = self.component_scale(name)
            if scale is not None:
                out[name] = out[name].float().mul_(scale)
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
            try:
                return np.frombuffer(codec.decode(path.read_bytes()), dtype=dtype).reshape(shape)
            except (RuntimeError, ValueError) as e:  # a damaged compressed chunk: an error, never a traceback
                raise StoreError(f"{path}: shard {self.shards[k].shard}, chunk {c} of {name} cannot be decoded ({e}); "
                                 f"`pipeline verify {self.root}` checks every chunk, re-running the same `pipeline "
                                 "extract` redoes the shard") from e  # fmt: skip
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

    def projection(self, name: str = "hidden_aux") -> torch.Tensor:
        """P [k, A*H] fp32 of a projected field (the field holds P·x), checked against the fingerprint's sha256."""
        if projection_of(self.fingerprint, name) is None:
            raise StoreError(f"{self.root}: field {name!r} is stored whole (no projection)")
        return self._projection(name)[0]

    def component_scale(self, name: str = "hidden_aux") -> torch.Tensor | None:
        """``s`` [k] of a projected field stored as ``y / s`` (format 5), else None."""
        record = projection_of(self.fingerprint, name)
        return None if record is None or "component_scale" not in record else self._projection(name)[1]

    def _projection(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if name not in self._projections:
            try:
                self._projections[name] = load_projection(self.root, projection_of(self.fingerprint, name), name)
            except ValueError as e:
                raise StoreError(f"{e}; re-extract into a new --out") from e
        return self._projections[name]

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

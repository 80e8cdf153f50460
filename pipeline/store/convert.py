"""Re-encoding a complete store (``pipeline convert``) without running the target."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.store.dtypes import (
    _PRECISION,
    HIDDEN_DTYPES,
    LOGPROB_DTYPES,
    Q19,
    aux_dtype_for,
    check_hidden_dtype,
    topk_ids_dtype,
)
from pipeline.store.errors import StoreError
from pipeline.store.format import FORMAT_VERSION, SampleMeta, TargetPieces, projection_of
from pipeline.store.inspect import inspect_store
from pipeline.store.projection import (
    DEFAULT_CALIBRATION_TOKENS,
    PROJECTION_FILE,
    auto_projection_k,
    encoder,
    fit_projection,
    project,
    read_projection_file,
    save_projection,
)
from pipeline.store.reader import StoreReader
from pipeline.store.writer import StoreWriter


def reencode_store(src: str | os.PathLike, dst: str | os.PathLike, *, hidden_dtype: str | None = None,
                   aux_dtype: str | None = None, codec: str | None = None, logprob_dtype: str | None = None,
                   io_workers: int | None = None,
                   aux_projection: int | str | None = "keep", calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
                   progress: bool = False) -> dict:  # fmt: skip
    """Write a complete store again with other storage dtypes / codec, without running the target.

    Samples go through the same :class:`ShardWriter` as extraction (casts, fp8 quantization, chunking, commits)
    and the fingerprint is the source's with ``dtypes``/``sharding.codec``/``format_version`` replaced, so the
    result is what ``pipeline extract`` with those flags writes whenever the source holds the values the target
    computed (stored in its compute dtype or wider). Precision only goes down (fp32 -> bf16/fp16 -> fp8);
    re-running resumes (committed shards are kept). Returns ``inspect_store(dst)``.

    ``aux_dtype``: ``hidden_aux``'s dtype (None: the source's; ``"auto"``: q19 when the result is projected with a
    component scale, int7 when projected without one (a format 3-4 source's projection is kept as it is), else
    ``hidden_dtype``). ``aux_projection``: ``"keep"`` (the source's: projected stays projected with its P),
    ``"auto"`` (k = 2H; a projected source keeps its k) or k
    (project a whole ``hidden_aux``; P is estimated from the stored features of the first ``calibration_tokens``
    tokens in stored order, as extraction does from the target's in its forward order: equal up to rounding), None (whole; a
    projected source cannot be unprojected).
    """
    from tqdm import tqdm

    reader = StoreReader(src)
    fp = json.loads(json.dumps(reader.fingerprint))
    old_hidden, old_lp = fp["dtypes"]["hidden"], fp["dtypes"]["topk_logprobs"]
    hidden_dtype, logprob_dtype = hidden_dtype or old_hidden, logprob_dtype or old_lp
    check_hidden_dtype(hidden_dtype, "hidden dtype")
    if logprob_dtype not in LOGPROB_DTYPES:
        raise StoreError(f"log-prob dtype {logprob_dtype!r}: choose one of {', '.join(LOGPROB_DTYPES)}")
    _check_lower(src, "hidden states", old_hidden, hidden_dtype)
    if _PRECISION[logprob_dtype] > _PRECISION[old_lp]:
        raise StoreError(f"{src}: log-probs are stored as {old_lp}; cannot re-encode them as {logprob_dtype}")
    fp["format_version"] = FORMAT_VERSION
    fp["dtypes"].update(hidden=hidden_dtype, topk_logprobs=logprob_dtype,
                        topk_ids=topk_ids_dtype(int(fp["model"]["vocab_size"])))  # fmt: skip
    fp["sharding"]["codec"] = codec or fp["sharding"]["codec"]
    fp["projection"] = fp.get("projection") or {}
    encode = _aux_encoding(reader, Path(dst), fp, aux_projection, calibration_tokens)
    if "hidden_aux" in reader.fields:
        old_aux = reader.fields["hidden_aux"][1]
        record = projection_of(fp, "hidden_aux")
        scaled = "component_scale" in (record or {})
        # None: the source's own aux dtype, where it had one; else the hidden dtype
        aux_dtype = aux_dtype_for(aux_dtype or (old_aux if old_aux != old_hidden else None), bool(record),
                                  hidden_dtype, scaled)  # fmt: skip
        if aux_dtype not in HIDDEN_DTYPES:
            raise StoreError(f"aux dtype {aux_dtype!r}: choose auto or one of {', '.join(HIDDEN_DTYPES)}")
        if aux_dtype == Q19 and not scaled:
            raise StoreError(f"{src}: q19 codes need a projection with a component scale (format 5); this store's "
                             "has none: keep int7 or re-extract")  # fmt: skip
        _check_lower(src, "EAGLE-3 features", old_aux, aux_dtype)
        fp["dtypes"]["hidden_aux"] = aux_dtype
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
                sample = reader.sample(i)
                if encode is not None:
                    sample["hidden_aux"] = encode(sample["hidden_aux"])
                if not sw.append(meta, sample):
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


def _check_lower(src, what: str, old: str, new: str) -> None:
    """Precision only goes down (fp32 -> bf16/fp16 -> fp8 -> int7 -> q19): anything else is not what an extraction wrote."""
    if _PRECISION[new] > _PRECISION[old] or (new != old and _PRECISION[new] == _PRECISION[old]):
        raise StoreError(f"{src}: {what} are stored as {old}; re-encoding them as {new} would not give what an "
                         "extraction writes (re-extract instead)")


def _aux_encoding(reader: StoreReader, dst: Path, fp: dict, k: int | str | None,
                  calibration_tokens: int) -> Callable[[torch.Tensor], torch.Tensor] | None:  # fmt: skip
    """What turns the source's ``hidden_aux`` as read (``y``, or whole ``x``) into the rows ``dst`` stores (None: as
    read), publishing P (and s) in ``dst`` and recording them in ``fp`` (a resumed conversion finds them published)."""
    source = projection_of(reader.fingerprint, "hidden_aux")
    if k == "keep" or "hidden_aux" not in reader.fields:
        return _keep(reader, dst, source)
    if k == "auto":  # a projected source keeps its P (its whole features are gone); else k = 2H
        k = source["k"] if source is not None else auto_projection_k(int(fp["model"]["hidden_size"]),
                                                                     len(fp["layers"]["aux"]))  # fmt: skip
    if source is not None:
        if k == source["k"]:
            return _keep(reader, dst, source)
        raise StoreError(f"{reader.root}: hidden_aux is stored projected to k={source['k']}; it cannot be written "
                         f"{'whole' if k is None else f'with k={k}'} (re-extract instead)")  # fmt: skip
    if k is None:
        return None
    dst.mkdir(parents=True, exist_ok=True)
    if (dst / PROJECTION_FILE).exists():  # a resumed conversion: the P its committed shards were written with
        p, record, scale = read_projection_file(dst)
    else:
        # stored order (shards in order, each in its forward's length buckets): the order extraction calibrates in
        rows = (reader.sample(i, ("hidden_aux",))["hidden_aux"] for i in range(len(reader)))
        p, scale, record = fit_projection(rows, math.prod(reader.fields["hidden_aux"][0]), k, calibration_tokens)
    _publish(dst, p, record, scale)
    fp["projection"]["hidden_aux"] = record
    e = encoder(p, scale)
    return lambda x: project(x, e)


def _keep(reader: StoreReader, dst: Path, source: dict | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A projected source keeps its P and s: the reader multiplied its rows by s, the writer stores them divided."""
    if source is None:
        return None
    scale = reader.component_scale("hidden_aux")
    _publish(dst, reader.projection("hidden_aux"), source, scale)
    return None if scale is None else (lambda y: y / scale)


def _publish(dst: Path, p, record: dict, scale=None) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    if not (dst / PROJECTION_FILE).exists():
        save_projection(dst, p, record, scale=scale)


class _CopyDir:
    """A tokenizer stand-in for :class:`TargetPieces`: ``save_pretrained`` copies the stored tokenizer files."""

    def __init__(self, path: Path):
        self.path = path

    def save_pretrained(self, out: str) -> None:
        shutil.copytree(self.path, out, dirs_exist_ok=True)

"""`pipeline extract`: stream records, tokenize, run the target per shard, write through the store.

Record j of the selection belongs to shard j // shard_size and shard s to rank s % world_size, so N workers fill
one directory without talking to each other. Forward batches never cross a shard, so tensors do not depend on the
number of workers.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from pipeline import __version__
from pipeline import data as data_mod
from pipeline.assets import cache_dir, resolve_data, resolve_model
from pipeline.store import (
    FORMAT_VERSION,
    HIDDEN_DTYPES,
    LOGPROB_DTYPES,
    SCALED,
    SampleMeta,
    StoreError,
    StoreReader,
    StoreWriter,
    aux_dtype_for,
    bad_shards_of,
    canonical_json,
    check_hidden_dtype,
    config_sha256,
    sha256_file,
    sha256_files,
    topk_ids_dtype,
)
from pipeline.store.inspect import LOSS_SHARE_BOUNDS
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

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")  # fmt: skip
MAX_INFLIGHT_WRITES = 4  # batches queued for the writer thread; bounds host memory


@dataclass
class ExtractConfig:
    out: Path
    model: str | None = None
    data: str | None = None  # a file, a directory (save_to_disk, parquet/arrow files) or hf:NAME[:SPLIT]
    data_field: str | None = None  # the conversation column / key (default: conversations or messages)
    kind: str = "chat"  # chat | fim
    thinking: str = "auto"  # keep | drop | auto (keep where the chat template renders reasoning)
    fim_tokens: tuple[str, str, str] = data_mod.DEFAULT_FIM_TOKENS
    offset: int = 0
    limit: int | None = None
    ids_file: str | None = None
    max_length: int = 2048
    top_k: int = 32
    # The defaults are the compact store (storage_layout.md, format 5): EAGLE-3 features projected to k = 2H, divided
    # by their component scale and stored as q19 rows, EAGLE-1's as fp8 rows, per-array codecs, fp16 log-probabilities. The format-2 layout:
    # bfloat16, float32, aux_projection None, codec "none".
    hidden_dtype: str = "float8_e4m3fn"  # bfloat16 | float16 | float32 | float8_e4m3fn
    aux_dtype: str = "auto"  # hidden_aux's dtype: "auto" = q19 when projected, else hidden_dtype
    logprob_dtype: str = "float16"  # float32 | float16 (top-k log-probabilities)
    stored_for: str = "both"  # eagle1 | eagle3 | both
    aux_projection: int | str | None = "auto"  # k: hidden_aux stored as P·x (P [k, A*H]); "auto": k = 2H; None: whole
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS  # tokens of the first batches (forward order) that estimate P
    aux_layers: list[int] | None = None
    shard_size: int = 256
    chunk_tokens: int = 4096
    codec: str = "auto"  # auto | none | zstd | blosc
    io_workers: int | None = None  # threads compressing and writing chunks (default: min(8, CPUs))
    batch_tokens: int | None = None  # padded tokens per forward; None: the backend's preference
    device: str = "auto"
    compute_dtype: str = "auto"
    backend: str = "hf"
    rank: int | None = None
    world_size: int | None = None
    progress: bool = True
    backend_options: dict = field(default_factory=dict)


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit flags, else torchrun's RANK/WORLD_SIZE, else SLURM's, else a single worker."""
    if rank is None:
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    if not 0 <= rank < world_size:
        raise ValueError(f"--rank {rank} is not in [0, --world-size {world_size})")
    return rank, world_size


def default_aux_layers(num_layers: int) -> list[int]:
    """EAGLE-3's {2, N//2, N-3}, as HF hidden-state indices; deduplicated for very shallow test models."""
    return sorted({min(max(i, 1), num_layers - 1) for i in (2, num_layers // 2, num_layers - 3)})


def weights_sha256(model_dir: Path) -> str:
    """sha256 over the model's weight files; cached by (path, size, mtime) since an 8B model is 16 GB to read."""
    files = sorted(p for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not files:
        raise StoreError(f"{model_dir}: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    cache_path = cache_dir() / "weight-hashes.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    key = canonical_json([[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    if key not in cache:
        cache[key] = sha256_files(files, model_dir)
        tmp = cache_path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_path)
    return cache[key]


def tokenizer_fingerprint(model_dir: Path, tokenizer) -> dict:
    files = [model_dir / n for n in TOKENIZER_FILES if (model_dir / n).exists()]
    return {
        "sha256": sha256_files(files, model_dir) if files else "",
        "chat_template_sha256": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest(),
    }


def build_fingerprint(cfg: ExtractConfig, model_dir: Path, source: data_mod.DataSource, data_format: str,
                      config: dict, tokenizer, num_layers: int, aux: list[int], backend: str, backend_dtype: str,
                      thinking: str | None = None) -> dict:  # fmt: skip
    stored = {"both": ["hidden_last", "hidden_aux"], "eagle1": ["hidden_last"], "eagle3": ["hidden_aux"]}[cfg.stored_for]
    ids_sha = sha256_file(Path(cfg.ids_file)) if cfg.ids_file else None
    return {
        "format_version": FORMAT_VERSION,
        "code_version": __version__,
        "backend": backend,
        "model": {"name": model_dir.name, "path": str(model_dir.resolve()), "config_sha256": config_sha256(config),
                  "weights_sha256": weights_sha256(model_dir), "num_layers": num_layers,
                  "compute_dtype": backend_dtype,
                  "hidden_size": int(config["hidden_size"]), "vocab_size": int(config["vocab_size"])},
        "tokenizer": tokenizer_fingerprint(model_dir, tokenizer),
        "layers": {"aux": aux, "last": num_layers, "stored": stored},
        "dtypes": {"hidden": cfg.hidden_dtype, "topk_logprobs": cfg.logprob_dtype, "input_ids": "int32",
                   "topk_ids": topk_ids_dtype(int(config["vocab_size"]))},
        "top_k": cfg.top_k,
        "max_length": cfg.max_length,
        "data": {**data_mod.source_fingerprint(source), "format": data_format,
                 "kind": cfg.kind, "fim_tokens": list(cfg.fim_tokens) if cfg.kind == "fim" else None,
                 "thinking": thinking,
                 "selection": {"offset": cfg.offset, "limit": cfg.limit, "ids_sha256": ids_sha}},
        "sharding": {"shard_size": cfg.shard_size, "chunk_tokens": cfg.chunk_tokens, "codec": cfg.codec},
        "projection": {},  # {"hidden_aux": record} once P is known (_aux_projection)
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------- selection


def iter_selection(path: data_mod.DataSource | Path, kind: str, offset: int, limit: int | None,
                   ids: set[str] | None, report: data_mod.StreamReport) -> Iterator[data_mod.Record | data_mod.Skip]:  # fmt: skip
    """The selected records (good and skipped alike) in source order: the unit that shards are cut from."""
    stream = data_mod.read_records(path, kind=kind, report=report)
    if ids is not None:
        stream = (r for r in stream if r.record_id in ids)
    stop = None if limit is None else offset + limit
    return itertools.islice(stream, offset, stop)


def count_selection(path: data_mod.DataSource | Path, kind: str, offset: int, limit: int | None,
                    ids: set[str] | None) -> tuple[int, dict]:  # fmt: skip
    """(records selected, stream report). A selection with no usable record is refused here, before any store
    exists: an empty or non-UTF-8 file, an --offset past the end, or only records that every one must be skipped."""
    report = data_mod.StreamReport(path=str(path), format="", records_seen=0, truncated=False,
                                   truncated_at_byte=None, bytes_read=0)  # fmt: skip
    n, usable, reasons, first = 0, 0, Counter(), None
    for rec in iter_selection(path, kind, offset, limit, ids, report):
        n += 1
        if isinstance(rec, data_mod.Skip):
            reasons[rec.reason] += 1
            first = first or rec.detail
        else:
            usable += 1
    if usable == 0:
        raise ValueError(_empty_selection(path, report, n, reasons, first, offset, limit, ids))
    return n, asdict(report)


def _empty_selection(path: data_mod.DataSource | Path, report: data_mod.StreamReport, n: int, reasons: Counter,
                     first: str | None, offset: int, limit: int | None, ids: set[str] | None) -> str:  # fmt: skip
    head = b""
    if not isinstance(path, data_mod.DataSource) or path.format == "json":
        with open(path.files[0] if isinstance(path, data_mod.DataSource) else path, "rb") as f:
            head = f.read(4)
    path = path.spec if isinstance(path, data_mod.DataSource) else path
    hint = ("; it starts with a UTF-16 byte-order mark: convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)"
            if head[:2] in (b"\xff\xfe", b"\xfe\xff") else "")  # fmt: skip
    if n:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(reasons.items()))
        return (f"{path}: none of the {n} selected records is usable ({counts}); first: {first}{hint}. "
                "Nothing was written.")  # fmt: skip
    if report.records_seen:
        return (f"{path}: the selection (--offset {offset}, --limit {limit}"
                f"{f', --ids with {len(ids)} ids' if ids is not None else ''}) matches none of its "
                f"{report.records_seen} records. Nothing was written.")  # fmt: skip
    return (f"{path}: no records in the file ({report.bytes_read} bytes: empty, only whitespace, or an empty "
            f"array){hint}. Nothing was written.")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- batching


def length_buckets(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest-first so that padded width x batch size stays within batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * width > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def make_backend(cfg: ExtractConfig, model_dir: Path):
    if cfg.backend == "hf":
        from pipeline.extract.hf_backend import HFBackend

        return HFBackend(model_dir, device=cfg.device, compute_dtype=cfg.compute_dtype)
    if cfg.backend == "vllm":
        from pipeline.extract.vllm_backend import VLLMBackend

        # vLLM would otherwise size its batch budget for the model's whole context window
        options = {"dtype": cfg.compute_dtype, **cfg.backend_options}
        return VLLMBackend(model_dir, max_model_len=cfg.max_length + 1, **options)
    raise ValueError(f"--backend {cfg.backend!r}: choose hf or vllm")


def run_extract(cfg: ExtractConfig, backend=None) -> dict:
    """Extract this worker's shards; returns the summary printed by the CLI. ``backend``: reuse a loaded one."""
    t0 = time.time()
    resolve_rank(cfg.rank, cfg.world_size)
    check_hidden_dtype(cfg.hidden_dtype, "--hidden-dtype", ValueError)
    if cfg.aux_dtype != "auto" and cfg.aux_dtype not in HIDDEN_DTYPES:
        raise ValueError(f"--aux-dtype {cfg.aux_dtype!r}: choose auto or one of {', '.join(HIDDEN_DTYPES)}")
    if cfg.logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"--logprob-dtype {cfg.logprob_dtype!r}: choose one of {', '.join(LOGPROB_DTYPES)}")
    model_dir = resolve_model(cfg.model)
    source = data_mod.open_source(resolve_data(None) if cfg.data is None else cfg.data, cfg.data_field)
    ids = _read_ids(cfg.ids_file) if cfg.ids_file else None
    selection = count_selection(source, cfg.kind, cfg.offset, cfg.limit, ids)  # refuses an empty one early
    thinking = _resolve_thinking(model_dir, cfg)
    # Tokenizing (chat template + offsets) costs as much as a small target's forward on a GPU: worker processes
    # do it one shard ahead. Forked before the model is loaded and before any thread starts.
    tok_pool = _tokenizer_pool(model_dir, cfg, source, thinking)
    owned = backend is None
    try:
        backend = backend or make_backend(cfg, model_dir)
        return _run(cfg, t0, model_dir, source, ids, backend, tok_pool, selection, thinking)
    finally:
        tok_pool.shutdown(cancel_futures=True)
        if owned and backend is not None and hasattr(backend, "close"):
            backend.close()


def _resolve_thinking(model_dir: Path, cfg: ExtractConfig) -> str | None:
    """--thinking resolved against the target's chat template (renders only: no tokenizer work before the fork)."""
    if cfg.kind != "chat":
        return None
    from transformers import AutoTokenizer

    return data_mod.resolve_thinking(AutoTokenizer.from_pretrained(model_dir), cfg.thinking)


def _run(cfg: ExtractConfig, t0: float, model_dir: Path, source: data_mod.DataSource, ids: set[str] | None, backend,
         tok_pool, selection: tuple[int, dict], thinking: str | None) -> dict:  # fmt: skip
    rank, world = resolve_rank(cfg.rank, cfg.world_size)
    tokenizer = backend.tokenizer
    n_layers = backend.num_layers
    aux = list(cfg.aux_layers) if cfg.aux_layers else default_aux_layers(n_layers)
    bad = [a for a in aux if not 0 <= a <= n_layers]
    if bad:
        raise ValueError(f"--aux-layers {bad}: hidden-state indices must lie in [0, {n_layers}] for this model")
    vocab = int(backend.config["vocab_size"])
    if not 1 <= cfg.top_k <= vocab:
        raise ValueError(f"--top-k {cfg.top_k}: must lie in [1, vocab size {vocab}]")
    if cfg.kind == "fim":
        data_mod.check_fim_tokens(tokenizer, cfg.fim_tokens)
    else:  # a template whose generated tokens cannot be derived is refused before any store exists
        data_mod.check_chat_template(tokenizer, thinking)

    n_records, stream_report = selection
    fingerprint = build_fingerprint(cfg, model_dir, source, stream_report["format"], backend.config, tokenizer,
                                    n_layers, aux, backend.name, backend.compute_dtype_name, thinking)
    batch_tokens = cfg.batch_tokens or getattr(backend, "preferred_batch_tokens", 8192)
    want_last = "hidden_last" in fingerprint["layers"]["stored"]
    want_aux = "hidden_aux" in fingerprint["layers"]["stored"]
    projection, held, calibration_s = None, {}, 0.0
    if cfg.aux_projection == "auto":  # k = 2H: the measured choice (README "Compact store")
        cfg = replace(cfg, aux_projection=auto_projection_k(int(backend.config["hidden_size"]), len(aux))
                      if want_aux else None)  # fmt: skip
    cfg = replace(cfg, aux_dtype=aux_dtype_for(cfg.aux_dtype, bool(cfg.aux_projection), cfg.hidden_dtype))
    if want_aux:
        fingerprint["dtypes"]["hidden_aux"] = cfg.aux_dtype
    n_shards = -(-n_records // cfg.shard_size)
    transfer = _transfer_dtypes(cfg, backend)
    if cfg.aux_projection:
        if not want_aux:
            raise ValueError(f"--aux-projection {cfg.aux_projection}: the store keeps no EAGLE-3 features "
                             f"(--for {cfg.stored_for}); EAGLE-1's hidden_last is never projected")  # fmt: skip
        tc = time.time()
        projection, fingerprint["projection"]["hidden_aux"], held = _aux_projection(
            cfg, backend, source, ids, aux, batch_tokens, thinking, n_shards, want_last, transfer)
        calibration_s = time.time() - tc
    plan = {"records": n_records, "shards": n_shards, "shard_size": cfg.shard_size}
    writer = StoreWriter(cfg.out, fingerprint, plan, backend.target_pieces(), rank=rank, world_size=world,
                         io_workers=cfg.io_workers)  # fmt: skip
    mine = [s for s in range(n_shards) if s % world == rank]
    # Shards the last `pipeline verify` found bad get a full check; the others the cheap one (sizes, metadata).
    flagged = _flagged_by_verify(cfg.out) & set(mine)
    todo = [s for s in mine if writer.shard_state(s, full=s in flagged)[0] != "committed"]

    totals: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    quarantined: list[dict] = []
    odd: list[str] = []  # samples whose loss share looks wrong (the first few, for the warning)
    commits: list[Future] = []
    bar = tqdm(total=sum(min(cfg.shard_size, n_records - s * cfg.shard_size) for s in todo), unit="rec",
               desc=f"extract rank {rank}/{world}", disable=not cfg.progress, dynamic_ncols=True)  # fmt: skip
    compute_s = 0.0
    taken: list[int] = []  # committed by another process while this one ran
    repaired: list[dict] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer") as pool:
        inflight: list[Future] = []

        def submit(fn, *args) -> Future:
            fut = pool.submit(fn, *args)
            inflight.append(fut)
            while len(inflight) > MAX_INFLIGHT_WRITES:
                inflight.pop(0).result()  # re-raises a writer error in the main thread
            return fut

        def claim(shard: int, wait: bool):
            """The shard's lock, or None: held by another live process (``wait`` off), or already committed."""
            lock = writer.claim(shard, blocking=False)
            if lock is None and not wait:
                return None
            if lock is None:
                # progress and waiting on stderr: stdout holds the summary only (`--json` must parse)
                tqdm.write(f"shard {shard}: waiting for {writer.claim_holder(shard)}, which is writing it",
                           file=sys.stderr)  # fmt: skip
                lock = writer.claim(shard, blocking=True)
            state, problems = writer.shard_state(shard, full=shard in flagged)
            if state == "committed":
                lock.release()
                taken.append(shard)
                return None
            if state == "corrupt":
                dest = writer.set_aside(shard, problems)
                repaired.append({"shard": shard, "problem": problems[0], "set_aside": str(dest)})
                tqdm.write(f"shard {shard}: failed its check ({problems[0]}); set aside as {dest.name}, redoing it",
                           file=sys.stderr)  # fmt: skip
            return lock

        loop_t0 = time.time()
        deferred: list[int] = []
        for wait, wanted in ((False, todo), (True, deferred)):  # second pass: shards another process held
            shards = _shards_of(source, cfg, ids, set(wanted))
            for shard, records, tokenized in _ahead(shards, lambda item: tok_pool.submit(_tokenize_shard, item[1])):
                lock = claim(shard, wait)
                if lock is None:
                    if not wait and shard not in taken:
                        deferred.append(shard)
                    continue
                sw = writer.begin_shard(shard, (shard * cfg.shard_size, shard * cfg.shard_size + len(records)),
                                        expected_tokens=sum(len(t.input_ids) for t in tokenized
                                                            if isinstance(t, data_mod.Tokenized)),
                                        claim=lock)  # fmt: skip
                try:
                    compute_s += _extract_shard(sw, records, tokenized, backend, cfg, aux, batch_tokens, want_last,
                                                want_aux, transfer, projection, submit, bar, totals, t0, odd,
                                                held.pop(shard, {}))  # fmt: skip
                except BaseException:
                    pool.submit(sw.abort)  # after the appends already queued
                    raise
                commits.append(submit(sw.commit))
        for fut in inflight:
            fut.result()
    writer.close()  # (on an error its idle write threads end when the writer is collected)
    bar.close()
    for fut in commits:
        stats = fut.result()
        totals["samples"] += stats["samples"]
        totals["stored_tokens"] += stats["tokens"]
        totals["loss_tokens"] += stats["loss_tokens"]
        skipped.update(stats["skipped"])
        quarantined += stats["quarantined"]
    if repaired or writer.repaired_target or writer.repaired_store_file:
        writer.forget_verify()  # it described the store before the repair
    written = [s for s in todo if s not in taken]
    wall = time.time() - t0
    loop_s = time.time() - loop_t0
    stored_bytes = _dir_bytes(cfg.out, [writer.shard_dir(s) for s in written])
    _refuse_empty_store(writer, n_records)
    return {
        "store": str(cfg.out), "rank": rank, "world_size": world, "backend": backend.name,
        "shards": {"planned": n_shards, "mine": len(mine), "written": len(written),
                   "already_committed": len(mine) - len(written), "repaired": repaired,
                   "committed_by_another_process": len(taken)},
        "cleaned_leftovers": writer.cleaned,
        "repaired_target": writer.repaired_target, "repaired_store_file": writer.repaired_store_file,
        "records_selected": n_records,
        "samples_written": totals["samples"], "skipped": dict(sorted(skipped.items())),
        "quarantined": len(quarantined), "quarantined_samples": quarantined[:20],
        "tokens": totals["stored_tokens"], "loss_tokens": totals["loss_tokens"],
        "loss_token_share": round(totals["loss_tokens"] / totals["stored_tokens"], 4) if totals["stored_tokens"] else 0.0,
        "warnings": loss_share_warnings(totals, odd),
        "projection": fingerprint["projection"],
        "bytes_written": stored_bytes,
        "bytes_per_token": stored_bytes / totals["stored_tokens"] if totals["stored_tokens"] else 0.0,
        # the calibration's forward is the first batches' (reused by the shards they belong to): counted in both
        "wall_s": round(wall, 2), "loop_s": round(loop_s, 2), "calibration_s": round(calibration_s, 2),
        "forward_s": round(compute_s, 2),
        "tokens_per_s": round(totals["stored_tokens"] / (loop_s + calibration_s), 1) if loop_s else 0.0,
        "source": stream_report,
    }  # fmt: skip


def _transfer_dtypes(cfg: ExtractConfig, backend) -> dict:
    """What the backend hands over, as ``forward`` keyword arguments: the storage dtype, cast on the device. fp8 and
    int7/q19 are quantized per row from the values in the target's compute dtype (no second rounding): on the device
    by backends that can (HF: ``quantizes_rows``; the aux rows after their projection), else by the store writer
    from the compute dtype. Backends without ``aux_dtype`` hand both fields over in one dtype."""
    import torch

    compute = getattr(torch, getattr(backend, "compute_dtype_name", "bfloat16"), torch.bfloat16)
    if getattr(backend, "quantizes_rows", False):
        def one(logical: str):
            return logical if logical in SCALED else HIDDEN_DTYPES[logical][1]

        return {"hidden_dtype": one(cfg.hidden_dtype), "aux_dtype": one(cfg.aux_dtype)}
    if cfg.hidden_dtype in SCALED or cfg.aux_dtype in SCALED:
        return {"hidden_dtype": compute}
    return {"hidden_dtype": HIDDEN_DTYPES[cfg.hidden_dtype][1]}


def _extract_shard(sw, records, tokenized, backend, cfg: ExtractConfig, aux, batch_tokens: int, want_last: bool,
                   want_aux: bool, transfer, projection, submit, bar, totals: Counter, t0: float, odd: list[str],
                   held: dict[int, tuple[list, list]]) -> float:  # fmt: skip
    """Run the target over one shard's samples and queue their writes; returns the forward time. ``projection``
    (P, or None): backends that can apply it on the device (``projects_aux``) get it; else it is applied here.
    ``held``: batch number -> (its token ids, the outputs the calibration computed, aux not yet projected)."""
    compute_s = 0.0
    on_device = projection is not None and getattr(backend, "projects_aux", False)
    extra = {"aux_projection": projection} if on_device else {}
    samples = []
    for sel, (rec, tok) in enumerate(zip(records, tokenized, strict=True), sw.records[0]):
        if isinstance(tok, data_mod.Skip):
            sw.skip(tok.source_index, tok.record_id, tok.reason, tok.detail)
        else:
            samples.append((SampleMeta(sel, rec.source_index, rec.record_id, tok.truncated), tok))
    bar.update(len(records) - len(samples))
    for number, batch in enumerate(length_buckets([len(t.input_ids) for _, t in samples], batch_tokens)):
        tb = time.time()
        inputs = [samples[i][1].input_ids for i in batch]
        if number in held and held[number][0] == inputs:
            outs = held.pop(number)[1]
            for out in outs if on_device else ():
                out["hidden_aux"] = backend.encode_aux(out["hidden_aux"], projection,
                                                       transfer.get("aux_dtype", transfer["hidden_dtype"]))
        else:
            outs = backend.forward(inputs, aux, cfg.top_k, want_last, want_aux,
                                   names=[_name(samples[i][0]) for i in batch], **transfer, **extra)  # fmt: skip
        compute_s += time.time() - tb
        for i, out in zip(batch, outs, strict=True):
            meta, tok = samples[i]
            if projection is not None and not on_device:
                out["hidden_aux"] = project(out["hidden_aux"], projection.cpu())
            out["input_ids"] = _int_tensor(tok.input_ids, "int32")
            out["loss_mask"] = _int_tensor(tok.loss_mask, "bool")
            totals["tokens"] += len(tok.input_ids)
            _note_loss_share(tok, meta, totals, odd)
        submit(_append_all, sw, [samples[i][0] for i in batch], outs)
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{totals['tokens'] / max(time.time() - t0, 1e-9):.0f}")
    return compute_s


def _note_loss_share(tok: data_mod.Tokenized, meta: SampleMeta, totals: Counter, odd: list) -> None:
    """Count what a correct mask never gives: loss on a sample's first token (it is always prompt), a share of
    loss tokens outside LOSS_SHARE_BOUNDS, assistant turns left as context."""
    share = sum(tok.loss_mask) / len(tok.loss_mask)
    first = bool(tok.loss_mask[0])
    totals["first_token_loss"] += first
    totals["context_turns"] += tok.context_turns
    if first or not LOSS_SHARE_BOUNDS[0] <= share <= LOSS_SHARE_BOUNDS[1]:
        totals["odd_loss_share"] += 1
        if len(odd) < 5:
            odd.append(f"{meta.record_id!r} ({share:.1%}{', first token' if first else ''})")


def loss_share_warnings(totals: Counter, odd: list[str]) -> list[str]:
    """What the extraction summary warns about the loss mask of this selection."""
    out = []
    if totals["odd_loss_share"]:
        lo, hi = LOSS_SHARE_BOUNDS
        out.append(f"{totals['odd_loss_share']} sample(s) have a loss-token share outside [{lo:.0%}, {hi:.0%}] or "
                   f"loss on their first token (a prompt token), e.g. {', '.join(odd)}: check the mask with "
                   "`pipeline inspect STORE --sample N`")  # fmt: skip
    if totals["context_turns"]:
        out.append(f"{totals['context_turns']} assistant turn(s) were left without loss: the chat template rewrites "
                   "them in later history (thinking dropped), so they are not what the model generated")  # fmt: skip
    return out


def _aux_projection(cfg: ExtractConfig, backend, source: data_mod.DataSource, ids: set[str] | None, aux: list[int],
                    batch_tokens: int, thinking: str | None, n_shards: int, want_last: bool, transfer: dict):  # fmt: skip
    """(the matrix that encodes a row, ``P`` with rows divided by ``s``, on the backend's device; the fingerprint
    record; the calibration's outputs by shard): the store's published P and s, else estimated from the calibration
    slice and published. Under the store lock, so that every
    worker of the store (any rank, a resumed or repairing run) writes with the same P; an unreadable file is set
    aside and estimated again (a P that then differs from the one the committed shards were written with is
    refused by the fingerprint check)."""
    import torch

    from pipeline.store import store_lock

    root = Path(cfg.out)
    (root / ".locks").mkdir(parents=True, exist_ok=True)
    held: dict = {}
    with store_lock(root):
        path = root / PROJECTION_FILE
        p = None
        if path.exists():
            try:
                p, record, scale = read_projection_file(root)
            except ValueError as e:
                dest = root / f".corrupt-{PROJECTION_FILE}-{int(time.time())}-{os.getpid()}"
                os.rename(path, dest)
                tqdm.write(f"{e}; set aside as {dest.name}, estimating it again")
        if p is None:
            p, scale, record, held = _calibrate(cfg, backend, source, ids, aux, batch_tokens, thinking, n_shards,
                                                want_last, transfer)  # fmt: skip
            save_projection(root, p, record, scale=scale)
    if record["k"] != cfg.aux_projection or record["calibration"]["tokens"] != cfg.calibration_tokens:
        raise StoreError(f"{path}: this store's projection has k={record['k']} from "
                         f"{record['calibration']['tokens']} calibration tokens; this run asks --aux-projection "
                         f"{cfg.aux_projection} --calibration-tokens {cfg.calibration_tokens} (a store has one "
                         "projection: extract into a new --out)")  # fmt: skip
    return encoder(p, scale).to(getattr(backend, "device", "cpu"), torch.float32), record, held


def _calibrate(cfg: ExtractConfig, backend, source: data_mod.DataSource, ids: set[str] | None, aux: list[int],
               batch_tokens: int, thinking: str | None, n_shards: int, want_last: bool, transfer: dict):  # fmt: skip
    """P (top-k principal directions of the uncentered fused aux features) and s from the first ``cfg.calibration_tokens``
    tokens of the extraction's own forward order (shard 0's length buckets, then shard 1's, ...): a function of the
    selection, not of ranks. The batches it ran are returned by shard and batch number, aux unprojected, so that the
    shard's extraction writes them instead of running them again: on one worker the calibration costs no forward."""
    import torch

    raw = dict(transfer, aux_dtype=torch.float32) if getattr(backend, "projects_aux", False) else transfer
    held: dict[int, dict[int, tuple[list, list]]] = {}

    def features():  # fit_projection stops pulling once it has its tokens: at most one batch more, held as well
        for shard, recs in _shards_of(source, cfg, ids, set(range(n_shards))):
            toks = [_tokenize_record(r, backend.tokenizer, source.spec, cfg.kind, cfg.max_length, cfg.fim_tokens,
                                     thinking) for r in recs]  # fmt: skip
            inputs = [t.input_ids for t in toks if isinstance(t, data_mod.Tokenized)]
            for number, batch in enumerate(length_buckets([len(x) for x in inputs], batch_tokens)):
                rows = [inputs[i] for i in batch]
                outs = backend.forward(rows, aux, cfg.top_k, want_last, True, **raw)
                held.setdefault(shard, {})[number] = (rows, outs)
                yield from (out["hidden_aux"] for out in outs)

    width = len(aux) * int(backend.config["hidden_size"])
    p, scale, record = fit_projection(features(), width, cfg.aux_projection, cfg.calibration_tokens,
                                      getattr(backend, "device", "cpu"))
    return p, scale, record, held


def _flagged_by_verify(root: Path) -> set[int]:
    """Shards the last `pipeline verify` of this store named (none when it never ran or cannot be read)."""
    try:
        last = StoreReader.last_verify_of(root)
    except StoreError:
        return set()
    return bad_shards_of(last["problems"]) if last and not last["ok"] else set()


def _refuse_empty_store(writer: StoreWriter, n_records: int) -> None:
    """Zero samples in a finished store is an error, not a store (every record was skipped or quarantined)."""
    stats = writer.committed_stats()
    if len(stats) < writer.plan["shards"] or any(s["samples"] for s in stats):
        return
    skipped: Counter[str] = Counter()
    for s in stats:
        skipped.update(s.get("skipped", {}))
    quarantined = sum(len(s.get("quarantined", [])) for s in stats)
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none"
    raise StoreError(f"{writer.root}: 0 samples written: all {n_records} selected records were skipped "
                     f"({reasons}) or quarantined ({quarantined}); this store holds no training data. Fix the input "
                     "or the selection and extract into a new --out")  # fmt: skip


def _name(meta: SampleMeta) -> str:
    return f"record {meta.record_id!r} (source #{meta.source_index}, sample {meta.sample_id})"


def _append_all(sw, metas, outs) -> None:
    for meta, out in zip(metas, outs, strict=True):
        sw.append(meta, out)


def _int_tensor(values: list[int], dtype: str):
    import torch

    return torch.tensor(values, dtype=getattr(torch, dtype))


# ---- tokenization in worker processes (module-level state: one tokenizer per worker)
_WORKER: dict = {}


def _tokenizer_pool(model_dir: Path, cfg: ExtractConfig, source: data_mod.DataSource,
                    thinking: str | None) -> ProcessPoolExecutor:  # fmt: skip
    workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(os.getpid(), str(model_dir), source.spec, cfg.kind, cfg.max_length,
                                         tuple(cfg.fim_tokens), thinking))  # fmt: skip


def _init_worker(parent: int, model_dir: str, data_path: str, kind: str, max_length: int,
                 fim_tokens: tuple[str, str, str], thinking: str | None = None) -> None:  # fmt: skip
    from transformers import AutoTokenizer

    _die_with_parent(parent)
    _WORKER.update(tokenizer=AutoTokenizer.from_pretrained(model_dir), path=data_path, kind=kind,
                   max_length=max_length, fim_tokens=fim_tokens, thinking=thinking)  # fmt: skip


def _die_with_parent(parent: int) -> None:
    # A killed extraction (SIGKILL, OOM) must not leave its tokenizer workers behind.
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(0)


def _tokenize_shard(records: list) -> list[data_mod.Tokenized | data_mod.Skip]:
    """Per record: its Tokenized sample, or the Skip that says why it is not stored."""
    w = _WORKER
    return [_tokenize_record(r, w["tokenizer"], w["path"], w["kind"], w["max_length"], w["fim_tokens"], w["thinking"])
            for r in records]  # fmt: skip


def _tokenize_record(rec, tokenizer, path: str, kind: str, max_length: int, fim_tokens,
                     thinking: str | None = "drop") -> data_mod.Tokenized | data_mod.Skip:  # fmt: skip
    if isinstance(rec, data_mod.Skip):
        return rec
    where = f"{path} record #{rec.source_index} (id {rec.record_id!r})"
    try:
        if kind == "fim":
            tok = data_mod.tokenize_fim(tokenizer, rec.fim, max_length, fim_tokens)
        else:
            tok = data_mod.tokenize_chat(tokenizer, rec.messages, max_length, thinking=thinking or "drop",
                                         tools=rec.tools)  # fmt: skip
    except data_mod.RenderError as e:
        return data_mod.Skip(rec.source_index, rec.record_id, "render_error", f"{where}: {e}")
    if sum(tok.loss_mask) == 0:
        return data_mod.Skip(rec.source_index, rec.record_id, "no_loss_tokens",
                             f"{where}: no assistant token left within --max-length {max_length}")  # fmt: skip
    return tok


def _ahead(items: Iterator[tuple[int, list]], submit) -> Iterator[tuple[int, list, list]]:
    """(shard, records, tokenized), with the next shard's tokenization already running."""
    pending = None
    for item in items:
        fut = submit(item)
        if pending is not None:
            yield pending[0][0], pending[0][1], pending[1].result()
        pending = (item, fut)
    if pending is not None:
        yield pending[0][0], pending[0][1], pending[1].result()


def _shards_of(path: data_mod.DataSource, cfg: ExtractConfig, ids: set[str] | None,
               wanted: set[int]) -> Iterator[tuple[int, list]]:  # fmt: skip
    """Stream the selection once, yielding (shard, records) for the wanted shards only."""
    if not wanted:
        return
    report = data_mod.StreamReport(path=str(path), format="", records_seen=0, truncated=False,
                                   truncated_at_byte=None, bytes_read=0)  # fmt: skip
    current, buf = None, []
    last = max(wanted)
    for j, rec in enumerate(iter_selection(path, cfg.kind, cfg.offset, cfg.limit, ids, report)):
        shard = j // cfg.shard_size
        if shard > last:
            break
        if shard != current:
            if current in wanted:
                yield current, buf
            current, buf = shard, []
        if shard in wanted:
            buf.append(rec)
    if current in wanted:
        yield current, buf


def _read_ids(path: str) -> set[str]:
    ids = {line.strip() for line in Path(path).read_text().splitlines() if line.strip()}
    if not ids:
        raise ValueError(f"--ids {path}: no record ids in the file")
    return ids


def _dir_bytes(root: Path, dirs: list[Path]) -> int:
    return sum(p.stat().st_size for d in dirs if d.exists() for p in d.rglob("*") if p.is_file())

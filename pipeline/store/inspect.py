"""What ``pipeline inspect`` reports about a store."""

from __future__ import annotations

import os
from collections import Counter

from pipeline.store.errors import StoreError
from pipeline.store.format import SHARDS_DIR, TENSORS_DIR, TMP_PREFIX, shard_name
from pipeline.store.leftovers import find_leftovers
from pipeline.store.reader import StoreReader


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
        "aux_dtype": reader.fields["hidden_aux"][1] if "hidden_aux" in reader.fields else None,
        "codec": reader.fingerprint["sharding"]["codec"],
        "samples": len(reader),
        "tokens": tokens,
        "loss_tokens": int(reader.loss_tokens.sum()),
        "loss_token_share": float(reader.loss_tokens.sum() / tokens) if tokens else 0.0,
        "loss_token_share_per_sample": loss_share_summary(reader),
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
        "projection": reader.fingerprint.get("projection") or {},
        "fingerprint": reader.fingerprint,
        "fingerprint_digest": reader.digest,
        "plan": reader.plan,
    }


# Per-sample loss-token shares outside these bounds are listed by `pipeline inspect`: a chat or FIM sample always
# starts with a prompt, so a share near 1 means the mask covers prompt text; near 0, that answers were cut away.
LOSS_SHARE_BOUNDS = (0.02, 0.98)


def loss_share_summary(reader: StoreReader) -> dict:
    """The per-sample loss-token share (loss tokens / tokens): quantiles and the samples outside LOSS_SHARE_BOUNDS."""
    import numpy as np

    if not len(reader):
        return {"samples": 0}
    share = reader.loss_tokens / np.maximum(reader.lengths, 1)
    lo, hi = LOSS_SHARE_BOUNDS
    odd = np.flatnonzero((share < lo) | (share > hi))
    q = np.quantile(share, [0.0, 0.05, 0.5, 0.95, 1.0])
    return {"samples": len(reader), "min": float(q[0]), "p5": float(q[1]), "median": float(q[2]),
            "p95": float(q[3]), "max": float(q[4]), "bounds": list(LOSS_SHARE_BOUNDS),
            "outside_bounds": [{"sample": int(i), "share": float(share[i])} for i in odd[:20]],
            "outside_bounds_count": int(len(odd))}  # fmt: skip


def sample_text(root: str | os.PathLike, i: int, open_mark: str = "⟦", close_mark: str = "⟧") -> dict:
    """Sample ``i`` decoded with the store's own tokenizer, each run of loss tokens between the marks."""
    from transformers import AutoTokenizer

    reader = StoreReader(root, require_complete=False, skip_bad_shards=True)
    if not 0 <= i < len(reader):
        raise StoreError(f"{reader.root}: no sample {i} (the store holds {len(reader)} samples: 0..{len(reader) - 1})")
    rows = reader.read(i, ("input_ids", "loss_mask"))
    ids, mask = rows["input_ids"].tolist(), [bool(m) for m in rows["loss_mask"].tolist()]
    tokenizer = AutoTokenizer.from_pretrained(reader.tokenizer_dir)
    parts, start = [], 0
    for t in range(1, len(ids) + 1):  # decode runs of equal mask, so multi-token characters stay whole
        if t == len(ids) or mask[t] != mask[start]:
            text = tokenizer.decode(ids[start:t], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            parts.append(f"{open_mark}{text}{close_mark}" if mask[start] else text)
            start = t
    k = int(reader._shard_of[i])
    j = i - int((reader._shard_of < k).sum())  # the sample's row in its shard's index
    index = reader.shards[k].index
    return {"sample": i, "record_id": str(index["record_id"][j]) if "record_id" in index else None,
            "source_index": int(index["source_index"][j]) if "source_index" in index else None,
            "tokens": len(ids), "loss_tokens": int(sum(mask)), "text": "".join(parts)}  # fmt: skip

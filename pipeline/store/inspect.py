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
        "projection": reader.fingerprint.get("projection") or {},
        "fingerprint": reader.fingerprint,
        "fingerprint_digest": reader.digest,
        "plan": reader.plan,
    }

"""What each integrity level costs on a real SmolLM2 store (README "Integrity"); every number beside its same-run
baseline.

(a) open: `StoreReader` (chunk files present with their recorded sizes, small files re-hashed, index within the
    arrays, digests) vs `pipeline verify`'s full re-hash of the same store;
(b) read: every sample read once (all fields) without and with the per-chunk checksum on first read, page cache
    warm; and loading the target weights without and with their checksum;
(c) training: EAGLE-1 steps/s and tokens/s over about one epoch with --integrity open vs read.

    python bench/integrity.py [--feats DIR] [--records 120] [--max-length 512] [--shard-size 20] [--steps 6]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

from pipeline.store import StoreReader, inspect_store, verify_store  # noqa: E402
from pipeline.train.trainer import TrainConfig, train  # noqa: E402


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def read_all(root: Path, verify_reads: bool) -> float:
    """Every sample once, copied out of the memmaps (a memmap view alone would not touch the bytes)."""
    reader = StoreReader(root, verify_reads=verify_reads)
    t = time.perf_counter()
    for i in range(len(reader)):
        reader.sample(i)
    return time.perf_counter() - t


def load_weights(reader: StoreReader) -> None:
    for t in reader.target_weights().values():  # safetensors maps lazily: touch every byte, as training does
        t.clone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--feats", type=Path, default=None, help="an existing store (default: extract one)")
    ap.add_argument("--records", type=int, default=120)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--shard-size", type=int, default=20)
    ap.add_argument("--steps", type=int, default=6, help="training steps per run (0: skip (c))")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="integrity-"))
    feats = args.feats or work / "feats"
    if not (feats / "store.arrow").exists():
        from pipeline.extract.runner import ExtractConfig, run_extract

        s = run_extract(ExtractConfig(out=feats, limit=args.records, max_length=args.max_length,
                                      shard_size=args.shard_size, progress=False))  # fmt: skip
        print(f"extracted {feats}: {s['samples_written']} samples, {s['tokens']} tokens in {s['wall_s']} s")
    info = inspect_store(feats)
    nbytes = info["bytes"]
    files = sum(len(list(p.rglob("*"))) for p in (feats / "shards").glob("shard-*"))
    print(f"store: {info['samples']} samples, {info['tokens']:,} tokens, {len(info['shards'])} shards, "
          f"{files} files, {nbytes / 2**20:.0f} MiB (target pieces {info['target_bytes'] / 2**20:.0f} MiB)\n")

    verify_store(feats, write_result=False)  # warm the page cache: every level below reads from memory
    open_s = timed(lambda: StoreReader(feats), repeat=5)
    full_s = timed(lambda: verify_store(feats, write_result=False), repeat=2)
    print("(a) opening vs the full re-hash")
    print(f"  open checks (StoreReader)     {open_s * 1e3:8.1f} ms   ({open_s / len(info['shards']) * 1e3:.1f} ms/shard)"
          f"   ratio {open_s / full_s:.4f}")
    print(f"  full (pipeline verify)        {full_s * 1e3:8.1f} ms   ({nbytes / full_s / 2**20:.0f} MiB/s)   ratio 1.0000")

    plain = min(read_all(feats, False) for _ in range(2))
    hashed = read_all(feats, True)  # a fresh reader: every chunk is hashed on its first read
    print("\n(b) reading every sample once (all fields)")
    print(f"  without checksums             {plain:8.3f} s    ratio 1.00")
    print(f"  checksum on each chunk's first read {hashed:8.3f} s    ratio {hashed / plain:.2f}")
    weights = feats / "target" / "weights.safetensors"
    load_s = timed(lambda: load_weights(StoreReader(feats)), repeat=3)
    checked_s = timed(lambda: load_weights(StoreReader(feats, verify_reads=True)), repeat=3)
    print(f"  target weights ({weights.stat().st_size / 2**20:.0f} MiB): load {load_s:.3f} s, with sha256 "
          f"{checked_s:.3f} s   ratio {checked_s / load_s:.2f}")
    if not args.steps:
        return

    print(f"\n(c) training EAGLE-1, {args.steps} steps of 2,048 packed tokens (a fresh reader per run)")
    rates = {}
    for k, level in enumerate(("open", "read", "open", "read")):  # interleaved: the shared CPU drifts
        out = work / f"run-{k}-{level}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        s = train(TrainConfig(feats=str(feats), out=str(out), max_steps=args.steps, integrity=level, progress=False))
        wall = time.perf_counter() - t
        rates.setdefault(level, []).append((s["steps"] / wall, wall))
    base = max(r for r, _ in rates["open"])
    for level, runs in rates.items():
        best = max(r for r, _ in runs)
        print(f"  --integrity {level:<5} {best:6.3f} steps/s (best of {len(runs)}, wall incl. start-up "
              f"{min(w for _, w in runs):.1f} s)   ratio {best / base:.3f}")


if __name__ == "__main__":
    main()

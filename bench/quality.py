"""Quality at equal budget: EAGLE-1 and EAGLE-3 trained from bf16, fp8 and fp8+zstd stores of the same data.

From one fp32 SmolLM2 extraction (real ShareGPT records) the stores are written by `pipeline convert`. Every run
uses the same seed, steps, learning rate and split, and the runs of one shuffle see the same order, so within a
shuffle the stores' precision is the only difference (global: the order uncompressed stores get; window: the
chunk-window order compressed stores get by default; either can be asked for). Each run's final weights are
evaluated on the held-out samples of the bf16 store (the features a serving engine hands the draft of a bf16
target): per-step greedy acceptance and the simulated chain τ (`pipeline train --val-fraction`'s metrics), each
against the bf16 run of the same shuffle.

    python bench/quality.py --feats FP32_STORE [--variants eagle1,eagle3] [--steps 40]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

os.environ.setdefault("WANDB_MODE", "disabled")

from pipeline import store as st  # noqa: E402
from pipeline.train import variants  # noqa: E402
from pipeline.train.loader import split_samples  # noqa: E402
from pipeline.train.trainer import TrainConfig, _evaluate, _val_batches, train  # noqa: E402

# (label, hidden dtype, codec, log-prob dtype, shuffle)
CONFIGS = [
    ("bf16, global shuffle", "bfloat16", "none", "float32", "global"),
    ("fp8, global shuffle", st.FP8, "none", "float32", "global"),
    ("fp8 + zstd + fp16 log-probs, global shuffle", st.FP8, "zstd", "float16", "global"),
    ("bf16", "bfloat16", "none", "float32", "window"),
    ("fp8", st.FP8, "none", "float32", "window"),
    ("fp8 + zstd + fp16 log-probs", st.FP8, "zstd", "float16", "window"),
]


def held_out(cfg: TrainConfig, run: Path, reader: st.StoreReader, every: bool = False) -> dict:
    """The run's final weights on ``reader``'s held-out samples (``every``: all of them, a store of records the run
    never saw): per-step acceptance and simulated τ."""
    model, _ = variants.load_run(run, "final")
    _, objective, _ = variants.build(cfg, reader)
    val_idx = np.arange(len(reader)) if every else split_samples(reader, cfg.val_fraction, cfg.seed)[1]
    batches = _val_batches(reader, val_idx, variants.required_fields(cfg), cfg, 0, 1)
    shim = SimpleNamespace(module=model, to_device=lambda b: b, all_mean=lambda means, weights: means)
    return _evaluate(cfg, shim, batches, objective)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--feats", type=Path, required=True, help="fp32 SmolLM2 store (bench/store.py builds one)")
    ap.add_argument("--variants", default="eagle1,eagle3")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--tokens-per-batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ttt-steps", type=int, default=3)
    ap.add_argument("--draft-vocab-size", type=int, default=4096)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-quality-"))
    stores = {}
    for label, dtype, codec, lp, _ in CONFIGS:
        path = work / f"store-{st.digest([dtype, codec, lp])[:8]}"
        stores[label] = path
        st.reencode_store(args.feats, path, hidden_dtype=dtype, codec=codec, logprob_dtype=lp)
    ref = st.StoreReader(stores["bf16"])
    print(f"{args.feats}: {len(ref)} samples, {int(ref.lengths.sum())} tokens; {args.steps} steps of "
          f"{args.tokens_per_batch} tokens, lr {args.lr}, seed 0, 20% held out; evaluated on the bf16 store's "
          "held-out samples; window shuffle: 2-chunk windows")
    for variant in args.variants.split(","):
        rows = {}
        for label, *_, shuffle in CONFIGS:
            cfg = TrainConfig(feats=str(stores[label]), out=str(work / f"run-{variant}-{label.replace(' ', '_')}"),
                              variant=variant, max_steps=args.steps, tokens_per_batch=args.tokens_per_batch,
                              lr=args.lr, val_fraction=0.2, ttt_steps=args.ttt_steps,
                              draft_vocab_size=args.draft_vocab_size, shuffle=shuffle, shuffle_window=2,
                              progress=False)  # fmt: skip
            t = time.time()
            if not (Path(cfg.out) / "summary.json").exists():
                train(cfg)
            rows[label] = (held_out(cfg, Path(cfg.out), ref), time.time() - t,
                           st.inspect_store(stores[label])["bytes_per_token_total"])  # fmt: skip
        steps = len(variants.eval_keys(TrainConfig(feats="", out="", variant=variant, ttt_steps=args.ttt_steps)))
        print(f"\n{variant}   B/token   " + "   ".join(f"acc_{i}" for i in range(steps))
              + "    τ      τ vs bf16 (same shuffle)   wall s")
        for label, (m, wall, bpt) in rows.items():
            base = rows["bf16, global shuffle" if label.endswith("global shuffle") else "bf16"][0]["tau"]
            accs = "   ".join(f"{m[f'cond_acc_{i}']:.3f}" for i in range(steps))
            print(f"  {label:<30} {bpt:6,.0f}   {accs}   {m['tau']:.4f}   {m['tau'] / base - 1:+.2%}   {wall:6.0f}")


if __name__ == "__main__":
    main()

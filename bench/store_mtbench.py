"""MT-bench τ of the demo's EAGLE-3 head trained from the compact default store against the bf16 (format-2) store.

Issue 20's goal: the head trained from the default store (projection auto, q19 EAGLE-3 features, fp8 EAGLE-1
features, codec auto, fp16 log-probs) decodes MT-bench within noise of the head trained from the bf16 store.

The demo's records are extracted once with whole fp32 features; both layouts are written from that store by
`pipeline.store.reencode_store` (the writer extraction uses: the bytes `pipeline extract` with those flags writes).
For each seed one EAGLE-3 head per layout is trained with the demo's settings (the same seed gives both layouts the
same held-out samples and initialisation; ``--shuffle auto``, the demo's, reads the compressed compact store in
windows and the uncompressed bf16 store globally, ``--shuffle global`` gives both the same sample order), exported,
and decoded greedily on MT-bench (both turns, chain drafts of a fixed depth, no cost model), the plain greedy
decoding of the same prompts being the reference for mismatches. Every stage is kept under ``--work`` and reused
when the script runs again.

    OMP_NUM_THREADS=1 python bench/store_mtbench.py [--work DIR] [--seeds 0,1] [--questions 10] [--depth 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

from pipeline.demo import DemoConfig  # noqa: E402
from pipeline.extract.runner import ExtractConfig  # noqa: E402
from pipeline.options import defaults  # noqa: E402

DEMO_SHARD_SIZE = 40  # run_demo's extraction
COMPACT_FIELDS = ("hidden_dtype", "aux_dtype", "codec", "logprob_dtype", "aux_projection", "calibration_tokens")


def layouts() -> dict[str, dict]:
    """reencode_store arguments of each compared layout: format 2 (bf16) and `pipeline extract`'s defaults."""
    extract_defaults = defaults(ExtractConfig)
    return {"bf16": {"hidden_dtype": "bfloat16", "aux_dtype": "bfloat16", "codec": "none",
                     "logprob_dtype": "float32", "aux_projection": None},
            "compact": {k: extract_defaults[k] for k in COMPACT_FIELDS}}  # fmt: skip


def build_stores(work: Path) -> dict[str, dict]:
    """The fp32 extraction and each layout re-encoded from it; returns ``{layout: inspect_store(...)}``."""
    from pipeline.extract.runner import run_extract
    from pipeline.store import inspect_store, reencode_store

    def complete(store: Path) -> bool:  # store.arrow is written first: an interrupted run resumes
        return (store / "store.arrow").exists() and inspect_store(store)["complete"]

    source = work / "fp32"
    if not complete(source):
        run_extract(ExtractConfig(out=source, limit=DemoConfig.records, max_length=DemoConfig.max_length,
                                  shard_size=DEMO_SHARD_SIZE, hidden_dtype="float32", aux_dtype="auto",
                                  logprob_dtype="float32", codec="none", aux_projection=None,
                                  progress=False))  # fmt: skip
    infos = {}
    for name, kwargs in layouts().items():
        if not complete(work / name):
            reencode_store(source, work / name, **kwargs)
        infos[name] = inspect_store(work / name)
    return infos


def train_and_export(work: Path, layout: str, seed: int, shuffle: str) -> tuple[dict, Path]:
    """The demo's EAGLE-3 training on one layout and seed (reused when finished); (summary, export dir)."""
    from pipeline.train.trainer import TrainConfig, train
    from pipeline.train.variants import export_run

    name = f"{layout}-s{seed}" + ("" if shuffle == "auto" else f"-{shuffle}")
    run, export = work / "runs" / name, work / "exports" / name
    if (run / "summary.json").exists():
        summary = json.loads((run / "summary.json").read_text())
    else:
        summary = train(TrainConfig(feats=str(work / layout), out=str(run), variant="eagle3", seed=seed,
                                    max_steps=DemoConfig.eagle3_steps, tokens_per_batch=DemoConfig.tokens_per_batch,
                                    lr=2e-3, val_fraction=0.1, draft_vocab_size=DemoConfig.draft_vocab_size,
                                    ttt_steps=DemoConfig.ttt_steps, shuffle=shuffle, progress=False))  # fmt: skip
    if not (export / "config.json").exists():
        export_run(run, export)
    return summary, export


def mtbench(export: Path, report_path: Path, questions: int, depth: int, max_new_tokens: int) -> dict:
    """Greedy chain drafting of a fixed depth on MT-bench questions 1..questions, both turns (reused when done)."""
    from pipeline.evaluate.cli import evaluate

    if report_path.exists():
        return json.loads(report_path.read_text())
    # stock linears: the same target arithmetic in every evaluation (auto picks by a timing)
    report, _, _ = evaluate(export, limit=questions, mode="chain", depth=depth, max_new_tokens=max_new_tokens,
                            report_path=report_path, policy="fixed", baselines=(), linears="stock", repeats=1,
                            progress=False)  # fmt: skip
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("store-mtbench"))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--shuffle", choices=["auto", "global"], default="auto")
    ap.add_argument("--layouts", default="bf16,compact", help="Train and evaluate these (e.g. one per process).")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.layouts.split(",")
    started = time.time()
    infos = build_stores(args.work)
    for name, info in infos.items():
        print(f"{name:<8} {info['samples']} samples, {info['tokens']} tokens, hidden {info['hidden_dtype']}, "
              f"aux {info['aux_dtype']}, codec {info['codec']}, {info['bytes_per_token_total']:.1f} B/token")
    rows = []
    for seed in seeds:
        for name in names:
            t = time.time()
            summary, export = train_and_export(args.work, name, seed, args.shuffle)
            report = mtbench(export, args.work / "evals" / f"{export.name}-d{args.depth}-q{args.questions}.json",
                             args.questions, args.depth, args.max_new_tokens)  # fmt: skip
            rows.append({"layout": name, "seed": seed, "bpt": infos[name]["bytes_per_token_total"],
                         "tau": report["acceptance_length"], "pos0": report["per_position_acceptance"][0],
                         "mismatches": report["mismatches"], "turns": report["turns"],
                         "sim_tau": summary["best_val_tau"]})  # fmt: skip
            print(f"  {name} seed {seed}: τ {rows[-1]['tau']:.3f} ({time.time() - t:.0f} s)", flush=True)
    print(f"\nEAGLE-3, demo settings ({DemoConfig.eagle3_steps} steps x {DemoConfig.tokens_per_batch} tokens, "
          f"shuffle {args.shuffle}); MT-bench questions 1-{args.questions}, both turns, {args.max_new_tokens} new tokens, "
          f"greedy, chain of fixed depth {args.depth}")
    head = (f"{'layout':<8} {'seed':>4} {'B/token':>8} {'MT-bench τ':>10} {'pos-0 acc':>9} {'mismatches':>10} "
            f"{'turns':>5} {'sim τ':>6}")  # fmt: skip
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['layout']:<8} {r['seed']:>4} {r['bpt']:>8.1f} {r['tau']:>10.3f} {r['pos0']:>9.3f} "
              f"{r['mismatches']!s:>10} {r['turns']:>5} {r['sim_tau']:>6.3f}")  # fmt: skip
    by = {(r["layout"], r["seed"]): r for r in rows}
    paired = [s for s in seeds if ("compact", s) in by and ("bf16", s) in by]
    if paired:
        keys = ("bpt", "tau", "pos0", "sim_tau")
        ratios = {k: [by["compact", s][k] / by["bf16", s][k] for s in paired] for k in keys}
        print(f"\n{'compact / bf16':<14} {'B/token':>7} {'τ':>7} {'pos-0':>7} {'sim τ':>7}")
        for i, s in enumerate(paired):
            print(f"{f'seed {s}':<14} " + " ".join(f"{ratios[k][i]:>7.3f}" for k in keys))
        print(f"{'mean':<14} " + " ".join(f"{statistics.mean(ratios[k]):>7.3f}" for k in keys))
    for name in names:
        taus = [by[name, s]["tau"] for s in seeds]
        print(f"{name} MT-bench τ across seeds: {min(taus):.3f}-{max(taus):.3f}")
    print(f"\n{time.time() - started:.0f} s in all (machine shared; timings are not the point)")


if __name__ == "__main__":
    main()

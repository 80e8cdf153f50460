"""Served vs own evaluator: the same exported heads, the same prompts, chain drafting at a fixed depth, in one run.

vLLM (``pipeline eval --engine vllm``: one plain engine, then one engine per head with ``num_speculative_tokens =
depth``, acceptance from vLLM's own counters) against the project's HF evaluator (``pipeline eval --mode chain
--policy fixed --depth D``, which drafts ``depth`` tokens every round as vLLM does). Prints, per head and engine,
verification forwards, accepted drafts per position, τ and greedy mismatches, then per turn how many
verification forwards the two evaluators needed (identical decisions give identical counts; a difference can only
come from a near-tied draft argmax flipping between the two engines' fp32 features).

    VLLM_CPU_KVCACHE_SPACE=2 python bench/vllm_served.py --head EXPORT [--head EXPORT ...] [--questions 4]
        [--depth 3] [--max-new-tokens 64] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def main() -> None:
    from pipeline.evaluate.cli import evaluate
    from pipeline.evaluate.prompts import load_conversations
    from pipeline.evaluate.report import write_report
    from pipeline.evaluate.runner import resolve_target_path
    from pipeline.evaluate.vllm_engine import draft_metadata, engine_options, evaluate_vllm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head", action="append", required=True, type=Path, help="an export directory (repeat)")
    ap.add_argument("--questions", type=int, default=4, help="MT-bench questions (both turns)")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench-vllm-served"))
    args = ap.parse_args()

    target = resolve_target_path(draft_metadata(args.head[0]), None)
    conversations = load_conversations(limit=args.questions)
    t0 = time.perf_counter()
    served = evaluate_vllm(args.head, target_dir=target, conversations=conversations, depth=args.depth,
                           max_new_tokens=args.max_new_tokens,
                           options=engine_options(dtype="float32", enforce_eager=True), progress=False)  # fmt: skip
    vllm_s = time.perf_counter() - t0
    rows, per_turn = [], []
    for head, rv in zip(args.head, served, strict=True):
        variant = rv["draft"]["variant"]
        write_report(rv, args.out / f"{variant}-vllm.json")
        t0 = time.perf_counter()
        rh, _, _ = evaluate(head, limit=args.questions, mode="chain", depth=args.depth, policy="fixed",
                            baselines=(), max_new_tokens=args.max_new_tokens, device="cpu",
                            report_path=args.out / f"{variant}-hf.json", progress=False)  # fmt: skip
        hf_s = time.perf_counter() - t0
        for engine, r in (("vllm", rv), ("hf", rh)):
            rows.append((variant, engine, r["target_forwards"], r["per_position_accepted"],
                         r["per_position_acceptance"], r["acceptance_length"], r["mismatches"], r["tokens_per_s"],
                         r["baseline_tokens_per_s"]))  # fmt: skip
        same_text = sum(a["text"] == b["text"] for a, b in zip(rv["prompts"], rh["prompts"], strict=True))
        fwd = [(a["target_forwards"], b["target_forwards"]) for a, b in zip(rv["prompts"], rh["prompts"], strict=True)]
        per_turn.append((variant, same_text, len(fwd), sum(a == b for a, b in fwd), fwd, hf_s))

    print(f"\nMT-bench questions 1-{args.questions} (both turns), chain depth {args.depth}, {args.max_new_tokens} new "
          f"tokens, greedy, fp32 both (vLLM {served[0]['vllm']['version']}, eager). vLLM engines: "
          f"{vllm_s:.0f} s in all incl. start-ups.")  # fmt: skip
    print(f"{'head':<7} {'engine':<6} {'verif. fwd':>10} {'accepted per position':<24} {'rate per position':<22} "
          f"{'tau':>6} {'mism.':>5} {'tok/s':>7} {'plain tok/s':>11}")  # fmt: skip
    for v, e, f, acc, rate, tau, mism, tps, base in rows:
        rates = " ".join(f"{x:.3f}" if x is not None else "-" for x in rate)
        print(f"{v:<7} {e:<6} {f:>10} {str(acc):<24} {rates:<22} {tau:>6.3f} {mism:>5} {tps:>7.1f} {base:>11.1f}")
    for v, same_text, n, same_fwd, fwd, hf_s in per_turn:
        print(f"{v}: answers identical in {same_text}/{n} turns; verification forwards identical in {same_fwd}/{n} "
              f"turns (vLLM, HF per turn: {fwd}); HF evaluator {hf_s:.0f} s")  # fmt: skip
    (args.out / "table.json").write_text(json.dumps({"rows": rows, "per_turn": per_turn}, indent=2))


if __name__ == "__main__":
    main()

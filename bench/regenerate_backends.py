"""`pipeline regenerate` throughput: the HF backend (default and larger batches) against the vLLM backend, on the
same ShareGPT records, greedy, in one run.

Each backend regenerates the same records into its own file. Reported per backend: model load / engine start-up,
time inside the generate calls, new tokens, new tokens/s over the generate calls and over the whole command
(load included), and how many generated assistant turns are token-identical to the first backend's (greedy: they
should be, up to near-tied argmaxes flipped by different fp32 kernels, after which a conversation diverges).

    VLLM_CPU_KVCACHE_SPACE=2 python bench/regenerate_backends.py [--limit 16] [--max-new-tokens 64] [--max-length 512]
        [--runs hf:8,hf:16,vllm:256] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


class Timed:
    """A generator whose generate calls are timed (the rest of `run_regenerate` is bookkeeping)."""

    def __init__(self, gen):
        self.gen, self.name, self.tokenizer, self.dtype_name = gen, gen.name, gen.tokenizer, gen.dtype_name
        self.seconds, self.calls = 0.0, 0

    def generate(self, *args, **kw):
        start = time.perf_counter()
        out = self.gen.generate(*args, **kw)
        took = time.perf_counter() - start
        self.seconds += took
        self.calls += 1
        print(f"  {self.name} call {self.calls}: {len(out)} prompts, {sum(len(c.token_ids) for c in out)} new tokens, "
              f"{took:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
        return out


def assistant_turns(path: Path) -> dict[str, list[str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["id"]: [m["content"] for m in r["messages"] if m["role"] == "assistant"] for r in rows}


def main() -> None:
    from pipeline.assets import resolve_model
    from pipeline.extract.vllm_backend import shutdown_llm
    from pipeline.regenerate import RegenerateConfig, make_generator, run_regenerate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--runs", default="hf:8,hf:16,vllm:256",
                    help="backend:batch-size, in order (the first is the reference for identical turns)")
    ap.add_argument("--work", type=Path, default=Path("bench-regenerate"))
    args = ap.parse_args()

    runs = [(r.split(":")[0], int(r.split(":")[1])) for r in args.runs.split(",") if r]
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(None)
    results = []
    for backend, batch in runs:
        out = args.work / f"{backend}-bs{batch}.jsonl"
        out.unlink(missing_ok=True)
        cfg = RegenerateConfig(out=out, offset=args.offset, limit=args.limit, max_new_tokens=args.max_new_tokens,
                               max_length=args.max_length, backend=backend, batch_size=batch, progress=False)  # fmt: skip
        start = time.perf_counter()
        gen = make_generator(cfg, model_dir)
        load_s = time.perf_counter() - start
        timed = Timed(gen)
        summary = run_regenerate(cfg, generator=timed)
        total_s = time.perf_counter() - start
        if backend == "vllm":
            shutdown_llm(gen.llm)
        del gen
        results.append({"backend": backend, "batch_size": batch, "dtype": timed.dtype_name, "load_s": load_s,
                        "generate_s": timed.seconds, "calls": timed.calls, "total_s": total_s,
                        "written": summary["written"], "turns": summary["turns_generated"],
                        "new_tokens": summary["new_tokens"], "out": str(out)})  # fmt: skip
        print(json.dumps(results[-1]), flush=True)

    ref = assistant_turns(Path(results[0]["out"]))
    base = results[0]["new_tokens"] / results[0]["generate_s"]
    print(f"\nShareGPT records [{args.offset}, {args.offset + args.limit}), greedy, max {args.max_new_tokens} new tokens "
          f"per turn, max length {args.max_length}; identical turns counted against {runs[0][0]} bs {runs[0][1]}")
    print(f"{'backend':<8} {'batch':>5} {'dtype':<8} {'load s':>7} {'gen s':>8} {'turns':>5} {'new tok':>8} "
          f"{'tok/s gen':>9} {'x':>6} {'tok/s all':>9} {'same turns':>11}")  # fmt: skip
    for r in results:
        turns = assistant_turns(Path(r["out"]))
        pairs = [(a, b) for k in ref for a, b in zip(ref[k], turns.get(k, []), strict=False)]
        same = sum(a == b for a, b in pairs)
        tps = r["new_tokens"] / r["generate_s"]
        print(f"{r['backend']:<8} {r['batch_size']:>5} {r['dtype']:<8} {r['load_s']:>7.1f} {r['generate_s']:>8.1f} "
              f"{r['turns']:>5} {r['new_tokens']:>8} {tps:>9.1f} {tps / base:>6.2f} "
              f"{r['new_tokens'] / r['total_s']:>9.1f} {same:>5}/{len(pairs):<5}")  # fmt: skip
    (args.work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

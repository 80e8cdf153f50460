"""What verifying n drafted tokens costs on this machine: one SmolLM2 forward over n new tokens after a cached
prefix, with the linears as transformers runs them (``x @ Wᵀ``) and as ``pipeline eval --linears skinny`` runs
them on the CPU (``W @ xᵀ`` for few rows, :func:`pipeline.evaluate.target.skinny_linears`; ``--linears auto``, the
default, measures both and keeps the faster), interleaved round by round; plus the
lm_head product alone. Prints milliseconds and each count's cost relative to one token, and the two kernels'
logits' largest difference.

    python bench/verify_cost.py [--prefix 150] [--rounds 3] [--reps 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.assets import smollm2_dir
from pipeline.evaluate.target import compact_cache, load_target, new_cache, skinny_linears, target_forward

COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_target(smollm2_dir())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prefix + max(COUNTS)), generator=gen)
    stock = {m: m.forward for m in model.modules() if isinstance(m, torch.nn.Linear)}

    def use(kind: str) -> None:
        for m, fwd in stock.items():
            m.forward = fwd
        if kind == "skinny":
            skinny_linears(model)

    @torch.no_grad()
    def cost(n: int) -> tuple[float, torch.Tensor]:
        cache = new_cache(model)
        target_forward(model, ids[:, :args.prefix], torch.arange(args.prefix)[None], cache)
        times, logits = [], None
        for _ in range(args.reps):
            start = time.perf_counter()
            logits, _ = target_forward(model, ids[:, args.prefix:args.prefix + n],
                                       torch.arange(args.prefix, args.prefix + n)[None], cache)  # fmt: skip
            times.append(time.perf_counter() - start)
            compact_cache(cache, args.prefix, [])
        return statistics.median(times) * 1e3, logits

    ms: dict[str, dict[int, list[float]]] = {k: {n: [] for n in COUNTS} for k in ("stock", "skinny")}
    diff = 0.0
    for _ in range(args.rounds):
        for n in COUNTS:
            out = {}
            for kind in ("stock", "skinny"):
                use(kind)
                t, out[kind] = cost(n)
                ms[kind][n].append(t)
            diff = max(diff, float((out["stock"] - out["skinny"]).abs().max()))
    use("stock")
    med = {k: {n: statistics.median(v) for n, v in d.items()} for k, d in ms.items()}
    print(f"target forward after a {args.prefix}-token cache, {args.threads} threads, median of {args.rounds} rounds "
          f"x {args.reps}; largest logit difference between the kernels {diff:.2e}")  # fmt: skip
    print(f"{'tokens':>6} {'x@Wt ms':>9} {'vs 1':>6} {'W@xt ms':>9} {'vs 1':>6} {'W@xt / x@Wt':>12}")
    for n in COUNTS:
        a, b = med["stock"][n], med["skinny"][n]
        print(f"{n:>6} {a:>9.1f} {a / med['stock'][1]:>6.2f} {b:>9.1f} {b / med['stock'][1]:>6.2f} {b / a:>12.2f}")
    w = model.lm_head.weight.detach()
    print("lm_head alone (49,152 x 576):")
    for n in (1, 2, 4, 8):
        x = torch.randn(n, w.shape[1], generator=gen)
        for name, fn in (("x@Wt", lambda x=x: torch.nn.functional.linear(x, w)), ("W@xt", lambda x=x: (w @ x.T).T)):
            fn()
            t = statistics.median(_timed(fn) for _ in range(args.reps))
            print(f"  {n} rows {name} {t:.2f} ms", end="")
        print()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


if __name__ == "__main__":
    main()

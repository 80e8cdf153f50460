"""Draft attention: speed of the paths on this CPU, and the memory of a Llama-3-8B-shaped EAGLE-3 step vs T.

(a) speed: one EAGLE-3 training step (forward + backward, SmolLM2-135M sizes, packed rows) with attention
    ``dense`` (the previous path: one [heads, T, T] score tensor per block) and ``chunked`` (query chunks of the
    rows the default 256 MiB budget gives at T = 8,192, each recomputed in backward); ``auto`` on the CPU runs
    one dense chunk whenever the scores fit the budget.
(b) memory: a training step of an EAGLE-3 draft with Llama-3-8B's shapes (H 4,096, 32 heads / 8 kv heads,
    intermediate 14,336, draft vocab 32,000, 7 TTT steps) at a few T on this CPU, fp32 (no GPU was lent):
    peak bytes of live tensors (a dispatch-mode counter), split into parameters + gradients and the rest. The
    activation part is fitted per path as a + b·T + c·T² (every tensor of a step is constant, linear in T, or a
    score tensor quadratic in T), checked on one more T, and extrapolated to T = 4,096 and 8,192. The static part
    is computed for GPU training (bf16 weights, fp32 master weights and Adam moments, bf16 gradients, the frozen
    128,256-token embedding in bf16) — measured in fp32, the activations are an upper bound for bf16 training.

    python bench/attention.py [--lengths 64,128,192] [--check 256]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import weakref

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import pipeline.draft.layers as layers
from pipeline.draft.eagle3 import Eagle3Config, Eagle3Draft, Eagle3Objective, build_draft_vocab, training_loss

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from synthetic_target import tiny_target_config  # noqa: E402  (a test helper: tests/ is not a package)

LLAMA8B = dict(vocab_size=128256, hidden_size=4096, num_layers=32, heads=32, kv_heads=8, intermediate_size=14336,
               max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, num_layers=30, heads=9, kv_heads=3, intermediate_size=1536,
               max_position_embeddings=8192)
DEFAULT_BUDGET = layers.CHUNK_SCORE_BYTES


def batch_for(tokens: int, h: int, vocab: int, k: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A packed row of four documents with random features and top-k targets."""
    g = torch.Generator().manual_seed(seed)
    lengths = [int(tokens * f) for f in (0.35, 0.25, 0.2)]
    lengths.append(tokens - sum(lengths))
    return {
        "input_ids": torch.randint(0, vocab, (1, tokens), generator=g),
        "loss_mask": (torch.rand(1, tokens, generator=g) > 0.3).float(),
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        "doc_ids": torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None],
        "hidden_aux": torch.randn(1, tokens, 3 * h, generator=g),
        "topk_ids": torch.randint(0, vocab, (1, tokens, k), generator=g),
        "topk_logprobs": torch.log_softmax(torch.randn(1, tokens, k, generator=g), -1),
    }  # fmt: skip


def draft_for(shape: dict, draft_vocab: int, embed_vocab: int | None = None) -> Eagle3Draft:
    """An EAGLE-3 draft of ``shape``; ``embed_vocab`` shrinks the frozen embedding (its size does not depend on T;
    the bench adds the real one back in the static memory)."""
    tc = tiny_target_config(**{**shape, "vocab_size": embed_vocab or shape["vocab_size"]})
    torch.manual_seed(0)
    n = shape["num_layers"]
    model = Eagle3Draft(Eagle3Config.from_target(tc, [2, n // 2, n - 3], draft_vocab))
    counts = np.random.default_rng(0).integers(0, 100, tc["vocab_size"])
    model.set_vocab(*build_draft_vocab(counts, draft_vocab)[:2])
    return model.train()


def rows_for(q_heads: int, tokens: int, ttt: int, budget: int = DEFAULT_BUDGET) -> int:
    """Query rows per chunk the default budget gives at ``tokens`` (bench/attention.py keeps them at every T)."""
    return max(1, budget // (3 * 4 * q_heads * (tokens + ttt - 1)))


def set_path(path: str, q_heads: int, tokens: int, ttt: int, rows: int) -> None:
    """``dense``: the previous path. ``chunked``: query chunks of ``rows`` rows."""
    os.environ["PIPELINE_ATTENTION"] = "dense" if path == "dense" else "chunked"
    layers.CHUNK_SCORE_BYTES = 3 * 4 * q_heads * (tokens + ttt - 1) * rows


def step(model, batch, ttt: int) -> None:
    loss, _ = training_loss(model, batch, Eagle3Objective(ttt_steps=ttt))
    loss.backward()


def speed(tokens: int, ttt: int, repeats: int) -> None:
    model = draft_for(SMOLLM2, 4096)
    batch = batch_for(tokens, SMOLLM2["hidden_size"], SMOLLM2["vocab_size"])
    times: dict[str, float] = {}
    for r in range(repeats + 1):  # alternate the paths (the machine is shared); the first round warms up
        for path in ("dense", "chunked"):
            set_path(path, SMOLLM2["heads"], tokens, ttt, rows_for(SMOLLM2["heads"], 8192, ttt))
            model.zero_grad()
            t = time.perf_counter()
            step(model, batch, ttt)
            if r:
                times[path] = min(times.get(path, float("inf")), time.perf_counter() - t)
    rows = rows_for(SMOLLM2["heads"], 8192, ttt)
    print(f"    T = {tokens:>5}: dense {times['dense']:.2f} s/step, chunked ({rows}-row chunks) "  # best of repeats
          f"{times['chunked']:.2f} s/step   chunked/dense {times['chunked'] / times['dense']:.2f}")


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage created under it until the storage is freed; ``peak`` is the
    high-water mark (what a caching allocator must hold at least, without its fragmentation)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.keys: set[int] = set()

    def _free(self, key: int, n: int) -> None:
        self.keys.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, n = id(storage), storage.nbytes()
                if n and key not in self.keys:
                    self.keys.add(key)
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, n)
        return out


def peak_bytes(model, batch, ttt: int) -> tuple[int, int]:
    """(peak bytes of live tensors during a forward + backward, bytes of parameters + gradients at the end)."""
    model.zero_grad(set_to_none=True)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    inputs = sum(v.numel() * v.element_size() for v in batch.values())
    tracker = LiveBytes()
    with tracker:
        step(model, batch, ttt)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    return params + inputs + tracker.peak, params + grads


def memory(lengths: list[int], check: int, ttt: int) -> None:
    shape = LLAMA8B
    model = draft_for(shape, 32000, embed_vocab=32000)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    embed_real = shape["vocab_size"] * shape["hidden_size"]
    gpu_static = 16 * trainable + 2 * embed_real  # bf16 w + fp32 master + Adam m,v (fp32) + bf16 grad; frozen bf16
    print(f"    draft: {trainable / 1e6:.0f}M trainable parameters, frozen {sorted(frozen)} "
          f"({embed_real / 1e6:.0f}M with the real vocabulary)")
    fits = {}
    rows = min(lengths) // 2  # every measured T runs as several chunks, as long rows do
    for path in ("dense", "chunked"):
        acts = []
        for tokens in [*lengths, check]:
            set_path(path, shape["heads"], tokens, ttt, rows)
            batch = batch_for(tokens, shape["hidden_size"], 32000)
            t = time.perf_counter()
            peak, static = peak_bytes(model, batch, ttt)
            acts.append(peak - static)
            print(f"    {path:<8} T = {tokens:>5}: peak {peak / 2**30:6.2f} GiB, parameters + gradients "
                  f"{static / 2**30:.2f} GiB, the rest {(peak - static) / 2**30:6.2f} GiB   ({time.perf_counter() - t:.0f} s)")
        coef = np.polyfit(np.array(lengths, float), np.array(acts[:-1], float), 2)
        predicted = np.polyval(coef, check)
        print(f"    {path:<8} fit a + bT + cT²: a {coef[2] / 2**20:.0f} MiB, b {coef[1] / 2**10:.1f} KiB/token, "
              f"c {coef[0]:.1f} B/token²; at T = {check}: predicted {predicted / 2**30:.2f} GiB, measured "
              f"{acts[-1] / 2**30:.2f} GiB ({predicted / acts[-1] - 1:+.1%})")
        fits[path] = coef
    print(f"\n    Llama-3-8B-shaped EAGLE-3 step, GPU bf16 training: static {gpu_static / 2**30:.1f} GiB "
          "(weights, master weights, Adam, gradients) + activations extrapolated from the fits above; chunked: "
          f"measured with {rows}-row chunks, plus the larger chunks of the default 256 MiB budget")
    for tokens in (4096, 8192):
        extra = 3 * 4 * shape["heads"] * (tokens + ttt - 1) * (rows_for(shape["heads"], tokens, ttt) - rows)
        total = {p: gpu_static + np.polyval(c, tokens) + (extra if p == "chunked" else 0) for p, c in fits.items()}
        row = "   ".join(f"{p} {v / 2**30:7.1f} GiB" for p, v in total.items())
        print(f"    T = {tokens:>5}: {row}   (chunked/dense {total['chunked'] / total['dense']:.3f}; chunks of "
              f"{rows_for(shape['heads'], tokens, ttt)} rows)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speed-tokens", default="1024,2048")
    ap.add_argument("--lengths", default="64,128,192", help="T of the memory fit")
    ap.add_argument("--check", type=int, default=256, help="T the fit must predict")
    ap.add_argument("--ttt-steps", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    if not args.skip_speed:
        print(f"(a) EAGLE-3 training step, SmolLM2-135M sizes, {args.ttt_steps} TTT steps, this CPU "
              f"({torch.get_num_threads()} threads)")
        for tokens in map(int, args.speed_tokens.split(",")):
            speed(tokens, args.ttt_steps, args.repeats)
    if not args.skip_memory:
        print(f"\n(b) memory of a Llama-3-8B-shaped EAGLE-3 training step ({args.ttt_steps} TTT steps, fp32, CPU)")
        memory([int(x) for x in args.lengths.split(",")], args.check, args.ttt_steps)


if __name__ == "__main__":
    main()

"""Training benchmark on a SmolLM2 store of real ShareGPT data; every ratio's baseline is measured in this run.

(a) loader samples/s: our store (memmap rows -> torch) vs `torch.load` of the per-sample peer layout, same samples;
(b) training tokens/s: batches read from the store (prefetch thread) vs the same batches already in memory;
(c) an offline step vs an online step that first runs the target forward for the batch (what EAGLE-3's
    reference trainer does), and the wall time of 1 extraction + 4 training runs vs 4 online runs;
(d) EAGLE-3: bytes/token with top-k targets vs keeping the last hidden state for exact targets, and the held-out
    simulated τ of a run with each target on the same data and budget;
(e) where a training step's time goes, today's step (dense attention, lm_head + log_softmax through autograd) vs
    the new one (flash attention per document, fused head) vs the new one with --compile, interleaved step by step
    on the same batches: FLOPs per step by torch's own counter, the achieved FLOP/s beside an fp32 matmul ceiling
    measured in this run on the same thread count, forward / backward / optimizer time, the time by kind of
    operator (torch.profiler), and whether the paths' losses agree;
(f) the held-out simulated τ of today's and the new step after the same CPU-seconds of training.

    OMP_NUM_THREADS=1 python bench/train.py [--feats DIR] [--steps 8] [--variants eagle1,eagle3] [--sections e,f]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.draft.layers import compile_layers  # noqa: E402
from pipeline.store import StoreReader, inspect_store  # noqa: E402
from pipeline.train import variants  # noqa: E402
from pipeline.train.engine import Engine, setup_distributed  # noqa: E402
from pipeline.train.loader import PackedLoader, Prefetcher, collate  # noqa: E402
from pipeline.train.trainer import TrainConfig, _evaluate, train  # noqa: E402


def build_store(out: Path, limit: int, max_length: int) -> Path:
    from pipeline.extract.runner import ExtractConfig, run_extract

    if not (out / "store.arrow").exists():
        s = run_extract(ExtractConfig(out=out, limit=limit, max_length=max_length, progress=False))
        print(f"built {out}: {s['samples_written']} samples, {s['tokens']} tokens, {s['tokens_per_s']} tok/s extraction")
    return out


def loader_bench(reader: StoreReader, work: Path, n: int) -> tuple[float, float]:
    fields = ("input_ids", "loss_mask", "hidden_last", "hidden_aux")
    idx = list(range(min(n, len(reader))))
    peer = work / "peer"
    peer.mkdir(exist_ok=True)
    for i in idx:
        s = reader.sample(i, fields)
        length = s["input_ids"].shape[0]
        torch.save({"input_ids": s["input_ids"].long()[None], "loss_mask": s["loss_mask"].long()[None],
                    "hidden_state": s["hidden_last"].to(torch.bfloat16)[None],
                    "aux_hidden_state": s["hidden_aux"].reshape(length, -1).to(torch.bfloat16)[None]},
                   peer / f"data_{i}.ckpt")  # fmt: skip
    rounds = 3
    t = time.perf_counter()
    for _ in range(rounds):
        for i in idx:
            torch.load(peer / f"data_{i}.ckpt")
    peer_rate = rounds * len(idx) / (time.perf_counter() - t)
    fresh = StoreReader(reader.root)
    t = time.perf_counter()
    for _ in range(rounds):
        for i in idx:
            fresh.sample(i, fields)
    ours_rate = rounds * len(idx) / (time.perf_counter() - t)
    return ours_rate, peer_rate


def step_rates(cfg: TrainConfig, reader: StoreReader, steps: int, device) -> dict[str, float]:
    """tokens/s of the same optimizer steps: (store, in memory, online with the target forward)."""
    from transformers import AutoModelForCausalLM

    from pipeline.assets import resolve_model

    torch.manual_seed(0)
    model, objective, _ = variants.build(cfg, reader)
    engine = Engine(model, cfg.engine_config(steps * 3), device)
    fields = variants.required_fields(cfg)
    loader = PackedLoader(reader, np.arange(len(reader)), fields, cfg.tokens_per_batch, seed=0)
    packs = loader.epoch_packs(0)[:steps]
    tokens = sum(n for p in packs for _, n in p)

    def run(batches) -> float:
        t = time.perf_counter()
        for _, batch in zip(range(steps), batches, strict=False):
            loss, _ = variants.loss(cfg, engine.module, engine.to_device(batch), objective)
            engine.backward_step(loss)
        return tokens / (time.perf_counter() - t)

    run(collate(reader, p, fields, cfg.tokens_per_batch) for p in packs[:1])  # warm-up
    pre = Prefetcher(((None, collate(reader, p, fields, cfg.tokens_per_batch)) for p in packs), depth=4)
    store_rate = run(b for _, b in pre)
    pre.close()
    in_memory = [collate(reader, p, fields, cfg.tokens_per_batch) for p in packs]
    memory_rate = run(iter(in_memory))

    target = AutoModelForCausalLM.from_pretrained(resolve_model(reader.fingerprint["model"]["path"]
                                                                if Path(reader.fingerprint["model"]["path"]).exists()
                                                                else None), dtype=torch.float32).eval()  # fmt: skip
    aux = reader.aux_layers

    def online(batch):
        # what an online trainer must do per batch: run the target on each document for its features
        with torch.no_grad():
            doc = batch["doc_ids"][0]
            for d in range(int(doc.max()) + 1):
                sel = doc == d
                out = target(input_ids=batch["input_ids"][:, sel], output_hidden_states=True)
                if "hidden_last" in batch:
                    batch["hidden_last"][:, sel] = out.hidden_states[-1]
                if "hidden_aux" in batch:
                    batch["hidden_aux"][:, sel] = torch.cat([out.hidden_states[a] for a in aux], -1)
                if "topk_ids" in batch:
                    v, j = torch.log_softmax(out.logits.float(), -1).topk(batch["topk_ids"].shape[-1], -1)
                    batch["topk_logprobs"][:, sel], batch["topk_ids"][:, sel] = v, j
        return batch

    online_rate = run(online(b) for b in in_memory)
    return {"store": store_rate, "memory": memory_rate, "online": online_rate, "tokens": tokens}


OP_KINDS = {  # torch.profiler op names -> what they are (self time; composite ops like aten::linear excluded)
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::dot", "aten::mv"),
    "fused attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",),
    "softmax+mask": ("aten::_softmax", "aten::_log_softmax", "aten::_softmax_backward_data",
                       "aten::_log_softmax_backward_data", "aten::masked_fill", "aten::masked_fill_", "aten::where",
                       "aten::logical_and", "aten::eq", "aten::le", "aten::ge", "aten::tril", "aten::logsumexp",
                       "aten::exp", "aten::argmax"),
    "optimizer": ("aten::_foreach", "Optimizer", "aten::_fused_adam", "aten::addcdiv_", "aten::lerp_"),
    "copies+layout": ("aten::copy_", "aten::cat", "aten::index", "aten::index_put_", "aten::gather",
                        "aten::scatter_add_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::fill_",
                        "aten::zero_", "aten::index_select", "aten::embedding", "aten::_index_put_impl_",
                        "aten::scatter", "aten::stack"),
}  # fmt: skip

# The step as it was before issue 23 ("today") and as it is now; every difference is a flag, so both run here.
PATHS = {
    "today": {"attention": "dense", "fused_head": False, "compile": False},
    "new": {"attention": "auto", "fused_head": True, "compile": False},
    "new + compile": {"attention": "auto", "fused_head": True, "compile": True},
}


def matmul_ceiling(m: int = 2048, k: int = 576, n: int = 1536, reps: int = 20) -> float:
    """fp32 GFLOP/s of torch.mm at a draft-layer shape on this machine now, in this process's thread count (best
    of ``reps``, CPU time of this thread when torch runs on one thread: other processes' share of the cores does
    not count, as it does not count in the steps')."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = step_clock()
        a @ b
        best = min(best, step_clock() - t)
    return 2 * m * k * n / best / 1e9


def step_clock() -> float:
    """Seconds of this thread's CPU time when torch computes on one thread (the machine's other processes do not
    slow it down, only the shared caches do), else wall time."""
    return time.thread_time() if torch.get_num_threads() == 1 else time.perf_counter()


class PathRun:
    """One training path (``PATHS``) with its own engine, from the same seed and weights as the others."""

    def __init__(self, name: str, cfg: TrainConfig, reader: StoreReader, device, total_steps: int):
        self.name, self.cfg, self.flags = name, cfg, PATHS[name]
        torch.manual_seed(0)
        model, self.objective, _ = variants.build(cfg, reader)
        self.objective.fused_head = self.flags["fused_head"]
        if self.flags["compile"]:
            compile_layers(model)
        self.engine = Engine(model, cfg.engine_config(total_steps), device)

    def _env(self):
        os.environ["PIPELINE_ATTENTION"] = self.flags["attention"]

    def step(self, batch: dict, seed: int) -> dict[str, float]:
        """One optimizer step; seconds of its forward (loss), backward and optimizer (DeepSpeed ``step``)."""
        self._env()
        self.engine.module.train()
        batch = self.engine.to_device(batch)
        torch.manual_seed(seed)
        t0 = step_clock()
        loss, metrics = variants.loss(self.cfg, self.engine.module, batch, self.objective)
        t1 = step_clock()
        self.engine.engine.backward(loss)
        t2 = step_clock()
        self.engine.engine.step()
        t3 = step_clock()
        return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "loss": metrics["loss"]}

    def flops(self, batch: dict) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        self._env()
        batch = self.engine.to_device(batch)
        with FlopCounterMode(display=False) as counter:
            loss, _ = variants.loss(self.cfg, self.engine.module, batch, self.objective)
            loss.backward()
        self.engine.module.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    def kinds(self, batches: list[dict]) -> dict[str, float]:
        """Share of the steps' operator self time per kind (torch.profiler)."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i, b in enumerate(batches):
                self.step(b, i)
        kinds: dict[str, float] = {k: 0.0 for k in OP_KINDS}
        kinds["other"] = 0.0
        for e in prof.key_averages():
            kind = next((k for k, names in OP_KINDS.items() if any(e.key.startswith(n) for n in names)), "other")
            kinds[kind] += e.self_cpu_time_total
        total = sum(kinds.values()) or 1.0
        return {k: v / total for k, v in kinds.items()}

    def evaluate(self, batches: list[dict]) -> float:
        self._env()
        return _evaluate(self.cfg, self.engine, batches, self.objective)["tau"]


def compare_paths(cfg: TrainConfig, reader: StoreReader, steps: int, device) -> dict:
    """Today's and the new step on the same batches, interleaved step by step (a disturbance hits both): per path
    the FLOPs of one step (torch's counter over loss + backward), CPU s/step (median) split into forward /
    backward / optimizer, the share of time per operator kind, and the first steps' losses."""
    fields = variants.required_fields(cfg)
    loader = PackedLoader(reader, np.arange(len(reader)), fields, cfg.tokens_per_batch, seed=0)
    packs = loader.epoch_packs(0)[:steps]
    batches = [collate(reader, p, fields, cfg.tokens_per_batch) for p in packs]
    runs = {name: PathRun(name, cfg, reader, device, 3 * steps + 4) for name in PATHS}
    # torch's FLOP counter sees eager operators only (and under it torch.compile would leave the blocks eager for
    # good): the compiled path computes the new path's FLOPs
    out = {name: {"flops": r.flops(batches[0]) if not r.flags["compile"] else None, "times": [], "losses": []}
           for name, r in runs.items()}  # fmt: skip
    for o in out.values():
        o["flops"] = o["flops"] or out["new"]["flops"]
    for name, r in runs.items():
        t = time.perf_counter()
        r.step(batches[0], 0)  # warm-up (first-call allocations, lazy DeepSpeed state, compilation)
        out[name]["first_step_wall_s"] = time.perf_counter() - t
    for i, b in enumerate(batches):
        for name, r in runs.items():
            t = r.step(b, i + 1)
            out[name]["times"].append(t)
            out[name]["losses"].append(t["loss"])
    tokens = sum(int((b["doc_ids"] >= 0).sum()) for b in batches) / len(batches)
    for name, r in runs.items():
        o = out[name]
        o["step_s"] = float(np.median([sum(v for k, v in t.items() if k != "loss") for t in o["times"]]))
        o["phases"] = {k: float(np.median([t[k] for t in o["times"]])) for k in ("forward", "backward", "optimizer")}
        o["tokens_per_s"] = tokens / o["step_s"]
        o["gflops"] = o["flops"] / o["step_s"] / 1e9
        o["kinds"] = r.kinds(batches[:2])
    out["tokens"] = tokens
    return out


def tau_after_budget(cfg: TrainConfig, reader: StoreReader, seconds: float, device) -> dict[str, dict]:
    """Held-out simulated τ of each path after ``seconds`` of step time (CPU time on one thread), from the same
    seed, data order and learning-rate schedule; the paths take turns one step at a time until each has spent the
    budget."""
    from pipeline.train.loader import split_samples
    from pipeline.train.trainer import _val_batches

    fields = variants.required_fields(cfg)
    train_idx, val_idx = split_samples(reader, cfg.val_fraction, cfg.seed)
    loader = PackedLoader(reader, train_idx, fields, cfg.tokens_per_batch, seed=cfg.seed)
    val = _val_batches(reader, val_idx, fields, cfg, 0, 1)
    runs = {name: PathRun(name, cfg, reader, device, cfg.max_steps or 1000) for name in ("today", "new")}
    spent = {name: 0.0 for name in runs}
    done = {name: 0 for name in runs}
    cache: list[dict] = []
    epoch = 0
    while any(s < seconds for s in spent.values()):
        i = min(done[name] for name in runs if spent[name] < seconds)
        while len(cache) <= i:
            cache += [collate(reader, p, fields, cfg.tokens_per_batch) for p in loader.epoch_packs(epoch)]
            epoch += 1
        for name, r in runs.items():
            if spent[name] < seconds and done[name] == i:
                t = r.step(cache[i], i)
                spent[name] += t["forward"] + t["backward"] + t["optimizer"]
                done[name] += 1
    return {name: {"steps": done[name], "tokens": sum(int((b["doc_ids"] >= 0).sum()) for b in cache[:done[name]]),
                   "tau": r.evaluate(val)} for name, r in runs.items()}  # fmt: skip


def e_shapes(args) -> list[tuple[str, int, int]]:
    """(variant, TTT steps, draft vocabulary) of sections (e) and (f)."""
    out = []
    for v in args.variants.split(","):
        if v == "eagle1":
            out.append(("eagle1", 1, 8192))
        else:
            out += [(v, int(t), int(n)) for t, n in (x.split("x") for x in args.e3_shapes.split(","))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--feats", type=Path, default=None, help="SmolLM2 store (default: build one)")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--tokens-per-batch", type=int, default=1024)
    ap.add_argument("--variants", default="eagle1,eagle3")
    ap.add_argument("--tau-steps", type=int, default=40, help="steps of each run in (d)")
    ap.add_argument("--sections", default="a,b,c,d,e,f", help="which sections to run")
    ap.add_argument("--e3-shapes", default="1x4096,3x8192",
                    help="EAGLE-3 shapes of (e)/(f) as TTTxVOCAB (the demo's first; the previous table's second)")
    ap.add_argument("--tau-seconds", type=float, default=60.0, help="CPU-seconds of steps per path in (f)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    feats = args.feats or build_store(work / "feats", args.limit, args.max_length)
    reader = StoreReader(feats)
    _, _, device = setup_distributed()
    info = inspect_store(feats)
    extraction_tok_s = 1.0 / (sum(s.get("wall_s", 0) for s in (sh.stats for sh in reader.shards)) /
                              max(info["tokens"], 1))  # fmt: skip
    print(f"\nstore {feats}: {len(reader)} samples, {info['tokens']} tokens; extraction ran at "
          f"{extraction_tok_s:.0f} tokens/s (from its commit records)\n")

    sections = set(args.sections.split(","))
    if "a" in sections:
        ours, peer = loader_bench(reader, work, 64)
        print("(a) loader                                  samples/s   ratio")
        print(f"    torch.load per-sample files (peers)     {peer:9.1f}   1.00")
        print(f"    our store (memmap rows -> torch)        {ours:9.1f}   {ours / peer:.2f}")

    for variant in args.variants.split(",") if sections & {"b", "c"} else []:
        cfg = TrainConfig(feats=str(feats), out="", variant=variant, tokens_per_batch=args.tokens_per_batch,
                          draft_vocab_size=8192, ttt_steps=7)  # fmt: skip
        r = step_rates(cfg, reader, args.steps, device)
        print(f"\n({'b' if variant == 'eagle1' else 'b3'}) {variant} training, {args.steps} steps of "
              f"{args.tokens_per_batch} tokens   tokens/s   ratio")
        print(f"    batches already in memory               {r['memory']:9.1f}   1.00")
        print(f"    batches read from the store             {r['store']:9.1f}   {r['store'] / r['memory']:.2f}")
        print(f"    online (target forward + step)          {r['online']:9.1f}   {r['online'] / r['memory']:.2f}")
        per_run = info["tokens"]  # one epoch over the store per training run
        offline = per_run / extraction_tok_s + 4 * per_run / r["store"]
        online = 4 * per_run / r["online"]
        print(f"(c) 1 extraction + 4 runs: {offline:.0f} s   vs   4 online runs: {online:.0f} s   "
              f"(online/offline {online / offline:.2f})")

    if "e" in sections:
        threads = torch.get_num_threads()
        ceiling = matmul_ceiling()
        results = []
        for variant, ttt, vocab in e_shapes(args):
            cfg = TrainConfig(feats=str(feats), out="", variant=variant, tokens_per_batch=args.tokens_per_batch,
                              draft_vocab_size=vocab, ttt_steps=ttt)  # fmt: skip
            results.append((variant, ttt, vocab, compare_paths(cfg, reader, args.steps, device)))
        ceiling = max(ceiling, matmul_ceiling())  # measured before and after: the better of the two
        print(f"\n(e) where a step goes: {args.steps} steps of {args.tokens_per_batch} packed tokens per path, today's "
              f"and the new path interleaved step by step on {threads} thread(s); times are this thread's CPU "
              f"seconds{'' if threads == 1 else ' (wall: more than one thread)'}; fp32 matmul ceiling measured in "
              f"this run on {threads} thread(s): {ceiling:.1f} GFLOP/s")  # fmt: skip
        print("    | head | path | GFLOP/step | s/step | forward / backward / optimizer s | tokens/s | GFLOP/s | "
              f"share of ceiling | time in {' / '.join([*OP_KINDS, 'other'])} |")
        print("    | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | --- |")
        for variant, ttt, vocab, r in results:
            name = "EAGLE-1" if variant == "eagle1" else f"EAGLE-3 (TTT {ttt}, vocab {vocab:,})"
            for path in PATHS:
                o = r[path]
                ph = " / ".join(f"{o['phases'][k]:.2f}" for k in ("forward", "backward", "optimizer"))
                kinds = " / ".join(f"{v:.0%}".rstrip("%") for v in o["kinds"].values()) + " %"
                print(f"    | {name} | {path} | {o['flops'] / 1e9:.1f} | {o['step_s']:.2f} | {ph} | "
                      f"{o['tokens_per_s']:.0f} | {o['gflops']:.1f} | {o['gflops'] / ceiling:.2f} | {kinds} |")
            t, n, c = r["today"], r["new"], r["new + compile"]
            diffs = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(t["losses"], n["losses"], strict=True)]
            cdiffs = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(n["losses"], c["losses"], strict=True)]
            print(f"      {name}: new/today tokens/s {n['tokens_per_s'] / t['tokens_per_s']:.2f}x; today's FLOPs per "
                  f"new step: {t['flops'] / n['step_s'] / 1e9:.1f} GFLOP/s ({t['flops'] / n['step_s'] / 1e9 / ceiling:.2f} "
                  f"of the ceiling); losses of the {len(diffs)} steps agree to {max(diffs):.1e} (relative); "
                  f"compile: {c['step_s'] / n['step_s']:.3f}x the new step's time after a first step of "
                  f"{c['first_step_wall_s']:.0f} s wall (new: {n['first_step_wall_s']:.0f} s), losses agree to "
                  f"{max(cdiffs):.1e}")  # fmt: skip

    if "f" in sections:
        print(f"\n(f) held-out simulated τ after {args.tau_seconds:.0f} CPU-seconds of steps per path (same seed, data "
              f"and schedule; val 20% of the store)\n    | head | path | steps | training tokens | held-out τ |\n"
              "    | --- | --- | ---: | ---: | ---: |")  # fmt: skip
        for variant, ttt, vocab in e_shapes(args)[:2]:
            cfg = TrainConfig(feats=str(feats), out="", variant=variant, tokens_per_batch=args.tokens_per_batch,
                              draft_vocab_size=vocab, ttt_steps=ttt, lr=2e-3, val_fraction=0.2, max_steps=200)  # fmt: skip
            name = "EAGLE-1" if variant == "eagle1" else f"EAGLE-3 (TTT {ttt}, vocab {vocab:,})"
            for path, o in tau_after_budget(cfg, reader, args.tau_seconds, device).items():
                print(f"    | {name} | {path} | {o['steps']} | {o['tokens']:,} | {o['tau']:.3f} |")

    if "eagle3" in args.variants and "d" in sections:
        bpt = info["bytes_per_token"]
        topk = bpt["hidden_aux"] + bpt["topk_ids"] + bpt["topk_logprobs"] + bpt["input_ids"] + bpt["loss_mask"]
        full = bpt["hidden_aux"] + bpt["hidden_last"] + bpt["input_ids"] + bpt["loss_mask"]
        print("\n(d) EAGLE-3 targets              bytes/token   held-out simulated τ")
        for target, size in ((f"top-k (K={reader.fingerprint['top_k']})", topk), ("full (hidden_last)", full)):
            run = work / f"tau-{target.split()[0]}"
            s = train(TrainConfig(feats=str(feats), out=str(run), variant="eagle3", max_steps=args.tau_steps,
                                  tokens_per_batch=args.tokens_per_batch, lr=2e-3, draft_vocab_size=8192,
                                  ttt_steps=4, val_fraction=0.2, target="topk" if target.startswith("top") else "full",
                                  progress=False))  # fmt: skip
            print(f"    {target:<28} {size:10.1f}   {s['best_val_tau']:.3f}")


if __name__ == "__main__":
    main()

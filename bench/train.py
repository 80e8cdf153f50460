"""Training benchmark on a SmolLM2 store of real ShareGPT data; every ratio's baseline is measured in this run.

(a) loader samples/s: our store (memmap rows -> torch) vs `torch.load` of the per-sample peer layout, same samples;
(b) training tokens/s: batches read from the store (prefetch thread) vs the same batches already in memory;
(c) an offline step vs an online step that first runs the target forward for the batch (what EAGLE-3's
    reference trainer does), and the wall time of 1 extraction + 4 training runs vs 4 online runs;
(d) EAGLE-3: bytes/token with top-k targets vs keeping the last hidden state for exact targets, and the held-out
    simulated τ of a run with each target on the same data and budget;
(e) where a training step's time goes: FLOPs per step and per counted (loss-carrying) token by torch's own
    counter, the achieved FLOP/s beside an fp32 matmul ceiling measured in this run, and the step's time by kind
    of operator (torch.profiler).

    python bench/train.py [--feats DIR] [--steps 8] [--variants eagle1,eagle3]
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

from pipeline.store import StoreReader, inspect_store  # noqa: E402
from pipeline.train import variants  # noqa: E402
from pipeline.train.engine import Engine, setup_distributed  # noqa: E402
from pipeline.train.loader import PackedLoader, Prefetcher, collate  # noqa: E402
from pipeline.train.trainer import TrainConfig, train  # noqa: E402


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
    "softmax / mask": ("aten::_softmax", "aten::_log_softmax", "aten::_softmax_backward_data",
                       "aten::_log_softmax_backward_data", "aten::masked_fill", "aten::masked_fill_", "aten::where",
                       "aten::logical_and", "aten::eq", "aten::le", "aten::ge", "aten::tril"),
    "optimizer": ("aten::_foreach", "Optimizer", "aten::_fused_adam", "aten::addcdiv_", "aten::lerp_"),
    "copies / layout": ("aten::copy_", "aten::cat", "aten::index", "aten::index_put_", "aten::gather",
                        "aten::scatter_add_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::fill_",
                        "aten::zero_", "aten::index_select", "aten::embedding", "aten::_index_put_impl_"),
}  # fmt: skip


def matmul_ceiling(m: int = 2048, k: int = 576, n: int = 1536, reps: int = 20) -> float:
    """fp32 GFLOP/s of torch.mm at a draft-layer shape on this machine now (best of ``reps``)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def flop_profile(cfg: TrainConfig, reader: StoreReader, steps: int, device) -> dict:
    """FLOPs of one step (torch's FlopCounterMode over loss + backward), the timed steps' GFLOP/s, and the share of
    step time per operator kind (torch.profiler self CPU time)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model, objective, _ = variants.build(cfg, reader)
    engine = Engine(model, cfg.engine_config(steps * 3), device)
    fields = variants.required_fields(cfg)
    loader = PackedLoader(reader, np.arange(len(reader)), fields, cfg.tokens_per_batch, seed=0)
    batches = [engine.to_device(collate(reader, p, fields, cfg.tokens_per_batch)) for p in loader.epoch_packs(0)[:steps]]
    with FlopCounterMode(display=False) as counter:
        loss, metrics = variants.loss(cfg, engine.module, batches[0], objective)
        loss.backward()
    engine.module.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    tokens = int((batches[0]["doc_ids"] >= 0).sum())
    for b in batches[:1]:  # warm-up
        engine.backward_step(variants.loss(cfg, engine.module, b, objective)[0])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for b in batches:
            engine.backward_step(variants.loss(cfg, engine.module, b, objective)[0])
        step_s = (time.perf_counter() - t) / len(batches)
    kinds: dict[str, float] = {k: 0.0 for k in OP_KINDS}
    kinds["other"] = 0.0
    for e in prof.key_averages():
        kind = next((k for k, names in OP_KINDS.items() if any(e.key.startswith(n) for n in names)), "other")
        kinds[kind] += e.self_cpu_time_total
    total = sum(kinds.values()) or 1.0
    return {"flops": flops, "tokens": tokens, "counted": metrics["tokens"], "step_s": step_s,
            "gflops": flops / step_s / 1e9, "shares": {k: v / total for k, v in kinds.items()}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--feats", type=Path, default=None, help="SmolLM2 store (default: build one)")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--tokens-per-batch", type=int, default=1024)
    ap.add_argument("--variants", default="eagle1,eagle3")
    ap.add_argument("--tau-steps", type=int, default=40, help="steps of each run in (d)")
    ap.add_argument("--sections", default="a,b,c,d,e", help="which sections to run")
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
        ceiling = matmul_ceiling()
        print(f"\n(e) where a step goes ({args.steps} steps of {args.tokens_per_batch} packed tokens; fp32 matmul "
              f"ceiling measured now: {ceiling:.1f} GFLOP/s)")  # fmt: skip
        for variant in args.variants.split(","):
            cfg = TrainConfig(feats=str(feats), out="", variant=variant, tokens_per_batch=args.tokens_per_batch,
                              draft_vocab_size=8192, ttt_steps=3)  # fmt: skip
            r = flop_profile(cfg, reader, args.steps, device)
            shares = ", ".join(f"{k} {v:.0%}" for k, v in r["shares"].items())
            print(f"    {variant}: {r['flops'] / 1e9:.1f} GFLOP/step = {r['flops'] / r['tokens'] / 1e6:.0f} MFLOP/token, "
                  f"{r['flops'] / max(r['counted'], 1) / 1e6:.0f} MFLOP per counted token ({r['counted']:.0f} of "
                  f"{r['tokens']}); {r['step_s']:.2f} s/step = {r['gflops']:.1f} GFLOP/s "
                  f"({r['gflops'] / ceiling:.2f} of the ceiling)\n      time by kind: {shares}")  # fmt: skip

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

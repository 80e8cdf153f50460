"""One prepared GPU check (run on a lent H100/H200 through the device tool; see README "GPU runs").

The GPU machine cannot receive the SmolLM2 weights (over the carry limit), so the target is a *SmolLM2-shaped* Llama
with seeded random weights (same layers, sizes, vocab and tokenizer: the same compute per token), and optionally
a Llama-3.2-1B-shaped one. Data: real ShareGPT records (a slice carried in .gpu/). Everything goes through the CLI:

1. bare HF forward tokens/s vs `pipeline extract` tokens/s on the same samples (bf16 compute), for bf16 storage
   and for fp8 + zstd + fp16 log-probs (`--stores`);
2. `pipeline train --variant eagle1` and `--variant eagle3` for a few hundred steps on CUDA (bf16, nccl, FusedAdam),
   tokens/s from the run's metrics;
3. `--attention`: peak CUDA memory of one training step of a Llama-3-8B-shaped EAGLE-3 draft (bf16, 7 TTT steps) at
   T = 4,096 and 8,192 with the previous dense attention and the chunked one (bench/attention.py measures the
   same on the CPU at small T and extrapolates).

    python3 bench/gpu.py --out $OUT [--records 588] [--steps 300] [--stores bf16,fp8-zstd] [--attention]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")


def make_target(out: Path, shape: str) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    base = json.loads((ROOT / ".gpu" / "smollm2" / "config.json").read_text())
    if shape == "llama-1b":  # Llama-3.2-1B sizes; SmolLM2's tokenizer (vocab padded to 128256)
        base.update(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True)
    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in base.items() if k not in ("architectures", "transformers_version")})
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(ROOT / ".gpu" / "smollm2").save_pretrained(out)
    return out


def bare_forward_tok_s(model_dir: Path, data: Path, records: int, max_length: int, batch_tokens: int) -> float:
    from extract import bare_forward, tokenized_slice  # bench/extract.py

    from pipeline.extract.hf_backend import HFBackend

    backend = HFBackend(model_dir, device="cuda")
    samples = tokenized_slice(backend.tokenizer, records, max_length, data)
    bare_forward(backend, samples, batch_tokens)  # warm-up
    return sum(len(s) for s in samples) / bare_forward(backend, samples, batch_tokens)


def cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=ENV, capture_output=True, text=True,
                         timeout=timeout)  # fmt: skip
    if res.returncode:
        print(res.stdout[-3000:], res.stderr[-5000:], flush=True)
        res.check_returncode()
    return res


def train_tok_s(run: Path) -> tuple[float, float, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("kind") == "train"][5:]  # skip warm-up steps (JIT, allocator)
    tok_s = sum(r["tokens_per_s"] for r in train) / len(train)
    wait = sum(r["loader_wait_s"] for r in train) / sum(r["step_s"] for r in train)
    return tok_s, wait, train[-1]


STORES = {"bf16": [], "fp8-zstd": ["--hidden-dtype", "fp8", "--codec", "zstd", "--logprob-dtype", "fp16"]}


def attention_memory(tokens_list: list[int]) -> dict:
    """Peak CUDA memory of a Llama-3-8B-shaped EAGLE-3 training step (bf16 weights, AdamW) per attention path."""
    import attention  # bench/attention.py

    out: dict = {}
    for path in ("chunked", "dense"):
        for tokens in tokens_list:
            attention.set_path(path, 32, tokens, 7, attention.rows_for(32, tokens, 7))
            model = attention.draft_for(attention.LLAMA8B, 32000).to("cuda", torch.bfloat16)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            batch = {k: v.cuda() for k, v in attention.batch_for(tokens, 4096, 128256).items()}
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            try:
                attention.step(model, batch, 7)
                opt.step()
                torch.cuda.synchronize()
                out[f"{path}_T{tokens}"] = {"peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                                            "step_s": time.perf_counter() - t}  # fmt: skip
            except torch.OutOfMemoryError:
                out[f"{path}_T{tokens}"] = "out of memory"
            print(path, tokens, out[f"{path}_T{tokens}"], flush=True)
            del model, opt, batch
            torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--records", type=int, default=588)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--shapes", default="smollm2,llama-1b")
    ap.add_argument("--stores", default="bf16,fp8-zstd", help=f"storage settings of the extraction: {list(STORES)}")
    ap.add_argument("--attention", action="store_true", help="peak memory of a Llama-3-8B-shaped EAGLE-3 step")
    args = ap.parse_args()
    work = Path("/tmp/gpu-bench")
    data = ROOT / ".gpu" / "sharegpt-600.json"
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                    "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST"), "cpus": os.cpu_count()}
    print(report, flush=True)
    for shape in args.shapes.split(","):
        records = args.records if shape == "smollm2" else min(args.records, 200)
        model = make_target(work / f"model-{shape}", shape)
        bare = bare_forward_tok_s(model, data, records, args.max_length, 16384)
        for store in args.stores.split(","):
            feats = work / f"feats-{shape}-{store}"
            shutil.rmtree(feats, ignore_errors=True)
            t = time.time()
            res = cli("extract", "--model", str(model), "--data", str(data), "--out", str(feats), "--limit",
                      str(records), "--max-length", str(args.max_length), "--batch-tokens", "16384", "--shard-size",
                      "100", "--no-progress", "--json", *STORES[store])  # fmt: skip
            s = json.loads(res.stdout)
            key = shape if store == "bf16" else f"{shape}-{store}"
            report[key] = {"bare_forward_tok_s": bare, "extract_tok_s": s["tokens_per_s"], "tokens": s["tokens"],
                           "extract_wall_s": time.time() - t, "bytes_per_token": s["bytes_per_token"],
                           "ratio": s["tokens_per_s"] / bare, "store": store}  # fmt: skip
            print(key, json.dumps(report[key]), flush=True)
            (args.out / "gpu_report.json").write_text(json.dumps(report, indent=2))
        feats = work / f"feats-{shape}-{args.stores.split(',')[0]}"
        if shape != "smollm2":
            continue
        for variant, extra in (("eagle1", []), ("eagle3", ["--draft-vocab-size", "32000"])):
            run = work / f"run-{variant}"
            shutil.rmtree(run, ignore_errors=True)
            t = time.time()
            try:
                cli("train", "--feats", str(feats), "--variant", variant, "--out", str(run), "--max-steps",
                    str(args.steps), "--tokens-per-batch", "8192", "--lr", "1e-3", "--no-progress", *extra)  # fmt: skip
            except subprocess.CalledProcessError:
                report[f"train_{variant}"] = "failed (output above)"
                continue
            tok_s, wait, last = train_tok_s(run)
            ds = json.loads((run / "config.json").read_text())["deepspeed"]
            report[f"train_{variant}"] = {"tok_s": tok_s, "loader_wait_share": wait, "wall_s": time.time() - t,
                                          "last": {k: v for k, v in last.items() if k.startswith(("loss", "acc"))},
                                          "optimizer": ds["optimizer"], "bf16": ds["bf16"]}  # fmt: skip
            print(variant, json.dumps(report[f"train_{variant}"]), flush=True)
            (args.out / "gpu_report.json").write_text(json.dumps(report, indent=2))
            shutil.copy(run / "curves.png", args.out / f"curves-{variant}.png")
    if args.attention:
        report["attention_memory"] = attention_memory([4096, 8192])
        (args.out / "gpu_report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Extraction benchmark on SmolLM2 + a fixed ShareGPT slice, everything measured in one run.

(a) bare HF forward (same batches, output_hidden_states, nothing kept) vs our full extraction (top-k, casts,
    checksums, Zarr writes overlapped with compute): tokens/s and their ratio;
(b) bytes/token per field: our store vs the per-sample `torch.save` layout peers use
    ({input_ids int64, loss_mask int64, hidden_state bf16 [L,H], aux_hidden_state bf16 [L,3H]});
(c) codecs: none / zstd / blosc bytes per token and sample read speed;
(d) how much probability mass the stored top-k covers, for several k.

    python bench/extract.py [--limit 48] [--max-length 512] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from pipeline import data as data_mod
from pipeline.assets import sharegpt_path, smollm2_dir
from pipeline.extract.hf_backend import HFBackend
from pipeline.extract.runner import ExtractConfig, length_buckets, run_extract
from pipeline.store import StoreReader, inspect_store


def tokenized_slice(tokenizer, limit: int, max_length: int, path: Path | None = None) -> list[list[int]]:
    """The token ids of the stored samples of records [0, limit) (the same rendering as extraction)."""
    out = []
    for i, rec in enumerate(data_mod.read_records(path or sharegpt_path())):
        if i >= limit:
            break
        if isinstance(rec, data_mod.Record):
            try:
                tok = data_mod.tokenize_chat(tokenizer, rec.messages, max_length)
            except data_mod.RenderError:
                continue
            if sum(tok.loss_mask):
                out.append(tok.input_ids)
    return out


def bare_forward(backend: HFBackend, samples: list[list[int]], batch_tokens: int) -> float:
    """Seconds for the forwards alone, with extraction's batches (output_hidden_states, nothing kept)."""
    model, device = backend.model, backend.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    with torch.inference_mode():
        for batch in length_buckets([len(s) for s in samples], batch_tokens):
            width = max(len(samples[i]) for i in batch)
            ids = torch.full((len(batch), width), backend.pad_id)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(batch):
                ids[r, : len(samples[i])] = torch.tensor(samples[i])
                mask[r, : len(samples[i])] = 1
            model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                  use_cache=False)  # fmt: skip
    sync()
    return time.perf_counter() - t


def peer_layout_bytes(reader: StoreReader, out: Path) -> dict[str, float]:
    """Write one torch.save per sample as SpecForge does; return bytes/token per field and in total."""
    per_field = {"input_ids": 0, "loss_mask": 0, "hidden_state": 0, "aux_hidden_state": 0}
    total = 0
    tokens = 0
    out.mkdir(parents=True, exist_ok=True)
    for i in range(len(reader)):
        s = reader.sample(i, ("input_ids", "loss_mask", "hidden_last", "hidden_aux"))
        n = s["input_ids"].shape[0]
        item = {"input_ids": s["input_ids"].long()[None], "loss_mask": s["loss_mask"].long()[None],
                "hidden_state": s["hidden_last"].to(torch.bfloat16)[None],
                "aux_hidden_state": s["hidden_aux"].reshape(n, -1).to(torch.bfloat16)[None]}
        for k, v in item.items():
            per_field[k] += v.numel() * v.element_size()
        path = out / f"data_{i}.ckpt"
        torch.save(item, path)
        total += path.stat().st_size
        tokens += n
    return {**{k: v / tokens for k, v in per_field.items()}, "total (files)": total / tokens}


def read_speed(root: Path, repeats: int = 3) -> float:
    reader = StoreReader(root)
    t = time.perf_counter()
    for _ in range(repeats):
        for i in range(len(reader)):
            reader.sample(i)
    return repeats * len(reader) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=48)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=1, help="(a) repeated, the three in turn; best of the rounds")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    backend = HFBackend(smollm2_dir(), device="cpu")
    samples = tokenized_slice(backend.tokenizer, args.limit, args.max_length)
    tokens = sum(len(s) for s in samples)
    bare_forward(backend, samples[:2], args.batch_tokens)  # warm-up

    default = dict(model=None, limit=args.limit, max_length=args.max_length, batch_tokens=args.batch_tokens,
                   progress=False, device="cpu")
    # the format-2 layout: (b) and (c) compare it with the peers'
    cfg = dict(default, hidden_dtype="bfloat16", logprob_dtype="float32", codec="none", aux_projection=None)
    print(f"\nSmolLM2-135M fp32 CPU, ShareGPT records [0, {args.limit}), max_length {args.max_length}: "
          f"{len(samples)} samples, {tokens} tokens\n")
    print("(a) throughput, tokens/s (ratio to the same round's bare forward)")
    print("    round   bare forward   format-2 loop (bf16)   default (P k=2H, q19, fp8)   calibration   forward share")
    best = {"bare": 0.0, "format-2": 0.0, "default": 0.0}
    for rnd in range(args.rounds):  # one loaded model, the three in turn: this machine's speed drifts between rounds
        bare = tokens / bare_forward(backend, samples, args.batch_tokens)
        ours = run_extract(ExtractConfig(out=work / "none", **cfg), backend=backend)
        compact = run_extract(ExtractConfig(out=work / "default", **default), backend=backend)
        assert ours["tokens"] == compact["tokens"] == tokens, (ours["tokens"], compact["tokens"], tokens)
        # the calibration's batches are written, not run again: its time counts in the default's rate
        rates = {"bare": bare, "format-2": tokens / ours["loop_s"],
                 "default": tokens / (compact["loop_s"] + compact["calibration_s"])}
        best = {k: max(best[k], v) for k, v in rates.items()}
        print(f"    {rnd:5d}   {bare:12.1f}   {rates['format-2']:11.1f} ({rates['format-2'] / bare:.3f})"
              f"   {rates['default']:17.1f} ({rates['default'] / bare:.3f})   {compact['calibration_s']:9.1f} s"
              f"   {ours['forward_s'] / ours['loop_s']:.1%}")
        if rnd < args.rounds - 1:
            shutil.rmtree(work / "none")
            shutil.rmtree(work / "default")
    print(f"    best    {best['bare']:12.1f}   {best['format-2']:11.1f} ({best['format-2'] / best['bare']:.3f})"
          f"   {best['default']:17.1f} ({best['default'] / best['bare']:.3f})")
    print(f"    (calibration = the first {ExtractConfig.calibration_tokens:,} tokens' forward + the Gram + the "
          "eigendecomposition; forward share = the format-2 loop's time inside the backend's forward)")

    info = inspect_store(work / "none")
    peer = peer_layout_bytes(StoreReader(work / "none"), work / "peer")
    ours_bpt = info["bytes_per_token"]
    print("\n(b) bytes/token                        ours (Zarr, bf16)   peer torch.save   ratio peer/ours")
    pairs = [("input_ids", "input_ids"), ("loss_mask", "loss_mask"), ("hidden_last", "hidden_state"),
             ("hidden_aux", "aux_hidden_state")]
    for mine, theirs in pairs:
        print(f"    {mine:<34} {ours_bpt[mine]:10.1f}   {peer[theirs]:14.1f}   {peer[theirs] / ours_bpt[mine]:8.2f}")
    for extra in ("topk_ids", "topk_logprobs", "metadata"):
        print(f"    {extra:<34} {ours_bpt.get(extra, 0):10.1f}   {'(not stored)':>14}")
    total_ours = sum(ours_bpt.values())
    print(f"    {'total':<34} {total_ours:10.1f}   {peer['total (files)']:14.1f}   {peer['total (files)'] / total_ours:8.2f}")

    print("\n(c) codec                              bytes/token   samples/s read")
    for codec in ("none", "zstd", "blosc"):
        root = work / codec
        if codec != "none":
            run_extract(ExtractConfig(out=root, **{**cfg, "codec": codec}), backend=backend)
        bpt = sum(inspect_store(root)["bytes_per_token"].values())
        print(f"    {codec:<34} {bpt:11.1f}   {read_speed(root):10.1f}")

    print("\n(d) top-k probability mass covered (mean over all tokens)")
    reader = StoreReader(work / "none")
    lm_head = reader.target_weights()["lm_head.weight"]
    mass = {k: 0.0 for k in (1, 4, 8, 16, 32, 64, 128)}
    count = 0
    for i in range(min(len(reader), 16)):
        s = reader.sample(i, ("hidden_last", "topk_logprobs"))
        logp = torch.log_softmax(s["hidden_last"].float() @ lm_head.T, -1)  # post-norm hidden -> exact logits
        for k in mass:
            mass[k] += logp.topk(k, -1).values.exp().sum(-1).sum().item()
        count += logp.shape[0]
    print("    " + "   ".join(f"k={k}: {v / count:.3f}" for k, v in mass.items()))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

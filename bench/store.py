"""Store dtype x codec benchmark on a real SmolLM2 store; every ratio's baseline is measured in the same run.

From one fp32 extraction (SmolLM2, ShareGPT) every other store is written by `pipeline convert` (the store writer
extraction uses: the same bytes as extracting with those flags), then:

(a) fp8 scale granularity: relative error of the dequantized hidden states vs bytes/token (raw and zstd), for one
    scale per token row (what the store does) and per block of 192/64/32 values;
(b) bytes/token of every hidden dtype x codec, against the peers' per-sample bf16 `torch.save` layout written
    from the same samples (goal: <= 0.45x with both EAGLE-1 and EAGLE-3 features);
(c) reads: samples/s of sequential `StoreReader.sample` calls, the same through the previous per-sample Zarr
    reads (compressed stores), and tokens/s of the training loader (pack + collate to fp32, `--shuffle auto`:
    global for uncompressed, window for compressed), each against bf16/none;
(d) training tokens/s of EAGLE-1 and EAGLE-3 steps fed from each store through the prefetching loader, against bf16/none;
(e) writes: tokens/s and MB/s of the store writer (cast/quantize + chunk compression + commit) with the write
    pool and inline, the disk's sequential write bandwidth, and the extraction/forward ratio this implies for
    the H100 run in the README;
(f) held-out quality of EAGLE-3 heads trained from each layout (the demo's settings: 1,024-token rows, lr 2e-3,
    1 TTT step, 4,096-token draft vocabulary, 10% held out) for each of ``--quality-steps`` and ``--seeds``: the
    same seed gives every layout the same held-out samples, initialisation and (global shuffle) sample order, so
    the layout is the only difference; each run's final weights are evaluated on the held-out samples of its own
    store and of the bf16 store (the whole features a serving engine hands the head; a projected head projects
    them itself): simulated τ and first-position acceptance, each against the bf16 run of the same seed and steps.
    Finished runs are reused (``--work``), so an interrupted run resumes. ``--heldout``: also on every sample of a
    store of records no run saw (the 10% split holds ~10 samples, too few to resolve 1% differences).
(g) (with b) the EAGLE-3 row as k = H, 2H, 3H projected values in fp8, int7, q19 of y/s, int4: error read back vs bytes; (h) (with b) bytes/token and totals at users' scale
    (Llama-3.1-8B and Qwen3-8B shapes, ShareGPT-68k and UltraChat-200k) predicted from (b)'s compact store;
(i) the check of (h): a real extraction (default layout) through a random-weight Llama of Llama-3.1-8B's
    per-token shape with --check-layers layers, bytes/token per array against (h)'s prediction.

    python bench/store.py [--feats FP32_STORE] [--steps 3] [--tokens-per-batch 512] [--sections a,b,c,d,e,f,i]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from numcodecs import Zstd  # noqa: E402

from pipeline import store as st  # noqa: E402
from pipeline.extract.runner import ExtractConfig  # noqa: E402
from pipeline.options import defaults  # noqa: E402
from pipeline.train import variants  # noqa: E402
from pipeline.train.engine import Engine, setup_distributed  # noqa: E402
from pipeline.train.loader import PackedLoader, Prefetcher, resolve_shuffle  # noqa: E402
from pipeline.train.trainer import TrainConfig  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16", st.FP8)
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", st.FP8: "fp8"}
CODECS = ("none", "zstd", "blosc")
# the README's H100 run (bench/gpu.py): bare forward tokens/s and bytes/token of the bf16 store it wrote
H100 = {"SmolLM2-135M shape": (384_435, 59_368, 4_871), "Llama-3.2-1B shape": (136_828, 20_221, 16_647)}


def build_source(out: Path, limit: int, max_length: int) -> Path:
    from pipeline.extract.runner import run_extract

    if not (out / "store.arrow").exists():
        run_extract(ExtractConfig(out=out, limit=limit, max_length=max_length, hidden_dtype="float32",
                                  logprob_dtype="float32", codec="none", aux_projection=None,
                                  shard_size=max(1, limit // 2), progress=False))  # fmt: skip
    return out


def scale_granularity(reader: st.StoreReader) -> None:
    print("\n(a) fp8 e4m3 scale granularity (hidden_last + 3 aux layers)   rel. error   B/token raw   B/token zstd")
    rows = [reader.sample(i, ("hidden_last", "hidden_aux")) for i in range(len(reader))]
    x = torch.cat([torch.cat([r["hidden_last"][:, None], r["hidden_aux"]], 1) for r in rows]).float()  # [T, 4, H]
    t, h = x.shape[0], x.shape[-1]
    for block in [b for b in (h, 192, 64, 32) if h % b == 0]:
        xb = x.reshape(t, 4, h // block, block)
        scale = xb.abs().amax(-1, keepdim=True).clamp_min(1e-30) / st.FP8_MAX
        q = (xb / scale).clamp(-st.FP8_MAX, st.FP8_MAX).to(torch.float8_e4m3fn)
        err = ((q.float() * scale).reshape(x.shape) - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-30)
        raw = q.view(torch.uint8).numpy().tobytes()
        scale_b = 4 * 4 * (h // block)  # fp32 scales per token
        label = "per token row (stored)" if block == h else f"per block of {block}"
        print(f"    {label:<58} {err.mean():.4f}   {len(raw) / t + scale_b:10.0f}   "
              f"{len(Zstd(3).encode(raw)) / t + scale_b:11.0f}")


def _pack_bits(q: np.ndarray, bits: int) -> bytes:
    """Unsigned ``bits``-bit codes (a multiple of 8 values) packed little-endian, as a store would hold them."""
    b = np.unpackbits(q.astype(np.uint8)[..., None], axis=-1, bitorder="little")[..., :bits]
    return np.packbits(b.reshape(-1), bitorder="little").tobytes()


def fewer_bits(reader: st.StoreReader) -> None:
    """(g): the EAGLE-3 row x (A*H values) stored as k projected values under each coding: relative error of the
    row the head gets back (``Pᵀ·decoded``: projection and rounding together) and bytes/token of the coded values +
    their scales, compressed in 256-row blocks as the store's chunks are (zstd; int7/q19 codes bit-shuffled, as codec
    auto stores them). P from the first 16,384 tokens, as extraction estimates it."""
    from numcodecs import Blosc

    rows = [reader.sample(i, ("hidden_aux",))["hidden_aux"] for i in range(len(reader))]
    x = torch.cat([r.reshape(r.shape[0], -1) for r in rows]).float()  # [T, A*H]
    t, width = x.shape
    h = width // len(reader.aux_layers)
    gram = st.GramAccumulator(width)
    gram.add(x[: st.DEFAULT_CALIBRATION_TOKENS])

    def stored_bytes(a: np.ndarray, codec) -> float:
        return sum(len(codec.encode(np.ascontiguousarray(a[i:i + 256]))) for i in range(0, len(a), 256)) / t

    print(f"\n(g) the EAGLE-3 row ({width} values) stored as k projected values, {t} tokens   rel. error of the row "
          "read back   B/token")  # fmt: skip
    for k in (h, 2 * h, 3 * h):
        p, _ = st.principal_projection(gram.gram, k)
        y = st.project(x, p)
        cal = y[: st.DEFAULT_CALIBRATION_TOKENS]
        s = st.component_scale(cal.double().square().sum(0), len(cal))  # format 5: the stored rows are y / s
        codings = {"fp8 per row": (st.FP8, 1), "int7 per row": (st.INT7, 1), "q19 per row of y/s (stored)": (st.Q19, s)}
        for label, (logical, div) in codings.items():
            rows = st.ScaledRows.quantize(y / div, logical)
            q, scale = rows.q, rows.scale
            back = (st.dequantize(q.view(torch.uint8).numpy(), scale.numpy(), logical) * div) @ p
            err = ((back - x).norm(dim=-1) / x.norm(dim=-1)).mean()
            codec = Zstd(3) if logical == st.FP8 else Blosc("zstd", 3, Blosc.BITSHUFFLE)
            size = stored_bytes(q.view(torch.uint8).numpy(), codec) + 4
            print(f"    k = {k:>5} ({k // h}H), {label:<42} {err:.4f}   {size:8.0f}")
        for bits, group in ((4, 32),):
            g = y.reshape(t, k // group, group)
            levels = 2 ** (bits - 1) - 1
            scale = (g.abs().amax(-1, keepdim=True) / levels).clamp_min(1e-30).half().float()
            q = torch.round(g / scale).clamp(-levels, levels)
            err = (((q * scale).reshape(t, k) @ p - x).norm(dim=-1) / x.norm(dim=-1)).mean()
            raw = _pack_bits((q + levels).to(torch.uint8).numpy(), bits)
            print(f"    k = {k:>5} ({k // h}H), {f'int{bits}, one fp16 scale per {group} values':<42} {err:.4f}   "
                  f"{len(Zstd(3).encode(raw)) / t + 2 * (k // group):8.0f}")


# (h): target shapes (hidden size, vocabulary) and datasets (records) of the users' scale table
SHAPES = {"Llama-3.1-8B": (4096, 128_256), "Qwen3-8B": (4096, 151_936)}
DATASETS = {"ShareGPT-68k": 68_000, "UltraChat-200k": 200_000}


def at_shape(fp: dict, hidden: int, vocab: int) -> dict:
    """The fingerprint a store in ``fp``'s layout would have for a target of this hidden size and vocabulary: the
    same dtypes, top-k and aux layers, top-k ids as wide as the vocabulary needs, a projection with the same k/H."""
    h0 = int(fp["model"]["hidden_size"])
    proj = {n: {**r, "k": r["k"] * hidden // h0, "input_width": r["input_width"] * hidden // h0}
            for n, r in (fp.get("projection") or {}).items()}  # fmt: skip
    return {**fp, "model": {**fp["model"], "hidden_size": hidden, "vocab_size": vocab},
            "dtypes": {**fp["dtypes"], "topk_ids": st.topk_ids_dtype(vocab)}, "projection": proj}  # fmt: skip


def raw_bytes_per_token(fp: dict) -> dict[str, float]:
    """Per Zarr array of a shard (the store's own array_shapes): uncompressed bytes per token."""
    return {name: float(np.prod(tail, dtype=np.int64)) * st.storage_dtype(logical).itemsize
            for name, (tail, logical) in st.array_shapes(fp).items()}  # fmt: skip


def predicted_bytes_per_token(info: dict, hidden: int, vocab: int) -> dict[str, float]:
    """Per stored array (and metadata): bytes/token of ``info``'s layout (an ``inspect_store`` result) at a target
    of this shape = the array's raw bytes/token at that shape times the compression ratio it has in ``info``'s
    store; per-shard metadata as measured."""
    fp = info["fingerprint"]
    src, dst = raw_bytes_per_token(fp), raw_bytes_per_token(at_shape(fp, hidden, vocab))
    return {name: bpt * dst[name] / src[name] if name in src else bpt for name, bpt in info["bytes_per_token"].items()}


def without_last(per_array: dict[str, float]) -> float:
    """Total bytes/token of the same store --for eagle3 (no hidden_last arrays; everything else identical)."""
    return sum(v for name, v in per_array.items() if not name.startswith("hidden_last"))


def peer_bytes_per_token(hidden: int) -> dict[str, float]:
    """The peers' layouts from their formats: SpecForge's per-sample bf16 torch.save (aux 3H + last H in bf16,
    int64 ids and mask) and speculators' fp8 (one byte per value of the same hidden states, ids as SpecForge; its
    scales left out)."""
    return {"SpecForge bf16 torch.save (both)": 8 * hidden + 16, "speculators fp8 (both)": 4 * hidden + 16}


def scale_table(compact: dict, tokens_per_record: float) -> None:
    """(h): bytes/token and totals at users' scale: ours from :func:`predicted_bytes_per_token` of the compact
    store measured in (b) on SmolLM2; the peers' from :func:`peer_bytes_per_token`."""
    fp = compact["fingerprint"]
    raw = raw_bytes_per_token(fp)
    ratios = ", ".join(f"{n} {b / raw[n]:.3f}" for n, b in compact["bytes_per_token"].items() if n in raw)
    print(f"\n(h) users' scale, {tokens_per_record:,.0f} tokens per record (measured on the embedded ShareGPT with "
          f"SmolLM2's tokenizer, max 4,096; UltraChat assumed alike); stored/raw ratios from (b)'s compact store "
          f"(hidden {fp['dtypes']['hidden']}, codec {fp['sharding']['codec']}): {ratios}")
    print(f"    {'shape':<14} {'layout':<44} {'B/token':>8}  vs SpecForge   " + "   ".join(f"{d:>14}" for d in DATASETS))
    for shape, (h, v) in SHAPES.items():
        ours = predicted_bytes_per_token(compact, h, v)
        rows = {**peer_bytes_per_token(h), "ours, compact, --for both": sum(ours.values()),
                "ours, compact, --for eagle3": without_last(ours)}  # fmt: skip
        base = rows["SpecForge bf16 torch.save (both)"]
        for label, bpt in rows.items():
            totals = "   ".join(f"{bpt * tokens_per_record * n / 1e12:11.2f} TB" for n in DATASETS.values())
            print(f"    {shape:<14} {label:<44} {bpt:8,.0f}  {bpt / base:10.3f}   {totals}")


# (i): Llama-3.1-8B's per-token shape (meta-llama/Llama-3.1-8B config.json); the depth is --check-layers
LLAMA31_8B = {"hidden": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
              "vocab_size": 128_256, "max_position_embeddings": 131_072, "tie": False,
              "rope_parameters": {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}}  # fmt: skip
LLAMA31_8B_LAYERS = 32


def check_at_8b(args, work: Path, reference: dict) -> None:
    """(i): extract real ShareGPT samples (the default layout) through a seeded random-weight Llama of
    Llama-3.1-8B's per-token shape with ``--check-layers`` layers, fp32 on the CPU, and print its bytes/token per
    array next to (h)'s prediction for Llama-3.1-8B from ``reference`` (the compact SmolLM2 store of (b)).

    Bytes/token do not depend on depth: every stored row is H wide (or k for the projected EAGLE-3 row, P
    [k, A*H]), top-k ids/log-probs are top_k wide. The pipeline's default aux layers for 32 layers are 3
    (``default_aux_layers``); a shallow model's default picks fewer, so the check names layers 1..3 (the inputs
    of decoder layers 1..3), which keeps A*H = 3H, the 8B's calibration width."""
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import make_tiny_llama  # tests/conftest.py

    from pipeline.assets import smollm2_dir
    from pipeline.extract.hf_backend import HFBackend
    from pipeline.extract.runner import default_aux_layers, run_extract

    n_aux = len(default_aux_layers(LLAMA31_8B_LAYERS))
    if args.check_layers <= n_aux:
        sys.exit(f"--check-layers {args.check_layers}: need more than {n_aux} layers for {n_aux} aux layers")
    model_dir = work / f"llama31-8b-shape-{args.check_layers}-layers"
    if not (model_dir / "config.json").exists():
        t = time.perf_counter()
        make_tiny_llama(model_dir, AutoTokenizer.from_pretrained(smollm2_dir()), layers=args.check_layers,
                        **LLAMA31_8B)  # fmt: skip
        print(f"\n(i) built {model_dir.name} (random weights, seed 0) in {time.perf_counter() - t:.0f} s")
    backend = HFBackend(model_dir, device="cpu", compute_dtype="float32")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from extract import tokenized_slice  # bench/extract.py

    vocab_ids = len(backend.tokenizer)
    held = sum(len(r) for r in tokenized_slice(backend.tokenizer, args.check_limit, args.check_max_length))
    calibration = min(held, ExtractConfig.calibration_tokens)
    out = work / "llama31-8b-shape-store"
    t = time.perf_counter()
    if not (out / "store.arrow").exists() or st.inspect_store(out)["complete"] is False:
        run_extract(ExtractConfig(out=out, limit=args.check_limit, max_length=args.check_max_length,
                                  aux_layers=list(range(1, n_aux + 1)), calibration_tokens=calibration,
                                  batch_tokens=2048, device="cpu", compute_dtype="float32", progress=False),
                    backend=backend)  # fmt: skip
    wall = time.perf_counter() - t
    del backend
    info = st.inspect_store(out)
    fp = info["fingerprint"]
    h, v = SHAPES["Llama-3.1-8B"]
    predicted = predicted_bytes_per_token(reference, h, v)
    measured = info["bytes_per_token"]
    proj = st.projection_of(fp, "hidden_aux")
    print(f"\n(i) check of (h) at Llama-3.1-8B's per-token shape (H {h}, V {v:,}, 32/8 heads, FFN 14,336): a "
          f"random-weight {args.check_layers}-layer model, fp32 on the CPU, default layout (hidden "
          f"{fp['dtypes']['hidden']}, top-k ids {fp['dtypes']['topk_ids']}, log-probs {fp['dtypes']['topk_logprobs']}, "
          f"codec {fp['sharding']['codec']}, aux layers {fp['layers']['aux']}"
          + (f", hidden_aux projected to k={proj['k']} of {proj['input_width']}, energy kept {proj['energy']:.3f}, "
             f"calibration {proj['calibration']['rows']} rows of {proj['calibration']['records']} records (lowered "
             f"from {ExtractConfig.calibration_tokens:,} to the {held:,} tokens these samples hold)" if proj else "")
          + f"); ShareGPT records [0, {args.check_limit}), max_length {args.check_max_length}: {info['samples']} "
          f"samples, {info['tokens']:,} tokens, {wall:.0f} s (shared machine)")
    print(f"    {'array':<28} {'raw':>8} {'measured':>9} {'predicted (h)':>14}   measured/predicted")
    raw = raw_bytes_per_token(fp)
    for name in sorted(set(measured) | set(predicted)):
        m, p = measured.get(name, float("nan")), predicted.get(name, float("nan"))
        print(f"    {name:<28} {raw.get(name, float('nan')):8,.1f} {m:9,.1f} {p:14,.1f}   {m / p:18.3f}")
    for label, m, p in (("total, --for both", sum(measured.values()), sum(predicted.values())),
                        ("total, --for eagle3", without_last(measured), without_last(predicted))):  # fmt: skip
        print(f"    {label:<28} {'':>8} {m:9,.1f} {p:14,.1f}   {m / p:18.3f}")
    spec = peer_bytes_per_token(h)["SpecForge bf16 torch.save (both)"]
    print(f"    measured --for both / SpecForge bf16 ({spec:,} B/token): {sum(measured.values()) / spec:.3f}; "
          f"--for eagle3: {without_last(measured) / spec:.3f}")
    if proj and proj["calibration"]["rows"] < proj["k"]:
        print(f"    caveat: {proj['calibration']['rows']} calibration rows < k={proj['k']}: P's last "
              f"{proj['k'] - proj['calibration']['rows']} rows span no calibration feature, so the calibrated "
              "samples' projected rows are near zero there and compress better than they would: hidden_aux is low")
    print("    caveat: random weights, not a trained model: the hidden states, the top-k ids and log-probs have other "
          "value statistics than Llama-3.1-8B's, so the compression ratios (the measured/raw of each array) check "
          "the format and the arithmetic of (h), not the trained model's zstd ratios; the --for eagle3 figure is "
          "this store less its hidden_last arrays (a --for eagle3 store holds the same other arrays: same P, same "
          f"calibration); the model vocabulary (128,256) sets the top-k id dtype, the SmolLM2 tokenizer ({vocab_ids:,} "
          "ids) the input ids")


def tokens_per_record(records: int) -> float:
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from extract import tokenized_slice  # bench/extract.py

    from pipeline.assets import smollm2_dir

    rows = tokenized_slice(AutoTokenizer.from_pretrained(smollm2_dir()), records, 4096)
    return sum(len(r) for r in rows) / len(rows)


def make_stores(src: Path, work: Path) -> dict[str, Path]:
    stores = {}
    for dtype in DTYPES:
        for codec in CODECS:
            name = f"{SHORT[dtype]}/{codec}"
            stores[name] = src if (dtype, codec) == ("float32", "none") else work / f"{SHORT[dtype]}-{codec}"
            if stores[name] != src:
                st.reencode_store(src, stores[name], hidden_dtype=dtype, codec=codec)
    stores["fp8/zstd, fp16 log-probs"] = work / "compact"
    st.reencode_store(src, stores["fp8/zstd, fp16 log-probs"], hidden_dtype=st.FP8, codec="zstd",
                      logprob_dtype="float16")  # fmt: skip
    h = int(st.StoreReader(src).fingerprint["model"]["hidden_size"])
    projected = {"P k=H + bf16/none": dict(hidden_dtype="bfloat16", codec="none", aux_projection=h),
                 "P k=H + fp8/zstd, fp16 log-probs (format-3 default)": dict(hidden_dtype=st.FP8, codec="zstd",
                                                                            logprob_dtype="float16", aux_projection=h)}
    for label, kw in projected.items():
        stores[label] = work / f"projected-{st.digest(kw)[:8]}"
        st.reencode_store(src, stores[label], **kw)
    stores[COMPACT] = compact_store(src, work)
    return stores


def compact_store(src: Path, work: Path) -> Path:
    """The compact store of (b) (extraction's default layout), written from ``src`` (a re-run resumes it)."""
    out = work / "compact-default"
    st.reencode_store(src, out, **{k: v for k, v in defaults(ExtractConfig).items() if k in REENCODE_ARGS})
    return out


def warm(path: Path) -> None:
    """Read every file once so that each store is measured from the page cache, as the others are."""
    for p in path.rglob("*"):
        if p.is_file():
            p.read_bytes()


def sequential_samples_per_s(root: Path) -> float:
    """Every sample's stored arrays (no dtype conversion), in storage order."""
    reader = st.StoreReader(root)
    t = time.perf_counter()
    for i in range(len(reader)):
        reader.read(i)
    return len(reader) / (time.perf_counter() - t)


def per_sample_zarr_per_s(root: Path) -> float:
    """The previous reader on compressed arrays: one Zarr slice per sample and field (decodes every overlapping
    chunk for every sample)."""
    import zarr

    reader = st.StoreReader(root)
    arrays = {(k, n): zarr.open_array(str(s.path / st.TENSORS_DIR / n), mode="r")
              for k, s in enumerate(reader.shards) for n in reader.arrays}  # fmt: skip
    t = time.perf_counter()
    for i in range(len(reader)):
        k, start = int(reader._shard_of[i]), int(reader.offsets[i])
        for n in reader.arrays:
            arrays[(k, n)][start:start + int(reader.lengths[i])]
    return len(reader) / (time.perf_counter() - t)


def loader_tokens_per_s(root: Path, fields: tuple[str, ...], tpb: int) -> tuple[float, str, float]:
    reader = st.StoreReader(root)
    mode = resolve_shuffle("auto", reader, fields)
    loader = PackedLoader(reader, np.arange(len(reader)), fields, tpb, seed=0, shuffle=mode, window_chunks=2)
    packs = loader.epoch_packs(0)
    t = time.perf_counter()
    tokens = 0
    for p in packs:
        b = loader.batch(p)
        tokens += int((b["doc_ids"] >= 0).sum())
    chunks = sum(-(-int(s.stats["tokens"]) // reader.chunk_rows(k)) for k, s in enumerate(reader.shards))
    arrays = sum(1 for n in reader.arrays if n.removesuffix(st.SCALE_SUFFIX) in ("input_ids", "loss_mask", *fields))
    decodes = reader.decoded_chunks / (chunks * arrays) if reader.decoded_chunks else 0.0
    return tokens / (time.perf_counter() - t), mode, decodes


def train_tokens_per_s(root: Path, steps: int, tpb: int, device, variant: str = "eagle1") -> tuple[float, float]:
    """(tokens/s, share of the step time spent waiting for the loader) over ``steps`` steps (EAGLE-3: the demo's
    4,096-token draft vocabulary and 1 TTT step)."""
    reader = st.StoreReader(root)
    cfg = TrainConfig(feats=str(root), out="", variant=variant, tokens_per_batch=tpb, draft_vocab_size=4096,
                      ttt_steps=1)  # fmt: skip
    torch.manual_seed(0)
    model, objective, _ = variants.build(cfg, reader)
    engine = Engine(model, cfg.engine_config(steps + 1), device)
    fields = variants.required_fields(cfg)
    loader = PackedLoader(reader, np.arange(len(reader)), fields, tpb, seed=0,
                          shuffle=resolve_shuffle("auto", reader, fields), window_chunks=2)  # fmt: skip
    pre = Prefetcher(loader, depth=4)
    try:
        _, batch = next(pre)  # warm-up step
        loss, _ = variants.loss(cfg, engine.module, engine.to_device(batch), objective)
        engine.backward_step(loss)
        t, tokens, wait0 = time.perf_counter(), 0, pre.wait_s
        for _ in range(steps):
            _, batch = next(pre)
            loss, _ = variants.loss(cfg, engine.module, engine.to_device(batch), objective)
            engine.backward_step(loss)
            tokens += int((batch["doc_ids"] >= 0).sum())
        wall = time.perf_counter() - t
        return tokens / wall, (pre.wait_s - wait0) / wall
    finally:
        pre.close()


def write_rates(src: Path, work: Path, dtype: str, codec: str, io_workers: int) -> tuple[float, float]:
    """tokens/s and stored MB/s of writing the whole store from samples held in memory as a GPU backend hands them
    over (bf16 rows, or fp8 rows already quantized on the device)."""
    reader = st.StoreReader(src)
    samples = []
    for i in range(len(reader)):
        s = reader.sample(i)
        for name in ("hidden_last", "hidden_aux"):
            s[name] = st.ScaledRows.quantize(s[name], dtype) if dtype in st.SCALED else s[name].to(st.HIDDEN_DTYPES[dtype][1])
        samples.append(s)
    fp = {**reader.fingerprint, "dtypes": {**reader.fingerprint["dtypes"], "hidden": dtype,
                                           "topk_ids": st.topk_ids_dtype(int(reader.fingerprint["model"]["vocab_size"]))},
          "sharding": {**reader.fingerprint["sharding"], "codec": codec}}  # fmt: skip
    out = work / f"write-{SHORT[dtype]}-{codec}-{io_workers}"
    shutil.rmtree(out, ignore_errors=True)
    target = st.TargetPieces(reader.target_config(), reader.target_weights(), st._CopyDir(reader.tokenizer_dir))
    writer = st.StoreWriter(out, fp, reader.plan, target, io_workers=io_workers)
    t = time.perf_counter()
    first = 0
    for s in reader.shards:
        sw = writer.begin_shard(s.shard, tuple(s.stats["records"]), expected_tokens=int(s.stats["tokens"]))
        for j in range(len(s.index["offset"])):
            sw.append(st.SampleMeta(int(s.index["sample_id"][j]), 0, str(j)), samples[first + j])
        sw.commit()
        first += len(s.index["offset"])
    writer.close()
    wall = time.perf_counter() - t
    info = st.inspect_store(out)
    shutil.rmtree(out, ignore_errors=True)
    return info["tokens"] / wall, info["bytes_per_token_total"] * info["tokens"] / wall / 1e6


def disk_write_mb_s(work: Path, mb: int = 256) -> float:
    block = np.random.default_rng(0).integers(0, 255, 1 << 20, dtype=np.uint8).tobytes()
    path = work / "disk-probe"
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(mb):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    wall = time.perf_counter() - t
    path.unlink()
    return mb / wall


COMPACT = "P k=2H, y/s as q19, fp8 last, codec auto, fp16 log-probs (default)"
REENCODE_ARGS = ("hidden_dtype", "aux_dtype", "codec", "logprob_dtype", "aux_projection")  # extraction's defaults
# (f): label -> reencode_store arguments ("H", "2H", "H/2": k from the hidden size); the first is the baseline
QUALITY_LAYOUTS = {
    "bf16/none (format-2 default)": dict(hidden_dtype="bfloat16", codec="none", logprob_dtype="float32"),
    "compact: P k=2H, y/s as q19, auto codec, fp16 (default)": dict(hidden_dtype=st.FP8, aux_dtype=st.Q19,
                                                                    codec="auto", logprob_dtype="float16",
                                                                    aux_projection="2H"),
    "P k=H + fp8 + zstd + fp16 (format-3 default)": dict(hidden_dtype=st.FP8, codec="zstd", logprob_dtype="float16",
                                                         aux_projection="H"),
    "fp8/zstd + fp16, whole": dict(hidden_dtype=st.FP8, codec="zstd", logprob_dtype="float16"),
    "P k=H/2 + fp8 + zstd + fp16": dict(hidden_dtype=st.FP8, codec="zstd", logprob_dtype="float16",
                                        aux_projection="H/2"),
    "P k=2H, fp32 aux (the projection alone)": dict(hidden_dtype=st.FP8, aux_dtype="float32", codec="zstd",
                                                    logprob_dtype="float16", aux_projection="2H"),
}


def quality(src: Path, work: Path, steps_list: list[int], seeds: list[int], layouts: list[str],
            heldout: Path | None = None) -> None:
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import held_out  # bench/quality.py

    from pipeline.train.trainer import train

    h = int(st.StoreReader(src).fingerprint["model"]["hidden_size"])
    paths = {}
    for label in layouts:
        kw = dict(QUALITY_LAYOUTS[label])
        if isinstance(kw.get("aux_projection"), str):
            kw["aux_projection"] = {"H": h, "2H": 2 * h, "H/2": h // 2}[kw["aux_projection"]]
        paths[label] = work / f"q-{st.digest(kw)[:8]}"
        if not (paths[label] / "store.arrow").exists() or st.inspect_store(paths[label])["complete"] is False:
            st.reencode_store(src, paths[label], **kw)
    base = st.StoreReader(paths[layouts[0]])
    unseen = st.StoreReader(heldout) if heldout else None
    print("\n(f) EAGLE-3 held-out quality per layout (demo settings; global shuffle for all; final weights)")
    if unseen is not None:
        print(f"    unseen: every sample of {heldout} ({len(unseen)} samples, {int(unseen.lengths.sum()):,} tokens, "
              "records the runs never saw)")
    print(f"    {'layout':<46} {'steps':>5} {'seed':>4} {'B/token':>8}   own store: τ / acc_0   "
          "bf16 held-out: τ (vs bf16 run) / acc_0 (vs bf16 run)   train loss (last 20)"
          + ("   unseen: τ (vs bf16 run) / acc_0 (vs bf16 run)" if unseen is not None else ""))
    results: dict = {}
    unseen_results: dict = {}
    for steps in steps_list:
        for seed in seeds:
            for label in layouts:
                cfg = TrainConfig(feats=str(paths[label]), out=str(work / f"qrun-{paths[label].name}-{steps}-{seed}"),
                                  variant="eagle3", max_steps=steps, tokens_per_batch=1024, lr=2e-3, seed=seed,
                                  val_fraction=0.1, draft_vocab_size=4096, ttt_steps=1, shuffle="global",
                                  progress=False)  # fmt: skip
                if not (Path(cfg.out) / "summary.json").exists():
                    train(cfg)
                own = held_out(cfg, Path(cfg.out), st.StoreReader(paths[label]))
                whole = held_out(cfg, Path(cfg.out), base)
                rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
                losses = [r["loss"] for r in rows if r.get("kind") == "train" and "loss" in r][-20:]
                results[(steps, seed, label)] = whole
                ref = results[(steps, seed, layouts[0])]
                extra = ""
                if unseen is not None:
                    unseen_results[(steps, seed, label)] = far = held_out(cfg, Path(cfg.out), unseen, every=True)
                    ref_far = unseen_results[(steps, seed, layouts[0])]
                    extra = (f"   {far['tau']:.4f} ({far['tau'] / ref_far['tau'] - 1:+.2%}) / {far['cond_acc_0']:.4f} "
                             f"({far['cond_acc_0'] / ref_far['cond_acc_0'] - 1:+.2%})")
                bpt = st.inspect_store(paths[label])["bytes_per_token_total"]
                print(f"    {label:<46} {steps:>5} {seed:>4} {bpt:8,.0f}   {own['tau']:.4f} / {own['cond_acc_0']:.4f}   "
                      f"{whole['tau']:.4f} ({whole['tau'] / ref['tau'] - 1:+.2%}) / {whole['cond_acc_0']:.4f} "
                      f"({whole['cond_acc_0'] / ref['cond_acc_0'] - 1:+.2%})   {sum(losses) / max(len(losses), 1):.3f}{extra}",
                      flush=True)  # fmt: skip


def layout_sections(args, src: Path, work: Path, sections: set[str]) -> None:
    """(b)-(e): every dtype x codec layout (and the projected ones) written from ``src``."""
    stores = make_stores(src, work)
    from extract import peer_layout_bytes  # bench/extract.py

    peer = peer_layout_bytes(st.StoreReader(stores["bf16/none"]), work / "peer")["total (files)"]
    shutil.rmtree(work / "peer", ignore_errors=True)
    print(f"\n(b) bytes/token: both heads' features (--for both) and EAGLE-3's alone (--for eagle3: the same store "
          f"without hidden_last), against the peer's bf16 torch.save of both ({peer:,.0f} B/token)")
    print(f"    {'layout':<52} {'both':>8}   ours/peer   {'eagle3':>8}   ours/peer")
    info = {name: st.inspect_store(p) for name, p in stores.items()}
    for name, i in info.items():
        bpt = i["bytes_per_token_total"]
        e3 = bpt - sum(v for f, v in i["bytes_per_token"].items() if f.startswith("hidden_last"))
        print(f"    {name:<52} {bpt:8,.0f}   {bpt / peer:9.3f}   {e3:8,.0f}   {e3 / peer:9.3f}")
    for name in ("fp8/zstd, fp16 log-probs", COMPACT):
        print(f"    per field, {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in info[name]["bytes_per_token"].items()))
    fewer_bits(st.StoreReader(src))
    scale_table(info[COMPACT], tokens_per_record(args.scale_records))

    order = ["bf16/none"] + [n for n in stores if n != "bf16/none"]  # the baseline first
    if "c" in sections:
        print(f"\n(c) reads, best of {args.rounds} interleaved rounds   samples/s: stored arrays, in order   "
              "per-sample Zarr (previous)   loader tokens/s (fp32 batches)   ratio   shuffle   decodes/chunk")
        fields = ("hidden_last", "hidden_aux", "topk_ids", "topk_logprobs")
        order = ["bf16/none"] + [n for n in stores if n != "bf16/none"]  # the baseline first
        for p in stores.values():
            warm(p)
        best: dict[str, list] = {}
        for _ in range(args.rounds):  # the machine is shared: interleave the stores and keep each one's best
            for name in order:
                seq = sequential_samples_per_s(stores[name])
                rate, mode, decodes = loader_tokens_per_s(stores[name], fields, 2048)
                prev = best.get(name, [0.0, 0.0, mode, decodes])
                best[name] = [max(prev[0], seq), max(prev[1], rate), mode, decodes]
        for name in order:
            seq, rate, mode, decodes = best[name]
            old = per_sample_zarr_per_s(stores[name]) if not name.split("/")[1].startswith("none") else float("nan")
            print(f"    {name:<36} {seq:12.1f}   {old:24.1f}   {rate:17,.0f}   {rate / best['bf16/none'][1]:5.2f}   "
                  f"{mode:<7}   {decodes:.2f}")

    if "d" in sections:
        if args.steps:
            _, _, device = setup_distributed()
            for variant in args.train_variants.split(","):
                print(f"\n(d) {variant} training from each store, {args.steps} steps of {args.tokens_per_batch} tokens, "
                      f"best of {args.rounds} interleaved rounds   tokens/s   ratio")  # (CPU: compute-bound)
                rates: dict[str, tuple[float, float]] = {}
                for _ in range(args.rounds):
                    for name in order:
                        rate, wait = train_tokens_per_s(stores[name], args.steps, args.tokens_per_batch, device,
                                                        variant)  # fmt: skip
                        if rate > rates.get(name, (0.0, 0.0))[0]:
                            rates[name] = (rate, wait)
                for name, (rate, wait) in rates.items():
                    print(f"    {name:<52} {rate:9.1f}   {rate / rates['bf16/none'][0]:.2f}   loader wait {wait:.2%} "
                          "of the time")

    if "e" in sections:
        print(f"\n(e) writes (store writer: checks + compression + chunk writes + commit, from bf16 / device-quantized fp8 "
              f"rows in memory), best of {args.rounds} interleaved rounds   tokens/s   MB/s stored")
        disk = disk_write_mb_s(work)
        write: dict[tuple, tuple[float, float]] = {}
        for _ in range(args.rounds):
            for dtype, codec in (("bfloat16", "none"), ("bfloat16", "zstd"), (st.FP8, "none"), (st.FP8, "zstd")):
                for workers in (0, os.cpu_count() or 1):
                    rate = write_rates(src, work, dtype, codec, workers)
                    write[(dtype, codec, workers)] = max(write.get((dtype, codec, workers), (0.0, 0.0)), rate)
        for (dtype, codec, workers), (tok_s, mb_s) in write.items():
            label = f"{SHORT[dtype]}/{codec}, " + ("inline" if workers == 0 else f"pool of {workers}")
            print(f"    {label:<72} {tok_s:9,.0f}   {mb_s:8.1f}")
        print(f"    disk: sequential write + fsync of 256 MB: {disk:.0f} MB/s")
        fp8_bpt = info["fp8/zstd, fp16 log-probs"]["bytes_per_token_total"]
        print("\n    expected extraction/forward on the README's H100 run (bound = the lower of forward and writes):")
        for shape, (fwd, ext, bpt) in H100.items():
            write_mb = ext * bpt / 1e6  # what the run sustained
            scale = bpt / 4_871  # bytes/token of this shape relative to SmolLM2's
            new_bpt = fp8_bpt * scale
            print(f"    {shape}: measured {ext / fwd:.2f} at {bpt:,} B/token ({write_mb:.0f} MB/s written); "
                  f"at {new_bpt:,.0f} B/token: {min(1.0, write_mb * 1e6 / new_bpt / fwd):.2f} with the same "
                  f"{write_mb:.0f} MB/s, 1.00 needs {fwd * new_bpt / 1e6:,.0f} MB/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--feats", type=Path, default=None, help="fp32 SmolLM2 store (default: extract one)")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3, help="timed EAGLE-1 steps per store in (d); 0 skips (d)")
    ap.add_argument("--tokens-per-batch", type=int, default=512)
    ap.add_argument("--train-variants", default="eagle1,eagle3", help="(d): heads whose training steps are timed")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of (c)-(e); each setting's best counts")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--sections", default="a,b,c,d,e,f")
    ap.add_argument("--scale-records", type=int, default=1000, help="(h): ShareGPT records measured for tokens/record")
    ap.add_argument("--check-layers", type=int, default=4, help="(i): layers of the 8B-shaped random model")
    ap.add_argument("--check-limit", type=int, default=10, help="(i): ShareGPT records extracted")
    ap.add_argument("--check-max-length", type=int, default=512, help="(i): max tokens per sample")
    ap.add_argument("--quality-steps", default="180,800", help="(f): training steps, comma-separated")
    ap.add_argument("--seeds", default="0", help="(f): seeds, comma-separated")
    ap.add_argument("--layouts", default=",".join(map(str, range(len(QUALITY_LAYOUTS)))),
                    help="(f): indices into QUALITY_LAYOUTS (0, the baseline, first)")
    ap.add_argument("--heldout", type=Path, default=None,
                    help="(f): a whole-feature store of other records (extract --offset past --feats' records); "
                         "every run is also evaluated on all of its samples")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-store-"))
    work.mkdir(parents=True, exist_ok=True)
    src = args.feats or build_source(work / "fp32", args.limit, args.max_length)
    reader = st.StoreReader(src)
    if reader.hidden_dtype != "float32" or set(reader.fields) < {"hidden_last", "hidden_aux"}:
        sys.exit(f"{src}: need an fp32 store with both hidden fields (extract --hidden-dtype fp32 --for both)")
    tokens = int(reader.lengths.sum())
    print(f"source {src}: SmolLM2, {len(reader)} ShareGPT samples, {tokens} tokens, "
          f"{len(reader.shards)} shards, chunks of {reader.chunk_rows(0)} rows")
    if "a" in sections:
        scale_granularity(reader)
    if sections & {"b", "c", "d", "e"}:
        layout_sections(args, src, work, sections)
    if "i" in sections:
        check_at_8b(args, work, st.inspect_store(compact_store(src, work)))
    if "f" in sections:
        layouts = [list(QUALITY_LAYOUTS)[int(i)] for i in args.layouts.split(",")]
        quality(src, work, [int(x) for x in args.quality_steps.split(",")], [int(x) for x in args.seeds.split(",")],
                layouts, args.heldout)  # fmt: skip
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

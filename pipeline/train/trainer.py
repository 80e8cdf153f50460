"""`pipeline train`: the loop, top to bottom. Store → packed batches → draft objective → DeepSpeed step.

The run directory holds everything a run produces: the resolved config (with the store fingerprint it trained on
and the code version), metrics.jsonl, DeepSpeed checkpoints (the last K, plus best/ by held-out simulated τ),
final/ weights, summary.json and curves.png. The store is only ever read.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import __version__
from pipeline.draft.layers import compile_layers, rope_exact_length
from pipeline.store import StoreError, StoreReader, missing_fingerprint_fields, verify_store
from pipeline.train import variants
from pipeline.train.engine import Engine, EngineConfig, setup_distributed
from pipeline.train.loader import (
    PackedLoader,
    Prefetcher,
    collate,
    pack_samples,
    resolve_shuffle,
    split_samples,
)
from pipeline.train.metrics import MetricsLog, plot_curves
from pipeline.train.rundir import TrainError, claim, clean_leftovers, write_json, writing

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
CKPT_DIR = "checkpoints"
# Changing these between a run and its resume does not change what is computed. The store is identified by its
# fingerprint digest (checked apart), not by where it lies: a moved (or re-extracted) store resumes; so does a run
# directory named by another path.
RESUME_FREE = {"resume", "wandb_project", "progress", "log_every", "verify_checksums", "integrity", "feats", "out"}
# How much of the store is checked before (and while) it is read; README "Integrity" says what each costs.
INTEGRITY_LEVELS = ("open", "read", "full")
# What a run recorded before these fields existed did: compared in their place when resuming such a run.
LEGACY_DEFAULTS = {"shuffle": "global", "shuffle_window": 8}


@dataclass
class TrainConfig:
    feats: str
    out: str
    variant: str = "eagle1"
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 3e-4
    warmup_steps: int | None = None  # default: 5% of the steps, at most the reference's 2000
    seed: int = 0
    tokens_per_batch: int = 2048
    packing: bool = True
    shuffle: str = "auto"  # auto | global | window (pipeline/train/loader.py); auto is resolved before the run
    shuffle_window: int = 8  # chunks per shuffle window (window shuffle)
    grad_accum: int = 1
    clip: float = 0.5
    weight_decay: float = 0.0
    zero_stage: int = 0
    deepspeed: str | None = None
    precision: str = "auto"
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    log_every: int = 1
    eval_every: int = 0  # 0: at the end only (when val_fraction > 0)
    val_fraction: float = 0.0
    target: str = "topk"  # topk | full
    noise: str | None = None  # uniform | gaussian | none; default: uniform for EAGLE-1, none for EAGLE-3
    noise_std: float = 0.2
    noise_scale_by_length: bool = False
    v_weight: float = 1.0
    p_weight: float = 0.1
    ttt_steps: int = 7
    step_decay: float = 0.8
    draft_vocab_size: int = 32000
    head_init: str = "random"  # EAGLE-3 lm_head/norm: random, or target (the target's rows of the draft vocab)
    loss_tokens: str = "assistant"  # assistant: loss on assistant tokens only; all: every token of a sample
    activation_checkpointing: bool = False
    compile_layers: bool = False  # torch.compile the draft layers' attention-free blocks (layers.compile_layers)
    wandb_project: str | None = None
    verify_checksums: bool = False  # the same as integrity="full"
    integrity: str = "read"
    resume: bool = False
    progress: bool = True

    def engine_config(self, total_steps: int) -> EngineConfig:
        warmup = self.warmup_steps if self.warmup_steps is not None else min(2000, max(1, total_steps // 20))
        return EngineConfig(lr=self.lr, warmup_steps=warmup, total_steps=total_steps, grad_accum=self.grad_accum,
                            clip=self.clip, weight_decay=self.weight_decay, zero_stage=self.zero_stage,
                            precision=self.precision, user_config=self.deepspeed)  # fmt: skip


def open_store(cfg: TrainConfig) -> StoreReader:
    """Open the store read-only and refuse anything that would train silently wrong.

    Integrity levels: ``open`` checks what needs no full read (chunk files present with their recorded sizes,
    metadata and index re-hashed, index within the arrays, fingerprint digests, target sizes); ``read`` (default)
    also re-hashes each chunk file the first time training reads it, and the target weights as they load; ``full``
    re-hashes the whole store first (`pipeline verify`)."""
    level = "full" if cfg.verify_checksums else cfg.integrity
    if level not in INTEGRITY_LEVELS:
        raise ValueError(f"--integrity {level!r}: choose one of {', '.join(INTEGRITY_LEVELS)}")
    # refuses an incomplete or damaged store, naming the missing shards or the first damaged file
    # "full" re-hashes every file below, before training reads any: hashing each chunk again on read would repeat it
    reader = StoreReader(cfg.feats, verify_reads=level == "read")
    missing = missing_fingerprint_fields(reader.fingerprint)
    if missing:
        raise StoreError(f"{cfg.feats}: fingerprint incomplete, missing {', '.join(missing)}")
    if level == "full":
        problems = verify_store(cfg.feats)
        if problems:
            raise StoreError(f"{cfg.feats}: verify failed with {len(problems)} problem(s), first: {problems[0]}; "
                             "re-run the same `pipeline extract` to redo what is damaged")  # fmt: skip
    last = reader.last_verify()
    if last is not None and not last["ok"]:
        raise StoreError(f"{cfg.feats}: the last `pipeline verify` failed ({len(last['problems'])} problems, first: "
                         f"{last['problems'][:1]}); fix or re-extract, then run `pipeline verify` again")  # fmt: skip
    if len(reader) == 0:
        raise StoreError(f"{cfg.feats}: the store holds no samples (every record was skipped when it was extracted: "
                         "`pipeline inspect` shows why)")  # fmt: skip
    need = set(variants.required_fields(cfg))
    if not need <= reader.has:
        raise StoreError(f"{cfg.feats}: variant {cfg.variant} with --target {cfg.target} needs "
                         f"{', '.join(sorted(need - reader.has))}, which this store does not hold (stored: "
                         f"{', '.join(sorted(reader.has))}); re-extract with --for both")  # fmt: skip
    exact = rope_exact_length(reader.target_config())
    longest = int(reader.lengths.max())
    if exact is not None and longest > exact[1]:
        rope_type, n = exact
        raise TrainError(f"{cfg.feats}: the target's rope_type {rope_type!r} changes its rotary frequencies for "
                         f"sequences longer than {n} tokens, which the draft does not reproduce, and the store holds "
                         f"samples of up to {longest} tokens; re-extract with --max-length {n} (or train for a "
                         "target with a static rope type)")  # fmt: skip
    return reader


def _check_run_dir(cfg: TrainConfig, run_dir: Path, fingerprint_digest: str) -> bool:
    """Returns True when this run continues an earlier one in the same directory."""
    ckpt = run_dir / CKPT_DIR / "latest"
    recorded = run_dir / CONFIG_FILE
    if not recorded.exists():
        if cfg.resume:
            raise TrainError(f"--resume: {run_dir} holds no run to resume")
        return False
    old = json.loads(recorded.read_text())
    if old.get("store_fingerprint_digest") != fingerprint_digest:
        raise TrainError(f"{run_dir} was trained on another store (fingerprint {old.get('store_fingerprint_digest')});"
                         f" {cfg.feats} has {fingerprint_digest}. Use a new --out.")  # fmt: skip
    # options newer than the run: what such a run did (LEGACY_DEFAULTS), else their default holds
    recorded_cfg = {**{f.name: f.default for f in fields(TrainConfig)}, **LEGACY_DEFAULTS, **old["train"]}
    diffs = [f"{k}: run has {recorded_cfg.get(k)!r}, now {v!r}" for k, v in asdict(cfg).items()
             if k not in RESUME_FREE and recorded_cfg.get(k) != v]  # fmt: skip
    if diffs:
        raise TrainError(f"{run_dir} holds a run with a different config; use a new --out, or the same flags to "
                         "resume it. Differences:\n  " + "\n  ".join(diffs))  # fmt: skip
    if (run_dir / SUMMARY_FILE).exists():
        raise TrainError(f"{run_dir} holds a finished run (summary.json); use a new --out for a new run")
    if not ckpt.exists():
        if cfg.resume:
            raise TrainError(f"--resume: {run_dir} has no checkpoint yet")
        return False
    return True


def _moved_store(run_dir: Path, cfg: TrainConfig) -> str | None:
    """Where the store lay when the run started, if it lies elsewhere now (same fingerprint: it resumes)."""
    recorded = json.loads((run_dir / CONFIG_FILE).read_text()).get("store")
    now = str(Path(cfg.feats).resolve())
    return recorded if recorded and recorded != now else None


def _step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    # Per-step RNG from (seed, step, micro, rank): noise is identical with or without a resume in between.
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0])


def _claim_run_dir(run_dir: Path, rank: int, world: int):
    """Rank 0 takes the run directory's writer lock and removes what dead writers left; every rank learns whether
    it got the lock (so that all stop together when another run holds it). Returns (lock or None, removed)."""
    lock, removed, refusal = None, [], None
    if rank == 0:
        try:
            with writing(run_dir, "creating the run directory"):
                run_dir.mkdir(parents=True, exist_ok=True)
            lock = claim(run_dir)
            removed = clean_leftovers(run_dir)
        except TrainError as e:
            refusal = str(e)
    if world > 1:
        shared = [refusal]
        torch.distributed.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal is not None:
        if lock is not None:
            lock.release()
        raise TrainError(refusal)
    return lock, removed


def train(cfg: TrainConfig) -> dict:
    rank, world, device = setup_distributed()
    reader = open_store(cfg)
    fields_needed = variants.required_fields(cfg)
    cfg.shuffle = resolve_shuffle(cfg.shuffle, reader, fields_needed)  # recorded resolved: resume compares it
    run_dir = Path(cfg.out)
    lock, removed = _claim_run_dir(run_dir, rank, world)
    try:
        return _train(cfg, reader, run_dir, removed, rank, world, device)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, reader: StoreReader, run_dir: Path, removed: list[str], rank: int, world: int,
           device: torch.device) -> dict:  # fmt: skip
    fields_needed = variants.required_fields(cfg)
    resuming = _check_run_dir(cfg, run_dir, reader.digest)
    if removed:
        tqdm.write(f"cleaned {len(removed)} temporary file(s) of dead writers in {run_dir}: {', '.join(removed)}",
                   file=sys.stderr)  # fmt: skip

    train_idx, val_idx = split_samples(reader, cfg.val_fraction, cfg.seed)
    loader = PackedLoader(reader, train_idx, fields_needed, cfg.tokens_per_batch, cfg.seed, rank, world, cfg.packing,
                          shuffle=cfg.shuffle, window_chunks=cfg.shuffle_window)  # fmt: skip
    packs_per_epoch = loader.packs_per_epoch()
    if packs_per_epoch == 0:
        raise TrainError(f"{cfg.feats}: {len(train_idx)} training samples make no pack for {world} ranks")
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * packs_per_epoch / cfg.grad_accum))
    waste = loader.waste(0)

    torch.manual_seed(cfg.seed)
    model, objective, build_info = variants.build(cfg, reader)
    model.gradient_checkpointing = cfg.activation_checkpointing
    if cfg.compile_layers:
        compile_layers(model)
    engine = Engine(model, cfg.engine_config(total_steps), device)

    record = {"train": asdict(cfg), "store": str(Path(cfg.feats).resolve()), "store_fingerprint_digest": reader.digest,
              "store_fingerprint": reader.fingerprint, "code_version": __version__, "world_size": world,
              "total_steps": total_steps, "packs_per_epoch": packs_per_epoch, "draft": build_info,
              "deepspeed": engine.config}  # fmt: skip
    step = 0
    if resuming:
        client = engine.load(run_dir / CKPT_DIR)
        if client is None:
            raise TrainError(f"{run_dir / CKPT_DIR}: no loadable checkpoint")
        step = client["step"]
        loader.state.epoch, loader.state.pack = client["loader"]["epoch"], client["loader"]["pack"]
        torch.set_rng_state(client["rng"]["torch"])
        np.random.set_state(client["rng"]["numpy"])
    elif rank == 0:
        write_json(run_dir / CONFIG_FILE, record)
    moved = _moved_store(run_dir, cfg) if resuming and rank == 0 else None
    log = MetricsLog(run_dir, step if resuming else None, cfg.wandb_project, record, enabled=rank == 0)
    if rank == 0:
        log.log({"kind": "info", "step": step, "resumed": resuming, "packing_waste": waste,
                 "packs_per_epoch": packs_per_epoch, "train_samples": len(train_idx), "val_samples": len(val_idx),
                 "shuffle": cfg.shuffle, "loader_cache_bytes": loader.cache_bytes(), "cleaned_leftovers": removed,
                 **({"store_moved_from": moved} if moved else {}),
                 **{k: v for k, v in build_info.items() if isinstance(v, (int, float))}})  # fmt: skip

    val_batches = _val_batches(reader, val_idx, fields_needed, cfg, rank, world)
    best_tau = -math.inf
    if resuming and (run_dir / "best" / "best.json").exists():
        best_tau = json.loads((run_dir / "best" / "best.json").read_text())["tau"]
    prefetch = Prefetcher(loader, depth=4)
    bar = tqdm(total=total_steps, initial=step, desc=f"train {cfg.variant}", disable=rank != 0 or not cfg.progress,
               dynamic_ncols=True)  # fmt: skip
    first, last = None, None
    start_step = step  # a resumed run's first step here is start_step + 1
    started = time.time()
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            wait0 = prefetch.wait_s
            sums: dict[str, float] = {}
            weights: dict[str, float] = {}
            batch_tokens = 0
            engine.module.train()
            for micro in range(cfg.grad_accum):
                state, batch = next(prefetch)
                torch.manual_seed(_step_seed(cfg.seed, step, micro, rank))
                loss, metrics = variants.loss(cfg, engine.module, engine.to_device(batch), objective)
                engine.backward_step(loss)
                batch_tokens += int((batch["doc_ids"] >= 0).sum())
                for k, (v, w) in variants.weighted(metrics).items():
                    sums[k] = sums.get(k, 0.0) + v * w
                    weights[k] = weights.get(k, 0.0) + w
                loader_state = state
            step += 1
            mean = engine.all_mean({k: v / max(weights[k], 1e-9) for k, v in sums.items()}, weights)
            elapsed = time.perf_counter() - t0
            total_tok, wait = engine.all_sum([batch_tokens, prefetch.wait_s - wait0])
            rec = {"kind": "train", "step": step, "lr": engine.lr, "tokens_per_s": total_tok / elapsed,
                   "loader_wait_s": wait / world, "step_s": elapsed, "epoch": loader_state.epoch, **mean}  # fmt: skip
            first = first or rec
            last = rec
            if rank == 0 and (step % cfg.log_every == 0 or step == total_steps):
                log.log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec.get('acc', 0):.3f}",
                                tok_s=f"{rec['tokens_per_s']:.0f}", wait=f"{wait / world / elapsed:.0%}")  # fmt: skip
            bar.update(1)
            client = {"step": step, "loader": loader_state.as_dict(),
                      "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}}  # fmt: skip
            evaluate_now = val_batches and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps)
            if evaluate_now:
                val = _evaluate(cfg, engine, val_batches, objective)
                if rank == 0:
                    log.log({"kind": "val", "step": step, **val})
                if val["tau"] > best_tau:
                    best_tau = val["tau"]
                    _save_weights(engine, run_dir / "best", cfg, build_info, {"step": step, **val}, rank)
            if (cfg.save_every and step % cfg.save_every == 0) or step == total_steps:
                with writing(run_dir / CKPT_DIR / f"step{step}", f"saving checkpoint step{step}"):
                    engine.save(run_dir / CKPT_DIR, f"step{step}", client, cfg.keep_last)
    finally:
        prefetch.close()
        bar.close()
    _save_weights(engine, run_dir / "final", cfg, build_info, {"step": step}, rank)
    summary = {"steps": step, "total_steps": total_steps, "start_step": start_step,
               "wall_s": round(time.time() - started, 2),
               "first": first, "last": last, "packing_waste": waste, "best_val_tau": best_tau if val_batches else None,
               "world_size": world, "rank": rank, "run_dir": str(run_dir), "cleaned_leftovers": removed,
               "store_moved_from": moved}  # fmt: skip
    if rank == 0:
        log.close()
        with writing(run_dir / "curves.png", "plotting the training curves"):
            plot_curves(run_dir, run_dir / "curves.png")
        write_json(run_dir / SUMMARY_FILE, summary)  # last: its presence marks the run finished
    engine.barrier()
    return summary


def _val_batches(reader, val_idx, fields_needed, cfg: TrainConfig, rank: int, world: int) -> list[dict]:
    if len(val_idx) == 0:
        return []
    order = np.sort(val_idx)
    packs = pack_samples(reader.lengths, order, cfg.tokens_per_batch) if cfg.packing else [
        [(int(i), min(int(reader.lengths[i]), cfg.tokens_per_batch))] for i in order]  # fmt: skip
    return [collate(reader, p, fields_needed, cfg.tokens_per_batch) for p in packs[rank::world]]


@torch.no_grad()
def _evaluate(cfg: TrainConfig, engine: Engine, batches: list[dict], objective) -> dict:
    engine.module.eval()
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for batch in batches:
        for k, (value, weight) in variants.evaluate(cfg, engine.module, engine.to_device(batch), objective).items():
            sums[k] = sums.get(k, 0.0) + value * weight
            weights[k] = weights.get(k, 0.0) + weight
    keys = sorted(set(sums) | set(variants.eval_keys(cfg)))
    mean = engine.all_mean({k: sums.get(k, 0.0) / max(weights.get(k, 0.0), 1e-9) for k in keys},
                           {k: weights.get(k, 0.0) for k in keys})  # fmt: skip
    mean["tau"] = variants.simulated_tau(cfg, mean)
    return mean


def _save_weights(engine: Engine, out: Path, cfg: TrainConfig, build_info: dict, meta: dict, rank: int) -> None:
    """Full draft weights (incl. frozen embeddings) as safetensors + the draft config, for export."""
    from safetensors.torch import save_file

    state = engine.full_state_dict()
    if rank == 0:
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        try:
            with writing(out / "model.safetensors", f"saving the {out.name}/ weights"):
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
                (tmp / "draft.json").write_text(json.dumps({"variant": cfg.variant, "draft": build_info,
                                                            "train": asdict(cfg), "code_version": __version__},
                                                           indent=2, default=str))  # fmt: skip
                (tmp / f"{out.name}.json").write_text(json.dumps(meta, indent=2, default=str))
                old = out.with_name(out.name + ".old")
                if out.exists():
                    os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed save leaves nothing half written behind
    engine.barrier()


def config_from_kwargs(**kw) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in kw.items() if k in names and v is not None})

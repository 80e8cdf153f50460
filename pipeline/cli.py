"""The `pipeline` command line (click)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from pipeline import __version__


def _ints(value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError as e:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers") from e


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@click.group()
@click.version_option(__version__, prog_name="pipeline")
def main() -> None:
    """Train EAGLE-1 / EAGLE-3 draft heads from an offline feature store."""


@main.command()
@click.option("--model", default=None, help="HF model directory (default: embedded SmolLM2-135M-Instruct).")
@click.option("--data", default=None, help="ShareGPT JSON or JSONL file (default: embedded ShareGPT).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Store directory.")
@click.option("--data-format", "kind", type=click.Choice(["chat", "fim"]), default="chat", show_default=True)
@click.option("--fim-tokens", default=None, help="prefix,suffix,middle special tokens for --data-format fim.")
@click.option("--offset", type=int, default=0, show_default=True, help="Skip this many source records.")
@click.option("--limit", type=int, default=None, help="Take at most this many source records.")
@click.option("--ids", "ids_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="File of record ids (one per line) to select.")  # fmt: skip
@click.option("--max-length", type=int, default=2048, show_default=True, help="Truncate samples to N tokens.")
@click.option("--top-k", type=int, default=32, show_default=True, help="Log-probabilities kept per token.")
@click.option("--hidden-dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True)
@click.option("--for", "stored_for", type=click.Choice(["both", "eagle1", "eagle3"]), default="both",
              show_default=True, help="eagle1 keeps only the last hidden state, eagle3 only the aux layers.")  # fmt: skip
@click.option("--aux-layers", default=None, help="HF hidden-state indices for EAGLE-3 (default 2,N//2,N-3).")
@click.option("--shard-size", type=int, default=256, show_default=True, help="Source records per shard.")
@click.option("--chunk-tokens", type=int, default=4096, show_default=True, help="Zarr chunk length (tokens).")
@click.option("--codec", type=click.Choice(["none", "zstd", "blosc"]), default="none", show_default=True)
@click.option("--batch-tokens", type=int, default=None,
              help="Padded tokens per forward (default: 8192 for hf, 65536 for vllm).")  # fmt: skip
@click.option("--device", default="auto", show_default=True)
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True)
@click.option("--rank", type=int, default=None, help="This worker (default: $RANK, $SLURM_PROCID, 0).")
@click.option("--world-size", type=int, default=None, help="Workers (default: $WORLD_SIZE, $SLURM_NTASKS, 1).")
@click.option("--tensor-parallel-size", type=int, default=1, show_default=True, help="vLLM backend only.")
@click.option("--gpu-memory-utilization", type=float, default=0.85, show_default=True, help="vLLM backend only.")
@click.option("--max-num-seqs", type=int, default=64, show_default=True, help="vLLM backend concurrency.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def extract(**kw) -> None:
    """Run the target once over chat data and write a sharded feature store."""
    from pipeline.extract.runner import ExtractConfig, run_extract
    from pipeline.extract.vllm_backend import VLLMRequestError
    from pipeline.store import StoreError

    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[kw["hidden_dtype"]]
    fim = tuple(kw["fim_tokens"].split(",")) if kw["fim_tokens"] else None
    if fim is not None and len(fim) != 3:
        raise click.BadParameter("--fim-tokens needs exactly three comma-separated tokens")
    backend_options = {}
    if kw["backend"] == "vllm":
        backend_options = {"tensor_parallel_size": kw["tensor_parallel_size"],
                           "gpu_memory_utilization": kw["gpu_memory_utilization"],
                           "max_num_seqs": kw["max_num_seqs"]}  # fmt: skip
    cfg = ExtractConfig(
        out=kw["out"], model=kw["model"], data=kw["data"], kind=kw["kind"], offset=kw["offset"], limit=kw["limit"],
        ids_file=kw["ids_file"], max_length=kw["max_length"], top_k=kw["top_k"], hidden_dtype=dtype,
        stored_for=kw["stored_for"], aux_layers=_ints(kw["aux_layers"]), shard_size=kw["shard_size"],
        chunk_tokens=kw["chunk_tokens"], codec=kw["codec"], batch_tokens=kw["batch_tokens"], device=kw["device"],
        backend=kw["backend"], rank=kw["rank"], world_size=kw["world_size"], progress=not kw["no_progress"],
        backend_options=backend_options,
    )  # fmt: skip
    if fim is not None:
        cfg.fim_tokens = fim
    try:
        summary = run_extract(cfg)
    except (StoreError, ValueError, FileNotFoundError, VLLMRequestError) as e:
        _fail(str(e))
    if kw["as_json"]:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(format_extract_summary(summary))


def format_extract_summary(s: dict) -> str:
    src = s["source"]
    lines = [
        f"store            {s['store']}  (rank {s['rank']}/{s['world_size']}, backend {s['backend']})",
        f"shards           {s['shards']['written']} written, {s['shards']['already_committed']} already committed, "
        f"{s['shards']['mine']} of {s['shards']['planned']} are this worker's",
        f"records          {s['records_selected']} selected; {s['samples_written']} samples written",
        f"skipped          {sum(s['skipped'].values())}" + "".join(f"  {k}={v}" for k, v in s["skipped"].items()),
        f"quarantined      {s['quarantined']}",
        f"tokens           {s['tokens']} ({s['loss_tokens']} loss tokens)",
        f"bytes            {s['bytes_written']:,} ({s['bytes_per_token']:.0f} B/token)",
        f"wall             {s['wall_s']} s (extraction loop {s['loop_s']} s, forward {s['forward_s']} s), "
        f"{s['tokens_per_s']} tokens/s",
    ]
    if src.get("truncated"):
        lines.append(f"source           {src['path']} is truncated at byte {src['truncated_at_byte']:,}: "
                     f"used the {src['records_seen']:,} complete records before it")  # fmt: skip
    return "\n".join(lines)


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(store: Path, as_json: bool) -> None:
    """Summarize a feature store: fingerprint, counts, bytes per field, shard status."""
    from pipeline.store import StoreError, inspect_store

    try:
        info = inspect_store(store)
    except StoreError as e:
        _fail(str(e))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    fp = info["fingerprint"]
    tokens = max(info["tokens"], 1)
    click.echo(f"store        {info['path']}  (format {info['format_version']}, "
               f"{'complete' if info['complete'] else 'INCOMPLETE'})")  # fmt: skip
    click.echo(f"target       {fp['model']['name']}  layers={fp['model']['num_layers']} H={fp['model']['hidden_size']} "
               f"V={fp['model']['vocab_size']}  backend={fp['backend']}")  # fmt: skip
    click.echo(f"stored       {', '.join(fp['layers']['stored'])}  aux layers={fp['layers']['aux']}  "
               f"hidden dtype={fp['dtypes']['hidden']}  top-k={fp['top_k']}  max_length={fp['max_length']}")  # fmt: skip
    click.echo(f"data         {fp['data']['path']}  ({fp['data']['format']}/{fp['data']['kind']}, "
               f"selection {fp['data']['selection']})")  # fmt: skip
    click.echo(f"samples      {info['samples']}   tokens {info['tokens']}   loss tokens {info['loss_tokens']} "
               f"({info['loss_token_share']:.1%})")  # fmt: skip
    click.echo(f"skipped      {sum(info['skipped'].values())} {info['skipped']}   quarantined {info['quarantined']}")
    click.echo(f"bytes        {info['bytes']:,} total, target pieces {info['target_bytes']:,}")
    for name, b in info["bytes_per_field"].items():
        click.echo(f"  {name:<16} {b:>14,} B  {b / tokens:>10.1f} B/token")
    verify = info["last_verify"]
    click.echo("verify       " + ("never run" if verify is None else ("ok" if verify["ok"] else
               f"FAILED ({len(verify['problems'])} problems)")))  # fmt: skip
    click.echo(f"fingerprint  {info['fingerprint_digest']}")
    click.echo("shards")
    for s in info["shards"]:
        click.echo(f"  {s['shard']:>5}  {s['status']:<12} {s['samples']:>6} samples {s['tokens']:>9} tokens "
                   f"{s['bytes']:>14,} B")  # fmt: skip


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
def verify(store: Path) -> None:
    """Recompute checksums and check index/tensor consistency; non-zero exit names every bad shard."""
    from pipeline.store import StoreError, verify_store

    try:
        problems = verify_store(store)
    except StoreError as e:
        _fail(str(e))
    if problems:
        for p in problems:
            click.echo(f"BAD  {p}", err=True)
        click.echo(f"verify: {len(problems)} problem(s) in {store}", err=True)
        sys.exit(1)
    click.echo(f"verify: {store} ok")


@main.command()
@click.option("--feats", required=True, type=click.Path(exists=True, file_okay=False), help="Feature store.")
@click.option("--variant", type=click.Choice(["eagle1", "eagle3"]), default="eagle1", show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (only this is written).")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Optimizer steps (overrides --epochs).")
@click.option("--lr", type=float, default=3e-4, show_default=True, help="Peak learning rate.")
@click.option("--warmup-steps", type=int, default=None, help="Linear warmup (default 5%% of steps, max 2000).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tokens-per-batch", type=int, default=2048, show_default=True, help="Tokens per packed row.")
@click.option("--no-packing", is_flag=True, help="One sample per row, padded (for comparison).")
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--clip", type=float, default=0.5, show_default=True, help="Gradient clipping (norm).")
@click.option("--zero-stage", type=click.IntRange(0, 3), default=0, show_default=True)
@click.option("--deepspeed", "deepspeed_json", default=None, type=click.Path(exists=True, dir_okay=False),
              help="DeepSpeed JSON; its keys override the flags.")  # fmt: skip
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--save-every", type=int, default=0, show_default=True, help="Checkpoint every N steps (0: end only).")
@click.option("--keep-last", type=int, default=2, show_default=True, help="Checkpoints kept.")
@click.option("--log-every", type=int, default=1, show_default=True)
@click.option("--eval-every", type=int, default=0, show_default=True, help="Held-out eval every N steps (0: end).")
@click.option("--val-fraction", type=float, default=0.0, show_default=True, help="Share of samples held out.")
@click.option("--target", type=click.Choice(["topk", "full"]), default="topk", show_default=True,
              help="Token targets: stored top-k log-probs, or the exact softmax of lm_head(hidden_last).")  # fmt: skip
@click.option("--noise", type=click.Choice(["uniform", "gaussian", "none"]), default=None,
              help="Feature noise (default: uniform for eagle1, none for eagle3).")  # fmt: skip
@click.option("--noise-std", type=float, default=0.2, show_default=True)
@click.option("--noise-scale-by-length", is_flag=True, help="Reference EAGLE-1 noise: scale by 512/L.")
@click.option("--v-weight", type=float, default=1.0, show_default=True, help="EAGLE-1 feature-regression weight.")
@click.option("--p-weight", type=float, default=0.1, show_default=True, help="EAGLE-1 token-loss weight.")
@click.option("--ttt-steps", type=int, default=7, show_default=True, help="EAGLE-3 training-time-test length.")
@click.option("--step-decay", type=float, default=0.8, show_default=True, help="EAGLE-3 per-step loss decay.")
@click.option("--draft-vocab-size", type=int, default=32000, show_default=True, help="EAGLE-3 (capped at V).")
@click.option("--activation-checkpointing", is_flag=True)
@click.option("--verify-checksums", is_flag=True, help="Re-hash the whole store before training.")
@click.option("--wandb-project", default=None, help="wandb project (WANDB_MODE respected; offline by default).")
@click.option("--resume", is_flag=True, help="Require resuming the run in --out (it also resumes by itself).")
@click.option("--no-progress", is_flag=True)
def train(**kw) -> None:
    """Train a draft head from a feature store with DeepSpeed (never opens the base model)."""
    from pipeline.store import StoreError
    from pipeline.train.trainer import TrainError, config_from_kwargs
    from pipeline.train.trainer import train as run_train

    kw["packing"] = not kw.pop("no_packing")
    kw["progress"] = not kw.pop("no_progress")
    kw["deepspeed"] = kw.pop("deepspeed_json")
    cfg = config_from_kwargs(**kw)
    try:
        summary = run_train(cfg)
    except (StoreError, TrainError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if summary.get("rank", 0) == 0:
        click.echo(format_train_summary(summary))


def format_train_summary(s: dict) -> str:
    first, last = s["first"] or {}, s["last"] or {}
    keys = [k for k in ("loss", "vloss", "ploss", "acc") if k in last] + sorted(
        k for k in last if k.startswith("acc_"))  # fmt: skip
    lines = [f"run              {s['run_dir']}  ({s['steps']} steps, {s['world_size']} rank(s), {s['wall_s']} s)",
             f"packing waste    {s['packing_waste']:.1%}"]  # fmt: skip
    for k in keys:
        lines.append(f"{k:<16} {first.get(k, float('nan')):.4f} (step 1) -> {last[k]:.4f} (step {s['steps']})")
    if last:
        lines.append(f"throughput       {last['tokens_per_s']:.0f} tokens/s, loader wait {last['loader_wait_s']:.3f} s "
                     f"of {last['step_s']:.3f} s per step")  # fmt: skip
    if s.get("best_val_tau") is not None:
        lines.append(f"held-out τ       {s['best_val_tau']:.3f} (best, simulated greedy chain; counts the bonus token)")
    return "\n".join(lines)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["vllm", "speculators"]), default="vllm", show_default=True)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Export directory (must not exist).")
@click.option("--weights", type=click.Choice(["final", "best"]), default="final", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="bf16", show_default=True)
def export(run_dir: Path, fmt: str, out: Path, weights: str, dtype: str) -> None:
    """Write a trained draft in the layout vLLM / SGLang (or speculators) load."""
    import torch

    from pipeline.train.variants import export_run

    if out.exists() and any(out.iterdir()):
        _fail(f"--out {out} exists and is not empty; exports never overwrite")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    try:
        path, record = export_run(run_dir, out, fmt, weights, torch_dtype)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    click.echo(f"exported {record['variant']} ({weights} weights of {run_dir}) as {fmt} to {path}")


def _register() -> None:
    # Commands that live with their stage (their modules import the heavy libraries only when they run).
    from pipeline.demo import demo_command
    from pipeline.evaluate.cli import eval_command
    from pipeline.regenerate import regenerate_command

    main.add_command(eval_command, "eval")
    main.add_command(demo_command, "demo")
    main.add_command(regenerate_command, "regenerate")


_register()

if __name__ == "__main__":
    main()

"""The `pipeline` command line (click)."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import click

from pipeline import __version__
from pipeline.extract.runner import ExtractConfig
from pipeline.options import AUX_CHOICES, CODEC_CHOICES, DTYPE_NAMES, HIDDEN_CHOICES, defaults, short_dtype
from pipeline.train.trainer import TrainConfig


def _scaled(record: dict) -> str:
    """How a projected field's rows are stored: divided by the component scale (format 5) or not."""
    scale = record.get("component_scale")
    return f" / s (s = rms^{scale['rms_power']:g} per component)" if scale else ""


def _projection(value: str) -> int | str | None:
    """``--aux-projection``: auto, none or a positive k."""
    if value in ("auto", "none"):
        return None if value == "none" else value
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter(f"{value!r}: expected auto, none or a positive integer k", param_hint="--aux-projection")
    return int(value)


def _ints(value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError as e:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers") from e


# Option defaults come from the config dataclasses (one source; tests/test_architecture.py checks every option).
TRAIN = defaults(TrainConfig)
EXTRACT = defaults(ExtractConfig)


class _DraftHeads(click.Choice):
    """The registered draft heads (:mod:`pipeline.draft.registry`, ``PIPELINE_PLUGINS`` included), looked up when
    the option is used or shown, so that the CLI starts without importing torch."""

    def __init__(self) -> None:
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:
        from pipeline.draft import registry

        return tuple(registry.names())

    @choices.setter
    def choices(self, value) -> None:  # click.Choice.__init__ assigns it; the registry is the source
        pass


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


class _Main(click.Group):
    """Expected faults end in one ``error:`` line and exit code 2, not a traceback: a missing package or asset
    wheel, a damaged or incomplete store, a refused run, a full disk or another failed file operation.
    ``PIPELINE_TRACEBACK=1`` shows the traceback instead."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Exception as e:
            message = _expected_fault(e)
            if message is None or os.environ.get("PIPELINE_TRACEBACK"):
                raise
            _fail(message)


def _expected_fault(e: Exception) -> str | None:
    """The one-line message for an expected fault, None for anything else (a bug keeps its traceback)."""
    from pipeline.assets import AssetMissing

    if isinstance(e, click.ClickException | click.exceptions.Exit | click.exceptions.Abort):
        return None
    if isinstance(e, AssetMissing):
        return str(e)
    # Only modules that raised can own the exception: look them up instead of importing torch here.
    for module, name in (("pipeline.store", "StoreError"), ("pipeline.train.trainer", "TrainError")):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(e, cls):
            return str(e)
    if isinstance(e, OSError) and e.errno is not None:
        where = f"{e.filename}: " if e.filename else ""
        return (f"{where}{e.strerror or e}; fix that (free space, permissions, the path), then re-run the same "
                "command: committed work is kept")  # fmt: skip
    if isinstance(e, ModuleNotFoundError):
        return (f"the Python package '{e.name}' is not installed ({e}); install it (scripts/setup.sh installs "
                "what the project needs)")  # fmt: skip
    if isinstance(e, ImportError):
        return f"a dependency failed to import ({e}); reinstall it (scripts/setup.sh)"
    return None


@click.group(cls=_Main)
@click.version_option(__version__, prog_name="pipeline")
def main() -> None:
    """Train EAGLE-1 / EAGLE-3 draft heads from an offline feature store."""


@main.command()
@click.option("--model", default=EXTRACT["model"], help="HF model directory (default: embedded SmolLM2-135M-Instruct).")
@click.option("--data", default=EXTRACT["data"],
              help="ShareGPT JSON / JSONL file, .parquet / .arrow file or folder of them, a datasets.save_to_disk "
              "folder, or hf:NAME[:SPLIT] (datasets.load_dataset; its cache when offline). Default: embedded ShareGPT.")
@click.option("--data-field", default=EXTRACT["data_field"],
              help="Column / key holding the conversation (default: conversations or messages).")
@click.option("--thinking", type=click.Choice(["auto", "keep", "drop"]), default=EXTRACT["thinking"], show_default=True,
              help="Assistant reasoning: keep (trained on, where the chat template renders it), drop, or auto "
              "(keep where the template can).")  # fmt: skip
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Store directory.")
@click.option("--data-format", "kind", type=click.Choice(["chat", "fim"]), default=EXTRACT["kind"], show_default=True)
@click.option("--fim-tokens", default=None, help="prefix,suffix,middle special tokens for --data-format fim.")
@click.option("--offset", type=int, default=EXTRACT["offset"], show_default=True, help="Skip this many source records.")
@click.option("--limit", type=int, default=EXTRACT["limit"], help="Take at most this many source records.")
@click.option("--ids", "ids_file", default=EXTRACT["ids_file"], type=click.Path(exists=True, dir_okay=False),
              help="File of record ids (one per line) to select.")  # fmt: skip
@click.option("--max-length", type=int, default=EXTRACT["max_length"], show_default=True, help="Truncate samples to N tokens.")
@click.option("--top-k", type=int, default=EXTRACT["top_k"], show_default=True, help="Log-probabilities kept per token.")
@click.option("--hidden-dtype", type=click.Choice(HIDDEN_CHOICES), default=short_dtype(EXTRACT["hidden_dtype"]), show_default=True,
              help="Storage dtype of the hidden states; fp8 = float8 e4m3 with one fp32 scale per token row.")
@click.option("--aux-dtype", type=click.Choice(AUX_CHOICES), default=EXTRACT["aux_dtype"], show_default=True,
              help="Storage dtype of EAGLE-3's features: auto = q19 (codes -9..9 of the components divided by their "
              "scale, one fp32 scale per row) when projected, else --hidden-dtype; int7 = codes -63..63.")  # fmt: skip
@click.option("--logprob-dtype", type=click.Choice(["fp32", "fp16"]), default=short_dtype(EXTRACT["logprob_dtype"]), show_default=True,
              help="Storage dtype of the top-k log-probabilities.")
@click.option("--aux-projection", default=EXTRACT["aux_projection"], show_default=True,
              help="EAGLE-3 features stored as P·x, P = their top-k principal directions: auto (k = 2H), none, or k.")
@click.option("--calibration-tokens", type=int, default=EXTRACT["calibration_tokens"], show_default=True,
              help="Tokens of the extraction's first batches that estimate the projection.")
@click.option("--for", "stored_for", type=click.Choice(["both", "eagle1", "eagle3"]), default=EXTRACT["stored_for"],
              show_default=True, help="eagle1 keeps only the last hidden state, eagle3 only the aux layers.")  # fmt: skip
@click.option("--aux-layers", default=EXTRACT["aux_layers"], help="HF hidden-state indices for EAGLE-3 (default 2,N//2,N-3).")
@click.option("--shard-size", type=int, default=EXTRACT["shard_size"], show_default=True, help="Source records per shard.")
@click.option("--chunk-tokens", type=int, default=EXTRACT["chunk_tokens"], show_default=True, help="Zarr chunk length (tokens).")
@click.option("--codec", type=click.Choice(CODEC_CHOICES), default=EXTRACT["codec"], show_default=True,
              help="auto: bit-shuffled zstd (blosc) for int7/q19 and fp16 arrays, zstd for the others.")
@click.option("--io-workers", type=int, default=EXTRACT["io_workers"], help="Threads compressing/writing chunks (default min(8, CPUs)).")
@click.option("--batch-tokens", type=int, default=EXTRACT["batch_tokens"],
              help="Padded tokens per forward (default: 8192 for hf, 65536 for vllm).")  # fmt: skip
@click.option("--device", default=EXTRACT["device"], show_default=True)
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default=EXTRACT["backend"], show_default=True)
@click.option("--dtype", "compute_dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default=short_dtype(EXTRACT["compute_dtype"]),
              show_default=True, help="Compute dtype of the target (auto: fp32 on a CPU, incl. vLLM's CPU build; "
              "bf16 on a GPU).")  # fmt: skip
@click.option("--enforce-eager/--no-enforce-eager", default=None,
              help="vLLM backend: no torch.compile / CUDA graphs (default: eager on vLLM's CPU build only).")
@click.option("--rank", type=int, default=EXTRACT["rank"], help="This worker (default: $RANK, $SLURM_PROCID, 0).")
@click.option("--world-size", type=int, default=EXTRACT["world_size"], help="Workers (default: $WORLD_SIZE, $SLURM_NTASKS, 1).")
@click.option("--tensor-parallel-size", type=int, default=1, show_default=True, help="vLLM backend only.")
@click.option("--gpu-memory-utilization", type=float, default=0.85, show_default=True, help="vLLM backend only.")
@click.option("--max-num-seqs", type=int, default=64, show_default=True, help="vLLM backend concurrency.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def extract(**kw) -> None:
    """Run the target once over chat data and write a sharded feature store."""
    # stdout holds the summary only (`--json` parses); vLLM logs to stdout unless told otherwise
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    from pipeline.extract.runner import run_extract
    from pipeline.extract.vllm_backend import VLLMEngineDied, VLLMRequestError
    from pipeline.store import StoreError

    dtype = DTYPE_NAMES[kw["hidden_dtype"]]
    fim = tuple(kw["fim_tokens"].split(",")) if kw["fim_tokens"] else None
    if fim is not None and len(fim) != 3:
        raise click.BadParameter("--fim-tokens needs exactly three comma-separated tokens")
    backend_options = {}
    if kw["backend"] == "vllm":
        backend_options = {"tensor_parallel_size": kw["tensor_parallel_size"],
                           "gpu_memory_utilization": kw["gpu_memory_utilization"],
                           "max_num_seqs": kw["max_num_seqs"], "enforce_eager": kw["enforce_eager"]}  # fmt: skip
    compute_dtype = DTYPE_NAMES.get(kw["compute_dtype"], "auto")
    cfg = ExtractConfig(
        out=kw["out"], model=kw["model"], data=kw["data"], data_field=kw["data_field"], thinking=kw["thinking"],
        kind=kw["kind"], offset=kw["offset"], limit=kw["limit"],
        ids_file=kw["ids_file"], max_length=kw["max_length"], top_k=kw["top_k"], hidden_dtype=dtype,
        aux_dtype=DTYPE_NAMES.get(kw["aux_dtype"], kw["aux_dtype"]),
        logprob_dtype=DTYPE_NAMES[kw["logprob_dtype"]], io_workers=kw["io_workers"],
        aux_projection=_projection(kw["aux_projection"]), calibration_tokens=kw["calibration_tokens"],
        stored_for=kw["stored_for"], aux_layers=_ints(kw["aux_layers"]), shard_size=kw["shard_size"],
        chunk_tokens=kw["chunk_tokens"], codec=kw["codec"], batch_tokens=kw["batch_tokens"], device=kw["device"],
        compute_dtype=compute_dtype, backend=kw["backend"], rank=kw["rank"], world_size=kw["world_size"], progress=not kw["no_progress"],
        backend_options=backend_options,
    )  # fmt: skip
    if fim is not None:
        cfg.fim_tokens = fim
    try:
        summary = run_extract(cfg)
    except (StoreError, ValueError, FileNotFoundError, VLLMRequestError) as e:
        _fail(str(e))
    except VLLMEngineDied as e:
        _fail(f"{e}. The shards committed before it are kept: run the same command again to resume.")
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
    for name, p in s.get("projection", {}).items():
        lines.insert(-2, f"projection       {name} = P·x{_scaled(p)}, k={p['k']} of {p['input_width']}, kept energy {p['energy']:.2%} "
                         f"of {p['calibration']['rows']:,} calibration tokens")  # fmt: skip
    for r in s["shards"].get("repaired", []):
        lines.append(f"repaired         shard {r['shard']} ({r['problem']}); the damaged copy is {r['set_aside']}")
    if s.get("repaired_target"):
        lines.append(f"repaired         target/ ({s['repaired_target'][0]}): rewritten from the model")
    if s.get("repaired_store_file"):
        lines.append(f"repaired         store.arrow ({s['repaired_store_file']}): rewritten from this run")
    if s["shards"].get("committed_by_another_process"):
        lines.append(f"shared           {s['shards']['committed_by_another_process']} shard(s) were committed by "
                     "another process writing this store at the same time")  # fmt: skip
    if s.get("cleaned_leftovers"):
        lines.append(f"cleaned          {len(s['cleaned_leftovers'])} temporary file(s) of dead writers: "
                     + ", ".join(s["cleaned_leftovers"][:5]))  # fmt: skip
    for w in s.get("warnings", []):
        lines.append(f"warning          {w}")
    if src.get("truncated"):
        lines.append(f"source           {src['path']} is truncated at byte {src['truncated_at_byte']:,}: "
                     f"used the {src['records_seen']:,} complete records before it")  # fmt: skip
    return "\n".join(lines)


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--sample", "samples", type=int, multiple=True,
              help="Print stored sample N as text, its loss-bearing tokens between ⟦ ⟧ (repeatable).")
def inspect(store: Path, as_json: bool, samples: tuple[int, ...]) -> None:
    """Summarize a feature store: fingerprint, counts, bytes per field, shard status."""
    from pipeline.store import StoreError, inspect_store
    from pipeline.store.inspect import sample_text

    try:
        if samples:
            shown = [sample_text(store, n) for n in samples]
        else:
            info = inspect_store(store)
    except StoreError as e:
        _fail(str(e))
    if samples:
        if as_json:
            click.echo(json.dumps(shown, indent=2, ensure_ascii=False))
        for s in [] if as_json else shown:
            click.echo(f"sample {s['sample']}  record {s['record_id']!r} (source #{s['source_index']})  "
                       f"{s['tokens']} tokens, {s['loss_tokens']} loss tokens (between ⟦ ⟧)")  # fmt: skip
            click.echo(s["text"])
        return
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
               f"hidden dtype={fp['dtypes']['hidden']}"
               + (f" (aux {info['aux_dtype']})" if info["aux_dtype"] not in (None, fp["dtypes"]["hidden"]) else "")
               + f"  top-k={fp['top_k']}  max_length={fp['max_length']}")  # fmt: skip
    for name, p in info["projection"].items():
        click.echo(f"projection   {name} = P·x{_scaled(p)}, k={p['k']} of {p['input_width']} ({p['method']}, kept energy "
                   f"{p['energy']:.2%} of {p['calibration']['rows']:,} calibration tokens)")  # fmt: skip
    click.echo(f"data         {fp['data']['path']}  ({fp['data']['format']}/{fp['data']['kind']}, "
               f"selection {fp['data']['selection']})")  # fmt: skip
    click.echo(f"samples      {info['samples']}   tokens {info['tokens']}   loss tokens {info['loss_tokens']} "
               f"({info['loss_token_share']:.1%})")  # fmt: skip
    share = info["loss_token_share_per_sample"]
    if share["samples"]:
        click.echo(f"loss share   per sample: min {share['min']:.1%}  p5 {share['p5']:.1%}  median {share['median']:.1%}"
                   f"  p95 {share['p95']:.1%}  max {share['max']:.1%}; {share['outside_bounds_count']} outside "
                   f"[{share['bounds'][0]:.0%}, {share['bounds'][1]:.0%}]"
                   + "".join(f"  #{o['sample']}={o['share']:.1%}" for o in share["outside_bounds"][:5]))  # fmt: skip
    click.echo(f"skipped      {sum(info['skipped'].values())} {info['skipped']}   quarantined {info['quarantined']}")
    click.echo(f"bytes        {info['bytes']:,} total, target pieces {info['target_bytes']:,}; "
               f"{info['bytes_per_token_total']:.1f} B/token (tensors + shard metadata, codec {info['codec']})")
    for name, b in info["bytes_per_field"].items():
        click.echo(f"  {name:<16} {b:>14,} B  {b / tokens:>10.1f} B/token")
    verify = info["last_verify"]
    click.echo("verify       " + ("never run" if verify is None else ("ok" if verify["ok"] else
               f"FAILED ({len(verify['problems'])} problems)")))  # fmt: skip
    for p in info["target_problems"]:
        click.echo(f"target       DAMAGED {p}")
    click.echo(f"fingerprint  {info['fingerprint_digest']}")
    click.echo("shards")
    for s in info["shards"]:
        click.echo(f"  {s['shard']:>5}  {s['status']:<12} {s['samples']:>6} samples {s['tokens']:>9} tokens "
                   f"{s['bytes']:>14,} B" + (f"  {s['problems'][0]}" if s.get("problems") else ""))  # fmt: skip
    if info["leftovers"]:
        from pipeline.store import describe_leftover

        click.echo("leftovers")
        for item in info["leftovers"]:
            click.echo(f"  {describe_leftover(item)}")


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="New store directory.")
@click.option("--hidden-dtype", type=click.Choice(HIDDEN_CHOICES), default=None, help="Default: the source's.")
@click.option("--aux-dtype", type=click.Choice(AUX_CHOICES), default=None,
              help="EAGLE-3 features' dtype (auto: q19 when projected, int7 for a format 3-4 projection). Default: "
              "the source's.")  # fmt: skip
@click.option("--logprob-dtype", type=click.Choice(["fp32", "fp16"]), default=None, help="Default: the source's.")
@click.option("--codec", type=click.Choice(CODEC_CHOICES), default=None, help="Default: the source's.")
@click.option("--aux-projection", default="keep", show_default=True,
              help="EAGLE-3 features as P·x: keep (the source's), auto (k = 2H), none, or k.")
@click.option("--calibration-tokens", type=int, default=EXTRACT["calibration_tokens"], show_default=True,
              help="Tokens of the first samples that estimate a new projection.")
@click.option("--compact", is_flag=True,
              help="The layout `pipeline extract` writes by default (projection auto, q19 EAGLE-3 and fp8 EAGLE-1 "
              "features, codec auto, fp16 log-probs); "
              "flags given as well win.")  # fmt: skip
@click.option("--no-progress", is_flag=True)
def convert(store: Path, out: Path, hidden_dtype: str | None, aux_dtype: str | None, logprob_dtype: str | None,
            codec: str | None, aux_projection: str, calibration_tokens: int, compact: bool,
            no_progress: bool) -> None:  # fmt: skip
    """Re-encode a complete store with other dtypes / codec / projection (e.g. an older or bf16 store into the
    compact default: --compact) without the target."""
    from pipeline.store import StoreError, reencode_store

    if compact:
        hidden_dtype = hidden_dtype or short_dtype(EXTRACT["hidden_dtype"])
        logprob_dtype = logprob_dtype or short_dtype(EXTRACT["logprob_dtype"])
        codec = codec or EXTRACT["codec"]
        aux_dtype = aux_dtype or EXTRACT["aux_dtype"]
        aux_projection = EXTRACT["aux_projection"] if aux_projection == "keep" else aux_projection
    try:
        info = reencode_store(store, out, hidden_dtype=DTYPE_NAMES.get(hidden_dtype), codec=codec,
                              aux_dtype=DTYPE_NAMES.get(aux_dtype, aux_dtype),
                              logprob_dtype=DTYPE_NAMES.get(logprob_dtype), progress=not no_progress,
                              aux_projection="keep" if aux_projection == "keep" else _projection(aux_projection),
                              calibration_tokens=calibration_tokens)  # fmt: skip
    except StoreError as e:
        _fail(str(e))
    click.echo(f"{out}: {info['samples']} samples, {info['tokens']} tokens, hidden {info['hidden_dtype']}, "
               f"codec {info['codec']}, {info['bytes_per_token_total']:.1f} B/token")


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
def verify(store: Path) -> None:
    """Recompute checksums and check index/tensor consistency; non-zero exit names every bad shard. Temporary
    files of dead writers and set-aside shards are listed as notes."""
    from pipeline.store import StoreError, describe_leftover, find_leftovers, record_verify, verify_store

    problems = verify_store(store, write_result=False)  # report first: recording may fail (a full disk)
    for p in problems:
        click.echo(f"BAD  {p}", err=True)
    for item in find_leftovers(store):
        click.echo(f"NOTE {describe_leftover(item)}", err=True)
    verdict = f"verify: {len(problems)} problem(s) in {store}" if problems else f"verify: {store} ok"
    click.echo(verdict, err=bool(problems))  # printed before it is recorded: recording may fail
    try:
        record_verify(store, problems)
    except (StoreError, OSError) as e:
        cause = e if isinstance(e, OSError) else e.__cause__
        if getattr(cause, "errno", None) in (errno.EROFS, errno.EACCES, errno.EPERM):
            # a store this process may only read (a read-only mount, another user's): the verdict stands
            click.echo(f"note: the verdict was not recorded in {store / 'verify.arrow'} ({cause.strerror}): "
                       "training reads only what is recorded, so run `pipeline verify` where the store is "
                       "writable to record it", err=True)  # fmt: skip
        else:
            _fail(f"the result was not recorded in verify.arrow: {e}")
    if problems:
        sys.exit(1)


@main.command()
@click.option("--feats", required=True, type=click.Path(exists=True, file_okay=False), help="Feature store.")
@click.option("--variant", type=_DraftHeads(), default=TRAIN["variant"], show_default=True,
              help="Draft head (a registered one; PIPELINE_PLUGINS=module.path,... adds more).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (only this is written).")
@click.option("--epochs", type=float, default=TRAIN["epochs"], show_default=True)
@click.option("--max-steps", type=int, default=TRAIN["max_steps"], help="Optimizer steps (overrides --epochs).")
@click.option("--lr", type=float, default=TRAIN["lr"], show_default=True, help="Peak learning rate.")
@click.option("--warmup-steps", type=int, default=TRAIN["warmup_steps"], help="Linear warmup (default 5%% of steps, max 2000).")
@click.option("--seed", type=int, default=TRAIN["seed"], show_default=True)
@click.option("--tokens-per-batch", type=int, default=TRAIN["tokens_per_batch"], show_default=True, help="Tokens per packed row.")
@click.option("--no-packing", is_flag=True, help="One sample per row, padded (for comparison).")
@click.option("--shuffle", type=click.Choice(["auto", "global", "window"]), default=TRAIN["shuffle"], show_default=True,
              help="global: all samples; window: whole chunks, samples mixed inside --shuffle-window chunks "
                   "(auto: window for compressed stores).")
@click.option("--shuffle-window", type=int, default=TRAIN["shuffle_window"], show_default=True,
              help="Chunks per window of the window shuffle (memory: see storage_layout.md).")
@click.option("--grad-accum", type=int, default=TRAIN["grad_accum"], show_default=True)
@click.option("--clip", type=float, default=TRAIN["clip"], show_default=True, help="Gradient clipping (norm).")
@click.option("--zero-stage", type=click.IntRange(0, 3), default=TRAIN["zero_stage"], show_default=True)
@click.option("--deepspeed", "deepspeed_json", default=None, type=click.Path(exists=True, dir_okay=False),
              help="DeepSpeed JSON; its keys override the flags.")  # fmt: skip
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default=TRAIN["precision"], show_default=True)
@click.option("--save-every", type=int, default=TRAIN["save_every"], show_default=True, help="Checkpoint every N steps (0: end only).")
@click.option("--keep-last", type=int, default=TRAIN["keep_last"], show_default=True, help="Checkpoints kept.")
@click.option("--log-every", type=int, default=TRAIN["log_every"], show_default=True)
@click.option("--eval-every", type=int, default=TRAIN["eval_every"], show_default=True, help="Held-out eval every N steps (0: end).")
@click.option("--val-fraction", type=float, default=TRAIN["val_fraction"], show_default=True, help="Share of samples held out.")
@click.option("--target", type=click.Choice(["topk", "full"]), default=TRAIN["target"], show_default=True,
              help="Token targets: stored top-k log-probs, or the exact softmax of lm_head(hidden_last).")  # fmt: skip
@click.option("--noise", type=click.Choice(["uniform", "gaussian", "none"]), default=TRAIN["noise"],
              help="Feature noise (default: uniform for eagle1, none for eagle3).")  # fmt: skip
@click.option("--noise-std", type=float, default=TRAIN["noise_std"], show_default=True)
@click.option("--noise-scale-by-length", is_flag=True, help="Reference EAGLE-1 noise: scale by 512/L.")
@click.option("--v-weight", type=float, default=TRAIN["v_weight"], show_default=True, help="EAGLE-1 feature-regression weight.")
@click.option("--p-weight", type=float, default=TRAIN["p_weight"], show_default=True, help="EAGLE-1 token-loss weight.")
@click.option("--ttt-steps", type=int, default=TRAIN["ttt_steps"], show_default=True, help="EAGLE-3 training-time-test length.")
@click.option("--step-decay", type=float, default=TRAIN["step_decay"], show_default=True, help="EAGLE-3 per-step loss decay.")
@click.option("--draft-vocab-size", type=int, default=TRAIN["draft_vocab_size"], show_default=True, help="EAGLE-3 (capped at V).")
@click.option("--head-init", type=click.Choice(["random", "target"]), default=TRAIN["head_init"], show_default=True,
              help="EAGLE-3 lm_head/norm start: random, or the target's lm_head rows of the draft vocabulary.")  # fmt: skip
@click.option("--loss-tokens", type=click.Choice(["assistant", "all"]), default=TRAIN["loss_tokens"], show_default=True,
              help="Tokens that carry the training loss (held-out metrics always use assistant tokens).")  # fmt: skip
@click.option("--activation-checkpointing", is_flag=True)
@click.option("--compile", "compile_layers", is_flag=True,
              help="torch.compile the draft layer's attention-free blocks (default eager: on the 2-core CPU the "
                   "~1 minute compile outweighs a few % per step; README 'Training speed').")  # fmt: skip
@click.option("--integrity", type=click.Choice(["open", "read", "full"]), default=TRAIN["integrity"], show_default=True,
              help="Store checks: open (sizes, metadata, index; milliseconds), read (+ each chunk's checksum on its "
                   "first read), full (re-hash the whole store first).")  # fmt: skip
@click.option("--verify-checksums", is_flag=True, help="Same as --integrity full.")
@click.option("--wandb-project", default=TRAIN["wandb_project"], help="wandb project (WANDB_MODE respected; offline by default).")
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
    start = s.get("start_step", 0)
    ran = f"steps {start + 1}-{s['steps']} of a resumed run" if start else f"{s['steps']} steps"
    if start and start >= s["steps"]:
        ran = f"all {s['steps']} steps were done before this resume, which wrote what was left"
    lines = [f"run              {s['run_dir']}  ({ran}, {s['world_size']} rank(s), {s['wall_s']} s)",
             f"packing waste    {s['packing_waste']:.1%}"]  # fmt: skip
    for k in keys:
        lines.append(f"{k:<16} {first.get(k, float('nan')):.4f} (step {first.get('step', start + 1)}) -> "
                     f"{last[k]:.4f} (step {last.get('step', s['steps'])})")
    if last:
        lines.append(f"throughput       {last['tokens_per_s']:.0f} tokens/s, loader wait {last['loader_wait_s']:.3f} s "
                     f"of {last['step_s']:.3f} s per step")  # fmt: skip
    if s.get("store_moved_from"):
        lines.append(f"store            moved since the run started (was {s['store_moved_from']}; same fingerprint)")
    if s.get("cleaned_leftovers"):
        lines.append(f"cleaned          {len(s['cleaned_leftovers'])} temporary file(s) of dead writers: "
                     + ", ".join(s["cleaned_leftovers"][:5]))  # fmt: skip
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
    note = json.loads((Path(path) / "config.json").read_text())["pipeline"].get("aux_layer_note")
    if note:
        click.echo(f"note: {note}")


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

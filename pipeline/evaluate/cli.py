"""``pipeline eval``: speculative decoding with a trained head against plain decoding of the same prompts."""

from __future__ import annotations

import json
from pathlib import Path

import click

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@click.command("eval")
@click.option("--draft", "draft_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Export directory of the draft head (`pipeline export`).")  # fmt: skip
@click.option("--model", default=None, type=click.Path(path_type=Path),
              help="Target HF model directory (default: the target recorded with the draft).")  # fmt: skip
@click.option("--bench", type=click.Choice(["mt-bench"]), default=None, help="Built-in prompts (default mt-bench).")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='JSONL of {"prompt": str} | {"turns": [...]} | {"messages": [...]}.')  # fmt: skip
@click.option("--limit", type=int, default=None, help="Evaluate the first N prompts only.")
@click.option("--mode", type=click.Choice(["chain", "tree"]), default="chain", show_default=True)
@click.option("--depth", type=int, default=5, show_default=True, help="Chain length / maximal tree depth.")
@click.option("--top-k", type=int, default=8, show_default=True, help="Tree: children per expanded node.")
@click.option("--total-tokens", type=int, default=60, show_default=True, help="Tree: drafted nodes verified.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy (lossless check).")
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON report (a PNG is written next to it); default ./eval-<draft>-<mode>.json.")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N].")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="fp32", show_default=True,
              help="Target and draft dtype (bf16/fp16 may flip near-tied argmaxes: not bit-exact).")  # fmt: skip
@click.option("--compare", nargs=2, type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Print two reports side by side and exit.")  # fmt: skip
@click.option("--threads", type=int, default=None,
              help="CPU threads for torch (default: torch's choice; on a busy CPU 1 can be much faster).")  # fmt: skip
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def eval_command(draft_dir, model, bench, prompts_file, limit, mode, depth, top_k, total_tokens, temperature,
                 max_new_tokens, report_path, seed, device, dtype, compare, threads, no_progress) -> None:  # fmt: skip
    """Speculative decoding with a trained EAGLE draft head: tau, per-position acceptance, speedup, losslessness.

    tau counts tokens per target verification forward including the bonus token; the prefill forward and the
    first token it yields are not counted (see the report's acceptance_length_convention).
    """
    from pipeline.evaluate.report import compare_reports

    if compare:
        a, b = (json.loads(Path(p).read_text()) for p in compare)
        click.echo(compare_reports(a, b, (Path(compare[0]).name, Path(compare[1]).name)))
        return
    if draft_dir is None:
        raise click.UsageError("--draft EXPORT_DIR is required (or --compare REPORT_A REPORT_B)")
    if bench and prompts_file:
        raise click.UsageError("use --bench or --prompts, not both")
    if max_new_tokens < 1:
        raise click.UsageError("--max-new-tokens must be >= 1")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        report, path, png = evaluate(draft_dir, model=model, bench=bench, prompts=prompts_file, limit=limit,
                                     mode=mode, depth=depth, top_k=top_k, total_tokens=total_tokens,
                                     temperature=temperature, max_new_tokens=max_new_tokens,
                                     report_path=report_path, seed=seed, device=device, dtype=dtype,
                                     progress=not no_progress)  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    from pipeline.evaluate.report import format_summary

    click.echo(format_summary(report))
    click.echo(f"report     {path}  (plot {png})")


def evaluate(draft_dir: str | Path, *, model: str | Path | None = None, bench: str | None = None,
             prompts: str | Path | None = None, limit: int | None = None, mode: str = "chain", depth: int = 5,
             top_k: int = 8, total_tokens: int = 60, temperature: float = 0.0, max_new_tokens: int = 256,
             report_path: str | Path | None = None, seed: int = 0, device: str = "auto", dtype: str = "fp32",
             progress: bool = True) -> tuple[dict, Path, Path]:  # fmt: skip
    """The whole `pipeline eval` run; returns (report, JSON path, PNG path)."""
    import torch

    from pipeline import __version__
    from pipeline.evaluate.drafter import DraftSettings
    from pipeline.evaluate.prompts import load_conversations
    from pipeline.evaluate.report import build_report, write_report
    from pipeline.evaluate.runner import check_pair, load_drafter, resolve_target_path, run_eval
    from pipeline.evaluate.target import load_target, stop_token_ids

    settings = DraftSettings(mode=mode, depth=depth, top_k=top_k, total_tokens=total_tokens, temperature=temperature)
    dev, torch_dtype = _device(device), getattr(torch, DTYPES[dtype])
    drafter, meta = load_drafter(draft_dir, dev, torch_dtype)
    target_dir = resolve_target_path(meta, model)
    target, tokenizer = load_target(target_dir, dev, torch_dtype)
    config_match = check_pair(target, drafter, target_dir, meta)
    conversations = load_conversations(bench, prompts, limit)
    stop_ids = stop_token_ids(tokenizer, getattr(target, "generation_config", None), target.config)
    records = run_eval(target, tokenizer, drafter, conversations, settings, max_new_tokens, stop_ids, seed, progress)
    report = build_report(
        records,
        settings={**vars(settings), "max_new_tokens": max_new_tokens, "seed": seed, "device": str(dev),
                  "dtype": dtype, "cpu_threads": torch.get_num_threads(), "prompts": str(prompts) if prompts else (bench or "mt-bench"), "limit": limit,
                  "stop_token_ids": sorted(stop_ids), "code_version": __version__},
        draft={"path": str(Path(draft_dir).resolve()), "variant": meta["variant"], "fmt": meta.get("fmt"),
               "aux_layer_ids": meta.get("aux_layer_ids"), "recorded_target": meta.get("target")},
        target={"path": str(Path(target_dir).resolve()), "name": Path(target_dir).name,
                "num_layers": target.config.num_hidden_layers, "config_matches_recorded": config_match},
    )  # fmt: skip
    if report_path is None:
        report_path = Path(f"eval-{Path(draft_dir).resolve().name}-{mode}.json")
    path, png = write_report(report, report_path)
    return report, path, png

"""``pipeline eval``: speculative decoding with a trained head against plain decoding of the same prompts."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.evaluate.drafter import DraftSettings
from pipeline.options import defaults

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DRAFT = defaults(DraftSettings)  # chain/tree option defaults: one source


@click.command("eval")
@click.option("--draft", "draft_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Export directory of the draft head (`pipeline export`).")  # fmt: skip
@click.option("--model", default=None, type=click.Path(path_type=Path),
              help="Target HF model directory (default: the target recorded with the draft).")  # fmt: skip
@click.option("--bench", type=click.Choice(["mt-bench"]), default=None, help="Built-in prompts (default mt-bench).")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='JSONL of {"prompt": str} | {"turns": [...]} | {"messages": [...]}.')  # fmt: skip
@click.option("--limit", type=int, default=None, help="Evaluate the first N prompts only.")
@click.option("--mode", type=click.Choice(["chain", "tree"]), default=DRAFT["mode"], show_default=True)
@click.option("--depth", type=int, default=DRAFT["depth"], show_default=True, help="Chain length / maximal tree depth.")
@click.option("--top-k", type=int, default=DRAFT["top_k"], show_default=True, help="Tree: children per expanded node.")
@click.option("--total-tokens", type=int, default=DRAFT["total_tokens"], show_default=True, help="Tree: drafted nodes verified.")
@click.option("--temperature", type=float, default=DRAFT["temperature"], show_default=True, help="0: greedy (lossless check).")
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON report (a PNG is written next to it); default ./eval-<draft>-<mode>.json.")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N].")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="fp32", show_default=True,
              help="Target and draft dtype (bf16/fp16 may flip near-tied argmaxes: not bit-exact).")  # fmt: skip
@click.option("--compare", nargs=2, type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Print two reports side by side and exit.")  # fmt: skip
@click.option("--policy", type=click.Choice(["adaptive", "fixed"]), default="adaptive", show_default=True,
              help="adaptive: draft and verify only what pays for itself on this machine (--depth/--total-tokens "
                   "are maxima); fixed: always --depth / --total-tokens.")  # fmt: skip
@click.option("--costs", "costs_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Cost model JSON for --policy adaptive (default: measured once per machine, cached).")  # fmt: skip
@click.option("--recalibrate", is_flag=True, help="Measure the cost model again (and cache it).")
@click.option("--baselines", default="generate,prompt_lookup", show_default=True,
              help="Also decode with these, same prompts, same run: generate, prompt_lookup ('' for none).")  # fmt: skip
@click.option("--linears", type=click.Choice(["auto", "skinny", "stock"]), default="auto", show_default=True,
              help="skinny: on the CPU, the target's and draft's linears over few rows run as W @ x^T; stock: "
                   "transformers' x @ W^T; auto: whichever verifies 2-8 tokens faster here, measured at start-up "
                   "(which wins depends on the CPU: bench/verify_cost.py). The baselines run the same model.")  # fmt: skip
@click.option("--threads", type=int, default=None,
              help="CPU threads for torch (default: torch's choice; on a busy CPU 1 can be much faster).")  # fmt: skip
@click.option("--engine", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True,
              help="hf: the project's evaluator; vllm: the head served by vLLM's speculative decoding (chain, "
              "num_speculative_tokens = --depth every step, i.e. --policy fixed), vLLM's own counters, against plain "
              "vLLM decoding.")  # fmt: skip
@click.option("--enforce-eager/--no-enforce-eager", default=None,
              help="--engine vllm: no torch.compile / CUDA graphs (default: eager on vLLM's CPU build only).")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Time every decoding this many times (alternating, identical outputs) and keep the fastest of "
                   "each: steadier speedups on a shared machine.")  # fmt: skip
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def eval_command(draft_dir, model, bench, prompts_file, limit, mode, depth, top_k, total_tokens, temperature,
                 max_new_tokens, report_path, seed, device, dtype, compare, policy, costs_file, recalibrate, baselines,
                 linears, threads, engine, enforce_eager, repeats, no_progress) -> None:  # fmt: skip
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
    if engine == "vllm":
        from pipeline.extract.vllm_backend import VLLMEngineDied, VLLMNotInstalledError

        if mode != "chain":
            raise click.UsageError("--engine vllm evaluates chain drafting only (--mode chain)")
        try:
            report, path, png = evaluate_with_vllm(draft_dir, model=model, bench=bench, prompts=prompts_file,
                                                   limit=limit, depth=depth, temperature=temperature,
                                                   max_new_tokens=max_new_tokens, report_path=report_path, seed=seed,
                                                   dtype=dtype, enforce_eager=enforce_eager,
                                                   progress=not no_progress)  # fmt: skip
        except (ValueError, FileNotFoundError, VLLMNotInstalledError, VLLMEngineDied) as e:
            raise click.ClickException(str(e)) from e
        from pipeline.evaluate.report import format_summary

        click.echo(format_summary(report))
        click.echo(f"report     {path}  (plot {png})")
        return
    try:
        report, path, png = evaluate(draft_dir, model=model, bench=bench, prompts=prompts_file, limit=limit,
                                     mode=mode, depth=depth, top_k=top_k, total_tokens=total_tokens,
                                     temperature=temperature, max_new_tokens=max_new_tokens,
                                     report_path=report_path, seed=seed, device=device, dtype=dtype,
                                     policy=policy, costs=costs_file, recalibrate=recalibrate,
                                     baselines=_baselines(baselines), linears=linears, repeats=repeats,
                                     progress=not no_progress)  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    from pipeline.evaluate.report import format_summary

    click.echo(format_summary(report))
    click.echo(f"report     {path}  (plot {png})")


def _baselines(value: str) -> tuple[str, ...]:
    from pipeline.evaluate.runner import BASELINES

    names = tuple(v.strip().replace("-", "_") for v in value.split(",") if v.strip())
    unknown = set(names) - set(BASELINES)
    if unknown:
        raise click.BadParameter(f"unknown baseline(s) {sorted(unknown)}; choose from {', '.join(BASELINES)}")
    return names


def evaluate(draft_dir: str | Path, *, model: str | Path | None = None, bench: str | None = None,
             prompts: str | Path | None = None, limit: int | None = None, mode: str = DRAFT["mode"],
             depth: int = DRAFT["depth"], top_k: int = DRAFT["top_k"], total_tokens: int = DRAFT["total_tokens"],
             temperature: float = DRAFT["temperature"], max_new_tokens: int = 256,
             report_path: str | Path | None = None, seed: int = 0, device: str = "auto", dtype: str = "fp32",
             policy: str = "adaptive", costs: str | Path | None = None, recalibrate: bool = False,
             baselines: tuple[str, ...] | None = None, linears: str = "auto", repeats: int = 1,
             progress: bool = True) -> tuple[dict, Path, Path]:  # fmt: skip
    """The whole `pipeline eval` run; returns (report, JSON path, PNG path)."""
    import torch

    from pipeline import __version__
    from pipeline.compute import pick_device
    from pipeline.evaluate.drafter import DraftSettings
    from pipeline.evaluate.prompts import load_conversations
    from pipeline.evaluate.report import build_report, write_report
    from pipeline.evaluate.runner import BASELINES, check_pair, load_drafter, resolve_target_path, run_eval
    from pipeline.evaluate.target import load_target, set_linears, stop_token_ids

    settings = DraftSettings(mode=mode, depth=depth, top_k=top_k, total_tokens=total_tokens, temperature=temperature)
    dev, torch_dtype = pick_device(device), getattr(torch, DTYPES[dtype])
    drafter, meta = load_drafter(draft_dir, dev, torch_dtype)
    target_dir = resolve_target_path(meta, model)
    target, tokenizer = load_target(target_dir, dev, torch_dtype)
    config_match = check_pair(target, drafter, target_dir, meta)
    linears_ms = None
    if linears == "auto":
        from pipeline.evaluate.budget import pick_linears

        linears, linears_ms = pick_linears(target, drafter)
    elif linears in ("skinny", "stock"):
        set_linears(linears, target, drafter.model)
    else:
        raise ValueError(f"linears must be auto|skinny|stock, not {linears!r}")
    conversations = load_conversations(bench, prompts, limit)
    stop_ids = stop_token_ids(tokenizer, getattr(target, "generation_config", None), target.config)
    budget = None
    if policy == "adaptive":
        from pipeline.evaluate.budget import Budget, load_costs

        budget = Budget(load_costs(target, drafter, f"{dtype}-{linears}", costs, recalibrate))
        recalibrated = _recheck_costs(budget, target, drafter, tokenizer, conversations, f"{dtype}-{linears}", costs)
    elif policy != "fixed":
        raise ValueError(f"policy must be adaptive|fixed, not {policy!r}")
    baselines = BASELINES if baselines is None else baselines
    records = run_eval(target, tokenizer, drafter, conversations, settings, max_new_tokens, stop_ids, seed, progress,
                       budget=budget, baselines=baselines, repeats=repeats)  # fmt: skip
    report = build_report(
        records,
        settings={**vars(settings), "policy": policy, "linears": linears, "linears_ms": linears_ms, "repeats": repeats, "baselines": list(baselines), "max_new_tokens": max_new_tokens, "seed": seed, "device": str(dev),
                  "dtype": dtype, "cpu_threads": torch.get_num_threads(), "prompts": str(prompts) if prompts else (bench or "mt-bench"), "limit": limit,
                  "stop_token_ids": sorted(stop_ids), "code_version": __version__},
        draft={"path": str(Path(draft_dir).resolve()), "variant": meta["variant"], "fmt": meta.get("fmt"),
               "aux_layer_ids": meta.get("aux_layer_ids"), "recorded_target": meta.get("target")},
        target={"path": str(Path(target_dir).resolve()), "name": Path(target_dir).name,
                "num_layers": target.config.num_hidden_layers, "config_matches_recorded": config_match},
    )  # fmt: skip
    if budget is not None:
        from pipeline.evaluate.budget import check_costs

        report["budget"] = {**budget.report(), "cost_check": check_costs(budget.costs, records),
                            "recalibrated": recalibrated}  # fmt: skip
    if report_path is None:
        report_path = Path(f"eval-{Path(draft_dir).resolve().name}-{mode}.json")
    path, png = write_report(report, report_path)
    return report, path, png


def _recheck_costs(budget, target, drafter, tokenizer, conversations, key: str, costs_file) -> dict | None:
    """Time a short plain decoding of the first prompt against the cost model; a stale model (cached under another
    load) is measured again, cached, and drafted by in this evaluation. Returns what was found and done (None: the
    model held, or it came from an explicit --costs file, which is checked at the end but never replaced)."""
    import torch

    from pipeline.evaluate.budget import load_costs, probe_costs
    from pipeline.evaluate.runner import first_prompt

    if costs_file is not None or not conversations:
        return None
    prompt = torch.tensor(first_prompt(tokenizer, conversations), device=drafter.device)
    check = probe_costs(target, prompt, budget.costs)
    if check is None or not check["stale"]:
        return None
    budget.costs = load_costs(target, drafter, key, recalibrate=True)
    return {"probe": check, "old_verify_1_s": check["modelled_step_s"], "new_verify_1_s": budget.costs.verify(1)}


def evaluate_with_vllm(draft_dir: str | Path, *, model: str | Path | None = None, bench: str | None = None,
                       prompts: str | Path | None = None, limit: int | None = None, depth: int = 5,
                       temperature: float = 0.0, max_new_tokens: int = 256, report_path: str | Path | None = None,
                       seed: int = 0, dtype: str = "fp32", enforce_eager: bool | None = None,
                       progress: bool = True) -> tuple[dict, Path, Path]:  # fmt: skip
    """`pipeline eval --engine vllm`: the head served by vLLM against plain vLLM decoding; (report, JSON, PNG)."""
    from pipeline.evaluate.prompts import load_conversations
    from pipeline.evaluate.report import write_report
    from pipeline.evaluate.runner import resolve_target_path
    from pipeline.evaluate.vllm_engine import draft_metadata, engine_options, evaluate_vllm

    meta = draft_metadata(draft_dir)
    target_dir = resolve_target_path(meta, model)
    conversations = load_conversations(bench, prompts, limit)
    options = engine_options(dtype=DTYPES[dtype], enforce_eager=enforce_eager, seed=seed)
    (report,) = evaluate_vllm([draft_dir], target_dir=target_dir, conversations=conversations, depth=depth,
                              temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, options=options,
                              settings_extra={"prompts": str(prompts) if prompts else (bench or "mt-bench"),
                                              "limit": limit}, progress=progress)  # fmt: skip
    if report_path is None:
        report_path = Path(f"eval-{Path(draft_dir).resolve().name}-vllm-chain.json")
    path, png = write_report(report, report_path)
    return report, path, png

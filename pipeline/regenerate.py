"""`pipeline regenerate`: replace a chat dataset's assistant turns with the target model's own responses.

EAGLE drafts are trained to predict the target; training on the target's own outputs (instead of whatever model
wrote the dataset) is what the EAGLE-3 paper does. Conversations are regenerated turn by turn: the first assistant
turn is generated from the (system and) user turns before it, appended, the next user turn appended, the next
assistant turn generated from that history, and so on. Records are processed in lockstep batches (all records of a
batch generate their j-th answer in one call).

Output: JSONL, one line per record, ``{"id": <source id>, "messages": [{"role", "content"}...],
"regenerated_by": {...}}``, which :func:`pipeline.data.read_records` reads like any JSONL chat file.
``regenerated_by`` records the model (path, ``config_sha256``, ``weights_sha256``), backend, dtype, sampling
settings, the source record (path, ordinal, id) and per generated turn its finish reason and token count.

Generated text is decoded with ``skip_special_tokens=False`` up to (not including) the first stop token, so the
extractor re-tokenizes what the model emitted. A conversation whose next prompt plus ``--max-new-tokens`` would
exceed ``--max-length`` ends after its last generated turn (``truncated_turns`` counts what was dropped); a record
that cannot fit even its first turn is skipped (``prompt_too_long``).

Resumable: the output file is opened for appending and records already in it (keyed by source ordinal and id) are
skipped. A last line cut short by a crash is detected and removed before appending. Re-running with a different
model or sampling settings into the same file is refused. Greedy output does not depend on batching; sampled
output is reproducible per record with the vLLM backend (a seed per request) and, with the HF backend, for the
same ``--seed``, ``--batch-size`` and selection run from scratch (one seed per batch call).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

import click
from tqdm import tqdm

from pipeline import __version__
from pipeline import data as data_mod
from pipeline.assets import resolve_data, resolve_model
from pipeline.options import DTYPE_NAMES
from pipeline.store import config_sha256

MAX_LISTED_SKIPS = 20


class RegenerateError(ValueError):
    """Bad options or an output file that cannot be resumed."""


@dataclass
class RegenerateConfig:
    out: Path
    model: str | None = None
    data: str | None = None  # anything `--data` of extract reads (pipeline.data.open_source)
    data_field: str | None = None
    thinking: str = "auto"  # keep: the target thinks and its reasoning is kept; drop: thinking off (where a switch)
    offset: int = 0
    limit: int | None = None
    max_new_tokens: int = 512
    temperature: float = 0.0
    backend: str = "hf"
    seed: int = 0
    max_length: int = 4096
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"  # compute dtype: auto (fp32 on a CPU, vLLM's CPU build included), float32, bfloat16, float16
    progress: bool = True
    backend_options: dict = field(default_factory=dict)


@dataclass
class Completion:
    token_ids: list[int]  # generated tokens before the stop token
    finish_reason: str  # "stop" (a stop token ended it) or "length" (max_new_tokens reached)


class Generator(Protocol):
    name: str
    tokenizer: Any
    dtype_name: str

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                 seeds: list[int]) -> list[Completion]: ...  # fmt: skip


def stop_token_ids(model_dir: Path, tokenizer) -> list[int]:
    """The tokens that end a generated turn: the evaluator's rule (:func:`pipeline.evaluate.target.stop_token_ids`:
    eos ids of generation_config.json, config.json and the tokenizer, plus the end-of-turn tokens the tokenizer
    has), so a regenerated answer ends where an evaluated one does, also for models whose configured eos is not
    the chat template's end-of-turn token."""
    from pipeline.evaluate.target import stop_token_ids as turn_stop_ids

    configs = [SimpleNamespace(eos_token_id=json.loads(p.read_text()).get("eos_token_id")) if p.exists() else None
               for p in (model_dir / "generation_config.json", model_dir / "config.json")]  # fmt: skip
    ids = turn_stop_ids(tokenizer, *configs)
    if not ids:
        raise RegenerateError(f"{model_dir}: no eos token id in generation_config.json, config.json or the tokenizer")
    return sorted(ids)


def cut_at_stop(tokens: list[int], stops: set[int]) -> Completion:
    for i, t in enumerate(tokens):
        if t in stops:
            return Completion(tokens[:i], "stop")
    return Completion(list(tokens), "length")


class HFGenerator:
    """transformers ``generate`` with its KV cache, left-padded batches."""

    name = "hf"

    def __init__(self, model_dir: str | os.PathLike, device: str = "auto", compute_dtype: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline.compute import compute_dtype_name, pick_device

        self.model_dir = Path(model_dir)
        self.device = pick_device(device)
        compute_dtype = compute_dtype_name(compute_dtype, self.device)
        self.dtype_name = compute_dtype
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=getattr(torch, compute_dtype))
        self.model.to(self.device).eval()
        self.stops = stop_token_ids(self.model_dir, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stops[0]

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                 seeds: list[int]) -> list[Completion]:  # fmt: skip
        import torch
        from transformers import GenerationConfig

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's next token lands in the same column
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else \
            {"do_sample": False}  # fmt: skip
        gen = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=self.stops, pad_token_id=self.pad_id,
                               **sampling)  # fmt: skip
        if temperature > 0:
            torch.manual_seed(seeds[0])  # one generator for the batch: see the module docstring
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      generation_config=gen)  # fmt: skip
        stops = set(self.stops)
        return [cut_at_stop(row[width:].tolist(), stops) for row in out.cpu()]


class VLLMGenerator:
    """vLLM ``LLM.generate`` over token-id prompts, a seed per request (vLLM's GPU build or its CPU build)."""

    name = "vllm"

    def __init__(self, model_dir: str | os.PathLike, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, max_num_seqs: int = 256, dtype: str = "auto",
                 max_model_len: int | None = None, seed: int = 0, enforce_eager: bool | None = None,
                 **engine_kwargs):  # fmt: skip
        """``dtype``: ``auto`` is fp32 on vLLM's CPU build (as the HF backend computes on a CPU), else vLLM's rule;
        ``enforce_eager`` (no torch.compile / CUDA graphs) defaults to eager on the CPU build only."""
        from transformers import AutoTokenizer

        from pipeline.extract.vllm_backend import check_vllm, resolve_dtype, vllm_on_cpu

        check_vllm()  # a clear message with the install hint instead of an ImportError
        from vllm import LLM, SamplingParams
        self.model_dir = Path(model_dir)
        on_cpu = vllm_on_cpu()
        dtype = resolve_dtype(dtype, json.loads((self.model_dir / "config.json").read_text()), on_cpu)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.stops = stop_token_ids(self.model_dir, self.tokenizer)
        kwargs = {"model": str(self.model_dir), "tensor_parallel_size": tensor_parallel_size,
                  "gpu_memory_utilization": gpu_memory_utilization, "max_num_seqs": max_num_seqs, "dtype": dtype,
                  "seed": seed, "enforce_eager": on_cpu if enforce_eager is None else enforce_eager,
                  **engine_kwargs}  # fmt: skip
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        # Prefix caching stays on (vLLM's default): turn j+1's prompt extends turn j's.
        self.llm = LLM(**kwargs)
        self.dtype_name = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        self._params = SamplingParams

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                 seeds: list[int]) -> list[Completion]:  # fmt: skip
        params = [self._params(max_tokens=max_new_tokens, temperature=temperature,
                               seed=seed if temperature > 0 else None, stop_token_ids=self.stops,
                               skip_special_tokens=False, detokenize=False) for seed in seeds]  # fmt: skip
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        stops = set(self.stops)
        return [cut_at_stop(list(o.outputs[0].token_ids), stops) for o in outs]


def make_generator(cfg: RegenerateConfig, model_dir: Path) -> Generator:
    if cfg.backend == "hf":
        return HFGenerator(model_dir, device=cfg.device, compute_dtype=cfg.dtype)
    if cfg.backend == "vllm":
        options = {"max_model_len": cfg.max_length, "seed": cfg.seed, "dtype": cfg.dtype, **cfg.backend_options}
        return VLLMGenerator(model_dir, **options)
    raise RegenerateError(f"--backend {cfg.backend!r}: choose hf or vllm")


# ---------------------------------------------------------------------------------------------------- output file


def record_key(source_index: int, record_id: str) -> str:
    """Output records are matched to source records by ordinal and id (ids repeat in some datasets)."""
    return f"{source_index}:{record_id}"


def scan_output(path: Path) -> tuple[dict[str, dict], bool]:
    """Keys of the records already in ``path`` (-> their ``regenerated_by``) and whether a cut-off last line was
    removed. A complete line that is not a regenerated record is an error (the file is not ours or is damaged)."""
    if not path.exists():
        return {}, False
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    repaired = end < len(data)
    if repaired:  # a crash mid-write: the last record is incomplete and will be generated again
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    done: dict[str, dict] = {}
    for n, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            src = rec["regenerated_by"]["source"]
            _settings(rec["regenerated_by"])  # present, or the line is not ours
            done[record_key(int(src["index"]), str(src["id"]))] = rec["regenerated_by"]
        except (ValueError, KeyError, TypeError) as e:
            raise RegenerateError(f"{path} line {n} is not a record written by `pipeline regenerate` ({e}); refusing "
                                  "to append to it (use a new --out)") from e  # fmt: skip
    return done, repaired


def _settings(regenerated_by: dict) -> dict:
    """What must agree for records to belong in one output file."""
    return {"model.config_sha256": regenerated_by["model"]["config_sha256"],
            "model.weights_sha256": regenerated_by["model"]["weights_sha256"],
            "sampling": regenerated_by["sampling"], "max_length": regenerated_by["max_length"],
            "thinking": regenerated_by.get("thinking", "auto")}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- driver


@dataclass
class _Conversation:
    record: data_mod.Record
    history: list[dict] = field(default_factory=list)
    cursor: int = 0  # next message of record.messages to consume
    turns: list[dict] = field(default_factory=list)
    truncated_turns: int = 0
    skip: tuple[str, str] | None = None  # (reason, detail)

    def advance(self) -> bool:
        """Copy user/system turns into the history up to the next assistant turn; False when none is left."""
        msgs = self.record.messages
        while self.cursor < len(msgs) and msgs[self.cursor]["role"] != "assistant":
            self.history.append(dict(msgs[self.cursor]))
            self.cursor += 1
        return self.cursor < len(msgs)

    def end_early(self) -> None:
        dropped = sum(1 for m in self.record.messages[self.cursor:] if m["role"] == "assistant")
        self.truncated_turns = dropped
        while self.history and self.history[-1]["role"] != "assistant":
            self.history.pop()  # end on the last generated answer
        self.cursor = len(self.record.messages)


def run_regenerate(cfg: RegenerateConfig, generator: Generator | None = None) -> dict:
    """Regenerate the selected records into ``cfg.out``; returns the summary the CLI prints."""
    t0 = time.time()
    if cfg.max_new_tokens < 1 or cfg.batch_size < 1 or cfg.temperature < 0 or cfg.offset < 0:
        raise RegenerateError("--max-new-tokens and --batch-size must be >= 1, --temperature and --offset >= 0")
    model_dir = resolve_model(cfg.model)
    source = data_mod.open_source(resolve_data(None) if cfg.data is None else cfg.data, cfg.data_field)
    data_path = source.spec
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done, repaired = scan_output(out)

    from transformers import AutoConfig

    from pipeline.extract.runner import weights_sha256

    greedy = cfg.temperature == 0
    base = {
        "model": {"path": str(model_dir.resolve()), "name": model_dir.name,
                  "config_sha256": config_sha256(AutoConfig.from_pretrained(model_dir).to_dict()),
                  "weights_sha256": weights_sha256(model_dir)},
        "sampling": {"temperature": cfg.temperature, "greedy": greedy, "max_new_tokens": cfg.max_new_tokens,
                     "seed": None if greedy else cfg.seed},
        "max_length": cfg.max_length,
        "thinking": cfg.thinking,
        "code_version": __version__,
    }  # fmt: skip
    for key, previous in done.items():
        if _settings(previous) != _settings(base):
            a, b = _settings(previous), _settings(base)
            diffs = [f"{k}: file has {a[k]!r}, this run has {b[k]!r}" for k in a if a[k] != b[k]]
            raise RegenerateError(f"{out} already holds records made with other settings (record {key}); refusing "
                                  "to mix. Differences:\n  " + "\n  ".join(diffs) + "\nUse a new --out.")  # fmt: skip
        break  # every record of the file was checked against the first when it was written

    report = data_mod.StreamReport(path=data_path, format="")
    stream = data_mod.read_records(source, kind="chat", report=report)
    stop = None if cfg.limit is None else cfg.offset + cfg.limit
    selection = itertools.islice(stream, cfg.offset, stop)

    counts: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    skipped_records: list[dict] = []
    stats = {"turns": 0, "new_tokens": 0, "stopped": 0, "truncated_records": 0}

    def note_skip(source_index: int, record_id: str, reason: str, detail: str) -> None:
        skipped[reason] += 1
        if len(skipped_records) < MAX_LISTED_SKIPS:
            skipped_records.append({"source_index": source_index, "record_id": record_id, "reason": reason,
                                    "detail": detail})  # fmt: skip

    bar = tqdm(total=cfg.limit, unit="rec", desc="regenerate", disable=not cfg.progress, dynamic_ncols=True)
    gen = generator
    thinking = data_mod.resolve_thinking(gen.tokenizer, cfg.thinking) if gen is not None else None
    with open(out, "a", encoding="utf-8") as f:
        for batch in _batched(selection, cfg.batch_size):
            todo = []
            for rec in batch:
                counts["selected"] += 1
                if isinstance(rec, data_mod.Skip):
                    note_skip(rec.source_index, rec.record_id, rec.reason, rec.detail)
                elif record_key(rec.source_index, rec.record_id) in done:
                    counts["already_done"] += 1
                else:
                    todo.append(_Conversation(rec))
            if todo:
                if gen is None:  # loaded only once there is work: a finished file re-runs in seconds
                    gen = make_generator(cfg, model_dir)
                    thinking = data_mod.resolve_thinking(gen.tokenizer, cfg.thinking)
                _regenerate_batch(todo, gen, cfg, stats, thinking)
                for conv in todo:
                    rec = conv.record
                    if conv.skip is not None:
                        note_skip(rec.source_index, rec.record_id, *conv.skip)
                        continue
                    meta = dict(base, backend=gen.name, dtype=gen.dtype_name, turns=conv.turns,
                                truncated_turns=conv.truncated_turns,
                                source={"path": str(data_path), "index": rec.source_index, "id": rec.record_id})  # fmt: skip
                    meta["thinking_resolved"] = thinking
                    tools = {"tools": rec.tools} if rec.tools else {}
                    line = json.dumps({"id": rec.record_id, "messages": conv.history, **tools, "regenerated_by": meta},
                                      ensure_ascii=False)  # fmt: skip
                    f.write(line + "\n")
                    counts["written"] += 1
                    stats["truncated_records"] += conv.truncated_turns > 0
                f.flush()
                os.fsync(f.fileno())
            bar.update(len(batch))
    bar.close()
    return {
        "out": str(out), "model": str(model_dir), "data": str(data_path),
        "backend": gen.name if gen is not None else cfg.backend,
        "selected": counts["selected"], "written": counts["written"], "already_done": counts["already_done"],
        "skipped": dict(sorted(skipped.items())), "skipped_records": skipped_records,
        "repaired_partial_line": repaired,
        "turns_generated": stats["turns"], "new_tokens": stats["new_tokens"], "stopped_turns": stats["stopped"],
        "truncated_records": stats["truncated_records"],
        "wall_s": round(time.time() - t0, 2),
        "source": {"format": report.format, "records_seen": report.records_seen, "truncated": report.truncated},
    }  # fmt: skip


def _batched(it, n: int):
    it = iter(it)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _regenerate_batch(convs: list[_Conversation], gen: Generator, cfg: RegenerateConfig, stats: dict,
                      thinking: str) -> None:  # fmt: skip
    """Generate every assistant turn of ``convs`` in lockstep: all j-th answers in one call."""
    tokenizer = gen.tokenizer
    active = [c for c in convs if c.advance()]
    for turn in itertools.count():
        prompts, owners = [], []
        for conv in active:
            try:
                text = data_mod.render_chat(tokenizer, conv.history, thinking=thinking, tools=conv.record.tools)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template wrote any BOS
            except (data_mod.RenderError, TypeError, ValueError) as e:  # a template error: this record only
                conv.skip = ("render_error", f"chat template failed at turn {turn}: {type(e).__name__}: {e}")
                continue
            if len(ids) + cfg.max_new_tokens > cfg.max_length:
                if not conv.turns:
                    conv.skip = ("prompt_too_long", f"the first prompt has {len(ids)} tokens; with "
                                 f"--max-new-tokens {cfg.max_new_tokens} it exceeds --max-length {cfg.max_length}")  # fmt: skip
                else:
                    conv.end_early()
                continue
            prompts.append(ids)
            owners.append(conv)
        if not prompts:
            return
        seeds = [_seed(cfg.seed, c.record.source_index, turn) for c in owners]
        completions = gen.generate(prompts, cfg.max_new_tokens, cfg.temperature, seeds)
        for conv, comp in zip(owners, completions, strict=True):
            content = tokenizer.decode(comp.token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            reasoning, answer = data_mod.split_reasoning(content) if thinking == "keep" else (None, content)
            message = {"role": "assistant", "content": answer}
            if reasoning:  # an empty thinking block is no reasoning (README: Data)
                message["reasoning_content"] = reasoning
            conv.history.append(message)
            conv.turns.append({"finish_reason": comp.finish_reason, "new_tokens": len(comp.token_ids)})
            conv.cursor += 1  # past the source's assistant turn this one replaces
            stats["turns"] += 1
            stats["new_tokens"] += len(comp.token_ids)
            stats["stopped"] += comp.finish_reason == "stop"
        active = [c for c in owners if c.advance()]


def _seed(seed: int, source_index: int, turn: int) -> int:
    # Per record and turn, so that a record's sample does not depend on what it is batched with (vLLM honours it).
    return (seed * 1_000_003 + source_index * 1_009 + turn) % (2**31 - 1)


# ---------------------------------------------------------------------------------------------------- CLI


def format_summary(s: dict) -> str:
    lines = [
        f"output           {s['out']}  (backend {s['backend']})",
        f"records          {s['selected']} selected; {s['written']} written, {s['already_done']} already in the file",
        f"skipped          {sum(s['skipped'].values())}" + "".join(f"  {k}={v}" for k, v in s["skipped"].items()),
        f"turns            {s['turns_generated']} generated ({s['stopped_turns']} ended by a stop token), "
        f"{s['new_tokens']} new tokens; {s['truncated_records']} conversation(s) cut at --max-length",
        f"wall             {s['wall_s']} s",
    ]
    if s["repaired_partial_line"]:
        lines.append("resume           removed a partially written last line (that record was generated again)")
    if s["source"]["truncated"]:
        lines.append(f"source           {s['data']} is truncated: used the {s['source']['records_seen']} complete records")
    return "\n".join(lines)


@click.command("regenerate")
@click.option("--model", default=None, help="HF model directory (default: embedded SmolLM2-135M-Instruct).")
@click.option("--data", default=None, help="Chat data as `pipeline extract --data` reads it (default: embedded ShareGPT).")
@click.option("--data-field", default=None, help="Column / key holding the conversation (default: conversations or messages).")
@click.option("--thinking", type=click.Choice(["auto", "keep", "drop"]), default="auto", show_default=True,
              help="keep: the target thinks where its template can and the reasoning is kept; drop: thinking off.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output JSONL (appended).")
@click.option("--offset", type=int, default=0, show_default=True, help="Skip this many source records.")
@click.option("--limit", type=int, default=None, help="Take at most this many source records.")
@click.option("--max-new-tokens", type=int, default=512, show_default=True, help="Per generated turn.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (unused when greedy).")
@click.option("--max-length", type=int, default=4096, show_default=True,
              help="Prompt + new tokens per turn; longer conversations end after their last fitting turn.")  # fmt: skip
@click.option("--batch-size", type=int, default=None,
              help="Conversations generated in lockstep (default 8 with hf, 256 with vllm).")  # fmt: skip
@click.option("--device", default="auto", show_default=True, help="HF backend device.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="Compute dtype (auto: fp32 on a CPU, vLLM's CPU build included; bf16 on a GPU).")  # fmt: skip
@click.option("--enforce-eager/--no-enforce-eager", default=None,
              help="vLLM backend: no torch.compile / CUDA graphs (default: eager on vLLM's CPU build only).")
@click.option("--tensor-parallel-size", type=int, default=1, show_default=True, help="vLLM backend only.")
@click.option("--gpu-memory-utilization", type=float, default=0.85, show_default=True, help="vLLM backend only.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def regenerate_command(**kw) -> None:
    """Replace the assistant turns of a chat dataset with the target model's own responses (JSONL out)."""
    options = {}
    if kw["backend"] == "vllm":
        options = {"tensor_parallel_size": kw["tensor_parallel_size"],
                   "gpu_memory_utilization": kw["gpu_memory_utilization"], "enforce_eager": kw["enforce_eager"]}  # fmt: skip
    if kw["batch_size"] is None:  # vLLM schedules a large batch itself; HF pads each batch to its longest prompt
        kw["batch_size"] = 256 if kw["backend"] == "vllm" else 8
    cfg = RegenerateConfig(out=kw["out"], model=kw["model"], data=kw["data"], data_field=kw["data_field"],
                           thinking=kw["thinking"], offset=kw["offset"], limit=kw["limit"],
                           max_new_tokens=kw["max_new_tokens"], temperature=kw["temperature"],
                           backend=kw["backend"], seed=kw["seed"], max_length=kw["max_length"],
                           batch_size=kw["batch_size"], device=kw["device"], progress=not kw["no_progress"],
                           dtype=DTYPE_NAMES.get(kw["dtype"], "auto"),
                           backend_options=options)  # fmt: skip
    try:
        summary = run_regenerate(cfg)
    except (RegenerateError, ValueError, FileNotFoundError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    click.echo(json.dumps(summary, indent=2) if kw["as_json"] else format_summary(summary))

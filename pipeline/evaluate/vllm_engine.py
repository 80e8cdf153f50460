"""``pipeline eval --engine vllm``: the exported head served by vLLM's own speculative decoding, same report format.

One vLLM engine without speculation answers every prompt first (the plain-decoding baseline; later turns of a
conversation are asked after its own answer, as the HF evaluator does); then, per draft head, an engine with
``speculative_config={"method": "eagle" | "eagle3", "model": EXPORT, "num_speculative_tokens": depth}`` answers
the same prompt token ids one request at a time. Acceptance comes from vLLM's own counters (``LLM(...,
disable_log_stats=False).get_metrics()``), read before and after every request:

* ``vllm:spec_decode_num_drafts`` = verification forwards (each decoding step verifies one chain of drafts; the
  prefill step is not one) = the report's ``target_forwards``;
* ``vllm:spec_decode_num_accepted_tokens_per_pos[d]`` = steps whose draft at position d+1 was accepted. A chain is
  accepted up to its first rejection, so position d+1 was attempted in the steps that accepted position d:
  ``attempted = [drafts, acc[0], acc[1], ...]``, the HF evaluator's conditional convention; the tokens emitted per
  step (accepted + bonus) follow as a histogram ``acc[j-1] - acc[j]`` steps of j+1 tokens.

The raw counters are kept in the report (``vllm.counters``, and per turn) next to the converted numbers. Greedy
losslessness is checked against the baseline's tokens for the same prompt (``mismatches``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.evaluate.prompts import Conversation, render
from pipeline.evaluate.runner import turn_record
from pipeline.evaluate.target import Generation, TargetError, stop_token_ids

COUNTERS = {"drafts": "vllm:spec_decode_num_drafts", "draft_tokens": "vllm:spec_decode_num_draft_tokens",
            "accepted": "vllm:spec_decode_num_accepted_tokens"}  # fmt: skip
PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


def vllm_method(variant: str) -> str | None:
    """vLLM's ``speculative_config`` method serving a head (None: the head is registered but vLLM has none)."""
    from pipeline.draft import registry

    try:
        return registry.get(variant).vllm_method
    except ValueError:
        return None


@dataclass
class Turn:
    """One prompt as the baseline answered it: the same token ids go to every speculative engine."""

    conv: Conversation
    turn: int
    prompt_ids: list[int]
    baseline: Generation


def draft_metadata(draft_dir: str | Path) -> dict:
    """The ``pipeline`` block of an export's config.json (variant, target, aux ids), without loading weights."""
    path = Path(draft_dir) / "config.json"
    try:
        meta = json.loads(path.read_text()).get("pipeline")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable as an export config ({e})") from e
    if not meta or not meta.get("variant"):
        raise ValueError(f"{path}: not a pipeline export (no 'pipeline.variant')")
    if vllm_method(meta["variant"]) is None:
        raise ValueError(f"{path}: a {meta['variant']!r} head, which vLLM cannot serve (no speculative method)")
    return meta


def spec_counters(llm: Any) -> dict[str, Any]:
    """vLLM's cumulative spec-decode counters of this process (zeros before the first speculative step)."""
    from vllm.v1.metrics.reader import Counter, Vector

    out: dict[str, Any] = {k: 0 for k in COUNTERS}
    out["accepted_per_pos"] = []
    names = {v: k for k, v in COUNTERS.items()}
    for m in llm.get_metrics():
        if isinstance(m, Counter) and m.name in names:
            out[names[m.name]] += int(m.value)
        elif isinstance(m, Vector) and m.name == PER_POS:
            pos = out["accepted_per_pos"]
            pos.extend([0] * (len(m.values) - len(pos)))
            for i, v in enumerate(m.values):
                pos[i] += int(v)
    return out


def counter_delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    pos_b = before["accepted_per_pos"] + [0] * (len(after["accepted_per_pos"]) - len(before["accepted_per_pos"]))
    return {**{k: after[k] - before[k] for k in COUNTERS},
            "accepted_per_pos": [a - b for a, b in zip(after["accepted_per_pos"], pos_b, strict=True)]}  # fmt: skip


def chain_generation(tokens: list[int], wall_s: float, c: dict[str, Any], depth: int) -> Generation:
    """A :class:`Generation` in the HF evaluator's conventions from one request's counter deltas."""
    acc = list(c["accepted_per_pos"][:depth]) + [0] * max(0, depth - len(c["accepted_per_pos"]))
    drafts = c["drafts"]
    attempted = [drafts] + acc[:-1]
    # steps that accepted exactly j drafts: acc[j-1] - acc[j] (acc[-1] = drafts), each emitting j + 1 tokens
    reach = [drafts] + acc + [0]
    lengths = [j + 1 for j in range(depth + 1) for _ in range(max(reach[j] - reach[j + 1], 0))]
    return Generation(tokens=tokens, wall_s=wall_s, target_forwards=drafts, accept_lengths=lengths,
                      attempted=attempted, accepted=acc)  # fmt: skip


class VLLMRunner:
    """One vLLM engine (plain or speculative) answering one token-id prompt at a time."""

    def __init__(self, target_dir: Path, options: dict, speculative_config: dict | None = None):
        from vllm import LLM

        from pipeline.extract.vllm_backend import check_vllm

        self.version = check_vllm()
        start = time.perf_counter()
        self.llm = LLM(model=str(target_dir), disable_log_stats=False, speculative_config=speculative_config,
                       **options)  # fmt: skip
        self.startup_s = time.perf_counter() - start

    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int], temperature: float,
                 seed: int) -> tuple[list[int], float]:  # fmt: skip
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, stop_token_ids=sorted(stop_ids),
                                seed=seed if temperature > 0 else None, detokenize=False)  # fmt: skip
        start = time.perf_counter()
        out = self.llm.generate([{"prompt_token_ids": list(prompt_ids)}], params, use_tqdm=False)
        return list(out[0].outputs[0].token_ids), time.perf_counter() - start

    def close(self) -> None:
        from pipeline.extract.vllm_backend import shutdown_llm

        shutdown_llm(self.llm)
        self.llm = None


def engine_options(dtype: str = "float32", enforce_eager: bool | None = None, seed: int = 0,
                   max_model_len: int | None = None, **extra: Any) -> dict[str, Any]:  # fmt: skip
    """``LLM(...)`` keyword arguments shared by the baseline and the speculative engines."""
    from pipeline.extract.vllm_backend import vllm_on_cpu

    opts = {"dtype": dtype, "seed": seed, "enforce_eager": vllm_on_cpu() if enforce_eager is None else enforce_eager,
            **extra}  # fmt: skip
    if max_model_len is not None:
        opts["max_model_len"] = max_model_len
    return opts


def run_baseline(target_dir: Path, tokenizer, conversations: list[Conversation], options: dict,
                 max_new_tokens: int, stop_ids: set[int], temperature: float, seed: int,
                 progress: bool = True) -> tuple[list[Turn], dict]:  # fmt: skip
    """Plain vLLM decoding of every turn (one engine); returns the turns and the engine's facts."""
    runner = VLLMRunner(target_dir, options)
    try:
        runner.generate(render(tokenizer, [{"role": "user", "content": "Hi"}]), 4, stop_ids, 0.0, seed)  # warm-up
        turns: list[Turn] = []
        for ci, conv in enumerate(tqdm(conversations, desc="vllm plain", unit="prompt", disable=not progress)):
            history = list(conv.messages)
            for ti, ask in enumerate(conv.turns or [None]):
                if ask is not None:
                    history.append({"role": "user", "content": ask})
                ids = render(tokenizer, history)
                tokens, wall = runner.generate(ids, max_new_tokens, stop_ids, temperature, _seed(seed, ci, ti))
                turns.append(Turn(conv, ti, ids, Generation(tokens, wall, target_forwards=max(len(tokens) - 1, 0))))
                answer = tokenizer.decode([t for t in tokens if t not in stop_ids], skip_special_tokens=True)
                history.append({"role": "assistant", "content": answer})
        return turns, {"version": runner.version, "startup_s": runner.startup_s}
    finally:
        runner.close()


def run_speculative(target_dir: Path, draft_dir: Path, tokenizer, turns: list[Turn], options: dict, depth: int,
                    max_new_tokens: int, stop_ids: set[int], temperature: float, seed: int,
                    progress: bool = True) -> tuple[list[dict], dict]:  # fmt: skip
    """The same prompts through an engine serving ``draft_dir``; per-turn records in the HF evaluator's format."""
    meta = draft_metadata(draft_dir)
    spec = {"method": vllm_method(meta["variant"]), "model": str(Path(draft_dir).resolve()),
            "num_speculative_tokens": depth}  # fmt: skip
    runner = VLLMRunner(target_dir, options, spec)
    try:
        runner.generate(turns[0].prompt_ids, 4, stop_ids, 0.0, seed)  # warm-up
        records: list[dict] = []
        total: dict[str, Any] = {**{k: 0 for k in COUNTERS}, "accepted_per_pos": []}
        for i, t in enumerate(tqdm(turns, desc=f"vllm {meta['variant']}", unit="turn", disable=not progress)):
            before = spec_counters(runner.llm)
            tokens, wall = runner.generate(t.prompt_ids, max_new_tokens, stop_ids, temperature,
                                           _seed(seed, i, t.turn))  # fmt: skip
            c = counter_delta(spec_counters(runner.llm), before)
            gen = chain_generation(tokens, wall, c, depth)
            text = tokenizer.decode([x for x in tokens if x not in stop_ids], skip_special_tokens=True)
            rec = turn_record(t.conv, t.turn, len(t.prompt_ids), gen, t.baseline, temperature, text)
            rec["vllm_counters"] = c
            records.append(rec)
            total = _add(total, c)
        facts = {"version": runner.version, "startup_s": runner.startup_s, "speculative_config": spec,
                 "counters": total,
                 "mean_acceptance_length": 1 + total["accepted"] / total["drafts"] if total["drafts"] else None}  # fmt: skip
        return records, facts
    finally:
        runner.close()


def _add(a: dict, b: dict) -> dict:
    n = max(len(a["accepted_per_pos"]), len(b["accepted_per_pos"]))
    pa = a["accepted_per_pos"] + [0] * (n - len(a["accepted_per_pos"]))
    pb = b["accepted_per_pos"] + [0] * (n - len(b["accepted_per_pos"]))
    return {**{k: a[k] + b[k] for k in COUNTERS}, "accepted_per_pos": [x + y for x, y in zip(pa, pb, strict=True)]}


def _seed(seed: int, ci: int, ti: int) -> int:
    return seed * 1_000_003 + ci * 17 + ti


def evaluate_vllm(draft_dirs: list[str | Path], *, target_dir: str | Path, conversations: list[Conversation],
                  depth: int = 5, temperature: float = 0.0, max_new_tokens: int = 256, seed: int = 0,
                  options: dict | None = None, settings_extra: dict | None = None,
                  progress: bool = True) -> list[dict]:  # fmt: skip
    """One report per draft head (the HF evaluator's format plus a ``vllm`` block), sharing one baseline run."""
    from transformers import AutoTokenizer, GenerationConfig

    from pipeline import __version__
    from pipeline.evaluate.report import build_report
    from pipeline.store import config_sha256

    target_dir = Path(target_dir)
    metas = [draft_metadata(d) for d in draft_dirs]
    target_cfg = json.loads((target_dir / "config.json").read_text())
    for d, meta in zip(draft_dirs, metas, strict=True):
        want = meta.get("target") or {}
        if (want.get("hidden_size"), want.get("vocab_size")) != (target_cfg.get("hidden_size"),
                                                                  target_cfg.get("vocab_size")):  # fmt: skip
            raise TargetError(f"{d}: the draft was trained for hidden/vocab {want.get('hidden_size')}/"
                              f"{want.get('vocab_size')}, target {target_dir} has {target_cfg.get('hidden_size')}/"
                              f"{target_cfg.get('vocab_size')}")  # fmt: skip
    options = options if options is not None else engine_options()
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    try:
        gen_cfg = GenerationConfig.from_pretrained(target_dir)
    except OSError:
        gen_cfg = None
    stop_ids = stop_token_ids(tokenizer, gen_cfg, _Obj(target_cfg))
    turns, base_facts = run_baseline(target_dir, tokenizer, conversations, options, max_new_tokens, stop_ids,
                                     temperature, seed, progress)  # fmt: skip
    reports = []
    for d, meta in zip(draft_dirs, metas, strict=True):
        records, facts = run_speculative(target_dir, Path(d), tokenizer, turns, options, depth, max_new_tokens,
                                         stop_ids, temperature, seed, progress)  # fmt: skip
        report = build_report(
            records,
            settings={"mode": "chain", "policy": "fixed", "depth": depth, "top_k": 1, "total_tokens": depth,
                      "temperature": temperature,
                      "max_new_tokens": max_new_tokens, "seed": seed, "engine": "vllm",
                      "device": "cpu" if _on_cpu() else "cuda",
                      "dtype": options.get("dtype"), "stop_token_ids": sorted(stop_ids),
                      "code_version": __version__, **(settings_extra or {})},
            draft={"path": str(Path(d).resolve()), "variant": meta["variant"], "fmt": meta.get("fmt"),
                   "aux_layer_ids": meta.get("aux_layer_ids"), "recorded_target": meta.get("target")},
            target={"path": str(target_dir.resolve()), "name": target_dir.name,
                    "num_layers": target_cfg.get("num_hidden_layers"),
                    "config_matches_recorded": (meta.get("target") or {}).get("config_sha256")
                    in (None, config_sha256(target_cfg))},
        )  # fmt: skip
        report["vllm"] = {**facts, "baseline_startup_s": base_facts["startup_s"], "engine_options": options}
        reports.append(report)
    return reports


def _on_cpu() -> bool:
    from pipeline.extract.vllm_backend import vllm_on_cpu

    return vllm_on_cpu()


class _Obj:
    """Attribute access over a config dict (``stop_token_ids`` reads ``eos_token_id`` attributes)."""

    def __init__(self, d: dict):
        self.eos_token_id = d.get("eos_token_id")

"""Run speculative and plain decoding on the same prompts and record both, turn by turn."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.draft.export import load_export
from pipeline.evaluate.budget import Budget
from pipeline.evaluate.decode import speculative_generate
from pipeline.evaluate.drafter import Drafter, DraftSettings
from pipeline.evaluate.prompts import Conversation, render
from pipeline.evaluate.target import Generation, TargetError, hf_generate, read_config, target_generate

# What a user has without a head, decoded on the same prompts in the same run (the plain loop always runs: it is
# the lossless reference). prompt_lookup: transformers' prompt-lookup decoding, nothing to train.
BASELINES = ("generate", "prompt_lookup")
PROMPT_LOOKUP_TOKENS = 10


def resolve_target_path(meta: dict, model: str | Path | None) -> Path:
    """``--model`` if given, else the target recorded in the export (the embedded SmolLM2 when that was the
    target and its recorded path is gone, e.g. another machine's cache)."""
    from pipeline.assets import SMOLLM2_NAME, smollm2_dir

    if model is not None:
        path = Path(model)
        if not (path / "config.json").exists():
            raise TargetError(f"--model {path}: not a Hugging Face model directory (no config.json)")
        return path
    recorded = (meta.get("target") or {}).get("name_or_path") or meta["draft_config"].get("target_name")
    if recorded and (Path(recorded) / "config.json").exists():
        return Path(recorded)
    if recorded and Path(recorded).name == SMOLLM2_NAME:
        return smollm2_dir()
    raise TargetError(f"the draft records its target as {recorded!r}, which is not a model directory here; "
                      "pass --model DIR")  # fmt: skip


def load_drafter(draft_dir: str | Path, device: torch.device, dtype: torch.dtype) -> tuple[Drafter, dict]:
    model, meta = load_export(draft_dir, dtype=dtype)
    return Drafter(model.to(device), meta.get("aux_layer_ids")), meta


def check_pair(target, drafter: Drafter, target_dir: Path, meta: dict) -> bool:
    """Refuse a target the draft cannot read; returns whether the target config is the recorded one."""
    from pipeline.store import config_sha256

    c, dc = target.config, drafter.model.config
    if (c.hidden_size, c.vocab_size) != (dc.hidden_size, dc.vocab_size):
        raise TargetError(f"target {target_dir} has hidden/vocab {c.hidden_size}/{c.vocab_size}, the draft was "
                          f"trained for {dc.hidden_size}/{dc.vocab_size}")  # fmt: skip
    top = max(drafter.aux_layer_ids, default=0)
    if top > c.num_hidden_layers:
        raise TargetError(f"aux layer {top} does not exist in a {c.num_hidden_layers}-layer target")
    recorded = (meta.get("target") or {}).get("config_sha256")
    # stores record the loaded model's config.to_dict(); accept that or the file as written
    return recorded is None or recorded in (config_sha256(c.to_dict()), config_sha256(read_config(target_dir)))


def _generation_record(g: Generation) -> dict[str, Any]:
    return {"new_tokens": len(g.tokens), "decode_tokens": g.decode_tokens, "target_forwards": g.target_forwards,
            "prefill_forwards": g.prefill_forwards, "wall_s": g.wall_s, "prefill_s": g.prefill_s,
            "tokens_per_s": g.tokens_per_s}  # fmt: skip


def run_turn(target, drafter: Drafter, prompt_ids: list[int], settings: DraftSettings, max_new_tokens: int,
             stop_ids: set[int], seed: int, budget: Budget | None = None,
             baselines: tuple[str, ...] = BASELINES,
             repeats: int = 1) -> tuple[Generation, Generation, dict[str, Generation]]:  # fmt: skip
    """(speculative, plain, {baseline: generation}) decoding of one prompt, each seeded by ``seed``.

    ``repeats > 1``: every decoding runs that many times, alternating, and the fastest of each is kept; the outputs
    are identical (same seeds, and ``budget`` starts every repeat from its state before the turn and learns from
    the turn once), only the timing differs, so a burst of other load on a shared machine hits one repeat, not the
    comparison."""
    device = drafter.device
    prompt = torch.tensor(prompt_ids, device=device)

    def gen() -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    lookup = {"generate": None, "prompt_lookup": PROMPT_LOOKUP_TOKENS}
    kept: dict[str, Generation] = {}
    for r in range(repeats):  # earlier repeats decide on a copy: the budget learns from the last one only
        trial = budget if r == repeats - 1 else copy.deepcopy(budget)
        runs = {"spec": speculative_generate(target, drafter, prompt, settings, max_new_tokens, stop_ids, gen(), trial),
                "plain": target_generate(target, prompt, max_new_tokens, stop_ids, settings.temperature, gen())}
        runs.update({name: hf_generate(target, prompt, max_new_tokens, stop_ids, settings.temperature, lookup[name],
                                       seed) for name in baselines})  # fmt: skip
        for name, g in runs.items():
            if name not in kept or g.wall_s < kept[name].wall_s:
                kept[name] = g
    return kept.pop("spec"), kept.pop("plain"), kept


def first_prompt(tokenizer, conversations: list[Conversation]) -> list[int]:
    """Token ids of the first conversation's first question (what warm-ups and probes decode)."""
    first = conversations[0]
    return render(tokenizer, first.messages or [{"role": "user", "content": first.turns[0]}])


def run_eval(target, tokenizer, drafter: Drafter, conversations: list[Conversation], settings: DraftSettings,
             max_new_tokens: int, stop_ids: set[int], seed: int = 0, progress: bool = True,
             warmup: bool = True, budget: Budget | None = None,
             baselines: tuple[str, ...] = BASELINES, repeats: int = 1) -> list[dict[str, Any]]:  # fmt: skip
    """One record per answered turn (``repeats``: see :func:`run_turn`). Later turns of a conversation are asked
    after the speculative decoder's own answer (identical to the target's in greedy mode). ``budget`` learns across
    the whole run."""
    if warmup:  # first calls pay for allocator/kernel setup; keep that out of every timing
        run_turn(target, drafter, first_prompt(tokenizer, conversations), settings, min(8, max_new_tokens), stop_ids,
                 seed, None, baselines)  # fmt: skip
    records = []
    for ci, conv in enumerate(tqdm(conversations, desc="eval", unit="prompt", disable=not progress)):
        history = list(conv.messages)
        asks = conv.turns or [None]
        for ti, ask in enumerate(asks):
            if ask is not None:
                history.append({"role": "user", "content": ask})
            ids = render(tokenizer, history)
            spec, base, others = run_turn(target, drafter, ids, settings, max_new_tokens, stop_ids,
                                          seed * 1_000_003 + ci * 17 + ti, budget, baselines, repeats)  # fmt: skip
            answer = tokenizer.decode([t for t in spec.tokens if t not in stop_ids], skip_special_tokens=True)
            history.append({"role": "assistant", "content": answer})
            records.append(turn_record(conv, ti, len(ids), spec, base, settings.temperature, answer, others))
    return records


def turn_record(conv: Conversation, turn: int, prompt_tokens: int, spec: Generation, base: Generation,
                temperature: float, text: str | None = None,
                others: dict[str, Generation] | None = None) -> dict[str, Any]:  # fmt: skip
    mismatch, first_diff = None, None
    greedy = temperature <= 0
    if greedy:
        mismatch = spec.tokens != base.tokens
        if mismatch:
            first_diff = next((i for i, (a, b) in enumerate(zip(spec.tokens, base.tokens, strict=False)) if a != b),
                              min(len(spec.tokens), len(base.tokens)))  # fmt: skip
    return {
        "id": conv.id, "turn": turn, "category": conv.category, "prompt_tokens": prompt_tokens,
        **_generation_record(spec), "tau": spec.tau, "accept_lengths": spec.accept_lengths,
        "attempted": spec.attempted, "accepted": spec.accepted,
        "baseline": _generation_record(base),
        "baselines": {name: {**_generation_record(g), "tau": g.tau, "mismatch": g.tokens != base.tokens if greedy
                             else None} for name, g in (others or {}).items()},
        "speedup": spec.tokens_per_s / base.tokens_per_s if base.tokens_per_s else None,
        "mismatch": mismatch, "first_difference": first_diff, "text": text,
    }  # fmt: skip

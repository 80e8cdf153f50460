"""Evaluation prompts: MT-bench (built in) or a JSONL file, and rendering them with the chat template."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Conversation:
    """``turns``: user messages asked one after another, each after the model's own previous answer.
    ``messages``: a fixed chat (OpenAI-style dicts) answered once at its end."""

    id: str
    turns: list[str] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    category: str | None = None


def load_conversations(bench: str | None = None, prompts: str | Path | None = None,
                       limit: int | None = None) -> list[Conversation]:  # fmt: skip
    """``bench="mt-bench"`` (80 questions, two turns) or a JSONL of ``{"prompt"}``, ``{"turns"}`` or
    ``{"messages"}`` records (an ``id``/``question_id`` field is kept when present)."""
    if prompts is not None:
        path = Path(prompts)
    elif bench in (None, "mt-bench"):
        from pipeline.assets import mtbench_path

        path = mtbench_path()
    else:
        raise ValueError(f"unknown bench {bench!r} (built in: mt-bench)")
    out: list[Conversation] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(out) >= limit:
                break
            out.append(_record(json.loads(line), f"{path.name}:{line_no}"))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def _record(rec: dict, where: str) -> Conversation:
    cid = str(rec.get("id", rec.get("question_id", where)))
    category = rec.get("category")
    if isinstance(rec.get("turns"), list) and rec["turns"]:
        return Conversation(cid, turns=[str(t) for t in rec["turns"]], category=category)
    if isinstance(rec.get("prompt"), str):
        return Conversation(cid, turns=[rec["prompt"]], category=category)
    if isinstance(rec.get("messages"), list) and rec["messages"]:
        messages = list(rec["messages"])
        while messages and messages[-1].get("role") == "assistant":
            messages.pop()  # the model answers the last non-assistant message
        if messages:
            return Conversation(cid, messages=messages, category=category)
    raise ValueError(f"{where}: expected a non-empty 'prompt', 'turns' or 'messages' field")


def render(tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of ``messages`` with the chat template and the assistant generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    # no template (a base model): the plain text of the conversation
    return tokenizer("\n".join(str(m.get("content", "")) for m in messages))["input_ids"]

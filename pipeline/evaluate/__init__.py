"""`pipeline eval`: real speculative decoding with trained EAGLE-1 / EAGLE-3 heads.

Modules: ``tree`` (tree structure, 4D masks, positions), ``target`` (HF target forward, cache compaction, plain
decoding baseline), ``drafter`` (chain / EAGLE-2 tree drafting), ``sampling`` (acceptance rule), ``decode``
(the speculative loop), ``prompts``, ``runner``, ``report``, ``cli`` (``eval_command``).

Names are imported lazily so that ``pipeline.evaluate.cli`` (imported by the command line) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "speculative_generate": "decode", "verify": "decode",
    "Drafter": "drafter", "DraftSettings": "drafter", "draft_chain": "drafter", "draft_tree": "drafter",
    "propose": "drafter",
    "Acceptance": "sampling", "accept": "sampling", "target_probs": "sampling",
    "Generation": "target", "compact_cache": "target", "load_target": "target", "stop_token_ids": "target",
    "target_forward": "target", "target_generate": "target",
    "Tree": "tree", "additive_mask": "tree", "tree_mask": "tree", "tree_positions": "tree",
    "evaluate": "cli", "eval_command": "cli",
}  # fmt: skip

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"pipeline.evaluate.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'pipeline.evaluate' has no attribute {name!r}")

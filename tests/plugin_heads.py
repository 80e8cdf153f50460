"""A draft head defined outside the package, to show that a new head is one module: registered at import, found
by the CLI through ``PIPELINE_PLUGINS=plugin_heads`` (tests/ on the path), trained, exported and drafted with no
edit to ``pipeline/``.

``tiny-eagle1``: EAGLE-1's architecture under its own name, trained without feature noise and judged on a 3-step
simulated chain; vLLM has no method for it (``pipeline eval --engine vllm`` refuses it by name)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.draft.eagle1 import Eagle1Config, Eagle1Head
from pipeline.draft.registry import register


@dataclass
class TinyEagle1Config(Eagle1Config):
    variant: ClassVar[str] = "tiny-eagle1"


class TinyEagle1Head(Eagle1Head):
    name = "tiny-eagle1"
    config_class = TinyEagle1Config
    vllm_method = None
    CHAIN_STEPS = 3

    def build(self, cfg, reader):
        model, objective, info = super().build(cfg, reader)
        objective.noise = "none"
        return model, objective, {**info, "note": "registered from tests/plugin_heads.py"}


register(TinyEagle1Head())

"""EAGLE-1 / EAGLE-3 draft heads: modules, training objectives, inference API, export."""

from pipeline.draft.eagle1 import Eagle1Config, Eagle1Draft, Eagle1Objective
from pipeline.draft.eagle3 import (
    Eagle3Config,
    Eagle3Draft,
    Eagle3Objective,
    acceptance_length,
    build_draft_vocab,
    chain_acceptance,
)
from pipeline.draft.layers import KVCache, causal_mask, doc_causal_mask

__all__ = [
    "Eagle1Config", "Eagle1Draft", "Eagle1Objective", "Eagle3Config", "Eagle3Draft", "Eagle3Objective",
    "KVCache", "acceptance_length", "build_draft_vocab", "causal_mask", "chain_acceptance", "doc_causal_mask",
]  # fmt: skip

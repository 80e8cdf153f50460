"""Load a ``--format speculators`` export with the ``speculators`` package itself and compare its logits with ours.

``speculators`` (0.9.0) is an optional install (``scripts/setup.sh --speculators``). Its ``Eagle3DraftModel``
has one forward, the training-time test with teacher forcing: step ``i`` at row ``t`` reads the token the caller
put at row ``t`` shifted left by ``i``, at ``position_ids + i``, attending to the step-0 keys of its document's
earlier rows and its own keys of steps ``1..i``: our :meth:`Eagle3Draft.ttt_forward` when we hand it our step-0
tokens (``x_{t+1}``). Its logits are taken from ``lm_head`` by a forward hook (the forward returns argmaxes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.draft.eagle3 import Eagle3Draft
from pipeline.draft.layers import shift_left


def load_with_speculators(export_dir: str | Path) -> Any:
    """speculators' own ``Eagle3DraftModel`` of an export, fp32, eager attention (flex attention needs a compiler
    on a CPU). It reads the verifier named in the export for the aux layer ids and the verifier's head."""
    from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig

    config = Eagle3SpeculatorConfig.from_pretrained(export_dir)
    config.transformer_layer_config._attn_implementation = "eager"
    return Eagle3DraftModel.from_pretrained(export_dir, config=config).float().eval()


@torch.no_grad()
def compare_logits(ours: Eagle3Draft, theirs: Any, row: dict[str, torch.Tensor], steps: int = 3) -> list[dict]:
    """Per TTT step: max |logit difference| (and relative to max |logit|) and argmax agreement of the two models
    over the rows of ``row`` (``[1, T]`` tensors of one document: ``input_ids``, ``position_ids``, ``doc_ids``,
    ``loss_mask``, ``hidden_aux [1, T, A*H]``, or ``[1, T, k]`` from a projected store) whose step-``i`` token is
    inside it."""
    whole = row["hidden_aux"].float()
    if ours.aux_projection is not None and whole.shape[-1] == ours.aux_projection.shape[0]:
        # a projected store's rows y = P·x: theirs (fc·PᵀP) reads Pᵀy, and fc·PᵀP·Pᵀy = fc·Pᵀy (orthonormal rows)
        whole = whole @ ours.aux_projection.float()
    logits: list[torch.Tensor] = []
    hook = theirs.lm_head.register_forward_hook(lambda _m, _i, out: logits.append(out.detach().float()))
    try:
        theirs(hidden_states=whole, input_ids=shift_left(row["input_ids"], 1),
               document_ids=torch.zeros_like(row["input_ids"]), position_ids=row["position_ids"], ttt_steps=steps)
    finally:
        hook.remove()
    mine = [ours.logits(h).float() for h in ours.ttt_forward(ours.fuse(row["hidden_aux"]), row, steps)]
    if len(logits) != steps:
        raise RuntimeError(f"speculators ran lm_head {len(logits)} times for {steps} TTT steps")
    n = row["input_ids"].shape[1]
    out = []
    for i, (a, b) in enumerate(zip(mine, logits, strict=True)):
        a, b = a[:, : n - 1 - i], b[:, : n - 1 - i]
        diff = float((a - b).abs().max())
        out.append({"step": i, "rows": a.shape[1], "max_abs_diff": diff, "rel_diff": diff / float(a.abs().max()),
                    "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean())})  # fmt: skip
    return out

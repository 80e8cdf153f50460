"""Config and target-distribution helpers shared by the two draft heads.

Alignment convention of every training objective here (the store does not shift; see storage_layout.md):
the draft at row ``t`` gets (feature at ``t``, token ``x_{t+1}``) and predicts the feature at ``t+1`` / the
distribution of ``x_{t+2}``, i.e. target row ``t+1`` (``topk_*[t+1]`` or ``lm_head(hidden_last[t+1])``). Row ``t``
counts iff ``t+2`` lies in the same document as ``t`` and ``loss_mask[t+2] = 1`` (``x_{t+2}`` is an assistant
token). EAGLE-3's TTT step ``i`` shifts everything by ``i`` more (token ``x_{t+1+i}``, target row ``t+1+i``,
weight ``loss_mask[t+2+i]``). Shifts never cross documents: a row whose shifted partner lies in another document
(or padding) is not counted and its shifted token is replaced by 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline.draft.layers import (
    DocCausal,
    KVBlock,
    rope_parameters,
    same_doc_ahead,
    shift_left,
    ttt_attention_mask,
)


def run_layer(module: nn.Module, layer: nn.Module, *args):
    """``layer(*args)``, recomputed in backward instead of stored when ``module.gradient_checkpointing`` is on
    (``--activation-checkpointing``: trades compute for the activations of long packed rows and TTT steps)."""
    if getattr(module, "gradient_checkpointing", False) and module.training and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


class DraftConfigMixin:
    """Serialisation and rope lookup shared by the draft config dataclasses."""

    target_config: dict

    @property
    def rope_parameters(self) -> dict:
        return rope_parameters(self.target_config)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass
class DraftShape(DraftConfigMixin):
    """The sizes every draft head mirrors from one target layer (:func:`target_fields`); a head's config
    dataclass extends it with its own fields (all defaulted)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    vocab_size: int
    max_position_embeddings: int


class TargetConfigError(ValueError):
    """A field of the target's config the draft cannot mirror; the message names it and what to do."""


# Families whose RMSNorm computes ``(1 + w) * x_hat`` (the stored ``norm.weight`` is ``w``, centred on 0).
ONE_PLUS_NORM_FAMILIES = ("gemma", "gemma2", "gemma3", "gemma3_text")
# Families whose attention bias / MLP bias / activation fields mean what a Llama layer's do (anything else: the
# draft keeps the Llama defaults, see :func:`target_fields`).
LLAMA_LAYER_FAMILIES = ("llama",)


def model_type(target_config: dict) -> str:
    return str(target_config.get("model_type") or "")


def mlp_width(target_config: dict) -> int:
    """The draft's MLP width: the MLP work the target does per token, read from the field that means it per family.

    Dense families: ``intermediate_size``. DeepSeek-V3 (its ``intermediate_size`` is the width of its few dense
    layers): ``moe_intermediate_size x (num_experts_per_tok + n_shared_experts)``, the routed and shared experts a
    token runs through. gpt-oss (``intermediate_size`` is per expert, no dense layer):
    ``intermediate_size x num_experts_per_tok``. Qwen3-MoE: ``moe_intermediate_size x num_experts_per_tok``.
    """
    tc, kind = target_config, model_type(target_config)

    def need(name: str) -> int:
        if tc.get(name) is None:
            raise TargetConfigError(f"target config.json has model_type {kind!r} but no {name!r}: the draft's MLP "
                                    f"width is read from it; add it or pass intermediate_size explicitly")  # fmt: skip
        return int(tc[name])

    if kind in ("deepseek_v3", "deepseek_v2"):
        return need("moe_intermediate_size") * (need("num_experts_per_tok") + int(tc.get("n_shared_experts") or 0))
    if kind == "gpt_oss":
        return need("intermediate_size") * need("num_experts_per_tok")
    if kind == "qwen3_moe":
        return need("moe_intermediate_size") * need("num_experts_per_tok")
    return need("intermediate_size")


def target_fields(target_config: dict) -> dict[str, Any]:
    """The draft layer's sizes from the target's HF config. The draft is one Llama layer trained from scratch (what
    vLLM and SGLang serve), so it mirrors the target's width, heads and eps, and keeps the Llama layer's own choices
    where a family's field means something a Llama layer has no way to express:

    * ``hidden_act``: silu (vLLM's Llama MLP serves nothing else; Gemma's ``hidden_activation`` is not copied);
    * attention/MLP bias: the target's ``attention_bias``/``mlp_bias`` for Llama targets only (Qwen2's q/k/v-only
      bias is part of its own weights, which the draft does not load);
    * ``head_dim``: ``hidden_size // num_attention_heads`` for MLA targets (DeepSeek's ``head_dim`` is its rope
      slice, not a q/k/v head); the target's ``head_dim`` otherwise;
    * MLP width: :func:`mlp_width`.
    """
    tc = target_config
    heads = int(tc["num_attention_heads"])
    hidden = int(tc["hidden_size"])
    mla = tc.get("kv_lora_rank") is not None
    head_dim = hidden // heads if mla else (tc.get("head_dim") or hidden // heads)
    llama = model_type(tc) in LLAMA_LAYER_FAMILIES
    return {
        "hidden_size": hidden,
        "intermediate_size": mlp_width(tc),
        "num_attention_heads": heads,
        "num_key_value_heads": heads if mla else int(tc.get("num_key_value_heads") or heads),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(tc.get("rms_norm_eps", 1e-6)),
        "vocab_size": int(tc["vocab_size"]),
        "max_position_embeddings": int(tc.get("max_position_embeddings", 2048)),
        "hidden_act": "silu",
        "attention_bias": bool(tc.get("attention_bias", False)) and llama,
        "mlp_bias": bool(tc.get("mlp_bias", False)) and llama,
    }


def norm_weight_offset(target_config: dict) -> float:
    """What to add to the target's stored RMSNorm weight to get the factor it multiplies by: 1 for Gemma's
    ``(1 + w) * x_hat``, 0 for Llama's ``w * x_hat`` (the draft's norm is Llama's)."""
    return 1.0 if model_type(target_config) in ONE_PLUS_NORM_FAMILIES else 0.0


def final_logit_softcap(target_config: dict) -> float | None:
    """Gemma-2's ``final_logit_softcapping`` (logits ``c * tanh(z / c)``), None where the target has none."""
    cap = target_config.get("final_logit_softcapping")
    return float(cap) if cap else None


def target_logits(hidden: torch.Tensor, head: torch.Tensor, target_config: dict) -> torch.Tensor:
    """The target's logits from its lm_head input (``hidden @ head.T``, then its final softcapping if any), fp32."""
    z = (hidden.to(head.dtype) @ head.T).float()
    cap = final_logit_softcap(target_config)
    return z if cap is None else cap * torch.tanh(z / cap)


def check_overrides(cls_fields: set[str], overrides: dict, fixed: tuple[str, ...]) -> None:
    unknown = set(overrides) - cls_fields
    if unknown:
        raise TypeError(f"unknown draft config field(s): {sorted(unknown)}")
    bad = [k for k in fixed if k in overrides]
    if bad:
        raise ValueError(f"{bad} must equal the target's (the draft reads the target's features and embeddings)")


def shifted_rows(batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """Inputs/targets/weights of TTT step ``step`` (0 for EAGLE-1) at every row ``t``.

    Returns ``tokens`` (``x_{t+1+step}``, 0 where that crosses a document), ``target_row_ok`` (row ``t+1+step``
    is in ``t``'s document) and ``counted`` (row ``t+2+step`` is in the document and is a loss token).
    """
    doc, ids, lm = batch["doc_ids"], batch["input_ids"], batch["loss_mask"]
    tok_ok = same_doc_ahead(doc, 1 + step)
    tokens = torch.where(tok_ok, shift_left(ids, 1 + step), torch.zeros_like(ids))
    counted = same_doc_ahead(doc, 2 + step) & (shift_left(lm, 2 + step) > 0)
    return {"tokens": tokens, "target_row_ok": tok_ok, "counted": counted}


def topk_target(batch: dict[str, torch.Tensor], row_shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored top-k target of row ``t + row_shift``: (ids ``[B,T,K]``, probabilities renormalised over the K)."""
    ids = shift_left(batch["topk_ids"], row_shift)
    logp = shift_left(batch["topk_logprobs"].float(), row_shift)
    p = logp.exp()
    return ids, p / p.sum(-1, keepdim=True).clamp_min(1e-30)


def soft_ce_sparse(logq: torch.Tensor, ids: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``-sum_k p_k log q[ids_k]`` per row; ``ids < 0`` (dropped) contribute nothing."""
    keep = ids >= 0
    lq = logq.gather(-1, ids.clamp_min(0))
    return -(torch.where(keep, p, torch.zeros_like(p)) * lq).sum(-1)


def masked_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x * w).sum() / w.sum().clamp_min(1)


# Logits one chunk of the fused head holds at once (rows x vocabulary x 4 bytes): 16 MiB chunks made the head's
# matmuls 10% slower than 64 MiB ones on the 2-core CPU (the weight is streamed once per chunk).
HEAD_CHUNK_BYTES = 64 << 20


def head_soft_ce(x: torch.Tensor, head: nn.Linear, row_weight: torch.Tensor, ids: torch.Tensor | None = None,
                 p: torch.Tensor | None = None, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``masked_mean(softCE(p, log_softmax(head(x))), row_weight)`` and the logits' argmax per row.

    ``x [N, H]``, ``head``: a bias-free ``Linear(H, V)`` (a frozen target head or a trained draft head),
    ``row_weight [N]``. Targets:
    sparse ``ids [N, K]`` (``< 0``: dropped) with probabilities ``p [N, K]``, or dense ``p [N, V]`` (``ids`` None).
    ``fused`` (default) never holds the ``[N, V]`` logits: row chunks compute logits, log-sum-exp, argmax and the
    gradient ``c_r (sum(p) softmax - p)`` at once, so the step makes two passes over vocabulary-sized memory instead
    of about nine; the gradients are kept for backward (the loss is a scalar). ``fused=False``: the same function
    through autograd (the previous path; tests compare the two), also taken under ZeRO-3, whose partitioned weight
    only the module's own forward gathers."""
    if not fused or getattr(head.weight, "ds_id", None) is not None:
        logq = torch.log_softmax(head(x).float(), dim=-1)
        ce = soft_ce_sparse(logq, ids, p) if ids is not None else -(p * logq).sum(-1)
        return masked_mean(ce, row_weight), logq.detach().argmax(-1)
    return _HeadSoftCE.apply(x, head.weight, row_weight.float(), ids, p)


class _HeadSoftCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, row_weight, ids, p):
        n, v = x.shape[0], weight.shape[0]
        need_x, need_w = ctx.needs_input_grad[:2]  # False under no_grad: metrics only
        scale = row_weight / row_weight.sum().clamp_min(1)  # d loss / d ce_r
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        arg = torch.empty(n, dtype=torch.long, device=x.device)
        gx = torch.empty_like(x) if need_x else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_w else None
        rows = max(1, HEAD_CHUNK_BYTES // (4 * v))
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            logits = (x[lo:hi] @ weight.T).float()
            arg[lo:hi] = logits.argmax(-1)
            lse = torch.logsumexp(logits, -1)
            if ids is not None:
                keep = ids[lo:hi] >= 0
                pk = torch.where(keep, p[lo:hi].float(), 0.0)
                idx = ids[lo:hi].clamp_min(0)
                total_p = pk.sum(-1)
                ce = total_p * lse - (pk * logits.gather(-1, idx)).sum(-1)
            else:
                pk = p[lo:hi].float()
                total_p = pk.sum(-1)
                ce = total_p * lse - (pk * logits).sum(-1)
            loss += (ce * scale[lo:hi]).sum()
            if need_x or need_w:
                # d ce_r / d logits = sum(p_r) softmax_r - p_r, built in place in the chunk's logits
                grad = logits.sub_(lse[:, None]).exp_().mul_((total_p * scale[lo:hi])[:, None])
                if ids is not None:
                    grad.scatter_add_(-1, idx, -pk * scale[lo:hi, None])
                else:
                    grad.sub_(pk * scale[lo:hi, None])
                grad = grad.to(x.dtype)
                if need_x:
                    gx[lo:hi] = grad @ weight
                if need_w:
                    gw.addmm_(grad.T.float(), x[lo:hi].float())
        ctx.save_for_backward(gx, gw)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(arg)
        return loss, arg

    @staticmethod
    def backward(ctx, dloss, _darg):
        gx, gw = ctx.saved_tensors
        dx = gx * dloss.to(gx.dtype) if gx is not None else None
        dw = (gw * dloss).to(ctx.weight_dtype) if gw is not None else None
        return dx, dw, None, None, None


def unroll_chain(layer: Callable, h0: torch.Tensor, batch: dict[str, torch.Tensor], steps: int,
                 dense: bool = False) -> list[torch.Tensor]:  # fmt: skip
    """Run a draft layer as a chain over every row at once (training-time test / simulated drafting).

    ``layer(hidden, tokens, position_ids, attend_to) -> (out, k, v)``. Step ``i`` feeds row ``t`` the step
    ``i-1`` output of the same row and token ``x_{t+1+i}`` at position ``position_ids[t] + i``; its query sees
    the step-0 keys of rows ``<= t`` of its document plus row ``t``'s own keys of steps ``1..i`` (the diagonal),
    which is exactly what the draft sees when it drafts a chain from row ``t`` at inference. The step-0 mask
    stays lazy (:class:`DocCausal`), so attention memory grows linearly with T (``layers.attend``). ``dense=True``
    attends over the concatenated keys of all steps with :func:`ttt_attention_mask` instead (same computation,
    O(T^2 * steps) memory; tests compare the two). Returns the outputs of steps ``0..steps-1``.
    """
    doc, pos = batch["doc_ids"], batch["position_ids"]
    m0 = DocCausal(doc)
    own = doc >= 0
    h = h0
    keys: list[tuple[torch.Tensor, torch.Tensor]] = []  # (k, v) of steps 0..i-1
    outs = []
    for i in range(steps):
        tokens = shifted_rows(batch, i)["tokens"]

        # `earlier` is a snapshot: activation checkpointing calls attend_to again during backward
        def attend_to(k, v, i=i, earlier=tuple(keys)):
            if dense:
                ks = torch.cat([kk for kk, _ in earlier] + [k], dim=2)
                vs = torch.cat([vv for _, vv in earlier] + [v], dim=2)
                return [KVBlock(ks, vs, ttt_attention_mask(doc, i))]
            if i == 0:
                return [KVBlock(k, v, m0)]
            k0, v0 = earlier[0]
            diag = [KVBlock(kj, vj, own, diagonal=True) for kj, vj in earlier[1:]]
            return [KVBlock(k0, v0, m0), *diag, KVBlock(k, v, own, diagonal=True)]

        out, k, v = layer(h, tokens, pos + i, attend_to)
        keys.append((k, v))
        outs.append(out)
        h = out
    return outs


def acceptance_length(cond_acc: list[float]) -> float:
    """tau = 1 + sum_i prod_{j<=i} a_j (tokens per target forward, counting the target's bonus token)."""
    tau, run = 1.0, 1.0
    for a in cond_acc:
        run *= float(a)
        tau += run
    return tau


def greedy_chain_acceptance(batch: dict[str, torch.Tensor], drafts: list[torch.Tensor], targets: list[torch.Tensor],
                            require_greedy_prefix: bool = True) -> dict[str, Any]:  # fmt: skip
    """Conditional greedy acceptance per chain step from an unrolled chain (``drafts[i]``, ``targets[i]``:
    the draft's and the target's argmax, in target ids, of step ``i`` at every row).

    Row ``t`` is eligible at step ``i`` if ``x_{t+2+i}`` is a loss token of ``t``'s document and every earlier step
    was accepted: the draft's token equalled the target's argmax and (``require_greedy_prefix``) so did the data
    token the next step is fed, so the simulated chain is a greedy trajectory. A target argmax the draft cannot
    emit is a rejection. Returns ``cond_acc`` (a_i), ``eligible`` (counts) and ``tau``.
    """
    doc, ids, lm = batch["doc_ids"], batch["input_ids"], batch["loss_mask"]
    alive = torch.ones_like(doc, dtype=torch.bool)
    cond, elig = [], []
    for i, (draft, arg) in enumerate(zip(drafts, targets, strict=True)):
        ok = same_doc_ahead(doc, 2 + i) & (shift_left(lm, 2 + i) > 0) & alive
        correct = draft == arg
        n = int(ok.sum())
        elig.append(n)
        cond.append(float((ok & correct).sum()) / n if n else 0.0)
        alive = alive & correct
        if require_greedy_prefix:
            alive = alive & (shift_left(ids, 2 + i) == arg)
    return {"cond_acc": cond, "eligible": elig, "tau": acceptance_length(cond)}

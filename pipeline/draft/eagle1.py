"""EAGLE-1 draft head: config, module, training objective.

Architecture (SafeAILab/EAGLE v1 ``cnets.py``; vLLM ``llama_eagle.py``): ``fc: Linear(2H -> H)`` over
``cat(embed(x_{t+1}), f_t)`` (embedding first, as vLLM concatenates), then one Llama decoder layer without
``input_layernorm`` and no final norm. The output is the predicted next feature ``f_{t+1}``; logits are the
target's frozen ``lm_head`` applied to it. ``embed_tokens`` and ``lm_head`` are the target's, frozen.

Training alignment: see :mod:`pipeline.draft.common` (row ``t``: ``(f_t, x_{t+1})`` -> ``f_{t+1}`` and the
distribution of ``x_{t+2}``; counted iff ``t+2`` is in the same document and ``loss_mask[t+2] = 1``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.draft.common import (
    DraftShape,
    check_overrides,
    greedy_chain_acceptance,
    head_soft_ce,
    masked_mean,
    run_layer,
    shifted_rows,
    target_fields,
    target_logits,
    topk_target,
    unroll_chain,
)
from pipeline.draft.export import export_weights
from pipeline.draft.layers import (
    DecoderLayer,
    DocCausal,
    KVCache,
    RotaryEmbedding,
    cache_attend_to,
    causal_mask,
    gaussian_noise,
    shift_left,
    uniform_noise,
)
from pipeline.draft.registry import DraftHead, register


@dataclass
class Eagle1Config(DraftShape):
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    fc_bias: bool = False  # vLLM's EAGLE-1 loader builds fc without bias
    target_config: dict = field(default_factory=dict, repr=False)  # verbatim target HF config (rope source)
    target_name: str | None = None  # target model path/name, for export metadata

    variant: ClassVar[str] = "eagle1"

    @classmethod
    def from_target(cls, target_config: dict, **overrides: Any) -> Eagle1Config:
        """Sizes, eps, rope and vocab from the target's HF config dict; ``overrides`` for the rest."""
        check_overrides({f.name for f in dataclasses.fields(cls)}, overrides, ("hidden_size", "vocab_size"))
        return cls(**{**target_fields(target_config), "target_config": dict(target_config), **overrides})



class Eagle1Draft(nn.Module):
    def __init__(self, config: Eagle1Config):
        super().__init__()
        c = config
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.fc = nn.Linear(2 * c.hidden_size, c.hidden_size, bias=c.fc_bias)
        self.layers = nn.ModuleList([DecoderLayer(
            c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.rms_norm_eps, c.hidden_act, eagle3=False, input_layernorm=False,
            attention_bias=c.attention_bias, mlp_bias=c.mlp_bias)])  # fmt: skip
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.rotary = RotaryEmbedding(c.target_config, c.head_dim)
        for p in (self.embed_tokens.weight, self.lm_head.weight):
            p.requires_grad_(False)

    # ---- weights -------------------------------------------------------------------------------------------

    FROZEN: ClassVar[tuple[str, ...]] = ("embed_tokens.weight", "lm_head.weight")

    def load_target_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy the target's ``embed_tokens.weight`` and ``lm_head.weight`` (store ``target/weights.safetensors``)."""
        embed = weights["embed_tokens.weight"]
        head = weights.get("lm_head.weight", embed)  # tied targets may ship only the embedding
        with torch.no_grad():
            self.embed_tokens.weight.copy_(embed.to(self.embed_tokens.weight.dtype))
            self.lm_head.weight.copy_(head.to(self.lm_head.weight.dtype))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def draft_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights only (no frozen target pieces): ``fc.*`` and ``layers.0.*``."""
        return {k: v for k, v in self.state_dict().items() if k not in self.FROZEN}

    # ---- forward -------------------------------------------------------------------------------------------

    def _layer(self, hidden: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor, attend_to):
        hidden = hidden.to(self.fc.weight.dtype)  # fp32 features (noise, stored dtypes) into a bf16 engine
        x = self.fc(torch.cat([self.embed_tokens(input_ids).to(hidden.dtype), hidden], dim=-1))
        cos, sin = self.rotary(position_ids)
        return run_layer(self, self.layers[0], x, cos, sin, attend_to)

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
                mask: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:  # fmt: skip
        """Predicted next features ``[B, N, H]`` from features ``hidden [B, N, H]`` and next tokens ``input_ids``.

        ``mask``: bool ``[B, N, S]`` / ``[N, S]`` over (cached + new) keys; ``cache`` is appended to if given.
        """
        out, _, _ = self._layer(hidden, input_ids, position_ids, cache_attend_to(cache, 0, mask))
        return out

    def step(self, hidden: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
             cache: KVCache | None, mask: torch.Tensor, last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Inference: (predicted features ``[B, N, H]``, logits over the target vocab ``[B, N, V]``; with
        ``last_only`` the logits of the last row only, ``[B, 1, V]``: the vocabulary-sized product dominates a step).

        A chain of ``k`` drafts after the target has verified up to position ``p``:

        1. ``step(f[:, s:p+1], x[:, s+1:p+2], positions s..p, cache, causal_mask(p+1-s, len(cache)))`` for the
           rows ``s..p`` not cached yet (``f`` = target features, ``x_{p+1}`` = the target's new token). The last
           row gives ``f_hat`` and logits; draft token ``d_1 = argmax``.
        2. For ``i = 1..k-1``: ``step(f_hat, d_i, position p+i, cache, all-true [1, len(cache)+1])`` — EAGLE-1
           feeds its own predicted feature back; ``d_{i+1} = argmax``.
        3. After verification accepts ``m`` drafts, ``cache.crop(p + 1)`` (rows computed from predicted features
           are stale; the next round feeds the target's real features for rows ``p+1..``).

        Tree drafting: build masks over the tree's ancestors and use ``cache.select`` to keep the accepted path.
        """
        out = self.forward(hidden, input_ids, position_ids, mask, cache)
        return out, self.lm_head(out[:, -1:] if last_only else out)

    @torch.no_grad()
    def generate_chain(self, hidden: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
                       cache: KVCache, k: int) -> torch.Tensor:  # fmt: skip
        """Greedy chain of ``k`` draft tokens ``[B, k]`` (steps 1-2 of :meth:`step` for rows of one sequence)."""
        n = hidden.shape[1]
        out, logits = self.step(hidden, input_ids, position_ids, cache, causal_mask(n, len(cache), hidden.device))
        f, tok, pos = out[:, -1:], logits[:, -1:].argmax(-1), position_ids[:, -1:]
        drafts = [tok]
        for _ in range(k - 1):
            pos = pos + 1
            f, logits = self.step(f, tok, pos, cache, torch.ones(1, len(cache) + 1, dtype=torch.bool, device=f.device))
            tok = logits.argmax(-1)
            drafts.append(tok)
        return torch.cat(drafts, dim=1)


# ---- objective -------------------------------------------------------------------------------------------------


@dataclass
class Eagle1Objective:
    v_weight: float = 1.0
    p_weight: float = 0.1
    noise: str = "uniform"  # "uniform" | "gaussian" | "none"; applied to the input features in train mode
    noise_std: float = 0.2
    noise_scale_by_length: bool = False  # the reference multiplies by 512/L; default: length-independent
    target: str = "topk"  # "topk": stored top-k log-probs renormalised; "full": softmax(lm_head(f_{t+1}))
    fused_head: bool = True  # common.head_soft_ce: lm_head + softCE in row chunks (False: through autograd)

    def __post_init__(self):
        if self.noise not in ("uniform", "gaussian", "none"):
            raise ValueError(f"noise must be uniform|gaussian|none, not {self.noise!r}")
        if self.target not in ("topk", "full"):
            raise ValueError(f"target must be topk|full, not {self.target!r}")


def add_noise(x: torch.Tensor, kind: str, std: float, doc_ids: torch.Tensor, scale_by_length: bool) -> torch.Tensor:
    if kind == "uniform":
        return uniform_noise(x, std, doc_ids, scale_by_length)
    if kind == "gaussian":
        return gaussian_noise(x, std)
    return x


def training_loss(model: Eagle1Draft, batch: dict[str, torch.Tensor],
                  objective: Eagle1Objective | None = None) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """``v_weight * SmoothL1(pred, f_{t+1}) + p_weight * softCE(target, lm_head(pred))`` over counted rows.

    Both terms are means over counted rows (SmoothL1 averaged over H first, as in the reference). Metrics:
    ``loss``, ``vloss``, ``ploss``, ``acc`` (draft argmax == target argmax), ``tokens`` (counted rows).
    """
    obj = objective or Eagle1Objective()
    f = batch["hidden_last"].float()
    doc, pos = batch["doc_ids"], batch["position_ids"]
    rows = shifted_rows(batch, 0)
    w = rows["counted"].float()

    x = f
    if model.training and obj.noise != "none":
        x = add_noise(f, obj.noise, obj.noise_std, doc, obj.noise_scale_by_length)
    pred = model(x, rows["tokens"], pos, DocCausal(doc))  # lazy mask: attention memory linear in T
    # Losses only on counted rows: the vocabulary-sized lm_head work is most of the step's compute.
    counted = rows["counted"]
    pred_c = pred[counted]
    target_f = shift_left(f, 1)[counted]
    if obj.target == "full":
        with torch.no_grad():
            # the target's own logits: its lm_head and, for Gemma-2, its final softcapping
            tlogits = target_logits(target_f, model.lm_head.weight, model.config.target_config)
            p = torch.softmax(tlogits, dim=-1)
            target_arg = tlogits.argmax(-1)
        ids = None
    else:
        ids, p = topk_target(batch, 1)
        ids, p = ids[counted], p[counted]
        target_arg = ids[..., 0]

    w = torch.ones(pred_c.shape[0], device=pred.device)
    vloss = masked_mean(F.smooth_l1_loss(pred_c.float(), target_f, reduction="none").mean(-1), w)
    ploss, draft_arg = head_soft_ce(pred_c, model.lm_head, w, ids, p, fused=obj.fused_head)
    loss = obj.v_weight * vloss + obj.p_weight * ploss
    with torch.no_grad():
        acc = masked_mean((draft_arg == target_arg).float(), w)
        vals = torch.stack([loss.detach(), vloss.detach(), ploss.detach(), acc, w.sum()]).tolist()
    metrics = dict(zip(("loss", "vloss", "ploss", "acc", "tokens"), vals, strict=True))
    return loss, metrics


@torch.no_grad()
def chain_acceptance(model: Eagle1Draft, batch: dict[str, torch.Tensor], steps: int = 5,
                     require_greedy_prefix: bool = True) -> dict[str, Any]:  # fmt: skip
    """Simulated greedy chain acceptance: step 0 reads the target's feature, later steps the draft's own
    predicted feature (EAGLE-1 drafting), over every row at once. See ``greedy_chain_acceptance``."""
    was_training = model.training
    model.eval()
    try:
        outs = unroll_chain(model._layer, batch["hidden_last"].float(), batch, steps)
    finally:
        model.train(was_training)
    drafts = [model.lm_head(h).argmax(-1) for h in outs]
    if "topk_ids" in batch:
        targets = [shift_left(batch["topk_ids"][..., 0], 1 + i) for i in range(steps)]
    else:
        head_in = batch["hidden_last"].to(model.lm_head.weight.dtype)
        targets = [model.lm_head(shift_left(head_in, 1 + i)).argmax(-1) for i in range(steps)]
    return greedy_chain_acceptance(batch, drafts, targets, require_greedy_prefix)


# ---- the head's registry entry ---------------------------------------------------------------------------------


class Eagle1Head(DraftHead):
    """EAGLE-1: last hidden state in, next feature out; the target's lm_head reads it."""

    name = "eagle1"
    config_class = Eagle1Config
    module_class = Eagle1Draft
    vllm_method = "eagle"

    def required_fields(self, cfg: Any) -> tuple[str, ...]:
        # the vloss target is the stored last hidden state in both target modes
        return ("hidden_last",) if cfg.target == "full" else ("hidden_last", "topk_ids", "topk_logprobs")

    def build(self, cfg: Any, reader: Any) -> tuple[nn.Module, Eagle1Objective, dict]:
        target_name = reader.fingerprint["model"].get("path") or reader.fingerprint["model"]["name"]
        config = self.config_class.from_target(reader.target_config(), target_name=target_name)
        model = self.module_class(config)
        model.load_target_weights(reader.target_weights())
        objective = Eagle1Objective(v_weight=cfg.v_weight, p_weight=cfg.p_weight, noise=cfg.noise or "uniform",
                                    noise_std=cfg.noise_std, noise_scale_by_length=cfg.noise_scale_by_length,
                                    target=cfg.target)  # fmt: skip
        return model, objective, {"variant": self.name, "config": config.to_dict()}

    loss = staticmethod(training_loss)
    chain_acceptance = staticmethod(chain_acceptance)

    def chain_steps(self, cfg: Any) -> int:
        return self.CHAIN_STEPS

    def row_inputs(self, model, hidden_states, aux_layer_ids, rows):
        h = hidden_states[-1]  # HF's last hidden state is post-norm, as stored in hidden_last
        return (h if rows is None else h[:, rows]).to(model.fc.weight.dtype)

    def export_layout(self, model, config, fmt, body, dtype, num_speculative_tokens):
        if config.fc_bias:
            raise ValueError("vLLM's EAGLE-1 loader builds fc without bias; train with fc_bias=False to export")
        prefix = "layers.0."  # vLLM's llama_eagle.py name, which happens to be the module's too
        weights = export_weights(model, self.layer_prefix, prefix, dtype)
        return {"architectures": ["LlamaForCausalLM"], **body}, weights, prefix


register(Eagle1Head())

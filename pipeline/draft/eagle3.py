"""EAGLE-3 draft head: config, draft vocabulary, module, training-time-test objective, chain acceptance.

Architecture (SafeAILab/EAGLE ``eagle/traineagle3/cnets.py``; vLLM/SGLang ``llama_eagle3.py``): the target's aux
features (inputs of decoder layers ``aux_layer_ids``, concatenated, ``A*H``) are fused by ``fc: Linear(A*H -> H,
no bias)``; one decoder layer ``midlayer`` whose q/k/v read ``cat(input_layernorm(embed(x)), hidden_norm(h))``
(``2H``) with residual ``h``; final ``norm``; ``lm_head: H -> draft_vocab`` (trained from scratch). ``d2t``
(``target id = i + d2t[i]``) and ``t2d`` (bool over the target vocab) map the draft vocabulary. The hidden state
fed back at later steps is the decoder-layer output *before* ``norm`` (vLLM returns it as ``hidden_prenorm``,
SGLang as the aux output).

Training-time test (TTT), step ``i = 0..S-1`` at row ``t``:

* input token ``x_{t+1+i}``, target row ``t+1+i``, weight ``loss_mask[t+2+i]`` (all inside ``t``'s document);
* hidden input: ``fc(aux_t)`` at step 0, the step ``i-1`` output (pre-norm) of the same row afterwards;
* attention: the step-0 keys of rows ``<= t`` of the same document, plus row ``t``'s own keys of steps ``1..i``
  (the "diagonal"); never another row's keys of a later step. This is exactly what the draft sees when it
  drafts a chain from row ``t`` at inference.
* position ids: the step-``i`` query/key of row ``t`` uses ``position_ids[t] + i``. vLLM's EAGLE proposer (and
  our evaluator) run the ``i``-th drafted token at position ``p + i`` where ``p`` is the position of the last
  target row, so training uses the same rotation (the reference has switched between a constant position and
  ``+i``; we pin the choice that mirrors serving).

Loss ``sum_i step_decay^i * softCE_i`` over the draft vocabulary, each term a mean over the rows counted at that
step (``loss_mask`` and ``t2d[argmax target]``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from pipeline.draft.common import (
    DraftShape,
    TargetConfigError,
    acceptance_length,
    check_overrides,
    greedy_chain_acceptance,
    head_soft_ce,
    masked_mean,
    norm_weight_offset,
    run_layer,
    shifted_rows,
    target_fields,
    target_logits,
    unroll_chain,
)
from pipeline.draft.eagle1 import add_noise
from pipeline.draft.export import aux_layers_are_default, export_weights, speculators_config
from pipeline.draft.layers import (
    DecoderLayer,
    KVCache,
    RMSNorm,
    RotaryEmbedding,
    cache_attend_to,
    causal_mask,
    shift_left,
)
from pipeline.draft.registry import DraftHead, register


@dataclass
class Eagle3Config(DraftShape):
    aux_layer_ids: list[int] = field(default_factory=list)  # HF output_hidden_states indices, from the store
    draft_vocab_size: int = 32000
    target_hidden_size: int = 0  # hidden size of each aux feature (0: = hidden_size)
    aux_projection_dim: int = 0  # k of a projected store (its rows are y = P·x; fc reads them as fc·Pᵀ); 0: none
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    target_config: dict = field(default_factory=dict, repr=False)
    target_name: str | None = None

    variant: ClassVar[str] = "eagle3"

    def __post_init__(self):
        self.aux_layer_ids = [int(i) for i in self.aux_layer_ids]
        if not self.aux_layer_ids:
            raise ValueError("aux_layer_ids is required (read it from the store: fingerprint['layers']['aux'])")
        self.target_hidden_size = int(self.target_hidden_size or self.hidden_size)
        self.draft_vocab_size = min(int(self.draft_vocab_size), int(self.vocab_size))

    @classmethod
    def from_target(cls, target_config: dict, aux_layer_ids: Sequence[int], draft_vocab_size: int = 32000,
                    **overrides: Any) -> Eagle3Config:  # fmt: skip
        """Sizes, eps, rope and vocab from the target's HF config; ``aux_layer_ids`` as stored (never assumed)."""
        check_overrides({f.name for f in dataclasses.fields(cls)}, overrides, ("hidden_size", "vocab_size"))
        base = target_fields(target_config)
        return cls(**{**base, "target_config": dict(target_config), "aux_layer_ids": list(aux_layer_ids),
                      "draft_vocab_size": draft_vocab_size, "target_hidden_size": base["hidden_size"],
                      **overrides})  # fmt: skip

    @classmethod
    def from_store(cls, reader: Any, draft_vocab_size: int = 32000, **overrides: Any) -> Eagle3Config:
        """From a ``pipeline.store.StoreReader``: its target config, model name and aux layer ids."""
        fp = reader.fingerprint
        overrides.setdefault("target_name", fp["model"].get("path") or fp["model"].get("name"))
        projected = (fp.get("projection") or {}).get("hidden_aux")
        if projected:
            overrides.setdefault("aux_projection_dim", int(projected["k"]))
        return cls.from_target(reader.target_config(), fp["layers"]["aux"], draft_vocab_size, **overrides)

    @property
    def fused_width(self) -> int:
        """Width of the concatenated aux features (``A*H``), what an exported ``fc`` reads."""
        return len(self.aux_layer_ids) * self.target_hidden_size



# ---- draft vocabulary ------------------------------------------------------------------------------------------


def build_draft_vocab(token_counts: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The ``size`` most frequent loss tokens (ties: lower id first; ``size`` capped at the vocab).

    Returns ``d2t`` (int64 ``[size]``, draft ids in ascending target-id order, ``target = i + d2t[i]``), ``t2d``
    (bool ``[V]``) and the share of counted tokens the draft vocabulary covers.
    """
    counts = np.asarray(token_counts, dtype=np.int64)
    v = counts.shape[0]
    size = min(int(size), v)
    order = np.lexsort((np.arange(v), -counts))  # last key is primary: count desc, then id asc
    used = np.sort(order[:size])
    d2t = torch.from_numpy(used - np.arange(size)).to(torch.int64)
    t2d = torch.zeros(v, dtype=torch.bool)
    t2d[torch.from_numpy(used)] = True
    total = int(counts.sum())
    coverage = float(counts[used].sum() / total) if total else 0.0
    return d2t, t2d, coverage


def draft_to_target(draft_ids: torch.Tensor, d2t: torch.Tensor) -> torch.Tensor:
    return draft_ids + d2t[draft_ids]


def target_to_draft(target_ids: torch.Tensor, d2t: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Draft ids of target ids; ``-1`` where the target id is not in the draft vocabulary."""
    index = torch.full((vocab_size,), -1, dtype=torch.long, device=d2t.device)
    draft = torch.arange(d2t.shape[0], device=d2t.device)
    index[draft + d2t] = draft
    return index[target_ids]


PREDICTION_SAMPLES = 64  # stored samples read (evenly spread) to measure the draft vocabulary's prediction coverage


def prediction_coverage(reader: Any, t2d: torch.Tensor, head: torch.Tensor | None = None,
                        samples: int = PREDICTION_SAMPLES) -> float:  # fmt: skip
    """Share of the target's next-token argmaxes at loss positions (stored ``topk_ids[..., 0]``, or
    ``argmax(hidden_last @ head.T)`` for stores without top-k ids, of up to ``samples`` samples) that the draft
    vocabulary holds: the rows EAGLE-3 can learn from (a row whose target argmax lies outside the draft vocabulary
    weighs 0 in :func:`training_loss`).

    ``draft_vocab_coverage`` counts the *data* tokens; when the answers are not the target's own (a random or
    mismatched target), the two differ, and at 0 every step would train on nothing: refused here, before any work.
    Returns -1.0 where it cannot be measured (no top-k ids and no ``head``)."""
    topk = "topk_ids" in reader.has
    if not topk and (head is None or "hidden_last" not in reader.has):
        return -1.0
    n = len(reader)
    picks = sorted({int(i * n / min(n, samples)) for i in range(min(n, samples))})
    hit = total = 0
    for i in picks:
        s = reader.sample(i, ("topk_ids" if topk else "hidden_last", "loss_mask"))
        if topk:
            arg = s["topk_ids"][:-1, 0].long()
        else:  # a few hundred rows at a time: rows x vocabulary logits
            h = s["hidden_last"][:-1].to(head.dtype)
            arg = torch.cat([(h[j:j + 256] @ head.T).argmax(-1) for j in range(0, h.shape[0], 256)]) if len(h) else (
                torch.zeros(0, dtype=torch.long))  # fmt: skip
        counted = s["loss_mask"][1:].bool()  # row t predicts token t + 1, counted where that is a loss token
        total += int(counted.sum())
        hit += int((t2d[arg.clamp_min(0)] & counted).sum())
    if total and hit == 0:
        raise TargetConfigError(
            f"draft vocabulary: none of the target's next-token argmaxes at {total} loss positions of {len(picks)} "
            f"samples lies in the {int(t2d.sum())}-token draft vocabulary (built from the data's token counts), so "
            "EAGLE-3 would train on nothing: the answers are not the target's own; regenerate them with the target "
            "(pipeline regenerate) or raise --draft-vocab-size")  # fmt: skip
    return hit / total if total else 0.0


# ---- module ----------------------------------------------------------------------------------------------------


class Eagle3Draft(nn.Module):
    FROZEN: ClassVar[tuple[str, ...]] = ("embed_tokens.weight",)

    def __init__(self, config: Eagle3Config):
        super().__init__()
        c = config
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        # fc keeps the whole features' basis [H, A*H] even over a projected store, whose rows y = P·x it reads as
        # (fc·Pᵀ)·y: the same initial weights and the same Adam coordinates as a head trained on the whole features
        # (an fc' [H, k] over y trains in P's principal axes, where Adam's per-coordinate steps differ; README
        # "Compact store"). P [k, A*H] (orthonormal rows) is the store's; saved with the weights, folded in at export.
        self.fc = nn.Linear(c.fused_width, c.hidden_size, bias=False)
        self.register_buffer("aux_projection", torch.zeros(c.aux_projection_dim, c.fused_width)
                             if c.aux_projection_dim else None)  # fmt: skip
        self.midlayer = DecoderLayer(
            c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.rms_norm_eps, c.hidden_act, eagle3=True, attention_bias=c.attention_bias, mlp_bias=c.mlp_bias)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.rotary = RotaryEmbedding(c.target_config, c.head_dim)
        # Identity mapping until set_vocab: a full-size draft vocabulary.
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.int64))
        t2d = torch.zeros(c.vocab_size, dtype=torch.bool)
        t2d[: c.draft_vocab_size] = True
        self.register_buffer("t2d", t2d)
        # The target's full lm_head, only for objective target="full"; never saved or exported.
        self.register_buffer("target_lm_head", None, persistent=False)

    # ---- weights / vocab -----------------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Heads saved before fc kept the whole basis hold fc' [H, k] over y = P·x: fc'·P reads y the same way.
        fc, p = state_dict.get(prefix + "fc.weight"), state_dict.get(prefix + "aux_projection")
        if fc is not None and p is not None and fc.shape[-1] == p.shape[0] != self.fc.weight.shape[-1]:
            state_dict[prefix + "fc.weight"] = (fc.double() @ p.double()).to(fc.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_vocab(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        if d2t.shape != self.d2t.shape or t2d.shape != self.t2d.shape:
            raise ValueError(f"vocab maps of shape {tuple(d2t.shape)}/{tuple(t2d.shape)}, expected "
                             f"{tuple(self.d2t.shape)}/{tuple(self.t2d.shape)}")  # fmt: skip
        used = torch.arange(d2t.shape[0]) + d2t.cpu()
        if not bool(t2d.cpu()[used].all()) or int(t2d.sum()) != d2t.shape[0]:
            raise ValueError("d2t and t2d disagree")
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    def load_target_weights(self, weights: dict[str, torch.Tensor], target_head: bool = False) -> None:
        """Copy the target's ``embed_tokens.weight``; with ``target_head`` also keep its full ``lm_head``
        (needed by ``Eagle3Objective(target="full")``; a non-persistent buffer, not part of any export)."""
        with torch.no_grad():
            self.embed_tokens.weight.copy_(weights["embed_tokens.weight"].to(self.embed_tokens.weight.dtype))
        if target_head:
            head = weights.get("lm_head.weight", weights["embed_tokens.weight"])
            self.target_lm_head = head.detach().to(self.embed_tokens.weight.dtype).clone()

    def init_head_from_target(self, weights: dict[str, torch.Tensor]) -> None:
        """Start ``lm_head`` from the target's lm_head rows of the draft vocabulary and ``norm`` from the target's
        final norm (speculators' initialisation; EAGLE and SpecForge start both from scratch)."""
        head = weights.get("lm_head.weight", weights["embed_tokens.weight"])
        used = torch.arange(self.d2t.shape[0]) + self.d2t.cpu()
        with torch.no_grad():
            self.lm_head.weight.copy_(head[used].to(self.lm_head.weight.dtype))
            if "norm.weight" in weights:  # Gemma stores w of its (1 + w) norm: the draft's Llama norm needs 1 + w
                offset = norm_weight_offset(self.config.target_config)
                self.norm.weight.copy_(weights["norm.weight"].to(self.norm.weight.dtype) + offset)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def draft_state_dict(self) -> dict[str, torch.Tensor]:
        """Trained weights + vocab maps (``fc``, ``midlayer.*``, ``norm``, ``lm_head``, ``d2t``, ``t2d``)."""
        return {k: v for k, v in self.state_dict().items() if k not in self.FROZEN}

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_to_target(draft_ids, self.d2t)

    def target_to_draft(self, target_ids: torch.Tensor) -> torch.Tensor:
        return target_to_draft(target_ids, self.d2t, self.config.vocab_size)

    def target_logits(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """Draft-vocab logits scattered into the target vocab (``-inf`` elsewhere), as vLLM's compute_logits."""
        out = draft_logits.new_full((*draft_logits.shape[:-1], self.config.vocab_size), float("-inf"))
        out[..., torch.arange(self.d2t.shape[0], device=self.d2t.device) + self.d2t] = draft_logits
        return out

    # ---- forward -------------------------------------------------------------------------------------------

    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """``fc`` over the concatenated aux features ``[B, N, A*H]`` -> ``[B, N, H]`` (step-0 hidden input); a head
        trained on a projected store takes them projected (``[B, N, k]``, as stored) or whole (projected here)."""
        weight, p = self.fc.weight, self.aux_projection
        if p is None:
            return self.fc(aux.to(weight.dtype))
        p = p.to(weight.dtype)
        if aux.shape[-1] != p.shape[0]:
            aux = aux.to(weight.dtype) @ p.T
        return nn.functional.linear(aux.to(weight.dtype), weight @ p.T)

    def unprojected(self) -> Eagle3Draft:
        """The same head over the whole aux features: ``fc·PᵀP`` (``[H, A*H]``), what the engines load. A head
        without a projection is returned as it is."""
        if self.aux_projection is None:
            return self
        dtype = self.fc.weight.dtype
        out = type(self)(dataclasses.replace(self.config, aux_projection_dim=0)).to(dtype)
        state = {k: v for k, v in self.state_dict().items() if k != "aux_projection"}
        p = self.aux_projection.double()
        state["fc.weight"] = (self.fc.weight.detach().double() @ p.T @ p).to(dtype)
        out.load_state_dict(state, strict=True)
        if self.target_lm_head is not None:
            out.target_lm_head = self.target_lm_head
        return out.train(self.training)

    def logits(self, hidden_prenorm: torch.Tensor) -> torch.Tensor:
        """Draft-vocab logits of a pre-norm layer output."""
        return self.lm_head(self.norm(hidden_prenorm))

    def _layer(self, hidden: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor, attend_to):
        cos, sin = self.rotary(position_ids)
        emb = self.embed_tokens(input_ids).to(hidden.dtype)
        return run_layer(self, self.midlayer, hidden, cos, sin, attend_to, emb)

    def step(self, hidden: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
             cache: KVCache | None, mask: torch.Tensor, last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Inference: (pre-norm output ``[B, N, H]``, draft-vocab logits ``[B, N, draft_vocab]``; with ``last_only``
        those of the last row only).

        ``hidden`` is ``fuse(aux)`` for rows the target computed, or a previous pre-norm output for drafted
        rows. ``mask``: bool ``[B, N, S]`` / ``[N, S]`` over (cached + new) keys; new keys go into ``cache``.

        A chain of ``k`` drafts after the target has verified up to position ``p``:

        1. ``step(fuse(aux[:, s:p+1]), x[:, s+1:p+2], positions s..p, cache, causal_mask(p+1-s, len(cache)))``
           for rows ``s..p`` not cached yet; the last row's logits give ``d_1`` (``draft_to_target(argmax)``),
           its pre-norm output ``h``.
        2. For ``i = 1..k-1``: ``step(h, d_i, position p+i, cache, all-true [1, len(cache)+1])``.
        3. After verification, ``cache.crop(p + 1)``: keys of drafted rows used the draft's own hidden state;
           the next round recomputes those rows from the target's aux features.

        Tree drafting: masks over each node's ancestors, ``cache.select`` to keep the accepted branch.
        """
        out, _, _ = self._layer(hidden, input_ids, position_ids, cache_attend_to(cache, 0, mask))
        return out, self.logits(out[:, -1:] if last_only else out)

    @torch.no_grad()
    def generate_chain(self, aux: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
                       cache: KVCache, k: int) -> torch.Tensor:  # fmt: skip
        """Greedy chain of ``k`` draft tokens (target ids ``[B, k]``) following :meth:`step`."""
        n = aux.shape[1]
        h, logits = self.step(self.fuse(aux), input_ids, position_ids, cache, causal_mask(n, len(cache), aux.device))
        h, pos = h[:, -1:], position_ids[:, -1:]
        tok = self.draft_to_target(logits[:, -1:].argmax(-1))
        drafts = [tok]
        for _ in range(k - 1):
            pos = pos + 1
            mask = torch.ones(1, len(cache) + 1, dtype=torch.bool, device=aux.device)
            h, logits = self.step(h, tok, pos, cache, mask)
            tok = self.draft_to_target(logits.argmax(-1))
            drafts.append(tok)
        return torch.cat(drafts, dim=1)

    def ttt_forward(self, fused: torch.Tensor, batch: dict[str, torch.Tensor], steps: int,
                    dense: bool = False) -> list[torch.Tensor]:  # fmt: skip
        """Pre-norm outputs ``[B, T, H]`` of TTT steps ``0..steps-1`` (see the module docstring).

        ``dense=True`` attends over the explicitly concatenated keys of all steps with
        :func:`ttt_attention_mask` (O(T^2 * steps) memory) instead of step-0 keys + per-row diagonals; the two
        are the same computation and tests compare them.
        """
        return unroll_chain(self._layer, fused, batch, steps, dense=dense)


# ---- objective -------------------------------------------------------------------------------------------------


@dataclass
class Eagle3Objective:
    ttt_steps: int = 7
    step_decay: float = 0.8
    target: str = "topk"  # "topk": stored top-k mapped into the draft vocab; "full": target lm_head (needs it)
    noise: str = "none"  # "none" | "uniform" | "gaussian", on the aux features in train mode
    noise_std: float = 0.2
    noise_scale_by_length: bool = False
    fused_head: bool = True  # common.head_soft_ce: lm_head + softCE in row chunks (False: through autograd)

    def __post_init__(self):
        if self.ttt_steps < 1:
            raise ValueError("ttt_steps must be >= 1")
        if self.noise not in ("uniform", "gaussian", "none"):
            raise ValueError(f"noise must be uniform|gaussian|none, not {self.noise!r}")
        if self.target not in ("topk", "full"):
            raise ValueError(f"target must be topk|full, not {self.target!r}")


def _step_target(model: Eagle3Draft, batch: dict[str, torch.Tensor], step: int, target: str,
                 rows: torch.Tensor | None = None):  # fmt: skip
    """(target argmax in target ids, draft ids ``[.., K]`` (None: dense), probabilities over the draft vocabulary)
    of the target of row ``t+1+step``: sparse (stored top-k, ``-1`` outside the draft vocabulary) or dense (``full``).

    ``rows`` (bool ``[B,T]``) restricts both to the selected rows (flattened), so the vocabulary-sized work is
    done only where a loss is counted."""

    def pick(x: torch.Tensor) -> torch.Tensor:
        x = shift_left(x, 1 + step)
        return x if rows is None else x[rows]

    if target == "full":
        head = model.target_lm_head
        if head is None:
            raise ValueError("target='full' needs the target lm_head: model.load_target_weights(w, target_head=True)")
        with torch.no_grad():
            tl = target_logits(pick(batch["hidden_last"]), head, model.config.target_config)
            arg = tl.argmax(-1)
            used = torch.arange(model.d2t.shape[0], device=tl.device) + model.d2t
            p = torch.softmax(tl[..., used].float(), dim=-1)
        return arg, None, p
    ids = pick(batch["topk_ids"])
    p = pick(batch["topk_logprobs"].float()).exp()
    dids = model.target_to_draft(ids)
    p = torch.where(dids >= 0, p, torch.zeros_like(p))
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    return ids[..., 0], dids, p


def training_loss(model: Eagle3Draft, batch: dict[str, torch.Tensor],
                  objective: Eagle3Objective | None = None) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """TTT loss ``sum_i step_decay^i * loss_i``; metrics ``loss_i``, ``acc_i``, ``tokens_i`` per step and
    ``loss``, ``acc`` (= ``acc_0``), ``tokens`` (= ``tokens_0``)."""
    obj = objective or Eagle3Objective()
    aux = batch["hidden_aux"].float()
    if model.training and obj.noise != "none":
        aux = add_noise(aux, obj.noise, obj.noise_std, batch["doc_ids"], obj.noise_scale_by_length)
    outs = model.ttt_forward(model.fuse(aux), batch, obj.ttt_steps)

    total = torch.zeros((), device=aux.device)
    stats = []
    for i, h in enumerate(outs):
        counted = shifted_rows(batch, i)["counted"]
        arg, dids, p = _step_target(model, batch, i, obj.target, counted)
        # draft-vocab logits only for counted rows: the lm_head is most of the step's compute
        w = model.t2d[arg].float()
        loss_i, draft_arg = head_soft_ce(model.norm(h[counted]), model.lm_head, w, dids, p,
                                         fused=obj.fused_head)  # fmt: skip
        total = total + obj.step_decay**i * loss_i
        with torch.no_grad():
            acc_i = masked_mean((model.draft_to_target(draft_arg) == arg).float(), w)
        stats.append(torch.stack([loss_i.detach(), acc_i, w.sum()]))
    vals = torch.stack(stats).tolist()
    metrics: dict[str, float] = {"loss": float(total.detach()), "acc": vals[0][1], "tokens": vals[0][2]}
    for i, (loss_i, acc_i, n_i) in enumerate(vals):
        metrics[f"loss_{i}"], metrics[f"acc_{i}"], metrics[f"tokens_{i}"] = loss_i, acc_i, n_i
    return total, metrics


# ---- acceptance ------------------------------------------------------------------------------------------------


simulated_acceptance = acceptance_length


@torch.no_grad()
def chain_acceptance(model: Eagle3Draft, batch: dict[str, torch.Tensor], steps: int = 7,
                     require_greedy_prefix: bool = True) -> dict[str, Any]:  # fmt: skip
    """Simulated greedy chain acceptance per step (see :func:`pipeline.draft.common.greedy_chain_acceptance`)."""
    was_training = model.training
    model.eval()
    try:
        outs = model.ttt_forward(model.fuse(batch["hidden_aux"].float()), batch, steps)
    finally:
        model.train(was_training)
    target = "topk" if "topk_ids" in batch else "full"
    return greedy_chain_acceptance(
        batch, [model.draft_to_target(model.logits(h).argmax(-1)) for h in outs],
        [_step_target(model, batch, i, target)[0] for i in range(steps)], require_greedy_prefix)


# ---- the head's registry entry ---------------------------------------------------------------------------------


class Eagle3Head(DraftHead):
    """EAGLE-3: fused aux-layer features in, its own norm + lm_head over a draft vocabulary out."""

    name = "eagle3"
    config_class = Eagle3Config
    module_class = Eagle3Draft
    layer_prefix = "midlayer."
    export_formats = ("vllm", "speculators")
    vllm_method = "eagle3"

    def required_fields(self, cfg: Any) -> tuple[str, ...]:
        return ("hidden_aux", "hidden_last") if cfg.target == "full" else ("hidden_aux", "topk_ids", "topk_logprobs")

    def build(self, cfg: Any, reader: Any) -> tuple[nn.Module, Eagle3Objective, dict]:
        weights = reader.target_weights()
        config = self.config_class.from_store(reader, cfg.draft_vocab_size)
        model = self.module_class(config)
        if config.aux_projection_dim:
            with torch.no_grad():
                model.aux_projection.copy_(reader.projection("hidden_aux"))
        d2t, t2d, coverage = build_draft_vocab(reader.token_counts(), config.draft_vocab_size)
        predicted = prediction_coverage(reader, t2d, weights.get("lm_head.weight", weights["embed_tokens.weight"]))
        model.set_vocab(d2t, t2d)
        model.load_target_weights(weights, target_head=cfg.target == "full")
        if cfg.head_init == "target":
            model.init_head_from_target(weights)
        elif cfg.head_init != "random":
            raise ValueError(f"--head-init {cfg.head_init!r}: choose random or target")
        objective = Eagle3Objective(ttt_steps=cfg.ttt_steps, step_decay=cfg.step_decay, target=cfg.target,
                                    noise=cfg.noise or "none", noise_std=cfg.noise_std,
                                    noise_scale_by_length=cfg.noise_scale_by_length)  # fmt: skip
        return model, objective, {"variant": self.name, "config": config.to_dict(),
                                  "draft_vocab_size": config.draft_vocab_size, "draft_vocab_coverage": coverage,
                                  "draft_vocab_prediction_coverage": predicted}  # fmt: skip

    loss = staticmethod(training_loss)
    chain_acceptance = staticmethod(chain_acceptance)

    def chain_steps(self, cfg: Any) -> int:
        return max(cfg.ttt_steps, self.CHAIN_STEPS)  # deeper than trained is still what drafting does

    def row_inputs(self, model, hidden_states, aux_layer_ids, rows):
        def take(h: torch.Tensor) -> torch.Tensor:
            return h if rows is None else h[:, rows]

        # fc over the aux layers concatenated in the stored order (hidden_aux.reshape(T, A*H) of the store)
        return model.fuse(torch.cat([take(hidden_states[i]) for i in aux_layer_ids], dim=-1))

    def draft_step(self, model, hidden, ids, positions, cache, mask, last_only):
        out, logits = model.step(hidden, ids, positions, cache, mask, last_only=last_only)
        return out, model.target_logits(logits)  # -inf outside the draft vocabulary

    def optional_weights(self, config: Eagle3Config) -> set[str]:
        # A full-size draft vocabulary is exported without its (identity) maps; the module's defaults are those.
        return super().optional_weights(config) | ({"d2t", "t2d"} if config.draft_vocab_size == config.vocab_size else set())

    def servable(self, model: Eagle3Draft) -> Eagle3Draft:
        return model.unprojected()

    def export_layout(self, model, config, fmt, body, dtype, num_speculative_tokens):
        ids = list(config.aux_layer_ids)
        if len(ids) != 3:
            warnings.warn(f"{len(ids)} aux layers: vLLM and SGLang size fc for exactly 3", stacklevel=3)
        if ids != sorted(set(ids)):
            # Engines capture each layer once, in layer order, and concatenate in that order.
            warnings.warn(f"aux layer ids {ids} are not strictly increasing: vLLM/SGLang would feed fc the "
                          "features in ascending layer order (and once per layer)", stacklevel=3)  # fmt: skip
        common = {"draft_vocab_size": config.draft_vocab_size, "target_hidden_size": config.target_hidden_size,
                  "norm_before_residual": False}  # fmt: skip
        # Left out when default: SGLang before PR #25454 would shift explicit ids by one (export module docstring).
        aux_ids = {} if aux_layers_are_default(config) else {"eagle_aux_hidden_state_layer_ids": ids}
        if fmt == "vllm":  # export_draft checked fmt against export_formats
            prefix = "midlayer."
            cfg = {"architectures": ["LlamaForCausalLMEagle3"], **body, **common,
                   "eagle_config": {**aux_ids, "use_aux_hidden_state": True}}  # fmt: skip
        else:
            prefix = "layers.0."
            cfg = speculators_config(config, body, common, aux_ids, num_speculative_tokens)
        weights = export_weights(model, self.layer_prefix, prefix, dtype)
        if config.draft_vocab_size == config.vocab_size:  # identity maps: vLLM refuses a d2t then
            weights.pop("d2t", None)
            weights.pop("t2d", None)
        if fmt == "speculators":  # speculators' loader would leave its embedding at zeros without it
            weights["embed_tokens.weight"] = model.embed_tokens.weight.detach().cpu().to(dtype).contiguous()
        return cfg, weights, prefix


register(Eagle3Head())

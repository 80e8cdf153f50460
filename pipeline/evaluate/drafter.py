"""Drafting with a trained EAGLE-1 / EAGLE-3 head: a chain, or an EAGLE-2 dynamic tree.

Row convention (as :meth:`pipeline.draft.eagle1.Eagle1Draft.step`): draft row ``t`` reads the feature of
position ``t`` and token ``x_{t+1}`` at position id ``t`` and predicts ``x_{t+2}``. After the target has
produced token ``x_n`` (fed to nobody yet), the rows up to ``n - 1`` are computable from real target features;
the last one gives the distribution of ``x_{n+1}``, and a drafted token at depth ``d`` is fed at position
``n - 1 + d`` with its parent row's output as hidden input (EAGLE-1: the predicted feature; EAGLE-3: the
pre-norm layer output). Drafted rows are dropped from the draft cache afterwards: the next round recomputes the
accepted ones from the target's real features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.draft.eagle1 import Eagle1Draft
from pipeline.draft.eagle3 import Eagle3Draft
from pipeline.draft.layers import KVCache, causal_mask
from pipeline.evaluate.tree import Tree


@dataclass
class DraftSettings:
    mode: str = "chain"  # "chain" | "tree"
    depth: int = 5  # chain length / maximal tree depth
    top_k: int = 8  # tree: children per expanded node and nodes expanded per depth
    total_tokens: int = 60  # tree: drafted nodes kept for verification (the root comes on top)
    temperature: float = 0.0

    def __post_init__(self):
        if self.mode not in ("chain", "tree"):
            raise ValueError(f"mode must be chain|tree, not {self.mode!r}")
        if self.depth < 1 or self.top_k < 1 or self.total_tokens < 1:
            raise ValueError("depth, top_k and total_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")


class Drafter:
    """One interface over both heads: target hidden states in, logits over the *target* vocabulary out."""

    def __init__(self, model: Eagle1Draft | Eagle3Draft, aux_layer_ids: Sequence[int] | None = None):
        self.model = model
        self.variant = model.config.variant
        if isinstance(model, Eagle3Draft):
            self.aux_layer_ids = list(aux_layer_ids if aux_layer_ids is not None else model.config.aux_layer_ids)
        elif isinstance(model, Eagle1Draft):
            self.aux_layer_ids = []
        else:
            raise TypeError(f"not a draft head: {type(model).__name__}")

    @property
    def device(self) -> torch.device:
        return self.model.fc.weight.device

    def row_inputs(self, hidden_states: Sequence[torch.Tensor], rows: torch.Tensor | None = None) -> torch.Tensor:
        """The draft's hidden input ``[1, R, H]`` for target rows ``rows`` (all if ``None``) of one forward.

        EAGLE-1: HF ``hidden_states[-1]`` (post-norm). EAGLE-3: ``fc`` over ``hidden_states[i]`` for the aux ids,
        concatenated in the stored order (``hidden_aux.reshape(T, A*H)`` of the store)."""

        def take(h: torch.Tensor) -> torch.Tensor:
            return h if rows is None else h[:, rows]

        dtype = self.model.fc.weight.dtype
        if self.variant == "eagle1":
            return take(hidden_states[-1]).to(dtype)
        return self.model.fuse(torch.cat([take(hidden_states[i]) for i in self.aux_layer_ids], dim=-1))

    def step(self, hidden: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
             mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(output hidden fed to child rows, fp32 logits over the target vocab; EAGLE-3: ``-inf`` outside its
        draft vocabulary, so argmax/softmax pick target ids directly)."""
        out, logits = self.model.step(hidden, ids, positions, cache, mask)
        if self.variant == "eagle3":
            logits = self.model.target_logits(logits)
        return out, logits.float()


@torch.no_grad()
def propose(drafter: Drafter, cache: KVCache, hidden: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
            settings: DraftSettings, depth: int | None = None,
            generator: torch.Generator | None = None) -> Tree:  # fmt: skip
    """Feed the new real rows (``hidden``/``ids``/``positions``: ``[1, R, ...]``) into ``cache``, then draft a
    chain or tree of at most ``depth`` (default ``settings.depth``) levels; ``cache`` ends holding real rows only."""
    depth = settings.depth if depth is None else depth
    mask = causal_mask(hidden.shape[1], len(cache), hidden.device)
    out, logits = drafter.step(hidden, ids, positions, cache, mask)
    real = len(cache)
    h, logits, pos = out[:, -1:], logits[0, -1], int(positions[0, -1])
    if depth <= 0:
        tree = Tree.empty(hidden.device)
    elif settings.mode == "chain":
        tree = draft_chain(drafter, cache, h, logits, pos, depth, settings.temperature, generator)
    else:
        tree = draft_tree(drafter, cache, h, logits, pos, depth, settings.top_k, settings.total_tokens)
    cache.crop(real)
    return tree


def draft_chain(drafter: Drafter, cache: KVCache, h: torch.Tensor, logits: torch.Tensor, pos: int, depth: int,
                temperature: float, generator: torch.Generator | None = None) -> Tree:  # fmt: skip
    """``depth`` tokens, each fed back at the next position: argmax at temperature 0, else sampled from
    ``q = softmax(logits / T)`` (kept for the acceptance rule)."""
    tokens, proposals = [], []
    for i in range(depth):
        if i:
            keys = torch.ones(1, len(cache) + 1, dtype=torch.bool, device=h.device)
            pos_i = torch.tensor([[pos + i]], device=h.device)
            h, step_logits = drafter.step(h, tokens[-1].view(1, 1), pos_i, cache, keys)
            logits = step_logits[0, -1]
        if temperature > 0:
            q = torch.softmax(logits / temperature, dim=-1)
            tok = torch.multinomial(q, 1, generator=generator)[0]
        else:
            q, tok = None, logits.argmax()
        tokens.append(tok)
        proposals.append(q)
    return Tree.chain(torch.stack(tokens), proposals)


def draft_tree(drafter: Drafter, cache: KVCache, h: torch.Tensor, logits: torch.Tensor, pos: int, depth: int,
               top_k: int, total_tokens: int) -> Tree:  # fmt: skip
    """EAGLE-2 dynamic tree: score = cumulative draft log-prob (untempered; at temperature > 0 the nodes are
    still chosen deterministically, see :mod:`pipeline.evaluate.sampling`). Level 1 is the root's top-k; at each further
    level the ``top_k`` best nodes of the last level are fed (one draft step, tree-masked) and each adds its
    top-k children. All created nodes compete; the ``total_tokens`` best are kept (ancestor-closed: a child
    never outscores its parent, and ties keep the earlier-created parent)."""
    dev, real = h.device, len(cache)
    vals, idx = torch.log_softmax(logits, -1).topk(top_k)
    tokens, scores = [idx], [vals]
    parents, depths = [-1] * top_k, [1] * top_k
    ancestors: list[list[int]] = [[] for _ in range(top_k)]  # cache slots of each node's fed ancestors
    frontier = list(range(top_k))
    frontier_h = h.expand(1, top_k, h.shape[-1])
    for d in range(1, depth):
        start, k = len(cache), len(frontier)
        mask = torch.zeros(k, start + k, dtype=torch.bool)
        mask[:, :real] = True
        for j, node in enumerate(frontier):
            mask[j, ancestors[node]] = True
            mask[j, start + j] = True
        node_tokens = torch.cat(tokens)[frontier]
        out, step_logits = drafter.step(frontier_h, node_tokens[None], torch.full((1, k), pos + d, device=dev),
                                        cache, mask.to(dev))  # fmt: skip
        vals, idx = torch.log_softmax(step_logits[0], -1).topk(top_k)  # [k, top_k]
        cum = torch.cat(scores)[frontier][:, None] + vals
        first = len(parents)
        tokens.append(idx.reshape(-1))
        scores.append(cum.reshape(-1))
        for j, node in enumerate(frontier):
            parents += [node] * top_k
            depths += [d + 1] * top_k
            ancestors += [ancestors[node] + [start + j]] * top_k
        best = cum.reshape(-1).topk(min(top_k, cum.numel())).indices.tolist()
        frontier = [first + b for b in best]
        frontier_h = out[:, [b // top_k for b in best]]
    all_scores = torch.cat(scores)
    order = torch.sort(all_scores, descending=True, stable=True).indices[:total_tokens]
    # -inf scores: EAGLE-3 tokens outside the draft vocabulary (top_k larger than what it can propose)
    keep = order[all_scores[order].isfinite()].sort().values.tolist()
    new_index = {old: new for new, old in enumerate(keep)}
    return Tree(torch.cat(tokens)[keep], [new_index[parents[i]] if parents[i] >= 0 else -1 for i in keep],
                [depths[i] for i in keep], [None] * len(keep))  # fmt: skip

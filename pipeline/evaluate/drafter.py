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
from torch import nn

from pipeline.draft.layers import KVCache, causal_mask
from pipeline.draft.registry import head_of
from pipeline.evaluate.budget import Budget
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
    """One interface over every registered head (:mod:`pipeline.draft.registry`): target hidden states in, logits
    over the *target* vocabulary out."""

    def __init__(self, model: nn.Module, aux_layer_ids: Sequence[int] | None = None):
        self.model = model
        self.head = head_of(model)
        self.variant = self.head.name
        own = self.head.aux_layer_ids(model.config)
        self.aux_layer_ids = list(aux_layer_ids) if aux_layer_ids is not None and own else own

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def row_inputs(self, hidden_states: Sequence[torch.Tensor], rows: torch.Tensor | None = None) -> torch.Tensor:
        """The draft's hidden input ``[1, R, H]`` for target rows ``rows`` (all if ``None``) of one forward
        (EAGLE-1: HF ``hidden_states[-1]``, post-norm; EAGLE-3: ``fc`` over the aux layers' states)."""
        return self.head.row_inputs(self.model, hidden_states, self.aux_layer_ids, rows)

    def step(self, hidden: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
             mask: torch.Tensor, last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(output hidden fed to child rows, fp32 logits over the target vocab; EAGLE-3: ``-inf`` outside its
        draft vocabulary, so argmax/softmax pick target ids directly). ``last_only``: logits of the last row only."""
        out, logits = self.head.draft_step(self.model, hidden, ids, positions, cache, mask, last_only)
        return out, logits.float()


@torch.no_grad()
def propose(drafter: Drafter, cache: KVCache, hidden: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
            settings: DraftSettings, depth: int | None = None, generator: torch.Generator | None = None,
            budget: Budget | None = None) -> tuple[Tree, Tree]:  # fmt: skip
    """Feed the new real rows (``hidden``/``ids``/``positions``: ``[1, R, ...]``) into ``cache``, then draft a
    chain or tree of at most ``depth`` (default ``settings.depth``) levels; ``cache`` ends holding real rows only.

    Returns (the tree to verify, every drafted node). Without ``budget`` both are the same tree of fixed size; with
    it, drafting stops once deeper drafts cannot pay for themselves and only the most likely nodes that maximise
    the expected tokens per second are verified (:mod:`pipeline.evaluate.budget`)."""
    depth = settings.depth if depth is None else depth
    mask = causal_mask(hidden.shape[1], len(cache), hidden.device)
    out, logits = drafter.step(hidden, ids, positions, cache, mask, last_only=True)
    real = len(cache)
    h, logits, pos = out[:, -1:], logits[0, -1], int(positions[0, -1])
    if depth <= 0:
        tree = Tree.empty(hidden.device)
        chosen = tree
    elif settings.mode == "chain":
        tree, chosen = draft_chain(drafter, cache, h, logits, pos, depth, settings.temperature, generator, budget)
    else:
        tree, chosen = draft_tree(drafter, cache, h, logits, pos, depth, settings.top_k, settings.total_tokens, budget)
    cache.crop(real)
    return chosen, tree


def draft_chain(drafter: Drafter, cache: KVCache, h: torch.Tensor, logits: torch.Tensor, pos: int, depth: int,
                temperature: float, generator: torch.Generator | None = None,
                budget: Budget | None = None) -> tuple[Tree, Tree]:  # fmt: skip
    """Up to ``depth`` tokens, each fed back at the next position: argmax at temperature 0, else sampled from
    ``q = softmax(logits / T)`` (kept for the acceptance rule). Returns (all drafted, the prefix to verify).

    With ``budget``: greedy drafts stop once deeper ones cannot pay and the verified prefix is the best by expected
    rate (choosing it after the fact is harmless: greedy acceptance is a comparison). A sampled draft must be
    verified whatever was drawn (otherwise the verified tokens are no longer distributed as ``q``), so at
    temperature > 0 the decision to draft position ``i`` is taken before sampling it, from ``q_i`` alone."""
    tokens, proposals, probs = [], [], []
    expected, cum, best_n = 0.0, 1.0, 0
    for i in range(depth):
        if i:
            keys = torch.ones(1, len(cache) + 1, dtype=torch.bool, device=h.device)
            pos_i = torch.tensor([[pos + i]], device=h.device)
            h, step_logits = drafter.step(h, tokens[-1].view(1, 1), pos_i, cache, keys)
            logits = step_logits[0, -1]
        p = torch.softmax(logits, dim=-1)
        if temperature > 0:
            q = torch.softmax(logits / temperature, dim=-1)
            if budget is not None:
                likely = float((q.cpu() * budget.acceptance(p)).sum())  # E over x ~ q of its acceptance
                if not budget.can_improve(expected, i, i + 1, budget.rate(expected, i, i + 1), cum * likely,
                                          depth - i):  # fmt: skip
                    break
            tok = torch.multinomial(q, 1, generator=generator)[0]
        else:
            q, tok = None, logits.argmax()
        tokens.append(tok)
        proposals.append(q)
        probs.append(float(p[tok]))
        best_n = len(tokens)
        if budget is not None:
            cum *= float(budget.acceptance(torch.tensor(probs[-1])))
            expected += cum
            if temperature <= 0:
                best_n, best = budget.best_count(_chain_expectations(budget, probs), i + 1)
                if not budget.can_improve(expected, i + 1, i + 1, best, cum, depth - i - 1):
                    break
    if not tokens:
        return Tree.empty(h.device), Tree.empty(h.device)
    drafted = Tree.chain(torch.stack(tokens), proposals)
    drafted.probs = probs
    if budget is None or best_n == len(tokens):
        return drafted, drafted
    return drafted, drafted.subset(list(range(best_n)))


def _chain_expectations(budget: Budget, probs: list[float]) -> list[float]:
    """P(the chain is accepted through position i) for every drafted position, under the acceptance model."""
    out, cum = [], 1.0
    for a in budget.acceptance(torch.tensor(probs)).tolist():
        cum *= a
        out.append(cum)
    return out


def draft_tree(drafter: Drafter, cache: KVCache, h: torch.Tensor, logits: torch.Tensor, pos: int, depth: int,
               top_k: int, total_tokens: int, budget: Budget | None = None) -> tuple[Tree, Tree]:  # fmt: skip
    """EAGLE-2 dynamic tree. Level 1 is the root's top-k; at each further level the ``top_k`` best nodes of the last
    level are fed (one draft step, tree-masked) and each adds its top-k children. Nodes are ranked by their
    cumulative draft log-prob (untempered; at temperature > 0 the nodes are still chosen deterministically, see
    :mod:`pipeline.evaluate.sampling`), or with ``budget`` by their probability of acceptance under its acceptance
    model. Without ``budget`` the ``total_tokens`` best nodes are verified; with it, the best ``n <= total_tokens``
    by expected rate, and expansion stops when no deeper node could pay. The kept set is ancestor-closed: a child
    never outranks its parent, and ties keep the earlier-created one. Returns (all drafted, the nodes to verify)."""
    dev, real = h.device, len(cache)
    logp = torch.log_softmax(logits, -1)
    vals, idx = logp.topk(top_k)
    tokens, scores, probs = [idx], [_score(vals, budget)], [vals.exp()]
    parents, depths = [-1] * top_k, [1] * top_k
    ancestors: list[list[int]] = [[] for _ in range(top_k)]  # cache slots of each node's fed ancestors
    frontier = list(range(top_k))
    frontier_h = h.expand(1, top_k, h.shape[-1])
    for d in range(1, depth):
        if budget is not None:
            ranked = torch.cat(scores).exp().sort(descending=True, stable=True).values
            n, best = budget.best_count(ranked[:total_tokens].tolist(), d)
            bound = float(torch.cat(scores)[frontier].max().exp())
            if not budget.can_improve(float(ranked[:n].sum()), n, d, best, bound, min(top_k, total_tokens - n)):
                break
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
        cum = torch.cat(scores)[frontier][:, None] + _score(vals, budget)
        first = len(parents)
        tokens.append(idx.reshape(-1))
        scores.append(cum.reshape(-1))
        probs.append(vals.exp().reshape(-1))
        for j, node in enumerate(frontier):
            parents += [node] * top_k
            depths += [d + 1] * top_k
            ancestors += [ancestors[node] + [start + j]] * top_k
        best_children = cum.reshape(-1).topk(min(top_k, cum.numel())).indices.tolist()
        frontier = [first + b for b in best_children]
        frontier_h = out[:, [b // top_k for b in best_children]]
    all_scores = torch.cat(scores)
    order = torch.sort(all_scores, descending=True, stable=True).indices[:total_tokens]
    # -inf scores: EAGLE-3 tokens outside the draft vocabulary (top_k larger than what it can propose)
    order = order[all_scores[order].isfinite()]
    drafted = Tree(torch.cat(tokens), parents, depths, [None] * len(parents), torch.cat(probs).tolist())
    if budget is not None:
        steps = max(depths)  # draft steps run: the root's plus one per expanded level
        n, _ = budget.best_count(all_scores[order].exp().tolist(), steps)
        order = order[:n]
    return drafted, drafted.subset(order.sort().values.tolist())


def _score(logp: torch.Tensor, budget: Budget | None) -> torch.Tensor:
    """A node's ranking increment: its draft log-prob, or the log of its acceptance probability under ``budget``
    (``-inf`` stays ``-inf``: a token the draft cannot propose)."""
    if budget is None:
        return logp
    accept = budget.acceptance(logp.exp()).to(logp.device).clamp_min(1e-12).log()
    return torch.where(torch.isfinite(logp), accept, logp)

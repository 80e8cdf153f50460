"""Verification: which drafted tokens the target accepts, and the token it adds.

One rule covers greedy and sampled decoding, chains and trees: *recursive rejection sampling* (speculative
sampling generalised to several candidates, SpecInfer / EAGLE). At a node with target distribution ``p`` the
children are tried in order; child ``x`` proposed from distribution ``q`` is accepted with probability
``min(1, p(x) / q(x))``; on rejection ``p <- norm(max(0, p - q))`` and the next child is tried; when no child
is accepted the bonus token is drawn from the current ``p``. Output tokens are then distributed exactly as the
target's (Leviathan et al. 2023, Thm. 1, applied once per candidate).

* A chain at temperature > 0 samples each draft token from the draft's ``q``: the classic rule.
* Tree nodes (EAGLE-2's top-k expansion) and greedy drafts are chosen deterministically, so their proposal is
  the point mass at ``x``: accept with probability ``p(x)``, else zero ``p(x)`` and renormalise (the rule
  EAGLE's ``evaluate_posterior`` applies with ``q = 1``). Top-k children are distinct, so this stays exact.
* Temperature 0 is the limit where ``p`` is the one-hot of the target's argmax: a child is accepted iff it
  equals the argmax and the bonus token is the argmax, i.e. exactly the target's greedy decoding (implemented
  as that comparison).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.evaluate.tree import Tree


def target_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Rows of ``logits [N, V]`` as distributions: softmax at ``temperature``, one-hot argmax at 0."""
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits.float() / temperature, dim=-1)


@dataclass
class Acceptance:
    path: list[int]  # accepted tree nodes, root to leaf
    bonus: int  # the target's token after the path
    attempted: int  # depths at which a child was tried (len(path), +1 if the last node had children)


def _uniform(generator: torch.Generator | None, device: torch.device) -> float:
    return float(torch.rand((), generator=generator, device=device))


def _residual(p: torch.Tensor, q: torch.Tensor | None, x: int) -> torch.Tensor:
    if q is None:
        r = p.clone()
        r[x] = 0.0
    else:
        r = (p - q).clamp_min(0.0)
    total = r.sum()
    # p <= q everywhere means p == q up to rounding, where a rejection has (numerically) zero probability.
    return r / total if total > 0 else p


def accept(tree: Tree, logits: torch.Tensor, temperature: float,
           generator: torch.Generator | None = None) -> Acceptance:  # fmt: skip
    """Walk the tree from the root: ``logits [1 + T, V]`` are the target's at the root (row 0) and at node ``i``
    (row ``1 + i``). Temperature 0 only compares with the argmax (no distributions, no random numbers)."""
    children = tree.children()
    tokens = tree.tokens.tolist()
    path: list[int] = []
    row = 0
    if temperature <= 0:
        best = logits.argmax(-1).tolist()
        while True:
            hit = [c for c in children[row] if tokens[c] == best[row]]  # siblings are distinct: at most one
            if not hit:
                return Acceptance(path, best[row], len(path) + (1 if children[row] else 0))
            path.append(hit[0])
            row = hit[0] + 1
    probs = target_probs(logits, temperature)
    while True:
        p = probs[row]
        for child in children[row]:
            x, q = tokens[child], tree.proposals[child]
            qx = 1.0 if q is None else float(q[x])
            if _uniform(generator, p.device) * qx < float(p[x]):  # probability min(1, p(x) / q(x))
                path.append(child)
                row = child + 1
                break
            p = _residual(p, q, x)
        else:
            bonus = int(torch.multinomial(p, 1, generator=generator))
            return Acceptance(path, bonus, len(path) + (1 if children[row] else 0))

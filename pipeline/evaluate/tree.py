"""Draft trees: structure, attention masks and position ids for one verification forward.

A tree holds the drafted tokens only; the *root* is the last token the target emitted (not yet fed to it).
Nodes are stored parents-before-children (a chain is the tree whose node ``i`` has parent ``i - 1``), and
node ``i`` sits at depth ``depths[i] >= 1`` below the root. Verification feeds ``[root, node_0, node_1, ...]``:
row 0 is the root, row ``1 + i`` is node ``i``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Tree:
    """Drafted tokens (target ids) with their parents (``-1`` = the root) and depths.

    ``proposals[i]``: the distribution node ``i`` was *sampled* from (``[V]``, target vocab), or ``None`` when it
    was chosen deterministically (argmax / top-k), which the acceptance rule treats as a point mass.
    ``probs[i]`` (when the drafter records it): the draft's untempered probability of node ``i`` given its parent.
    """

    tokens: torch.Tensor  # [T] long
    parents: list[int]
    depths: list[int]
    proposals: list[torch.Tensor | None]
    probs: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.parents)

    @classmethod
    def chain(cls, tokens: torch.Tensor, proposals: list[torch.Tensor | None] | None = None) -> Tree:
        n = int(tokens.numel())
        return cls(tokens.reshape(-1), list(range(-1, n - 1)), list(range(1, n + 1)),
                   proposals if proposals is not None else [None] * n)  # fmt: skip

    @classmethod
    def empty(cls, device: torch.device | str | None = None) -> Tree:
        return cls(torch.zeros(0, dtype=torch.long, device=device), [], [], [])

    def subset(self, keep: list[int]) -> Tree:
        """The tree of nodes ``keep`` (ascending and ancestor-closed), parents renumbered."""
        new_index = {old: new for new, old in enumerate(keep)}
        return Tree(self.tokens[keep], [new_index[self.parents[i]] if self.parents[i] >= 0 else -1 for i in keep],
                    [self.depths[i] for i in keep], [self.proposals[i] for i in keep],
                    [self.probs[i] for i in keep] if self.probs else [])  # fmt: skip

    def greedy_verdicts(self, emitted: list[int]) -> list[tuple[float, bool]]:
        """(draft probability, accepted) of every node greedy verification would have tried, given the tokens the
        target emitted after the root: at depth ``d`` the children of the node matching ``emitted[d-2]`` (the root's
        at ``d = 1``), accepted iff equal to ``emitted[d-1]``. Known for nodes that were drafted but not verified
        too, since greedy acceptance is a comparison with the target's token."""
        children = self.children()
        tokens = self.tokens.tolist()
        out, row = [], 0
        for e in emitted:
            hit = None
            for c in children[row]:
                out.append((self.probs[c], tokens[c] == e))
                if tokens[c] == e:
                    hit = c
            if hit is None:
                break
            row = hit + 1
        return out

    @property
    def is_chain(self) -> bool:
        return self.parents == list(range(-1, len(self) - 1))

    def children(self) -> list[list[int]]:
        """``children()[1 + i]``: the children of node ``i`` (index 0: the root's), in node order."""
        out: list[list[int]] = [[] for _ in range(len(self) + 1)]
        for i, p in enumerate(self.parents):
            out[p + 1].append(i)
        return out


def tree_mask(parents: list[int], past: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool ``[1 + T, past + 1 + T]``: every row sees the ``past`` cached positions, the root, its ancestors
    and itself (row 0 is the root, row ``1 + i`` node ``i``)."""
    n = len(parents) + 1
    seen = torch.eye(n, dtype=torch.bool)
    seen[:, 0] = True
    for i, p in enumerate(parents):
        if p >= 0:
            seen[1 + i] |= seen[1 + p]  # parents precede children, so the parent's row is complete
    return torch.cat([torch.ones(n, past, dtype=torch.bool), seen], dim=1).to(device)


def tree_positions(depths: list[int], root_position: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Position ids ``[1, 1 + T]``: the root at ``root_position``, a node at ``root_position + depth``."""
    return (torch.tensor([0, *depths], dtype=torch.long) + root_position).to(device)[None]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool "may attend" mask ``[Q, K]`` as the 4D float mask ``[1, 1, Q, K]`` HF Llama adds to its scores.

    transformers 5.x returns a 4D ``attention_mask`` unchanged from ``create_causal_mask``; the ``sdpa`` path
    passes it to ``scaled_dot_product_attention`` and the ``eager`` path adds it to the scores, so an additive
    float mask (0 / dtype min) is right for both (a bool one only for sdpa).
    """
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]

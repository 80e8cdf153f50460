"""Speculative decoding: draft (chain or tree), verify in one target forward, accept, compact the caches.

Counting convention: the prefill forward (whole prompt) yields the first token and is not a decoding
forward. Every later target forward is one verification and emits ``accepted + 1`` tokens (the +1 is the
target's bonus token), fewer only when a stop token or ``max_new_tokens`` cuts the last one. So
``tau = (new tokens - 1) / verification forwards`` and plain decoding has ``tau = 1`` by construction.
"""

from __future__ import annotations

import time

import torch

from pipeline.draft.layers import KVCache
from pipeline.evaluate.budget import Budget
from pipeline.evaluate.drafter import Drafter, DraftSettings, propose
from pipeline.evaluate.sampling import accept
from pipeline.evaluate.target import (
    Generation,
    TargetError,
    cache_length,
    compact_cache,
    finish,
    new_cache,
    pick,
    sliding_window,
    sync,
    target_forward,
)
from pipeline.evaluate.tree import Tree, additive_mask, tree_mask, tree_positions

TREE_ATTENTION = ("sdpa", "eager")  # implementations that apply an arbitrary 4D mask


def verify(target, cache, root: int, tree: Tree) -> tuple[torch.Tensor, tuple]:
    """One target forward over ``[root, *tree.tokens]``: logits ``[1 + T, V]`` and hidden states.

    A chain is causal, so HF's own mask serves; a tree gets the 4D mask of :func:`tree_mask`."""
    device = tree.tokens.device
    past = cache_length(cache)
    ids = torch.cat([torch.tensor([root], device=device), tree.tokens])[None]
    mask = None
    if not tree.is_chain:
        impl = getattr(target.config, "_attn_implementation", "sdpa")
        if impl not in TREE_ATTENTION:
            raise ValueError(f"tree verification needs attn_implementation in {TREE_ATTENTION}, not {impl!r}")
        window = sliding_window(target)
        if window is not None and past + len(ids[0]) > window:
            # one 4D mask serves every layer: exact only while the sliding layers still see every position
            raise TargetError(f"tree verification past the target's sliding window ({window} positions; this one "
                              f"reaches {past + len(ids[0])}): evaluate with a chain (--mode chain) or shorter "
                              "prompts / --max-new-tokens")  # fmt: skip
        mask = additive_mask(tree_mask(tree.parents, past, device), target.dtype)
    return target_forward(target, ids, tree_positions(tree.depths, past, device), cache, mask, hidden=True)


@torch.no_grad()
def speculative_generate(target, drafter: Drafter, prompt: torch.Tensor, settings: DraftSettings,
                         max_new_tokens: int, stop_ids: set[int], generator: torch.Generator | None = None,
                         budget: Budget | None = None) -> Generation:  # fmt: skip
    """Decode ``prompt`` (``[n]`` token ids) with the target, drafting with ``drafter``; lossless: greedy output
    equals :func:`~pipeline.evaluate.target.target_generate`'s, sampled output has the target's distribution.

    With ``budget`` (cost-aware drafting) a round may draft nothing (a plain step; the rows waiting for the draft
    are fed at the next round that drafts) and verifies only the drafted tokens that pay for themselves."""
    device = drafter.device
    prompt = prompt.reshape(1, -1).to(device)
    sync(device)
    start = time.perf_counter()
    cache, dcache = new_cache(target), KVCache()
    n = prompt.shape[1]
    logits, hs = target_forward(target, prompt, torch.arange(n, device=device)[None], cache, hidden=True,
                                last_only=True)  # fmt: skip
    tokens, done = finish([pick(logits[-1], settings.temperature, generator)], max_new_tokens, stop_ids)
    # the draft rows waiting to be fed: (target feature of position t, token t + 1, position t); the features stay
    # as the target's hidden states until a round drafts, so that a skipped round computes nothing for the draft
    waiting = [(hs, None)]
    rows_ids = torch.cat([prompt[0, 1:], torch.tensor(tokens[-1:], device=device)])[None]
    rows_pos = torch.arange(n, device=device)[None]
    attempted, accepted = [0] * settings.depth, [0] * settings.depth
    lengths: list[int] = []
    while not done:
        # a verification emits at most depth + 1 tokens: never draft past max_new_tokens
        depth = min(settings.depth, max_new_tokens - len(tokens) - 1)
        drafted = None
        if budget is None or (depth > 0 and budget.should_draft(depth)):
            rows_h = drafter.row_inputs(_Joined(waiting))
            tree, drafted = propose(drafter, dcache, rows_h, rows_ids, rows_pos, settings, depth, generator, budget)
        else:
            tree = Tree.empty(device)
        past = cache_length(cache)
        logits, hs = verify(target, cache, tokens[-1], tree)
        verdict = accept(tree, logits, settings.temperature, generator)
        rows = [0] + [1 + i for i in verdict.path]
        compact_cache(cache, past, rows)
        new = tree.tokens[verdict.path].tolist() + [verdict.bonus]
        before = len(tokens)
        tokens, done = finish(tokens + new, max_new_tokens, stop_ids)
        lengths.append(len(tokens) - before)
        for d in range(verdict.attempted):
            attempted[d] += 1
            accepted[d] += d < len(verdict.path)
        if budget is not None and drafted is not None:
            budget.observe(drafted, tree, verdict, new, settings.temperature)
        new_ids = torch.tensor([new], device=device)
        new_pos = torch.arange(past, past + len(rows), device=device)[None]
        kept = (hs, None if len(rows) == len(tree) + 1 else torch.tensor(rows, device=device))
        if drafted is None:  # a skipped round (budget only): nothing fed, the waiting rows stay waiting
            waiting.append(kept)
            rows_ids, rows_pos = torch.cat([rows_ids, new_ids], 1), torch.cat([rows_pos, new_pos], 1)
        else:
            waiting, rows_ids, rows_pos = [kept], new_ids, new_pos
    sync(device)
    return Generation(tokens, time.perf_counter() - start, len(lengths), accept_lengths=lengths,
                      attempted=attempted, accepted=accepted)  # fmt: skip


class _Joined:
    """The hidden states of several target forwards (each with the rows kept, ``None``: all) read as one forward's:
    ``[i]`` is layer ``i``'s states of every kept row, in order. Only the layers a head reads are joined."""

    def __init__(self, forwards: list[tuple[tuple, torch.Tensor | None]]):
        self.forwards = forwards

    def __getitem__(self, i: int) -> torch.Tensor:
        parts = [hs[i] if rows is None else hs[i][:, rows] for hs, rows in self.forwards]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

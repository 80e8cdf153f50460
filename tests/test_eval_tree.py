"""Tree structure, the 4D tree mask in HF Llama, cache compaction, tree drafting and the acceptance walk."""

from __future__ import annotations

import pytest
import torch
from synthetic_draft import tiny_draft
from synthetic_target import tiny_target, tiny_target_config

from pipeline.draft.layers import KVCache, causal_mask
from pipeline.evaluate.decode import verify
from pipeline.evaluate.drafter import Drafter, DraftSettings, propose
from pipeline.evaluate.sampling import accept
from pipeline.evaluate.target import cache_length, compact_cache, new_cache, target_forward
from pipeline.evaluate.tree import Tree, tree_mask, tree_positions

pytestmark = pytest.mark.usefixtures("one_thread")

V = 300

# root -> a(0), b(1); a -> c(2); c -> d(3); b -> e(4)
PARENTS = [-1, -1, 0, 2, 1]
DEPTHS = [1, 1, 2, 3, 2]


@pytest.fixture(scope="module")
def target():
    return tiny_target(tiny_target_config(vocab_size=V, hidden_size=64, num_layers=8), seed=3)


def explicit_tree(tokens: list[int]) -> Tree:
    return Tree(torch.tensor(tokens), list(PARENTS), list(DEPTHS), [None] * len(PARENTS))


def test_tree_mask_and_positions_of_an_explicit_tree():
    m = tree_mask(PARENTS, past=2).int()
    #                 past  root a  b  c  d  e
    expected = [[1, 1, 1, 0, 0, 0, 0, 0],  # root
                [1, 1, 1, 1, 0, 0, 0, 0],  # a
                [1, 1, 1, 0, 1, 0, 0, 0],  # b
                [1, 1, 1, 1, 0, 1, 0, 0],  # c
                [1, 1, 1, 1, 0, 1, 1, 0],  # d
                [1, 1, 1, 0, 1, 0, 0, 1]]  # e  # fmt: skip
    assert m.tolist() == expected
    assert tree_positions(DEPTHS, 7).tolist() == [[7, 8, 8, 9, 10, 9]]
    assert explicit_tree([1, 2, 3, 4, 5]).children() == [[0, 1], [2], [4], [3], [], []]
    chain = Tree.chain(torch.tensor([4, 5, 6]))
    assert chain.is_chain and not explicit_tree([1, 2, 3, 4, 5]).is_chain
    assert tree_mask(chain.parents, 1).tolist() == causal_mask(4, 1).tolist()


@torch.no_grad()
def test_one_tree_forward_equals_separate_forwards_of_each_path(target):
    prefix = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(0))
    root, nodes = 17, [21, 22, 23, 24, 25]
    cache = new_cache(target)
    target_forward(target, prefix, torch.arange(9)[None], cache)
    logits, hs = verify(target, cache, root, explicit_tree(nodes))
    assert cache_length(cache) == 9 + 6 and len(hs) == target.config.num_hidden_layers + 1
    paths = {0: [], 1: [21], 2: [22], 3: [21, 23], 4: [21, 23, 24], 5: [22, 25]}  # row -> tokens after root
    for row, path in paths.items():
        ids = torch.cat([prefix, torch.tensor([[root, *path]])], dim=1)
        out = target(ids, output_hidden_states=True)
        assert torch.allclose(logits[row], out.logits[0, -1], atol=1e-4), row
        for layer in (2, 5, -1):
            assert torch.allclose(hs[layer][0, row], out.hidden_states[layer][0, -1], atol=1e-4)


@torch.no_grad()
def test_compacting_the_target_cache_equals_a_fresh_forward_over_the_accepted_path(target):
    prefix = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(1))
    nodes, root = [10, 11, 12, 13, 14], 30
    for path in ([0, 2, 3], [1, 4], [0], []):  # a-c-d, b-e (non-contiguous rows), a (a plain crop), none
        cache = new_cache(target)
        target_forward(target, prefix, torch.arange(6)[None], cache)
        verify(target, cache, root, explicit_tree(nodes))
        compact_cache(cache, 6, [0] + [1 + i for i in path])
        fresh = new_cache(target)
        ids = torch.cat([prefix, torch.tensor([[root] + [nodes[i] for i in path]])], dim=1)
        target_forward(target, ids, torch.arange(ids.shape[1])[None], fresh)
        assert cache_length(cache) == cache_length(fresh) == 7 + len(path)
        for a, b in zip(cache.layers, fresh.layers, strict=True):
            assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)
        # and decoding continues from it exactly as from the fresh cache
        nxt = torch.tensor([[7]])
        pos = torch.tensor([[ids.shape[1]]])
        assert torch.allclose(target_forward(target, nxt, pos, cache)[0], target_forward(target, nxt, pos, fresh)[0],
                              atol=1e-4)  # fmt: skip


@torch.no_grad()
@pytest.mark.parametrize("variant", ["eagle1", "eagle3"])
def test_tree_drafting_builds_a_valid_tree_and_leaves_only_real_rows_cached(target, variant):
    drafter = Drafter(tiny_draft(target, variant, draft_vocab_size=200, seed=1))
    ids = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(2))
    hs = target(ids, output_hidden_states=True).hidden_states
    rows = drafter.row_inputs(hs)
    settings = DraftSettings(mode="tree", depth=4, top_k=3, total_tokens=10)
    cache = KVCache()
    tree, drafted = propose(drafter, cache, rows[:, :-1], ids[:, 1:], torch.arange(7)[None], settings)
    assert len(drafted) >= len(tree)  # every created node; the total_tokens best are verified
    assert len(cache) == 7
    assert len(tree) == 10 and max(tree.depths) <= 4
    for i, (p, d) in enumerate(zip(tree.parents, tree.depths, strict=True)):
        assert p < i and d == (1 if p < 0 else tree.depths[p] + 1)
    for siblings in tree.children():
        toks = tree.tokens[siblings].tolist()
        assert len(set(toks)) == len(toks)
    if variant == "eagle3":
        assert bool(drafter.model.t2d[tree.tokens].all())  # only ids of the draft vocabulary
    # the cached rows are exactly those of a fresh pass over the real rows
    fresh = KVCache()
    drafter.step(rows[:, :-1], ids[:, 1:], torch.arange(7)[None], fresh, causal_mask(7))
    assert torch.allclose(cache.k[0], fresh.k[0], atol=1e-6)
    # the first level is the top-k of the last real row, in order
    _, logits = drafter.step(rows[:, :-1], ids[:, 1:], torch.arange(7)[None], KVCache(), causal_mask(7))
    top = logits[0, -1].topk(3).indices.tolist()
    assert tree.tokens[[i for i, p in enumerate(tree.parents) if p < 0]].tolist() == top


def test_greedy_walk_accepts_the_longest_matching_path():
    tree = explicit_tree([5, 6, 7, 8, 9])  # a=5 b=6 c=7 d=8 e=9
    want = {0: 6, 2: 9, 5: 3}  # root -> b, b -> e, e -> bonus 3
    logits = torch.zeros(6, 12)
    for row, tok in want.items():
        logits[row, tok] = 1.0
    verdict = accept(tree, logits, 0.0)
    assert verdict.path == [1, 4] and verdict.bonus == 3 and verdict.attempted == 2
    logits[0] = 0.0
    logits[0, 7] = 1.0  # c is not a child of the root: nothing accepted, bonus = argmax
    verdict = accept(tree, logits, 0.0)
    assert verdict.path == [] and verdict.bonus == 7 and verdict.attempted == 1

"""Sampling (temperature > 0) keeps the target's distribution: the acceptance rule alone, and end to end on a
tiny model with a small vocabulary (empirical token distributions vs the exact ones, chi-square at 1e-3)."""

from __future__ import annotations

import pytest
import torch
from synthetic_draft import tiny_draft
from synthetic_target import tiny_target, tiny_target_config

from pipeline.evaluate.decode import speculative_generate
from pipeline.evaluate.drafter import Drafter, DraftSettings
from pipeline.evaluate.sampling import accept
from pipeline.evaluate.tree import Tree

pytestmark = pytest.mark.usefixtures("one_thread")

V = 16
Z_1E3 = 3.09  # one-sided normal quantile of 1e-3


def chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> tuple[bool, float, float]:
    """Pearson chi-square of ``counts`` against ``probs``, cells with expected < 5 pooled; (passes at 1e-3,
    statistic, critical value by the Wilson-Hilferty approximation)."""
    n = counts.sum()
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    crit = dof * (1 - 2 / (9 * dof) + Z_1E3 * (2 / (9 * dof)) ** 0.5) ** 3
    return stat < crit, stat, crit


def test_chi2_helper_rejects_a_wrong_distribution():
    p = torch.softmax(torch.randn(V, generator=torch.Generator().manual_seed(0)), -1)
    g = torch.Generator().manual_seed(1)
    good = torch.bincount(torch.multinomial(p, 5000, replacement=True, generator=g), minlength=V)
    bad_p = p.clone()
    bad_p[p.argmax()] -= 0.04  # a 4% shift of mass (total variation 0.04)
    bad_p[p.argmin()] += 0.04
    bad = torch.bincount(torch.multinomial(bad_p, 5000, replacement=True, generator=g), minlength=V)
    assert chi2_ok(good, p)[0] and not chi2_ok(bad, p)[0]


def test_acceptance_rule_reproduces_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    q[3] = 0.0  # a token the draft cannot propose (EAGLE-3 outside its vocabulary)
    q = q / q.sum()
    rows = torch.stack([p, torch.full((V,), 1.0 / V)])
    n = 6000
    chain, tree = torch.zeros(V), torch.zeros(V)
    for _ in range(n):
        x = int(torch.multinomial(q, 1, generator=g))
        v = accept(Tree.chain(torch.tensor([x]), [q]), rows.log(), 1.0, g)
        chain[x if v.path else v.bonus] += 1
        # three deterministic candidates (EAGLE-2 top-k children of the root)
        three = Tree(torch.tensor([int(i) for i in q.topk(3).indices]), [-1, -1, -1], [1, 1, 1], [None] * 3)
        v = accept(three, torch.cat([p[None], rows[1:].expand(3, V)]).log(), 1.0, g)
        tree[int(three.tokens[v.path[0]]) if v.path else v.bonus] += 1
    for counts in (chain, tree):
        ok, stat, crit = chi2_ok(counts, p)
        assert ok, (stat, crit)
    assert 0.2 < chain[q.topk(3).indices].sum() / n  # the draft's tokens are really in play


def conditional_test(target, prompt: torch.Tensor, runs: list[list[int]]) -> tuple[float, float, float]:
    """Each sampled token ``y_t`` against the target's exact ``p_t = p(. | prompt, y_<t)``: ``S = sum_t
    (onehot(y_t) - p_t)`` is a martingale with covariance ``C = sum_t (diag p_t - p_t p_t^T)``, so ``S^T C^+ S``
    is chi-square with V - 1 degrees of freedom. Returns (statistic, critical value at 1e-3, total variation of
    the pooled empirical distribution from the pooled ``p_t``)."""
    ids = torch.cat([prompt.expand(len(runs), -1), torch.tensor(runs)], dim=1)
    with torch.no_grad():
        p = torch.softmax(target(ids).logits[:, prompt.shape[1] - 1:-1].double(), -1).reshape(-1, V)
    y = torch.nn.functional.one_hot(torch.tensor(runs).reshape(-1), V).double()
    s = (y - p).sum(0)
    c = torch.diag(p.sum(0)) - p.T @ p
    stat = float(s @ torch.linalg.pinv(c, hermitian=True) @ s)
    dof = V - 1
    crit = dof * (1 - 2 / (9 * dof) + Z_1E3 * (2 / (9 * dof)) ** 0.5) ** 3
    return stat, crit, float(0.5 * (y.mean(0) - p.mean(0)).abs().sum())


def sample_runs(target, drafter, settings, prompt, n: int, new_tokens: int,
                budget=None) -> tuple[list[list[int]], float]:  # fmt: skip
    runs, accepted, attempted = [], 0, 0
    for seed in range(n):
        out = speculative_generate(target, drafter, prompt[0], settings, new_tokens, set(),
                                   torch.Generator().manual_seed(seed), budget)  # fmt: skip
        runs.append(out.tokens)
        accepted, attempted = accepted + sum(out.accepted), attempted + sum(out.attempted)
    return runs, accepted / attempted


@pytest.fixture(scope="module")
def small_target():
    return tiny_target(tiny_target_config(vocab_size=V, hidden_size=32, num_layers=2, heads=4, kv_heads=2),
                       seed=5, init_std=0.3)  # fmt: skip


PROMPT = torch.tensor([[3, 1, 4, 1, 5]])


@pytest.mark.parametrize(("variant", "mode"), [("eagle3", "chain"), ("eagle1", "tree")])
def test_speculative_sampling_matches_the_target_distribution_end_to_end(small_target, variant, mode):
    # EAGLE-3 with 10 of 16 tokens: its q is 0 on the rest, which only the residual can produce
    drafter = Drafter(tiny_draft(small_target, variant, aux_layer_ids=(0, 1, 2), draft_vocab_size=10, seed=6))
    settings = DraftSettings(mode=mode, depth=3, top_k=3, total_tokens=6, temperature=1.0)
    runs, rate = sample_runs(small_target, drafter, settings, PROMPT, 120, 16)
    assert 0.15 < rate < 0.95, rate  # both the accept and the reject paths ran often
    stat, crit, tv = conditional_test(small_target, PROMPT, runs)
    assert stat < crit and tv < 0.08, (stat, crit, tv)  # TV: a loose sanity bound (noise ~0.04)


def test_cost_aware_sampling_matches_the_target_distribution(small_target):
    # the chain decides how deep to draft before sampling each position, never after: a sampled draft that were
    # dropped for being unlikely would bias the verified tokens away from q
    from pipeline.evaluate.budget import Budget, CostModel

    drafter = Drafter(tiny_draft(small_target, "eagle3", aux_layer_ids=(0, 1, 2), draft_vocab_size=10, seed=6))
    settings = DraftSettings(mode="chain", depth=3, temperature=1.0)
    budget = Budget(CostModel({1: 1.0, 2: 1.05, 4: 1.15, 8: 1.35}, 0.0))
    runs, rate = sample_runs(small_target, drafter, settings, PROMPT, 120, 16, budget)
    per_round = budget.decisions["verified_drafts"] / budget.decisions["rounds"]
    assert 0.3 < per_round < 2.7, budget.decisions  # the budget really varied the chain length
    stat, crit, tv = conditional_test(small_target, PROMPT, runs)
    assert stat < crit and tv < 0.08, (stat, crit, tv)


def test_the_distribution_test_catches_a_biased_rule(small_target, monkeypatch):
    import pipeline.evaluate.sampling as sampling

    drafter = Drafter(tiny_draft(small_target, "eagle3", aux_layer_ids=(0, 1, 2), draft_vocab_size=10, seed=6))
    settings = DraftSettings(mode="chain", depth=3, temperature=1.0)
    # the classic bug: after a rejection, resample from p instead of norm(max(0, p - q)). (Treating a sampled
    # draft as a point mass, by contrast, is *not* a bug: it is exact, just accepts less.)
    monkeypatch.setattr(sampling, "_residual", lambda p, q, x: p)
    runs, _ = sample_runs(small_target, drafter, settings, PROMPT, 60, 16)
    stat, crit, _ = conditional_test(small_target, PROMPT, runs)
    assert stat > crit, (stat, crit)

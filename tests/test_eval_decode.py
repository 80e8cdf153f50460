"""Greedy speculative decoding is lossless: token-identical to the target's own greedy decoding, with random
heads (few acceptances) and with heads fitted to the target (many acceptances: accept paths and cache crops)."""

from __future__ import annotations

import pytest
import torch
from synthetic_draft import decoding_target, fit_draft, fit_prompts, tiny_draft

from pipeline.evaluate.decode import speculative_generate
from pipeline.evaluate.drafter import Drafter, DraftSettings
from pipeline.evaluate.target import target_generate

pytestmark = pytest.mark.usefixtures("one_thread")

V = 500
AUX = (2, 4, 5)
MODES = {"chain": DraftSettings(mode="chain", depth=4),
         "tree": DraftSettings(mode="tree", depth=4, top_k=4, total_tokens=12)}  # fmt: skip


@pytest.fixture(scope="module")
def target():
    return decoding_target(V)


@pytest.fixture(scope="module")
def fitted(target):
    """Heads fitted to the target's greedy continuations of 12 prompts, and those prompts/continuations."""
    prompts, seqs = fit_prompts(target)
    heads = {}
    for variant in ("eagle1", "eagle3"):
        head = tiny_draft(target, variant, AUX, seed=1)
        fit_draft(head, target, seqs, steps=150, lr=1e-2, ttt_steps=2)
        heads[variant] = Drafter(head)
    return heads, prompts, seqs


def random_prompts(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (int(torch.randint(1, 12, (), generator=g)),), generator=g) for _ in range(n)]


@pytest.mark.parametrize("variant", ["eagle1", "eagle3"])
@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_random_heads_are_lossless(target, variant, mode):
    drafter = Drafter(tiny_draft(target, variant, AUX, draft_vocab_size=V // 2, seed=2))
    for i, prompt in enumerate(random_prompts(6, seed=10)):
        plain = target_generate(target, prompt, 20, set())
        spec = speculative_generate(target, drafter, prompt, MODES[mode], 20, set())
        assert spec.tokens == plain.tokens, (i, prompt.tolist())
        assert len(spec.tokens) == 20 and spec.decode_tokens == sum(spec.accept_lengths)
        # a stop token inside the output ends both at the same place, the stop token included
        stop = {plain.tokens[7 + i]}
        plain_stop = target_generate(target, prompt, 20, stop)
        assert speculative_generate(target, drafter, prompt, MODES[mode], 20, stop).tokens == plain_stop.tokens
        assert plain_stop.tokens[-1] in stop and len(plain_stop.tokens) <= 8 + i


@pytest.mark.parametrize("variant", ["eagle1", "eagle3"])
@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_fitted_heads_accept_often_and_stay_lossless(target, fitted, variant, mode):
    heads, prompts, seqs = fitted
    settings = MODES[mode]
    spec_tokens = forwards = 0
    attempted = [0] * settings.depth
    accepted = [0] * settings.depth
    for i in range(6):
        spec = speculative_generate(target, heads[variant], prompts[i], settings, 32, set())
        assert spec.tokens == seqs[i, 4:].tolist() == target_generate(target, prompts[i], 32, set()).tokens
        assert spec.tau == spec.decode_tokens / spec.target_forwards
        assert spec.target_forwards == len(spec.accept_lengths) and sum(spec.accept_lengths) == 31
        assert max(spec.accept_lengths) <= settings.depth + 1
        spec_tokens += spec.decode_tokens
        forwards += spec.target_forwards
        attempted = [a + b for a, b in zip(attempted, spec.attempted, strict=True)]
        accepted = [a + b for a, b in zip(accepted, spec.accepted, strict=True)]
    tau = spec_tokens / forwards
    assert tau > 1.5, (variant, mode, tau, accepted, attempted)
    assert all(a <= t for a, t in zip(accepted, attempted, strict=True)) and accepted[1] > 0  # depth >= 2 reached
    # depth 1 is tried by every verification that drafted (the last may have no budget left); deeper depths
    # only after an acceptance
    assert forwards - 6 <= attempted[0] <= forwards and all(attempted[d + 1] <= accepted[d] for d in range(settings.depth - 1))


def test_budget_edges(target, fitted):
    heads, prompts, _ = fitted
    for n in (1, 2, 3):
        for mode in ("chain", "tree"):
            spec = speculative_generate(target, heads["eagle1"], prompts[0], MODES[mode], n, set())
            assert spec.tokens == target_generate(target, prompts[0], n, set()).tokens and len(spec.tokens) == n
            assert spec.target_forwards <= n - 1 and (n > 1 or spec.tau is None)
    # the first token (from the prefill) is already a stop token: no decoding forward at all
    first = target_generate(target, prompts[1], 5, set()).tokens[0]
    spec = speculative_generate(target, heads["eagle3"], prompts[1], MODES["tree"], 5, {first})
    assert spec.tokens == [first] and spec.target_forwards == 0

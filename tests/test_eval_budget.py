"""Cost-aware drafting: the rate arithmetic, the online acceptance model, and that any budget stays lossless
(greedy: token-identical to plain decoding; sampling: the target's distribution) while deciding differently."""

from __future__ import annotations

import pytest
import torch
from synthetic_draft import decoding_target, fit_draft, fit_prompts, tiny_draft
from synthetic_target import tiny_target, tiny_target_config

from pipeline.evaluate.budget import AcceptanceModel, Budget, CostModel
from pipeline.evaluate.decode import _Joined, speculative_generate
from pipeline.evaluate.drafter import Drafter, DraftSettings
from pipeline.evaluate.runner import run_turn
from pipeline.evaluate.target import target_generate
from pipeline.evaluate.tree import Tree

pytestmark = pytest.mark.usefixtures("one_thread")

V = 500
AUX = (2, 4, 5)
MODES = {"chain": DraftSettings(mode="chain", depth=5),
         "tree": DraftSettings(mode="tree", depth=5, top_k=4, total_tokens=16)}  # fmt: skip


def costs(slope: float, draft: float = 0.02) -> CostModel:
    """A synthetic machine: one token costs 1, each further verified token ``slope``, a draft step ``draft``."""
    return CostModel({n: 1.0 + slope * (n - 1) for n in (1, 2, 4, 8, 16, 32)}, draft)


def test_best_count_maximises_the_expected_rate():
    b = Budget(costs(0.1, draft=0.0))
    # rates: n=0 1/1, n=1 1.9/1.1, n=2 2.4/1.2 = 2.0, n=3 2.5/1.3
    assert b.best_count([0.9, 0.5, 0.1], draft_steps=0) == (2, pytest.approx(2.0))
    assert b.best_count([0.05], draft_steps=0)[0] == 0  # a hopeless draft is not verified
    assert b.costs.verify(3) == pytest.approx(1.2) and b.costs.verify(64) == pytest.approx(7.3)
    assert b.can_improve(0.0, 0, 0, 1.0, bound=0.5, more=3) and not b.can_improve(0.0, 0, 0, 1.0, bound=0.05, more=3)


def test_a_cost_model_measured_under_another_load_is_reported():
    from pipeline.evaluate.budget import check_costs
    from pipeline.evaluate.report import cost_warning

    def turns(step_s: float) -> list[dict]:  # two turns of plain decoding at step_s seconds per decoding forward
        return [{"baseline": {"wall_s": 0.3 + step_s * n, "prefill_s": 0.3, "target_forwards": n}} for n in (99, 27)]

    model = CostModel({1: 0.050, 2: 0.057}, 0.003)  # cached while the CPU was busier than now
    for step_s, stale in ((0.038, True), (0.047, False), (0.058, False), (0.070, True)):
        check = check_costs(model, turns(step_s))
        assert check["observed_step_s"] == pytest.approx(step_s) and check["stale"] is stale
        warning = cost_warning({"budget": {"cost_check": check}})
        assert (warning is not None) is stale
    assert "50.0 ms" in warning and "70.0 ms" in warning and "--recalibrate" in warning
    assert cost_warning({}) is None  # --policy fixed: no cost model, no check
    stopped_at_once = [{"baseline": {"wall_s": 0.3, "prefill_s": 0.3, "target_forwards": 0}}]
    assert check_costs(model, stopped_at_once) is None  # no decoding forward to compare


def test_acceptance_model_starts_at_identity_and_learns():
    m = AcceptanceModel(bins=10, prior=4.0)
    assert m(torch.tensor([0.05, 0.55, 0.95])).tolist() == pytest.approx([0.05, 0.55, 0.95])
    m.update([0.95] * 40, [False] * 40)  # an over-confident head
    assert float(m(torch.tensor(0.92))) < 0.1 and float(m(torch.tensor(0.5))) == pytest.approx(0.55)


def test_greedy_verdicts_cover_unverified_nodes():
    # root -> a(5) -> b(6); root -> c(7); emitted 5, 6, 9: a and b accepted, c refused, nothing beyond
    tree = Tree(torch.tensor([5, 7, 6]), [-1, -1, 0], [1, 1, 2], [None] * 3, [0.6, 0.3, 0.8])
    assert tree.greedy_verdicts([5, 6, 9]) == [(0.6, True), (0.3, False), (0.8, True)]
    assert tree.greedy_verdicts([7, 1]) == [(0.6, False), (0.3, True)]
    assert tree.subset([0, 2]).parents == [-1, 0] and tree.subset([0, 2]).probs == [0.6, 0.8]


@pytest.fixture(scope="module")
def target():
    return decoding_target(V)


@pytest.fixture(scope="module")
def heads(target):
    """A random head (rarely right) and a head fitted to the target's greedy continuations (often right)."""
    prompts, seqs = fit_prompts(target)
    fitted = tiny_draft(target, "eagle3", AUX, seed=1)
    fit_draft(fitted, target, seqs, steps=150, lr=1e-2, ttt_steps=2)
    return {"random": Drafter(tiny_draft(target, "eagle3", AUX, draft_vocab_size=V // 2, seed=2)),
            "fitted": Drafter(fitted)}, prompts  # fmt: skip


@pytest.mark.parametrize("mode", ["chain", "tree"])
@pytest.mark.parametrize("slope", [0.02, 0.5])
def test_any_budget_is_lossless_and_weighs_cost(target, heads, mode, slope):
    drafters, prompts = heads
    stats = {}
    for name, drafter in drafters.items():
        budget = Budget(costs(slope))
        forwards = tokens = 0
        for i in range(4):
            plain = target_generate(target, prompts[i], 24, set())
            spec = speculative_generate(target, drafter, prompts[i], MODES[mode], 24, set(), budget=budget)
            assert spec.tokens == plain.tokens, (name, i)
            stop = {plain.tokens[9]}
            stopped = speculative_generate(target, drafter, prompts[i], MODES[mode], 24, stop, budget=budget)
            assert stopped.tokens == target_generate(target, prompts[i], 24, stop).tokens
            forwards, tokens = forwards + spec.target_forwards, tokens + spec.decode_tokens
        stats[name] = (tokens / forwards, budget.decisions)
    assert stats["fitted"][0] > stats["random"][0], stats
    if slope == 0.5:  # verifying costs half a step per token: the random head is (almost) never worth a draft
        assert stats["random"][1]["skipped"] > 0 and stats["random"][0] < 1.2, stats
    else:  # nearly free verification: the fitted head drafts deep
        assert stats["fitted"][0] > 2.0, stats


def test_skinny_linears_compute_the_same_products():
    import copy

    from pipeline.evaluate.target import SKINNY_MAX_ROWS, skinny_linears

    model = tiny_target(tiny_target_config(vocab_size=V, hidden_size=64, num_layers=2), seed=3, init_std=0.2)
    skinny = copy.deepcopy(model)
    n_linear = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert skinny_linears(skinny) == n_linear > 0
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 3, SKINNY_MAX_ROWS + 5):  # the last one takes F.linear again
        ids = torch.randint(0, V, (1, rows), generator=gen)
        with torch.no_grad():
            a, b = model(input_ids=ids).logits, skinny(input_ids=ids).logits
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    lin = next(m for m in skinny.modules() if type(m) is torch.nn.Linear)
    x = torch.randn(2, 3, lin.in_features, generator=gen)
    assert torch.allclose(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-6)


def test_auto_linears_measure_both_kernels_and_keep_the_faster(target, heads):
    from pipeline.evaluate.budget import pick_linears
    from pipeline.evaluate.target import _SkinnyForward, stock_linears

    drafter = heads[0]["fitted"]
    prompt = torch.arange(1, 9)
    before = target_generate(target, prompt, 12, set()).tokens
    choice, ms = pick_linears(target, drafter, prefix=16, counts=(2, 4), reps=2)
    assert choice in ("skinny", "stock") and set(ms) == {"skinny", "stock"}
    assert all(set(per) == {2, 4} and all(t > 0 for t in per.values()) for per in ms.values())
    assert choice == min(ms, key=lambda k: sum(ms[k].values()))
    for model in (target, drafter.model):  # both left on the winner
        patched = [isinstance(m.__dict__.get("forward"), _SkinnyForward) for m in model.modules()
                   if type(m) is torch.nn.Linear]  # fmt: skip
        assert patched and all(p == (choice == "skinny") for p in patched)
    assert target_generate(target, prompt, 12, set()).tokens == before
    stock_linears(target), stock_linears(drafter.model)  # the module-scoped fixtures stay stock for other tests
    assert not any("forward" in m.__dict__ for m in target.modules() if type(m) is torch.nn.Linear)


class EveryThird(Budget):
    """Drafts on every third round only: the rows of the two skipped rounds wait as target hidden states."""

    def should_draft(self, max_depth: int) -> bool:
        self.decisions["rounds"] += 1
        return self.decisions["rounds"] % 3 == 1


def test_rows_of_skipped_rounds_reach_the_draft(target, heads):
    drafters, prompts = heads
    drafter = drafters["fitted"]
    # the features a skipped round leaves waiting are those of computing them round by round
    for variant_drafter in (drafter, Drafter(tiny_draft(target, "eagle1", AUX, seed=3))):
        hs1 = target(prompts[0][None], output_hidden_states=True).hidden_states
        hs2 = target(prompts[1][None], output_hidden_states=True).hidden_states
        rows = torch.tensor([0, 2])
        joined = variant_drafter.row_inputs(_Joined([(hs1, None), (hs2, rows)]))
        apart = torch.cat([variant_drafter.row_inputs(hs1), variant_drafter.row_inputs(hs2, rows)], 1)
        torch.testing.assert_close(joined, apart)
    # and a head fitted to the target keeps its acceptance when it only drafts every third round: rows fed late,
    # in one batch, at their own positions (misaligned rows would make its first drafts mostly wrong)
    rates = {}
    for name, budget in (("every round", None), ("every third", EveryThird(costs(0.02)))):
        attempted = accepted = 0
        for i in range(4):
            spec = speculative_generate(target, drafter, prompts[i], MODES["chain"], 24, set(), budget=budget)
            assert spec.tokens == target_generate(target, prompts[i], 24, set()).tokens
            attempted, accepted = attempted + spec.attempted[0], accepted + spec.accepted[0]
        rates[name] = accepted / attempted
    assert rates["every third"] > 0.7 and rates["every third"] > rates["every round"] - 0.1, rates


def test_probes_back_off_while_refused_and_reset_when_accepted():
    budget = Budget(costs(slope=5.0))  # verifying anything costs far more than it can return: always skip
    budget.recent_first = 0.0
    gaps, skipped = [], 0
    for _ in range(200):
        if budget.should_draft(max_depth=4):
            gaps.append(skipped)
            skipped = 0
            budget.probed(accepted=len(gaps) == 5)  # the fifth probe is accepted
        else:
            skipped += 1
    assert gaps[:8] == [3, 7, 15, 31, 31, 3, 7, 15]
    assert budget.decisions["probes"] == len(gaps)


def test_repeats_time_again_but_decide_and_learn_once(target, heads):
    drafters, prompts = heads
    once, twice = Budget(costs(0.02)), Budget(costs(0.02))
    ids = prompts[0].tolist()
    a = run_turn(target, drafters["fitted"], ids, MODES["chain"], 16, set(), 0, once, ())
    b = run_turn(target, drafters["fitted"], ids, MODES["chain"], 16, set(), 0, twice, (), repeats=3)
    assert a[0].tokens == b[0].tokens == a[1].tokens == b[1].tokens
    assert a[0].accept_lengths == b[0].accept_lengths and b[0].target_forwards == a[0].target_forwards
    assert once.decisions == twice.decisions and once.acceptance.state() == twice.acceptance.state()

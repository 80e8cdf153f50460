"""EAGLE-3 draft: vocab maps, TTT masks (explicit), TTT == chained inference, objective, overfit, acceptance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic_target import make_batch, target_weights, tiny_target, tiny_target_config

from pipeline.draft.eagle3 import (
    Eagle3Config,
    Eagle3Draft,
    Eagle3Objective,
    acceptance_length,
    build_draft_vocab,
    chain_acceptance,
    draft_to_target,
    target_to_draft,
    training_loss,
)
from pipeline.draft.layers import KVCache, causal_mask, ttt_attention_mask

pytestmark = pytest.mark.usefixtures("one_thread")

V, H, AUX, VD = 1000, 64, [1, 2, 3], 400


@pytest.fixture(scope="module")
def target():
    tc = tiny_target_config(vocab_size=V, hidden_size=H)
    return tc, tiny_target(tc, seed=0, init_std=0.3)


@pytest.fixture(scope="module")
def samples():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, V, (n,), generator=g) for n in (40, 24, 48, 32)]


@pytest.fixture(scope="module")
def packed(target, samples):
    return make_batch(target[1], samples, AUX, 16, rows=[[0, 1], [2, 3]], width=80)


def new_draft(target, batch, seed=0, vocab=VD, head=False) -> Eagle3Draft:
    tc, tgt = target
    torch.manual_seed(seed)
    model = Eagle3Draft(Eagle3Config.from_target(tc, AUX, vocab))
    model.load_target_weights(target_weights(tgt), target_head=head)
    # Vocabulary from the target's argmax tokens so that most rows count (as on regenerated data).
    counts = torch.bincount(batch["topk_ids"][..., 0].flatten(), minlength=V).numpy()
    d2t, t2d, _ = build_draft_vocab(counts, vocab)
    model.set_vocab(d2t, t2d)
    return model


# ---- config / vocab ----------------------------------------------------------------------------------------


def test_config_requires_stored_aux_ids(target):
    tc, _ = target
    c = Eagle3Config.from_target(tc, [2, 5, 9], 32000)
    assert c.aux_layer_ids == [2, 5, 9] and c.draft_vocab_size == V and c.target_hidden_size == H
    with pytest.raises(ValueError):
        Eagle3Config.from_target(tc, [])
    assert Eagle3Config.from_dict(c.to_dict()) == c

    class Reader:  # duck-typed StoreReader
        fingerprint = {"model": {"name": "tiny", "path": "/models/tiny"}, "layers": {"aux": [1, 2, 3]}}

        def target_config(self):
            return tc

    s = Eagle3Config.from_store(Reader(), 100)
    assert s.aux_layer_ids == [1, 2, 3] and s.target_name == "/models/tiny" and s.draft_vocab_size == 100


def test_build_draft_vocab_ties_cap_coverage():
    counts = np.array([5, 3, 3, 0, 7, 3])
    d2t, t2d, cov = build_draft_vocab(counts, 3)
    assert t2d.tolist() == [True, True, False, False, True, False]  # 4 (7), 0 (5), then 1 wins the 3-way tie
    assert d2t.tolist() == [0, 0, 2] and d2t.dtype == torch.int64
    assert cov == pytest.approx(15 / 21)
    d2t_all, t2d_all, cov_all = build_draft_vocab(counts, 100)
    assert d2t_all.shape == (6,) and bool(t2d_all.all()) and cov_all == 1.0
    assert build_draft_vocab(np.zeros(4, np.int64), 2)[1].tolist() == [True, True, False, False]


def test_vocab_round_trip():
    counts = np.random.default_rng(0).integers(0, 50, size=V)
    d2t, t2d, _ = build_draft_vocab(counts, VD)
    draft = torch.arange(VD)
    tgt = draft_to_target(draft, d2t)
    assert bool(t2d[tgt].all()) and (tgt.diff() > 0).all()
    assert torch.equal(target_to_draft(tgt, d2t, V), draft)
    outside = torch.nonzero(~t2d).flatten()
    assert (target_to_draft(outside, d2t, V) == -1).all()


def test_shapes_frozen_and_state_dict(target, packed):
    model = new_draft(target, packed, head=True)
    assert model.fc.weight.shape == (H, 3 * H) and model.fc.bias is None
    assert model.midlayer.self_attn.q_proj.weight.shape == (H, 2 * H)
    assert model.lm_head.weight.shape == (VD, H)
    sd = model.state_dict()
    assert sd["d2t"].dtype == torch.int64 and sd["t2d"].dtype == torch.bool and sd["t2d"].shape == (V,)
    assert "target_lm_head" not in sd and "embed_tokens.weight" not in model.draft_state_dict()
    assert {k.split(".")[0] for k in model.draft_state_dict()} == {"fc", "midlayer", "norm", "lm_head", "d2t", "t2d"}
    loss, _ = training_loss(model, packed, Eagle3Objective(ttt_steps=2))
    loss.backward()
    assert not model.embed_tokens.weight.requires_grad and model.embed_tokens.weight.grad is None
    assert all(p.grad is not None for p in model.trainable_parameters())


def test_projected_head_trains_in_the_whole_features_basis(target):
    """Over a projected store (rows y = P·x) fc stays [H, 3H] and reads y as fc·Pᵀ: the same initial weights and the
    same gradients as a head given Pᵀy whole, so Adam steps in the same coordinates; a head saved with fc' [H, k]
    (before this layout) loads as fc'·P and reads y unchanged."""
    tc, _ = target
    k = 2 * H
    p = torch.linalg.qr(torch.randn(3 * H, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0]
    p = p.T.float().contiguous()  # [k, 3H], orthonormal rows
    heads = []
    for dim in (0, k):
        torch.manual_seed(0)
        heads.append(Eagle3Draft(Eagle3Config.from_target(tc, AUX, VD, aux_projection_dim=dim)))
    whole, projected = heads
    projected.aux_projection.copy_(p)
    assert projected.fc.weight.shape == (H, 3 * H) and torch.equal(projected.fc.weight, whole.fc.weight)
    y = torch.randn(1, 10, k, generator=torch.Generator().manual_seed(2))
    for head, x in ((whole, y @ p), (projected, y)):
        head.fuse(x).square().sum().backward()
    assert torch.allclose(projected.fc.weight.grad, whole.fc.weight.grad, atol=1e-5)
    assert torch.allclose(projected.unprojected().fuse(y @ p), projected.fuse(y), atol=1e-5)

    old = {**projected.state_dict(), "fc.weight": torch.randn(H, k)}
    projected.load_state_dict(old)
    assert torch.allclose(projected.fuse(y), y @ old["fc.weight"].T, atol=1e-4)


# ---- masks ---------------------------------------------------------------------------------------------------


def expected_ttt_mask(doc: list[int], step: int) -> list[list[int]]:
    """By hand: step-0 keys of rows <= t in t's document, then row t's own key of each step 1..step."""
    t_len = len(doc)
    rows = []
    for t in range(t_len):
        block0 = [int(doc[t] >= 0 and doc[r] == doc[t] and r <= t) for r in range(t_len)]
        diag = [int(doc[t] >= 0 and r == t) for r in range(t_len)]
        rows.append(block0 + diag * step)
    return rows


def test_ttt_mask_packed_explicit():
    doc = torch.tensor([[0, 0, 0, 1, 1, -1]])
    # step 0, written out
    assert ttt_attention_mask(doc, 0)[0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0],
    ]  # fmt: skip
    # step 2, written out: step-0 block | step-1 keys | step-2 keys
    assert ttt_attention_mask(doc, 2)[0].int().tolist() == [
        [1, 0, 0, 0, 0, 0,  1, 0, 0, 0, 0, 0,  1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0,  0, 1, 0, 0, 0, 0,  0, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0,  0, 0, 1, 0, 0, 0,  0, 0, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0,  0, 0, 0, 1, 0, 0,  0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0,  0, 0, 0, 0, 1, 0,  0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0,  0, 0, 0, 0, 0, 0,  0, 0, 0, 0, 0, 0],
    ]  # fmt: skip
    for step in range(4):
        assert ttt_attention_mask(doc, step)[0].int().tolist() == expected_ttt_mask(doc[0].tolist(), step)


def test_ttt_mask_unpacked_explicit():
    doc = torch.zeros(1, 4, dtype=torch.long)
    assert ttt_attention_mask(doc, 1)[0].int().tolist() == [
        [1, 0, 0, 0,  1, 0, 0, 0],
        [1, 1, 0, 0,  0, 1, 0, 0],
        [1, 1, 1, 0,  0, 0, 1, 0],
        [1, 1, 1, 1,  0, 0, 0, 1],
    ]  # fmt: skip
    for step in range(3):
        assert ttt_attention_mask(doc, step)[0].int().tolist() == expected_ttt_mask([0] * 4, step)


def test_blockwise_ttt_equals_dense_masked_ttt(target, packed):
    """The fast path (step-0 keys + per-row diagonals) computes the dense, explicitly masked attention."""
    model = new_draft(target, packed).eval()
    with torch.no_grad():
        fused = model.fuse(packed["hidden_aux"])
        fast = model.ttt_forward(fused, packed, 4)
        dense = model.ttt_forward(fused, packed, 4, dense=True)
    for a, b in zip(fast, dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_ttt_steps_equal_chained_inference(target, packed):
    """Step i of TTT at row t == the i-th drafting step of an inference chain started at row t (KV cache,
    own hidden state fed back, position p+i): the mask and the position ids mirror serving."""
    model = new_draft(target, packed).eval()
    steps = 4
    doc = packed["doc_ids"]
    with torch.no_grad():
        fused = model.fuse(packed["hidden_aux"])
        ttt = model.ttt_forward(fused, packed, steps)
        for row, t in ((0, 5), (0, 30), (0, 45), (1, 50)):  # (0, 45) is in row 0's second document
            start = int((doc[row] == doc[row, t]).nonzero()[0])
            sl = slice(start, t + 1)
            ids, pos = packed["input_ids"][row:row + 1], packed["position_ids"][row:row + 1]
            cache = KVCache(1)
            h, _ = model.step(fused[row:row + 1, sl], ids[:, start + 1:t + 2], pos[:, sl], cache,
                              causal_mask(t + 1 - start))  # fmt: skip
            h = h[:, -1:]
            torch.testing.assert_close(h[0, 0], ttt[0][row, t], rtol=1e-5, atol=1e-5)
            for i in range(1, steps):
                tok = ids[:, t + 1 + i:t + 2 + i]
                mask = torch.ones(1, len(cache) + 1, dtype=torch.bool)
                h, _ = model.step(h, tok, pos[:, t:t + 1] + i, cache, mask)
                torch.testing.assert_close(h[0, 0], ttt[i][row, t], rtol=1e-5, atol=1e-5)


def test_documents_do_not_leak(target, packed):
    model = new_draft(target, packed).eval()
    other = {k: v.clone() for k, v in packed.items()}
    second = packed["doc_ids"][0] == 1
    other["hidden_aux"][0, second] += 1.0
    other["input_ids"][0, second] = (other["input_ids"][0, second] + 7) % V
    with torch.no_grad():
        a = model.ttt_forward(model.fuse(packed["hidden_aux"]), packed, 4)
        b = model.ttt_forward(model.fuse(other["hidden_aux"]), other, 4)
    first = packed["doc_ids"][0] == 0
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x[0, first], y[0, first], rtol=0, atol=0)


def test_incremental_step0_with_crop(target, samples):
    batch = make_batch(target[1], samples[:1], AUX, 4)
    model = new_draft(target, batch).eval()
    n = batch["input_ids"].shape[1]
    tokens = torch.cat([batch["input_ids"][:, 1:], torch.zeros(1, 1, dtype=torch.long)], 1)
    pos = batch["position_ids"]
    with torch.no_grad():
        fused = model.fuse(batch["hidden_aux"])
        full = model.ttt_forward(fused, batch, 1)[0]
        cache = KVCache(1)
        outs = [model.step(fused[:, t:t + 1], tokens[:, t:t + 1], pos[:, t:t + 1], cache,
                           torch.ones(1, t + 1, dtype=torch.bool))[0] for t in range(n)]  # fmt: skip
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-5)
        cache.crop(10)
        drafts = model.generate_chain(batch["hidden_aux"][:, 10:11], tokens[:, 10:11], pos[:, 10:11], cache, 3)
        assert len(cache) == 13 and drafts.shape == (1, 3) and bool(model.t2d[drafts].all())
        cache.crop(10)
        rest, logits = model.step(fused[:, 10:], tokens[:, 10:], pos[:, 10:], cache, causal_mask(n - 10, 10))
        torch.testing.assert_close(rest, full[:, 10:], rtol=0, atol=1e-5)
        assert logits.shape == (1, n - 10, VD)
        full_vocab = model.target_logits(logits)
        assert torch.equal(full_vocab.argmax(-1), model.draft_to_target(logits.argmax(-1)))


# ---- objective -----------------------------------------------------------------------------------------------


def test_loss_is_decayed_sum_of_step_losses(target, packed):
    model = new_draft(target, packed).eval()
    loss, m = training_loss(model, packed, Eagle3Objective(ttt_steps=4, step_decay=0.8))
    assert loss.item() == pytest.approx(sum(0.8**i * m[f"loss_{i}"] for i in range(4)), rel=1e-6)
    assert m["acc"] == m["acc_0"] and m["tokens"] == m["tokens_0"] and m["loss"] == pytest.approx(loss.item())
    loss1, m1 = training_loss(model, packed, Eagle3Objective(ttt_steps=1))
    assert loss1.item() == pytest.approx(m1["loss_0"]) and m1["loss_0"] == pytest.approx(m["loss_0"])
    loss_flat, mf = training_loss(model, packed, Eagle3Objective(ttt_steps=4, step_decay=1.0))
    assert loss_flat.item() == pytest.approx(sum(mf[f"loss_{i}"] for i in range(4)), rel=1e-6)


def test_counted_rows_follow_shift_document_and_t2d(target, packed):
    model = new_draft(target, packed, vocab=100).eval()
    _, m = training_loss(model, packed, Eagle3Objective(ttt_steps=3))
    doc, lm = packed["doc_ids"].tolist(), packed["loss_mask"].tolist()
    arg = packed["topk_ids"][..., 0]
    t2d = model.t2d
    for i in range(3):
        n = 0
        for b in range(2):
            for t in range(80 - 2 - i):
                n += (doc[b][t] >= 0 and doc[b][t + 2 + i] == doc[b][t] and lm[b][t + 2 + i] == 1
                      and bool(t2d[arg[b, t + 1 + i]]))  # fmt: skip
        assert m[f"tokens_{i}"] == n
    assert 0 < m["tokens_0"] < 128  # a 100-token draft vocab misses some target argmaxes


def test_topk_with_full_vocab_equals_full_target(target, samples):
    batch = make_batch(target[1], samples[:2], AUX, top_k=V)
    model = new_draft(target, batch, head=True).eval()
    lt, mt = training_loss(model, batch, Eagle3Objective(ttt_steps=3, target="topk"))
    lf, mf = training_loss(model, batch, Eagle3Objective(ttt_steps=3, target="full"))
    torch.testing.assert_close(lt, lf, rtol=1e-5, atol=1e-6)
    for i in range(3):
        assert mt[f"loss_{i}"] == pytest.approx(mf[f"loss_{i}"], rel=1e-5)
        assert mt[f"acc_{i}"] == mf[f"acc_{i}"] and mt[f"tokens_{i}"] == mf[f"tokens_{i}"]
    with pytest.raises(ValueError, match="target lm_head"):
        training_loss(new_draft(target, batch), batch, Eagle3Objective(target="full"))


def test_noise_option(target, packed):
    model = new_draft(target, packed).train()
    clean, _ = training_loss(model, packed, Eagle3Objective(ttt_steps=2))
    noisy, _ = training_loss(model, packed, Eagle3Objective(ttt_steps=2, noise="uniform"))
    assert clean.item() != noisy.item()
    model.eval()
    again, _ = training_loss(model, packed, Eagle3Objective(ttt_steps=2, noise="uniform"))
    assert again.item() == pytest.approx(clean.item(), rel=1e-6)


def test_acceptance_length_formula():
    assert acceptance_length([]) == 1.0
    assert acceptance_length([0.5, 0.5]) == pytest.approx(1.75)
    assert acceptance_length([1.0] * 3) == 4.0


def test_overfits_and_chain_acceptance(target, packed):
    model = new_draft(target, packed, seed=1)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=3e-3)
    obj = Eagle3Objective(ttt_steps=3)
    for _ in range(150):
        loss, _ = training_loss(model, packed, obj)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    _, m = training_loss(model, packed, obj)
    assert m["acc_0"] >= 0.9, m
    assert m["acc_2"] >= 0.8, m
    acc = chain_acceptance(model, packed, steps=3, require_greedy_prefix=False)
    assert acc["eligible"][0] == 128 and acc["eligible"][1] <= 128
    assert all(0.8 <= a <= 1.0 for a in acc["cond_acc"]), acc
    assert acc["tau"] == pytest.approx(acceptance_length(acc["cond_acc"]))
    # Random data tokens rarely equal the target's argmax: a greedy trajectory rarely survives step 0.
    greedy = chain_acceptance(model, packed, steps=3)
    assert greedy["eligible"][0] == 128 and greedy["eligible"][1] < acc["eligible"][1]


@pytest.mark.parametrize("variant", ["eagle1", "eagle3"])
def test_activation_checkpointing_and_chunked_attention_give_the_same_gradients(target, packed, variant,
                                                                                monkeypatch):  # fmt: skip
    """Against the plain path (dense attention, the head's softmax through autograd): the default (flash attention
    per document on the CPU, fused head), activation checkpointing, and attention cut into 16-row query chunks
    (each recomputed in backward, as long rows are on a GPU) change no loss and no gradient."""
    import pipeline.draft.layers as layers
    from pipeline.draft import eagle1

    tc, tm = target
    if variant == "eagle1":
        model = eagle1.Eagle1Draft(eagle1.Eagle1Config.from_target(tc))
        model.load_target_weights(target_weights(tm))
        loss_fn, obj = eagle1.training_loss, eagle1.Eagle1Objective(noise="none")
    else:
        model = Eagle3Draft(Eagle3Config.from_target(tc, AUX, VD))
        d2t, t2d, _ = build_draft_vocab(np.bincount(packed["input_ids"].flatten().numpy(), minlength=V), VD)
        model.set_vocab(d2t, t2d)
        model.load_target_weights(target_weights(tm))
        loss_fn, obj = training_loss, Eagle3Objective(ttt_steps=3)
    grads, losses = [], []
    heads, width = tc["num_attention_heads"], packed["input_ids"].shape[1]
    paths = [(False, "dense", None, False), (False, "auto", None, True), (True, "auto", None, True),
             (False, "chunked", 16, True), (True, "chunked", 16, True)]  # fmt: skip
    for checkpointing, attention, chunk_rows, fused_head in paths:
        monkeypatch.setenv("PIPELINE_ATTENTION", attention)
        obj.fused_head = fused_head
        if chunk_rows:  # bytes for 16 query rows of the widest step (step-0 keys + 2 diagonals)
            monkeypatch.setattr(layers, "CHUNK_SCORE_BYTES", 3 * 4 * 2 * heads * chunk_rows * (width + 2))
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        loss, _ = loss_fn(model.train(), packed, obj)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0] and all(g.keys() == grads[0].keys() for g in grads)
    for g, loss in zip(grads[1:], losses[1:], strict=True):
        assert loss == pytest.approx(losses[0], rel=1e-6)
        for n in grads[0]:
            torch.testing.assert_close(g[n], grads[0][n], atol=1e-6, rtol=1e-5)

"""EAGLE-1 draft: shapes, frozen pieces, concat order, objective, alignment, incremental inference, overfit."""

from __future__ import annotations

import pytest
import torch
from synthetic_target import make_batch, target_weights, tiny_target, tiny_target_config

from pipeline.draft.eagle1 import Eagle1Config, Eagle1Draft, Eagle1Objective, training_loss
from pipeline.draft.layers import KVCache, causal_mask, doc_causal_mask

pytestmark = pytest.mark.usefixtures("one_thread")

V, H = 1000, 64


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
    return make_batch(target[1], samples, [1, 2, 3], 16, rows=[[0, 1], [2, 3]], width=80)


def new_draft(target, seed=0, **overrides) -> Eagle1Draft:
    tc, tgt = target
    torch.manual_seed(seed)
    model = Eagle1Draft(Eagle1Config.from_target(tc, **overrides))
    model.load_target_weights(target_weights(tgt))
    return model


def test_config_from_target(target):
    tc, _ = target
    c = Eagle1Config.from_target(tc, intermediate_size=96)
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (64, 4, 2, 16)
    assert c.intermediate_size == 96 and c.vocab_size == V and not c.fc_bias
    assert c.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    with pytest.raises(ValueError):
        Eagle1Config.from_target(tc, hidden_size=32)
    assert Eagle1Config.from_dict(c.to_dict()) == c


def test_shapes_and_frozen_pieces(target, packed):
    model = new_draft(target)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"fc.weight", "layers.0.post_attention_layernorm.weight"} | {
        f"layers.0.self_attn.{p}_proj.weight" for p in "qkvo"} | {
        f"layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}  # fmt: skip
    assert model.fc.weight.shape == (H, 2 * H) and model.fc.bias is None
    loss, _ = training_loss(model, packed)
    loss.backward()
    for p in (model.embed_tokens.weight, model.lm_head.weight):
        assert not p.requires_grad and p.grad is None
    assert all(p.grad is not None for p in model.trainable_parameters())
    assert torch.equal(model.lm_head.weight, target[1].lm_head.weight)
    out = model(packed["hidden_last"], packed["input_ids"], packed["position_ids"], doc_causal_mask(packed["doc_ids"]))
    assert out.shape == (2, 80, H)


def test_fc_concat_order_embedding_first(target, packed):
    model = new_draft(target)
    seen = {}
    model.fc.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    ids, f = packed["input_ids"], packed["hidden_last"]
    model(f, ids, packed["position_ids"], doc_causal_mask(packed["doc_ids"]))
    torch.testing.assert_close(seen["x"][..., :H], model.embed_tokens(ids))
    torch.testing.assert_close(seen["x"][..., H:], f)


def test_topk_with_full_vocab_equals_full_target(target, samples):
    batch = make_batch(target[1], samples[:2], [1, 2, 3], top_k=V)
    model = new_draft(target).eval()
    lt, mt = training_loss(model, batch, Eagle1Objective(target="topk"))
    lf, mf = training_loss(model, batch, Eagle1Objective(target="full"))
    torch.testing.assert_close(lt, lf, rtol=1e-6, atol=1e-6)
    assert mt["acc"] == mf["acc"] and mt["tokens"] == mf["tokens"]
    assert mt["vloss"] == mf["vloss"]


def test_loss_weighting(target, packed):
    model = new_draft(target).eval()
    _, m = training_loss(model, packed)
    for v_w, p_w in ((1.0, 0.0), (0.0, 1.0), (0.7, 0.3)):
        loss, mm = training_loss(model, packed, Eagle1Objective(v_weight=v_w, p_weight=p_w))
        assert mm["vloss"] == pytest.approx(m["vloss"]) and mm["ploss"] == pytest.approx(m["ploss"])
        assert loss.item() == pytest.approx(v_w * m["vloss"] + p_w * m["ploss"], rel=1e-6)


def test_noise_only_in_train_mode(target, packed):
    model = new_draft(target)
    model.eval()
    clean, _ = training_loss(model, packed, Eagle1Objective(noise="uniform"))
    model.train()
    none, _ = training_loss(model, packed, Eagle1Objective(noise="none"))
    assert none.item() == pytest.approx(clean.item(), rel=1e-6)
    torch.manual_seed(0)
    noisy, _ = training_loss(model, packed, Eagle1Objective(noise="uniform", noise_std=0.2))
    torch.manual_seed(0)
    scaled, _ = training_loss(model, packed, Eagle1Objective(noise="uniform", noise_scale_by_length=True))
    gauss, _ = training_loss(model, packed, Eagle1Objective(noise="gaussian"))
    assert len({clean.item(), noisy.item(), scaled.item(), gauss.item()}) == 4
    with pytest.raises(ValueError):
        Eagle1Objective(noise="normal")


def counted_by_hand(batch) -> int:
    """Rows t with t+2 in the same document and loss_mask[t+2] = 1."""
    n = 0
    for doc, lm in zip(batch["doc_ids"].tolist(), batch["loss_mask"].tolist(), strict=True):
        for t in range(len(doc) - 2):
            n += doc[t] >= 0 and doc[t + 2] == doc[t] and lm[t + 2] == 1
    return n


def test_alignment_counts_and_document_isolation(target, packed):
    model = new_draft(target).eval()
    _, m = training_loss(model, packed)
    assert m["tokens"] == counted_by_hand(packed) == sum(n - 4 for n in (40, 24, 48, 32))
    # Changing the second document of row 0 must not change anything the first document computes.
    doc = packed["doc_ids"]
    other = {k: v.clone() for k, v in packed.items()}
    sel = (doc == 1)[0]
    other["hidden_last"][0, sel] += 1.0
    other["input_ids"][0, sel] = (other["input_ids"][0, sel] + 1) % V
    a = model(packed["hidden_last"], packed["input_ids"], packed["position_ids"], doc_causal_mask(doc))
    b = model(other["hidden_last"], other["input_ids"], other["position_ids"], doc_causal_mask(doc))
    first = (doc == 0)[0]
    torch.testing.assert_close(a[0, first], b[0, first], rtol=0, atol=0)


def test_incremental_cache_matches_full_forward(target, samples):
    """Token-by-token and chunked+crop inference with a KVCache reproduce the training forward (step 0)."""
    batch = make_batch(target[1], samples[:1], [1, 2, 3], 4)
    model = new_draft(target).eval()
    f, pos = batch["hidden_last"], batch["position_ids"]
    tokens = torch.cat([batch["input_ids"][:, 1:], torch.zeros(1, 1, dtype=torch.long)], 1)
    n = f.shape[1]
    with torch.no_grad():
        full, full_logits = model.step(f, tokens, pos, None, causal_mask(n))
        cache = KVCache(1)
        outs = [model.step(f[:, t:t + 1], tokens[:, t:t + 1], pos[:, t:t + 1], cache,
                           torch.ones(1, t + 1, dtype=torch.bool))[0] for t in range(n)]  # fmt: skip
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-5)
        # Draft a chain of 4 after row 20 (own predicted features fed back), reject it, crop, continue.
        cache = KVCache(1)
        drafts = model.generate_chain(f[:, :21], tokens[:, :21], pos[:, :21], cache, 4)
        assert len(cache) == 21 + 3
        h, tok = full[:, 20:21], full_logits[:, 20:21].argmax(-1)
        manual, by_hand = [tok], KVCache(1)
        model.step(f[:, :21], tokens[:, :21], pos[:, :21], by_hand, causal_mask(21))
        for i in range(1, 4):
            h, logits = model.step(h, tok, pos[:, 20:21] + i, by_hand, torch.ones(1, len(by_hand) + 1, dtype=torch.bool))
            tok = logits.argmax(-1)
            manual.append(tok)
        assert torch.equal(drafts, torch.cat(manual, 1))
        cache.crop(21)
        rest, _ = model.step(f[:, 21:], tokens[:, 21:], pos[:, 21:], cache, causal_mask(n - 21, 21))
        torch.testing.assert_close(rest, full[:, 21:], rtol=0, atol=1e-5)


def test_overfits_a_few_samples(target, packed):
    model = new_draft(target, seed=1)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=3e-3)
    obj = Eagle1Objective(p_weight=1.0, noise="none")
    for _ in range(200):
        loss, _ = training_loss(model, packed, obj)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    _, m = training_loss(model, packed, obj)
    assert m["acc"] >= 0.9, m
    assert m["vloss"] < 0.15, m

"""pipeline.draft.layers: rope, attention blocks, masks, KV cache, decoder layer vs transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from synthetic_target import packed_doc_ids, tiny_target_config, ttt_attention_inputs

from pipeline.draft.layers import (
    DecoderLayer,
    KVBlock,
    KVCache,
    RotaryEmbedding,
    attend,
    cache_attend_to,
    causal_mask,
    doc_causal_mask,
    same_doc_ahead,
    shift_left,
    uniform_noise,
)

ROPES = [
    {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
    {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}},
    {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 128}},
    {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 128}},
    # legacy transformers-4 fields, as older target configs carry them
    {"rope_theta": 250000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
]  # fmt: skip


@pytest.mark.parametrize("rope", ROPES, ids=lambda r: str(r.get("rope_parameters", r)))
def test_rope_matches_transformers(rope):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    tc = tiny_target_config(**rope)
    ours = RotaryEmbedding(tc, head_dim=16)
    ref = LlamaRotaryEmbedding(LlamaConfig(**tc))
    pos = torch.tensor([[0, 1, 2, 7, 100, 400]])
    x = torch.zeros(1, 6, 16)
    cos_r, sin_r = ref(x, pos)
    cos, sin = ours(pos)
    torch.testing.assert_close(cos, cos_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin, sin_r, rtol=1e-6, atol=1e-6)


def test_attend_matches_sdpa_gqa():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 8)
    k, v = torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = torch.rand(2, 5, 7) > 0.3
    mask[..., 0] = True
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                         attn_mask=mask[:, None])  # fmt: skip
    torch.testing.assert_close(attend(q, [KVBlock(k, v, mask)]), ref, rtol=1e-5, atol=1e-5)
    # Splitting the keys into blocks with one softmax is the same attention.
    blocks = [KVBlock(k[:, :, :3], v[:, :, :3], mask[..., :3]), KVBlock(k[:, :, 3:], v[:, :, 3:], mask[..., 3:])]
    torch.testing.assert_close(attend(q, blocks), ref, rtol=1e-5, atol=1e-5)


def test_diagonal_block_equals_dense_identity_mask():
    torch.manual_seed(1)
    q = torch.randn(1, 4, 5, 8)
    k0, v0 = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    kd, vd = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    m0 = torch.ones(5, 5, dtype=torch.bool).tril()[None]
    own = torch.ones(1, 5, dtype=torch.bool)
    fast = attend(q, [KVBlock(k0, v0, m0), KVBlock(kd, vd, own, diagonal=True)])
    dense_mask = torch.cat([m0, torch.eye(5, dtype=torch.bool)[None]], dim=2)
    dense = attend(q, [KVBlock(torch.cat([k0, kd], 2), torch.cat([v0, vd], 2), dense_mask)])
    torch.testing.assert_close(fast, dense, rtol=1e-5, atol=1e-6)


def test_query_without_keys_outputs_zeros():
    q = torch.randn(1, 2, 3, 4)
    k = v = torch.randn(1, 1, 3, 4)
    out = attend(q, [KVBlock(k, v, torch.zeros(1, 3, 3, dtype=torch.bool))])
    assert torch.equal(out, torch.zeros_like(out))


def test_doc_causal_mask_explicit():
    doc = torch.tensor([[0, 0, 1, 1, 1, -1]])
    m = doc_causal_mask(doc)[0].int()
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0],
    ])  # fmt: skip
    assert torch.equal(m, expected)
    assert causal_mask(2, 3).int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_shift_helpers_stay_in_document():
    doc = torch.tensor([[0, 0, 0, 1, 1, -1]])
    assert same_doc_ahead(doc, 1).int().tolist() == [[1, 1, 0, 1, 0, 0]]
    assert same_doc_ahead(doc, 2).int().tolist() == [[1, 0, 0, 0, 0, 0]]
    assert shift_left(torch.tensor([[1, 2, 3]]), 1).tolist() == [[2, 3, 0]]


def test_kv_cache_append_crop_select():
    cache = KVCache(1)
    k = torch.arange(2 * 1 * 5 * 2, dtype=torch.float).view(2, 1, 5, 2)
    cache.append(0, k[:, :, :3], -k[:, :, :3])
    ka, va = cache.append(0, k[:, :, 3:], -k[:, :, 3:])
    assert len(cache) == 5 and torch.equal(ka, k) and torch.equal(va, -k)
    cache.crop(4)
    assert len(cache) == 4 and torch.equal(cache.k[0], k[:, :, :4])
    cache.select(torch.tensor([0, 2, 3]))
    assert torch.equal(cache.k[0], k[:, :, [0, 2, 3]]) and torch.equal(cache.v[0], -k[:, :, [0, 2, 3]])
    cache.select(torch.tensor([[2, 0], [1, 1]]))  # per-row selection (tree branches differ per sequence)
    assert torch.equal(cache.k[0][0], k[0, :, [3, 0]]) and torch.equal(cache.k[0][1], k[1, :, [2, 2]])


def test_decoder_layer_matches_transformers_llama_layer():
    """Same parameter names as HF's LlamaDecoderLayer (strict load) and the same output."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    tc = tiny_target_config()
    config = LlamaConfig(**tc)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = LlamaDecoderLayer(config, layer_idx=0).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.1)
    ours = DecoderLayer(64, 128, 4, 2, 16, config.rms_norm_eps, "silu", input_layernorm=True)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 6, 64)
    pos = torch.arange(6).repeat(2, 1)
    additive = torch.full((6, 6), float("-inf")).triu(1)[None, None].expand(2, 1, 6, 6)
    with torch.no_grad():
        expected = ref(x, attention_mask=additive, position_ids=pos,
                       position_embeddings=LlamaRotaryEmbedding(config)(x, pos))  # fmt: skip
        expected = expected[0] if isinstance(expected, tuple) else expected
        cos, sin = RotaryEmbedding(tc, 16)(pos)
        out, _, _ = ours(x, cos, sin, cache_attend_to(None, 0, causal_mask(6)))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_uniform_noise_bounds():
    torch.manual_seed(0)
    x = torch.zeros(1, 12, 32)
    doc = torch.tensor([[0] * 4 + [1] * 8])
    plain = uniform_noise(x, 0.2, doc, scale_by_length=False)
    assert plain.abs().max() <= 0.1 and plain.abs().max() > 0.05
    scaled = uniform_noise(x, 0.2, doc, scale_by_length=True)
    assert scaled[0, :4].abs().max() <= 0.1 * 512 / 4 and scaled[0, :4].abs().max() > 0.05 * 512 / 4
    assert scaled[0, 4:].abs().max() <= 0.1 * 512 / 8 and scaled[0, 4:].abs().max() > 0.05 * 512 / 8


# ---- training attention: lazy document mask, query chunks, FlexAttention


@pytest.mark.parametrize("steps", [1, 3])
def test_chunked_attention_equals_dense_with_gradients(monkeypatch, steps):
    import pipeline.draft.layers as layers

    doc = packed_doc_ids()
    results = []
    for impl, chunk_bytes in (("dense", 1 << 30), ("chunked", 3 * 4 * 2 * 4 * 7 * (40 + steps - 1))):  # 7 rows
        monkeypatch.setenv("PIPELINE_ATTENTION", impl)
        monkeypatch.setattr(layers, "CHUNK_SCORE_BYTES", chunk_bytes)
        q, kv, blocks = ttt_attention_inputs(doc, steps)
        assert layers.attention_impl(q, blocks) == impl
        if impl == "chunked":
            assert layers._chunk_rows(q, 40 + steps - 1) == 7
        out = attend(q, blocks)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out.detach(), [t.grad for t in (q, *kv)]))
    (dense, dgrads), (chunked, cgrads) = results
    torch.testing.assert_close(chunked, dense, rtol=1e-5, atol=1e-6)
    for a, b in zip(cgrads, dgrads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (dense[0, :, 38:] == 0).all()  # padding queries see nothing


def test_lazy_doc_mask_rows_and_first_key():
    from pipeline.draft.layers import DocCausal

    doc = packed_doc_ids()
    lazy = DocCausal(doc)
    assert torch.equal(lazy.rows(10, 20, 3, 20), doc_causal_mask(doc)[:, 10:20, 3:20])
    assert lazy.first_key(14, 20) == 0  # row 1 is one document from row 0
    assert lazy.first_key(31, 36) == 0 and DocCausal(doc[:1]).first_key(31, 36) == 31
    assert DocCausal(doc[:1]).first_key(38, 40) == 38  # padding only


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_forward_equals_dense(monkeypatch):
    pytest.importorskip("torch.nn.attention.flex_attention")
    doc = packed_doc_ids()
    outs = []
    for impl in ("dense", "flex"):
        monkeypatch.setenv("PIPELINE_ATTENTION", impl)
        q, _, blocks = ttt_attention_inputs(doc, 3, grad=False)  # no FlexAttention backward on the CPU: test_draft_gpu.py
        outs.append(attend(q, blocks))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_auto_attention_on_the_cpu_is_flash_per_document_else_dense_until_the_scores_grow(monkeypatch):
    import pipeline.draft.layers as layers

    monkeypatch.delenv("PIPELINE_ATTENTION", raising=False)
    q, _, blocks = ttt_attention_inputs(packed_doc_ids(), 3, grad=False)
    assert layers.attention_impl(q, blocks) == "flash"
    assert blocks[0].mask.segments() == [[(0, 13), (13, 31), (31, 38)], [(0, 40)]]
    assert layers.attention_impl(q, [KVBlock(blocks[0].k, blocks[0].v, blocks[0].mask.dense())]) == "dense"
    split = packed_doc_ids()
    split[0, 5:8] = 1  # document 0 in two runs: not a set of causal blocks
    q, _, blocks = ttt_attention_inputs(split, 3, grad=False)
    assert blocks[0].mask.segments() is None
    assert layers.attention_impl(q, blocks) == "dense"
    monkeypatch.setattr(layers, "CPU_DENSE_SCORE_BYTES", 1000)
    assert layers.attention_impl(q, blocks) == "chunked"
    monkeypatch.setenv("PIPELINE_ATTENTION", "flash")
    with pytest.raises(ValueError, match="flash"):
        layers.attention_impl(q, blocks)


@pytest.mark.parametrize("steps", [1, 3])
def test_flash_attention_equals_dense_with_gradients(monkeypatch, steps):
    doc = packed_doc_ids(width=97)  # runs of several kernel blocks, an odd tail, padding, a second row
    results = []
    for impl in ("dense", "flash"):
        monkeypatch.setenv("PIPELINE_ATTENTION", impl)
        q, kv, blocks = ttt_attention_inputs(doc, steps, heads=6, kv_heads=2, head_dim=16)
        out = attend(q, blocks)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out.detach(), [t.grad for t in (q, *kv)]))
    (dense, dgrads), (flash, fgrads) = results
    torch.testing.assert_close(flash, dense, rtol=1e-5, atol=1e-5)
    for a, b in zip(fgrads, dgrads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (flash[0, :, 93:] == 0).all()  # padding queries see nothing


def test_unknown_attention_impl_is_named(monkeypatch):
    monkeypatch.setenv("PIPELINE_ATTENTION", "fast")
    q, _, blocks = ttt_attention_inputs(packed_doc_ids(), 1)
    with pytest.raises(ValueError, match="PIPELINE_ATTENTION"):
        attend(q, blocks)


# ---- the draft heads' lm_head + soft cross-entropy, fused in row chunks


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("trained_head", [True, False])
def test_fused_head_soft_ce_equals_autograd(monkeypatch, sparse, trained_head):
    import pipeline.draft.common as common

    monkeypatch.setattr(common, "HEAD_CHUNK_BYTES", 4 * 50 * 7)  # 7 rows per chunk: 5 chunks, the last short
    g = torch.Generator().manual_seed(0)
    n, h, v, k = 31, 16, 50, 4
    x0 = torch.randn(n, h, generator=g)
    head = torch.nn.Linear(h, v, bias=False).requires_grad_(trained_head)
    ids = torch.randint(0, v, (n, k), generator=g)
    ids[::5, 1] = -1  # dropped targets
    p = torch.softmax(torch.randn(n, k if sparse else v, generator=g), -1)
    row_weight = (torch.rand(n, generator=g) > 0.3).float()
    results = []
    for fused in (False, True):
        head.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        loss, arg = common.head_soft_ce(x, head, row_weight, ids if sparse else None, p, fused=fused)
        (3 * loss).backward()
        results.append((loss.detach(), arg, x.grad, head.weight.grad))
    (l0, a0, gx0, gw0), (l1, a1, gx1, gw1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    assert torch.equal(a1, a0)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-7)
    if trained_head:
        torch.testing.assert_close(gw1, gw0, rtol=1e-5, atol=1e-7)
    else:
        assert gw0 is None and gw1 is None
    with torch.no_grad():  # metrics only: no gradient work, same value
        loss, _ = common.head_soft_ce(x0, head, row_weight, ids if sparse else None, p)
    torch.testing.assert_close(loss, l0, rtol=1e-6, atol=1e-6)

"""pipeline.draft.layers: rope, attention blocks, masks, KV cache, decoder layer vs transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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
from pipeline.draft.synthetic import tiny_target_config

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

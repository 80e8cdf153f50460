"""Draft heads on a CUDA device: same numbers as on CPU, and a SmolLM2-sized TTT step fits and runs.

Skipped without CUDA. Run directly (``python tests/test_draft_gpu.py``) to print timings and peak memory.
"""

from __future__ import annotations

import time

import pytest
import torch
from synthetic_target import make_batch, target_weights, tiny_target, tiny_target_config

from pipeline.draft.eagle1 import Eagle1Config, Eagle1Draft, Eagle1Objective
from pipeline.draft.eagle1 import training_loss as eagle1_loss
from pipeline.draft.eagle3 import (
    Eagle3Config,
    Eagle3Draft,
    Eagle3Objective,
    build_draft_vocab,
    chain_acceptance,
)
from pipeline.draft.eagle3 import training_loss as eagle3_loss
from pipeline.draft.layers import KVCache

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
AUX = [1, 2, 3]


def to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@needs_cuda
def test_cuda_matches_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    tc = tiny_target_config()
    tgt = tiny_target(tc, init_std=0.3)
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, 1000, (n,), generator=g) for n in (40, 24, 48, 32)]
    batch = make_batch(tgt, samples, AUX, 16, rows=[[0, 1], [2, 3]], width=80)
    w = target_weights(tgt)

    torch.manual_seed(0)
    e1 = Eagle1Draft(Eagle1Config.from_target(tc))
    e1.load_target_weights(w)
    e1.eval()
    l_cpu, _ = eagle1_loss(e1, batch, Eagle1Objective(target="full"))
    l_gpu, _ = eagle1_loss(e1.cuda(), to(batch, "cuda"), Eagle1Objective(target="full"))
    torch.testing.assert_close(l_gpu.cpu(), l_cpu, rtol=1e-4, atol=1e-4)

    torch.manual_seed(0)
    e3 = Eagle3Draft(Eagle3Config.from_target(tc, AUX, 400))
    e3.load_target_weights(w, target_head=True)
    e3.set_vocab(*build_draft_vocab(torch.bincount(batch["topk_ids"][..., 0].flatten(), minlength=1000).numpy(),
                                    400)[:2])  # fmt: skip
    e3.eval()
    for target in ("topk", "full"):
        l_cpu, m_cpu = eagle3_loss(e3.cpu(), batch, Eagle3Objective(ttt_steps=3, target=target))
        l_gpu, m_gpu = eagle3_loss(e3.cuda(), to(batch, "cuda"), Eagle3Objective(ttt_steps=3, target=target))
        torch.testing.assert_close(l_gpu.cpu(), l_cpu, rtol=1e-4, atol=1e-4)
        assert m_gpu["tokens_2"] == m_cpu["tokens_2"]
    acc = chain_acceptance(e3, to(batch, "cuda"), steps=3)
    assert len(acc["cond_acc"]) == 3
    gb = to(batch, "cuda")
    drafts = e3.generate_chain(gb["hidden_aux"][:1, :20], gb["input_ids"][:1, 1:21], gb["position_ids"][:1, :20],
                               KVCache(1), 4)  # fmt: skip
    assert drafts.shape == (1, 4) and drafts.is_cuda


@needs_cuda
@pytest.mark.parametrize("impl", ["chunked", "flex"])
def test_training_attention_paths_match_dense_on_cuda(monkeypatch, impl):
    """Query-chunked and FlexAttention (compiled, block mask) attention give the dense path's outputs and
    gradients over packed rows with TTT diagonals (FlexAttention's backward exists on CUDA only)."""
    from synthetic_target import packed_doc_ids, ttt_attention_inputs

    import pipeline.draft.layers as layers
    from pipeline.draft.layers import attend

    doc = packed_doc_ids(256, "cuda")
    results = []
    for mode in ("dense", impl):
        monkeypatch.setenv("PIPELINE_ATTENTION", mode)
        monkeypatch.setattr(layers, "CHUNK_SCORE_BYTES", 3 * 4 * 2 * 8 * 32 * 256 * 3)  # 32-row chunks
        q, kv, blocks = ttt_attention_inputs(doc, 3, heads=8, kv_heads=2, head_dim=64)
        out = attend(q, blocks)
        (out * torch.linspace(-1, 1, out.numel(), device="cuda").reshape(out.shape)).sum().backward()
        results.append((out.detach(), [t.grad for t in (q, *kv)]))
    (ref, ref_grads), (got, grads) = results
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)  # flex: TF32/fused kernels on the GPU
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def smollm2_sized_step(tokens: int = 2048, steps: int = 7) -> dict:
    """One EAGLE-3 and one EAGLE-1 training step at SmolLM2-135M sizes on a packed row of ``tokens``."""
    tc = tiny_target_config(vocab_size=49152, hidden_size=576, num_layers=30, heads=9, kv_heads=3,
                            intermediate_size=1536, max_position_embeddings=8192)  # fmt: skip
    dev = torch.device("cuda")
    h, v, k = 576, 49152, 20
    lengths = [int(tokens * f) for f in (0.35, 0.25, 0.2)]
    lengths.append(tokens - sum(lengths))
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    batch = {
        "input_ids": torch.randint(0, v, (1, tokens)), "loss_mask": (torch.rand(1, tokens) > 0.3).float(),
        "position_ids": pos, "doc_ids": doc, "hidden_last": torch.randn(1, tokens, h),
        "hidden_aux": torch.randn(1, tokens, 3 * h), "topk_ids": torch.randint(0, v, (1, tokens, k)),
        "topk_logprobs": torch.log_softmax(torch.randn(1, tokens, k), -1),
    }  # fmt: skip
    batch = to(batch, dev)
    w = {"embed_tokens.weight": torch.randn(v, h) * 0.02, "lm_head.weight": torch.randn(v, h) * 0.02}
    out = {}
    for name in ("eagle3", "eagle1"):
        if name == "eagle3":
            model = Eagle3Draft(Eagle3Config.from_target(tc, [2, 15, 27], 32000))
            model.load_target_weights(w)
            model.set_vocab(*build_draft_vocab(torch.randint(0, 100, (v,)).numpy(), 32000)[:2])
            loss_fn, obj = eagle3_loss, Eagle3Objective(ttt_steps=steps)
        else:
            model = Eagle1Draft(Eagle1Config.from_target(tc))
            model.load_target_weights(w)
            loss_fn, obj = eagle1_loss, Eagle1Objective()
        model.to(dev).train()
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
        for _ in range(2):  # warm-up
            loss, _ = loss_fn(model, batch, obj)
            loss.backward()
            opt.step()
            opt.zero_grad()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        n = 5
        for _ in range(n):
            loss, m = loss_fn(model, batch, obj)
            loss.backward()
            opt.step()
            opt.zero_grad()
        torch.cuda.synchronize()
        out[name] = {"step_s": (time.perf_counter() - t) / n, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                     "loss": m["loss"], "finite": bool(torch.isfinite(loss))}  # fmt: skip
        model.cpu()
        torch.cuda.empty_cache()
    return out


@needs_cuda
def test_smollm2_sized_training_step_fits():
    out = smollm2_sized_step()
    for name, r in out.items():
        assert r["finite"], (name, r)
        assert r["peak_gib"] < 40, (name, r)


if __name__ == "__main__":
    print(torch.cuda.get_device_name(0))
    print(smollm2_sized_step())

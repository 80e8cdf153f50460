"""What vLLM serves for each family's export: its rope (vLLM's own ``get_rope`` on the exported config rotates
exactly as the draft trained: partial rotary, Gemma-3's full-attention rope, DeepSeek/gpt-oss yarn, Phi longrope)
and, for the families in SERVED, the EAGLE-3 export served by vLLM's CPU build with the HF evaluator's acceptance.

Skipped without vllm, failed instead where CI requires it (PIPELINE_REQUIRE_VLLM=1)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import LIVE_REPORT, require_vllm
from family_targets import family_config, family_model

require_vllm()
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

from pipeline.draft.eagle3 import Eagle3Config, Eagle3Draft  # noqa: E402
from pipeline.draft.export import export_draft  # noqa: E402
from pipeline.draft.layers import RotaryEmbedding, apply_rope  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("one_thread")]

# Phi longrope is left out: vLLM's longrope module reads the engine's max_model_len, which needs a whole engine.
ROPE_FAMILIES = ["llama", "phi3", "gemma3_text", "gpt_oss", "deepseek_v3", "qwen3"]


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_vllm_rotates_the_exported_draft_as_it_was_trained(tmp_path, family):
    from transformers import LlamaConfig
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    tc = json.loads(json.dumps(family_config(family, 256, layers=6).to_dict()))
    c = Eagle3Config.from_target(tc, (1, 2, 3), draft_vocab_size=128)
    cfg = json.loads((export_draft(Eagle3Draft(c), None, tmp_path / "e3") / "config.json").read_text())
    served = LlamaConfig(**{k: v for k, v in cfg.items() if k != "pipeline"})  # what vLLM's Llama reads
    head_dim = served.head_dim
    with set_current_vllm_config(VllmConfig()):  # vLLM's rope modules are custom ops that read it
        rope = get_rope(head_dim, served.max_position_embeddings, True, served.rope_parameters, torch.float32)
    n, heads = 40, c.num_attention_heads
    pos = torch.arange(n)
    q = torch.randn(n, heads * head_dim)
    k = torch.randn(n, c.num_key_value_heads * head_dim)
    q_v, k_v = rope.forward_native(pos, q.clone(), k.clone())
    cos, sin = RotaryEmbedding(c.target_config, c.head_dim)(pos[None])
    q_d = apply_rope(q.view(1, n, heads, head_dim).transpose(1, 2), cos, sin).transpose(1, 2).reshape(n, -1)
    k_d = apply_rope(k.view(1, n, -1, head_dim).transpose(1, 2), cos, sin).transpose(1, 2).reshape(n, -1)
    torch.testing.assert_close(q_v, q_d, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k_v, k_d, rtol=1e-4, atol=1e-4)


# families beyond the Llama of test_vllm_live.py that vLLM's CPU build serves here: two engine start-ups each
# (baseline, EAGLE-3), about a minute a family on this CPU
SERVED = ["qwen3", "qwen2", "mistral", "qwen3_moe"]


@pytest.mark.slow
@pytest.mark.parametrize("family", SERVED)
def test_eagle3_export_of_another_family_is_served_by_vllm(tmp_path, smollm2_tokenizer, family):
    """A tiny random target of ``family`` (SmolLM2's tokenizer) and an EAGLE-3 head fitted to its own greedy answers,
    exported and served by vLLM's CPU build: lossless, and the same verification steps as the HF evaluator."""
    from synthetic_draft import fit_draft, greedy_continuations, tiny_draft

    from pipeline.evaluate.cli import evaluate
    from pipeline.evaluate.prompts import load_conversations, render
    from pipeline.evaluate.vllm_engine import engine_options, evaluate_vllm

    model_dir = tmp_path / "target"
    # head_dim 64: vLLM's CPU attention kernels exist for a few head sizes only (16 is refused); Qwen2 has no head_dim
    # field (hidden / heads), so its hidden size makes it 64
    size = {"hidden": 256} if family == "qwen2" else {"head_dim": 64}
    target = family_model(family, len(smollm2_tokenizer), layers=8, init_std=0.1, **size)
    target.save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    prompts = tmp_path / "p.jsonl"
    texts = ["Name three colours.", "What is the capital of France?"]
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    # the head learns the target's own greedy answers to exactly these prompts (as the evaluators render them)
    seqs = [greedy_continuations(target, torch.tensor([render(smollm2_tokenizer, [{"role": "user", "content": t}])]),
                                 24)[0] for t in texts]  # fmt: skip
    head = tiny_draft(target, "eagle3", (2, 4, 5), draft_vocab_size=len(smollm2_tokenizer), seed=1)
    for seq in seqs:  # one batch per prompt (their lengths differ)
        fit_draft(head, target, [seq], steps=80, lr=1e-2)
    head.config.target_name = str(model_dir)
    draft = export_draft(head, None, tmp_path / "e3", dtype=torch.float32)

    depth, new = 3, 24
    [rv] = evaluate_vllm([draft], target_dir=model_dir, conversations=load_conversations(prompts=prompts),
                         depth=depth, max_new_tokens=new, options=engine_options(dtype="float32", enforce_eager=True),
                         progress=False)  # fmt: skip
    rh, _, _ = evaluate(draft, model=model_dir, prompts=prompts, depth=depth, max_new_tokens=new, device="cpu",
                        report_path=tmp_path / "hf.json", policy="fixed", baselines=(), progress=False)  # fmt: skip
    c = rv["vllm"]["counters"]
    assert rv["mismatches"] == 0 and rh["mismatches"] == 0 and c["drafts"] > 0
    assert [p["text"] for p in rv["prompts"]] == [p["text"] for p in rh["prompts"]]
    fv, fh = rv["target_forwards"], rh["target_forwards"]
    LIVE_REPORT.append(f"vllm families: {family} EAGLE-3 served by vLLM: {fv} verification steps, accepted per "
                       f"position {c['accepted_per_pos']}, tau {rv['acceptance_length']:.3f}; HF evaluator {fh} "
                       f"steps, tau {rh['acceptance_length']:.3f}")  # fmt: skip
    assert abs(fv - fh) <= max(2, 0.05 * fh), (fv, fh)
    assert c["accepted"] > 0

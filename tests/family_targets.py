"""Tiny seeded random targets of every model family users bring, built from transformers' own config classes
(hidden 64, few layers, fp32): what each family's config means for the draft and the evaluator is tested on these.

Sliding windows are shrunk to 16 positions so that short decodings cross them; Phi-3 comes with the partial
rotary of Phi-4-mini (0.75) under the default and the longrope rope; gpt-oss and DeepSeek-V3 with their yarn."""

from __future__ import annotations

import torch

WINDOW = 16  # sliding window of the windowed families: crossed after a few decoded tokens
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 6,
            "long_factor": [1.5] * 6, "original_max_position_embeddings": 256}  # fmt: skip


def _common(vocab: int, layers: int, hidden: int) -> dict:
    return {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}  # fmt: skip


# family -> (transformers config class name, family-specific fields)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {"intermediate_size": 128}),
    "qwen2": ("Qwen2Config", {"intermediate_size": 128}),
    "qwen3": ("Qwen3Config", {"intermediate_size": 128, "head_dim": 16}),
    "qwen3_moe": ("Qwen3MoeConfig", {"intermediate_size": 128, "moe_intermediate_size": 32, "num_experts": 4,
                                     "num_experts_per_tok": 2, "head_dim": 16}),
    "mistral": ("MistralConfig", {"intermediate_size": 128, "sliding_window": None}),
    "mistral_window": ("MistralConfig", {"intermediate_size": 128, "sliding_window": WINDOW}),
    "gemma2": ("Gemma2Config", {"intermediate_size": 128, "head_dim": 16, "sliding_window": WINDOW,
                                "tie_word_embeddings": True}),
    "gemma3_text": ("Gemma3TextConfig", {"intermediate_size": 128, "head_dim": 16, "sliding_window": WINDOW,
                                         "tie_word_embeddings": True,
                                         "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                                "rope_theta": 1000000.0},
                                                             "sliding_attention": {"rope_type": "default",
                                                                                   "rope_theta": 10000.0}}}),
    "phi3": ("Phi3Config", {"intermediate_size": 128, "partial_rotary_factor": 0.75}),
    "phi3_longrope": ("Phi3Config", {"intermediate_size": 128, "partial_rotary_factor": 0.75,
                                     "original_max_position_embeddings": 256,
                                     "rope_parameters": dict(LONGROPE, partial_rotary_factor=0.75)}),
    "gpt_oss": ("GptOssConfig", {"intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2,
                                 "head_dim": 16, "sliding_window": WINDOW, "layer_types": None,
                                 "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                                                     "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                                     "original_max_position_embeddings": 128}}),
    "deepseek_v3": ("DeepseekV3Config", {"intermediate_size": 128, "moe_intermediate_size": 32,
                                         "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
                                         "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
                                         "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8,
                                         "qk_nope_head_dim": 8, "v_head_dim": 16, "num_key_value_heads": 4,
                                         "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0,
                                                             "factor": 4.0, "original_max_position_embeddings": 128,
                                                             "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                                                             "mscale_all_dim": 1.0}}),
    "olmo2": ("Olmo2Config", {"intermediate_size": 128}),
}


def family_config(family: str, vocab: int = 256, layers: int = 6, hidden: int = 64, **overrides):
    """The transformers config object of a tiny ``family`` target."""
    import transformers

    cls_name, fields = FAMILIES[family]
    kwargs = {**_common(vocab, layers, hidden), **fields, **overrides}
    if kwargs.get("layer_types", "") is None:
        kwargs.pop("layer_types")
    return getattr(transformers, cls_name)(**kwargs)


def family_model(family: str, vocab: int = 256, layers: int = 6, seed: int = 0, init_std: float = 0.2, **overrides):
    """A seeded random fp32 causal LM of ``family`` in eval mode (eager attention where the family needs it)."""
    from transformers import AutoModelForCausalLM

    config = family_config(family, vocab, layers, initializer_range=init_std, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # Gemma/OLMo init norms at 0 or 1: random norm weights make a wrong norm formula visible
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.normal_(0.0, 0.3).add_(1.0 if "gemma" not in family else 0.0)
    return model.float().eval()

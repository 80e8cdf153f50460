"""Tiny random Llama targets and store-format batches built from them (tests, smoke runs).

The batches follow the project's loader format (``pipeline.train.loader.collate``): packed rows, positions that
restart per document, ``doc_ids = -1`` on padding, fp32 features, top-k log-probs of the next token per row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch


def tiny_target_config(vocab_size: int = 1000, hidden_size: int = 64, num_layers: int = 4, heads: int = 4,
                       kv_heads: int = 2, **overrides) -> dict:  # fmt: skip
    from transformers import LlamaConfig

    kwargs = {"intermediate_size": 2 * hidden_size, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "architectures": ["LlamaForCausalLM"], **overrides}  # fmt: skip
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, **kwargs)  # fmt: skip
    return json.loads(json.dumps(cfg.to_dict()))  # as the store's target/config.json reads back


def tiny_target(config: dict, seed: int = 0, init_std: float = 0.1):
    """A seeded random fp32 ``LlamaForCausalLM``. A wider init than HF's 0.02 gives peaked next-token
    distributions, closer to a trained model's than near-uniform ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**config, "initializer_range": init_std})).float().eval()
    return model


def target_weights(model) -> dict[str, torch.Tensor]:
    """The store's ``target/weights.safetensors`` content of an HF Llama."""
    return {"embed_tokens.weight": model.model.embed_tokens.weight.detach().clone(),
            "norm.weight": model.model.norm.weight.detach().clone(),
            "lm_head.weight": model.lm_head.weight.detach().clone()}  # fmt: skip


@torch.no_grad()
def generate_samples(model, n: int, length: int, prompt_len: int = 4, seed: int = 0,
                     temperature: float = 0.0) -> list[torch.Tensor]:  # fmt: skip
    """``n`` sequences: a random prompt continued by the target (greedy, or sampled at ``temperature``)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (1, prompt_len), generator=g)
        while ids.shape[1] < length:
            logits = model(ids).logits[0, -1]
            if temperature > 0:
                nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt[None]], dim=1)
        out.append(ids[0])
    return out


@torch.no_grad()
def make_batch(model, samples: Sequence[torch.Tensor], aux_layer_ids: Sequence[int], top_k: int,
               rows: Sequence[Sequence[int]] | None = None, width: int | None = None,
               prompt_len: int = 4) -> dict[str, torch.Tensor]:  # fmt: skip
    """Pack ``samples`` into rows (``rows``: sample indices per row; default one sample per row) of ``width``.

    ``loss_mask`` is 1 after the first ``prompt_len`` tokens of each sample (the "assistant" part).
    """
    rows = [[i] for i in range(len(samples))] if rows is None else rows
    width = width or max(sum(len(samples[i]) for i in r) for r in rows)
    h = model.config.hidden_size
    a = len(aux_layer_ids)
    b = len(rows)
    batch = {
        "input_ids": torch.zeros(b, width, dtype=torch.long),
        "loss_mask": torch.zeros(b, width),
        "position_ids": torch.zeros(b, width, dtype=torch.long),
        "doc_ids": torch.full((b, width), -1, dtype=torch.long),
        "hidden_last": torch.zeros(b, width, h),
        "hidden_aux": torch.zeros(b, width, a * h),
        "topk_ids": torch.zeros(b, width, top_k, dtype=torch.long),
        "topk_logprobs": torch.zeros(b, width, top_k),
    }
    for r, members in enumerate(rows):
        pos = 0
        for doc, i in enumerate(members):
            ids = samples[i]
            n = len(ids)
            out = model(ids[None], output_hidden_states=True)
            hs = out.hidden_states
            logp = torch.log_softmax(out.logits[0].float(), dim=-1).topk(top_k, dim=-1)
            sl = slice(pos, pos + n)
            batch["input_ids"][r, sl] = ids
            batch["loss_mask"][r, sl] = (torch.arange(n) >= prompt_len).float()
            batch["position_ids"][r, sl] = torch.arange(n)
            batch["doc_ids"][r, sl] = doc
            batch["hidden_last"][r, sl] = hs[-1][0]
            batch["hidden_aux"][r, sl] = torch.cat([hs[j][0] for j in aux_layer_ids], dim=-1)
            batch["topk_ids"][r, sl] = logp.indices
            batch["topk_logprobs"][r, sl] = logp.values
            pos += n
    return batch


def packed_doc_ids(width: int = 40, device: str | torch.device = "cpu") -> torch.Tensor:
    """``[2, width]`` document ids: a row of three documents and padding, and a row holding one document."""
    doc = torch.full((2, width), -1, device=device)
    cut = [0, width * 13 // 40, width * 31 // 40, width * 38 // 40]
    for d in range(3):
        doc[0, cut[d]:cut[d + 1]] = d
    doc[1] = 0
    return doc


def ttt_attention_inputs(doc: torch.Tensor, steps: int, seed: int = 0, grad: bool = True, heads: int = 4,
                         kv_heads: int = 2, head_dim: int = 8) -> tuple[torch.Tensor, list[torch.Tensor], list]:  # fmt: skip
    """Random queries and the key blocks of TTT step ``steps - 1`` (lazy step-0 mask + diagonals), on ``doc``'s
    device: ``(q, [k0, v0, k1, v1, ...], blocks)``."""
    from pipeline.draft.layers import DocCausal, KVBlock

    g = torch.Generator().manual_seed(seed)
    b, t = doc.shape

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(doc.device).requires_grad_(grad)

    q = rand(b, heads, t, head_dim)
    kv = [(rand(b, kv_heads, t, head_dim), rand(b, kv_heads, t, head_dim)) for _ in range(steps)]
    own = doc >= 0
    blocks = [KVBlock(*kv[0], DocCausal(doc))] + [KVBlock(k, v, own, diagonal=True) for k, v in kv[1:]]
    return q, [x for pair in kv for x in pair], blocks

"""Draft heads for a tiny random target (tests, smoke runs): random ones, and ones fitted briefly to the target's
own greedy continuations so that real decoding accepts many drafts."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from synthetic_target import make_batch, target_weights

from pipeline.draft.eagle1 import Eagle1Config, Eagle1Draft, Eagle1Objective
from pipeline.draft.eagle1 import training_loss as eagle1_loss
from pipeline.draft.eagle3 import Eagle3Config, Eagle3Draft, Eagle3Objective
from pipeline.draft.eagle3 import training_loss as eagle3_loss


def tiny_draft(target, variant: str, aux_layer_ids: Sequence[int] = (2, 4, 5), draft_vocab_size: int | None = None,
               seed: int = 0) -> Eagle1Draft | Eagle3Draft:  # fmt: skip
    """A seeded random head for ``target`` (an HF Llama) with the target's embedding (and EAGLE-1 lm_head)."""
    cfg = target.config.to_dict()
    torch.manual_seed(seed)
    if variant == "eagle1":
        model: Eagle1Draft | Eagle3Draft = Eagle1Draft(Eagle1Config.from_target(cfg))
    else:
        vocab = draft_vocab_size or target.config.vocab_size
        model = Eagle3Draft(Eagle3Config.from_target(cfg, list(aux_layer_ids), draft_vocab_size=vocab))
    model.load_target_weights(target_weights(target))
    return model.float().eval()


@torch.no_grad()
def greedy_continuations(target, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``[B, P + new_tokens]``: each prompt row continued greedily by the target (HF generate, batched)."""
    return target.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip


def fit_draft(model: Eagle1Draft | Eagle3Draft, target, sequences: torch.Tensor, steps: int = 150, lr: float = 1e-2,
              ttt_steps: int = 2) -> dict[str, float]:  # fmt: skip
    """Train ``model`` with its own objective on the target's features of ``sequences`` (one batch, AdamW)."""
    aux = getattr(model.config, "aux_layer_ids", None) or [0]  # make_batch always builds hidden_aux
    batch = make_batch(target, list(sequences), aux, top_k=8, prompt_len=1)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    model.train()
    metrics: dict[str, float] = {}
    for _ in range(steps):
        if isinstance(model, Eagle1Draft):
            loss, metrics = eagle1_loss(model, batch, Eagle1Objective(noise="none"))
        else:
            loss, metrics = eagle3_loss(model, batch, Eagle3Objective(ttt_steps=ttt_steps))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return metrics


def decoding_target(vocab_size: int = 500):
    """The tiny target the decoding tests share. init 0.2: peaked but not yet looping continuations, so every token
    depends on the whole context (a wrong cache entry shows up as a different token)."""
    from synthetic_target import tiny_target, tiny_target_config

    return tiny_target(tiny_target_config(vocab_size=vocab_size, hidden_size=64, num_layers=8), seed=0, init_std=0.2)


def fit_prompts(target, n: int = 12, length: int = 4, new_tokens: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompts, their greedy continuations) that fitted heads learn from, on one thread (a shared CPU)."""
    torch.set_num_threads(1)
    prompts = torch.randint(0, target.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(0))
    return prompts, greedy_continuations(target, prompts, new_tokens)

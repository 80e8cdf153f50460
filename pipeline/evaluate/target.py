"""The HF target: loading, one forward with an explicit KV cache, cache compaction, stop tokens, and the plain
(non-speculative) decoding loop that serves as the baseline and the losslessness reference."""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# End-of-turn markers of common chat templates; used only when the tokenizer really has them as tokens.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_turn|>", "<end_of_turn>", "<|end|>", "<|eom_id|>")


class TargetError(ValueError):
    """The target model cannot be found or does not fit the draft."""


def load_target(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer) of an HF model directory. ``sdpa`` attention (it takes our 4D tree masks),
    or ``eager`` where transformers refuses sdpa for the architecture (gpt-oss's attention sinks; eager takes the
    same 4D masks)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    except ValueError as e:  # transformers refuses sdpa for this architecture (its message says so)
        if "sdpa" not in str(e).lower() and "scaled_dot_product" not in str(e).lower():
            raise
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model.to(device).eval(), tokenizer


SKINNY_MAX_ROWS = 32


def skinny_linears(model, max_rows: int = SKINNY_MAX_ROWS) -> int:
    """Run the model's ``nn.Linear`` products over at most ``max_rows`` rows as ``W @ xᵀ`` instead of ``x @ Wᵀ``.

    Verifying a few drafted tokens is a product over a few rows that reads every weight once, like a 1-token step.
    Which kernel does that best depends on the CPU and its BLAS: on one 2-core x86 machine ``x @ Wᵀ`` over 2-8
    rows cost 1.6-2x the 1-row product and ``W @ xᵀ`` 1.15-1.65x, on another the reverse (bench/verify_cost.py),
    so ``pipeline eval --linears auto`` measures both (:func:`pipeline.evaluate.budget.pick_linears`). Longer
    inputs (prompts) keep ``F.linear``. Plain greedy decoding and the baselines run the same patched model, so
    comparisons stay like for like. Returns the number of layers patched (:func:`stock_linears` undoes it)."""
    n = 0
    for mod in model.modules():
        if type(mod) is torch.nn.Linear:
            mod.forward = _SkinnyForward(mod, max_rows)
            n += 1
    return n


def stock_linears(model) -> int:
    """Undo :func:`skinny_linears`: every ``nn.Linear`` back to ``F.linear``. Returns the number restored."""
    n = 0
    for mod in model.modules():
        if isinstance(mod.__dict__.get("forward"), _SkinnyForward):
            del mod.forward
            n += 1
    return n


def set_linears(kind: str, *models) -> None:
    """``skinny`` (:func:`skinny_linears`) or ``stock`` (:func:`stock_linears`) linears on every model given."""
    setter = {"skinny": skinny_linears, "stock": stock_linears}[kind]
    for model in models:
        setter(model)


class _SkinnyForward:
    def __init__(self, mod: torch.nn.Linear, max_rows: int):
        self.mod, self.max_rows = mod, max_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.mod.weight, self.mod.bias
        rows = x.numel() // x.shape[-1]
        if rows > self.max_rows or x.device.type != "cpu":
            return torch.nn.functional.linear(x, w, b)
        y = (w @ x.reshape(rows, -1).T).T
        if b is not None:
            y = y + b
        return y.reshape(*x.shape[:-1], w.shape[0])


def stop_token_ids(tokenizer: Any = None, generation_config: Any = None, config: Any = None) -> set[int]:
    """eos ids of the generation config / model config / tokenizer, plus end-of-turn tokens the tokenizer has."""
    ids: set[int] = set()
    for source in (generation_config, config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return ids


def new_cache(model):
    """A ``DynamicCache`` for ``model``. Its sliding-window layers record their past (keep every new position until
    :func:`compact_cache` trims them), so that a verification's rejected drafts can be dropped after the window
    has filled; HF still gives each forward only the keys inside the window."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False) and hasattr(layer, "activate_past_recording"):
            layer.activate_past_recording()
    return cache


_CACHE_KW: dict[type, str] = {}


def _cache_kw(model) -> str:
    # transformers 5.24 renamed `past_key_values` to `cache` (the old name is deprecated, not gone); ask the
    # signature so both 5.x spellings work without a deprecation warning per forward.
    cls = type(model)
    if cls not in _CACHE_KW:
        params = inspect.signature(cls.forward).parameters
        _CACHE_KW[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KW[cls]


def target_forward(model, ids: torch.Tensor, positions: torch.Tensor, cache, mask: torch.Tensor | None = None,
                   hidden: bool = False, last_only: bool = False) -> tuple[torch.Tensor, tuple | None]:  # fmt: skip
    """Run ``ids [1, N]`` at ``positions [1, N]`` after the cached prefix; the cache grows by N.

    Returns fp32 logits ``[N, V]`` (``[1, V]`` with ``last_only``) and, with ``hidden``, HF's
    ``hidden_states`` tuple (index 0: embeddings, index i: input of layer i, last: post-norm). ``mask`` is a
    4D additive mask over (cached + new) keys; ``None`` lets HF build the causal one.
    """
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                output_hidden_states=hidden, logits_to_keep=1 if last_only else 0,
                **{_cache_kw(model): cache})  # fmt: skip
    return out.logits[0].float(), (out.hidden_states if hidden else None)


def cache_length(cache) -> int:
    return int(cache.get_seq_length())


def compact_cache(cache, past: int, rows: list[int]) -> None:
    """Keep the first ``past`` positions and then the new positions ``past + rows`` (in that order).

    Operates on the layers' key/value tensors: the public ``crop`` only drops a suffix (and changed its
    argument's meaning within 5.x), a tree needs an arbitrary subset. Full-attention dynamic layers hold every
    position; sliding-window layers (recording their past, :func:`new_cache`) hold the last positions before
    ``past`` and every new one: both are compacted the same way, and a sliding layer is then trimmed back to the
    ``sliding_window - 1`` positions its next forward can see.
    """
    contiguous = rows == list(range(len(rows)))
    for layer in cache.layers:
        sliding = getattr(layer, "is_sliding", False)
        if not hasattr(layer, "keys") or (sliding and not getattr(layer, "record_past", False)):
            raise TargetError(f"cannot compact a {type(layer).__name__} cache layer (linear attention, or a "
                              "sliding window not recording its past: build the cache with new_cache)")  # fmt: skip
        if layer.keys is None or layer.keys.numel() == 0:
            continue
        total = int(layer.cumulative_length) if sliding else int(layer.keys.shape[2])
        first = total - int(layer.keys.shape[2])  # absolute position of the tensor's first row
        start = past - first
        if start < 0:
            raise TargetError(f"{type(layer).__name__}: positions before {past} were already dropped")
        if not (contiguous and total == past + len(rows)):
            if not contiguous:
                idx = torch.tensor(rows, device=layer.keys.device) + start
                # gather first (a copy), then write into place: no copy of the prefix
                layer.keys[:, :, start:start + len(rows)] = layer.keys.index_select(2, idx)
                layer.values[:, :, start:start + len(rows)] = layer.values.index_select(2, idx)
            layer.keys = layer.keys[:, :, :start + len(rows)]
            layer.values = layer.values[:, :, :start + len(rows)]
        if sliding:
            layer.cumulative_length = past + len(rows)
            keep = layer.sliding_window - 1
            layer.keys, layer.values = layer.keys[:, :, -keep:], layer.values[:, :, -keep:]


def sliding_window(model) -> int | None:
    """The attention window of ``model``'s sliding layers (None: every layer attends to everything)."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> int:
    """Greedy (``temperature == 0``) or sampled token of one row of logits."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def finish(tokens: list[int], max_new_tokens: int, stop_ids: set[int]) -> tuple[list[int], bool]:
    """Truncate after the first stop token or at ``max_new_tokens``; returns (tokens, done)."""
    for i, t in enumerate(tokens[:max_new_tokens]):
        if t in stop_ids:
            return tokens[: i + 1], True
    return tokens[:max_new_tokens], len(tokens) >= max_new_tokens


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Generation:
    """What one decoding run produced and what it cost.

    ``target_forwards`` counts decoding forwards only (the prefill is ``prefill_forwards``). ``accept_lengths``:
    tokens kept per decoding forward. ``attempted[d]`` / ``accepted[d]``: verifications that tried / accepted a
    draft at depth ``d + 1`` (tried = the path reached depth ``d`` and the node there had drafted children).
    """

    tokens: list[int]
    wall_s: float
    target_forwards: int
    prefill_forwards: int = 1
    accept_lengths: list[int] = field(default_factory=list)
    attempted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    prefill_s: float | None = None  # seconds of the prefill forward and its token, where the decoder timed it apart

    @property
    def decode_tokens(self) -> int:
        """Tokens emitted by decoding forwards: all but the first, which the prefill forward produced."""
        return max(len(self.tokens) - 1, 0)

    @property
    def tau(self) -> float | None:
        return self.decode_tokens / self.target_forwards if self.target_forwards else None

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.wall_s if self.wall_s > 0 else 0.0


@torch.no_grad()
def target_generate(model, prompt: torch.Tensor, max_new_tokens: int, stop_ids: set[int], temperature: float = 0.0,
                    generator: torch.Generator | None = None) -> Generation:  # fmt: skip
    """Plain decoding with a KV cache: one target forward per token (greedy at ``temperature == 0``)."""
    device = next(model.parameters()).device
    prompt = prompt.reshape(1, -1).to(device)
    sync(device)
    start = time.perf_counter()
    cache = new_cache(model)
    n = prompt.shape[1]
    logits, _ = target_forward(model, prompt, torch.arange(n, device=device)[None], cache, last_only=True)
    tokens, done = finish([pick(logits[-1], temperature, generator)], max_new_tokens, stop_ids)
    sync(device)
    prefill_s = time.perf_counter() - start
    forwards = 0
    while not done:
        pos = torch.tensor([[n + len(tokens) - 1]], device=device)
        logits, _ = target_forward(model, torch.tensor([[tokens[-1]]], device=device), pos, cache)
        forwards += 1
        tokens, done = finish(tokens + [pick(logits[-1], temperature, generator)], max_new_tokens, stop_ids)
    sync(device)
    return Generation(tokens, time.perf_counter() - start, forwards, accept_lengths=[1] * forwards, prefill_s=prefill_s)


@torch.no_grad()
def hf_generate(model, prompt: torch.Tensor, max_new_tokens: int, stop_ids: set[int], temperature: float = 0.0,
                prompt_lookup: int | None = None, seed: int = 0) -> Generation:  # fmt: skip
    """transformers' own ``generate`` on the same prompt (greedy, or sampling at ``temperature`` with no top-k/top-p
    cut), with ``prompt_lookup_num_tokens`` when ``prompt_lookup`` is given: the baselines a user already has.
    Target forwards are counted with a hook (the first is the prefill)."""
    device = next(model.parameters()).device
    prompt = prompt.reshape(1, -1).to(device)
    calls = [0]
    hook = model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {
        "do_sample": False, "temperature": None, "top_k": None, "top_p": None}  # fmt: skip
    if temperature > 0:
        torch.manual_seed(seed)
    try:
        sync(device)
        start = time.perf_counter()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                             eos_token_id=sorted(stop_ids), pad_token_id=sorted(stop_ids)[0],
                             prompt_lookup_num_tokens=prompt_lookup, **sampling)  # fmt: skip
        sync(device)
        wall = time.perf_counter() - start
    finally:
        hook.remove()
    tokens, _ = finish(out[0, prompt.shape[1]:].tolist(), max_new_tokens, stop_ids)
    return Generation(tokens, wall, max(calls[0] - 1, 0))


def read_config(path: str | Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())

"""vLLM log-probabilities -> the store's ``topk_logprobs`` / ``topk_ids`` rows.

Structure (matched against vLLM 0.18.1 and 0.33.0: ``vllm/logprobs.py``, ``vllm/v1/engine/logprobs.py``,
``vllm/v1/sample/sampler.py::gather_logprobs``, ``GPUModelRunner._get_prompt_logprobs_dict``):

* ``RequestOutput.prompt_logprobs`` has one entry per prompt token. Entry 0 is ``None`` (nothing predicts the
  first token). Entry *t* >= 1 holds the distribution of prompt token *t* given tokens ``< t``, i.e. computed from
  the logits at position *t - 1*.
* Each entry is ``{token_id: Logprob(logprob, rank, decoded_token)}`` (or, with ``flat_logprobs=True``, one
  ``FlatLogprobs`` container whose per-position slices hold the same data). The engine builds it from the columns
  ``[actual token, top-1, ..., top-k]``: the actual (prompt or sampled) token comes first with its true rank, then
  the top-k with ranks 1..k. A dict keeps one entry per id, so it has k + 1 entries when the actual token is not in
  the top-k and k entries when it is (the top-k column overwrites it; its rank then is its top-k position).
* ``logprobs_mode`` defaults to ``raw_logprobs``: ``log_softmax`` in fp32 of the raw logits, the same values as
  ``log_softmax(logits.float()).topk(k)`` in the HF backend.

Alignment with the store: row *r* holds the distribution of token *r + 1* computed at position *r*, so for a
T-token sample

* rows 0 .. T-2 come from ``prompt_logprobs[1] .. prompt_logprobs[T-1]`` (row r = entry r + 1);
* row T-1 (the distribution after the whole sample) is not a prompt logprob at all: it is the first *sampled*
  position, obtained by generating exactly one token with ``SamplingParams(max_tokens=1, logprobs=k)``
  (``outputs[0].logprobs[0]``, actual token = the sampled one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class LogprobFormatError(ValueError):
    """vLLM logprobs that do not have the expected structure (wrong k, wrong length, missing entries)."""


def position_topk(entry: Any, actual_token: int, k: int, where: str = "position") -> tuple[list[float], list[int]]:
    """The top-k ``(logprobs, ids)`` of one position, in decreasing order, without the actual token's extra entry.

    ``entry`` is a dict ``{token_id: Logprob | {"logprob", "rank"} | float}`` (keys may be strings, as after a
    JSON round trip), as vLLM returns per position.
    """
    if not isinstance(entry, dict):
        raise LogprobFormatError(f"{where}: expected a dict of token id -> Logprob, got {type(entry).__name__}")
    items = [(int(tid), *_logprob_and_rank(v, where)) for tid, v in entry.items()]
    if len(items) == k + 1:
        # The actual token sits outside the top-k: drop exactly that id (never guess from tied values).
        kept = [it for it in items if it[0] != actual_token]
        if len(kept) != k:
            raise LogprobFormatError(f"{where}: {k + 1} entries but the actual token {actual_token} is not one of "
                                     "them")  # fmt: skip
        items = kept
    elif len(items) != k:
        raise LogprobFormatError(f"{where}: {len(items)} entries, expected {k} or {k + 1} (was the request made "
                                 f"with prompt_logprobs={k} / logprobs={k}?)")  # fmt: skip
    # The remaining entries carry their top-k position as rank (1..k); fall back to value order without ranks.
    items.sort(key=lambda it: (it[2] if it[2] is not None else float("inf"), -it[1]))
    return [it[1] for it in items], [it[0] for it in items]


def _logprob_and_rank(value: Any, where: str) -> tuple[float, int | None]:
    if isinstance(value, (int, float)):
        return float(value), None
    if isinstance(value, dict):
        return float(value["logprob"]), value.get("rank")
    if hasattr(value, "logprob"):
        return float(value.logprob), getattr(value, "rank", None)
    raise LogprobFormatError(f"{where}: cannot read a logprob from a {type(value).__name__}")


def _is_flat(container: Any) -> bool:
    return all(hasattr(container, a) for a in ("start_indices", "end_indices", "token_ids", "logprobs"))


def _flat_position(container: Any, pos: int, actual_token: int, k: int, where: str) -> tuple[list[float], list[int]]:
    # FlatLogprobs keeps the engine's columns in order: [actual token, top-1 .. top-k]. Reading the raw slice avoids
    # the dict collapse altogether.
    s, e = container.start_indices[pos], container.end_indices[pos]
    if e - s != k + 1:
        raise LogprobFormatError(f"{where}: {e - s} columns, expected {k + 1} (actual token + top-{k})")
    if int(container.token_ids[s]) != actual_token:
        raise LogprobFormatError(f"{where}: first column is token {container.token_ids[s]}, expected the actual "
                                 f"token {actual_token}")  # fmt: skip
    return [float(x) for x in container.logprobs[s + 1 : e]], [int(x) for x in container.token_ids[s + 1 : e]]


def _position(container: Any, pos: int, actual_token: int, k: int, where: str) -> tuple[list[float], list[int]]:
    if _is_flat(container):
        return _flat_position(container, pos, actual_token, k, where)
    return position_topk(container[pos], actual_token, k, where)


def store_topk(prompt_token_ids: Sequence[int], prompt_logprobs: Any, sampled_token_id: int, sample_logprobs: Any,
               k: int, where: str = "request") -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The store's ``(topk_logprobs [T, k] fp32, topk_ids [T, k] int32)`` for one T-token sample.

    ``prompt_logprobs`` is ``RequestOutput.prompt_logprobs`` (T entries, the first None); ``sample_logprobs`` is
    ``RequestOutput.outputs[0].logprobs`` of the one generated token and ``sampled_token_id`` that token.
    Row r < T-1 comes from prompt entry r + 1, row T-1 from the sampled position (see the module docstring).
    """
    n = len(prompt_token_ids)
    if n == 0:
        raise LogprobFormatError(f"{where}: empty prompt")
    if prompt_logprobs is None:
        raise LogprobFormatError(f"{where}: no prompt_logprobs (the request must set prompt_logprobs={k})")
    if len(prompt_logprobs) != n:
        raise LogprobFormatError(f"{where}: {len(prompt_logprobs)} prompt_logprobs entries for {n} prompt tokens")
    if not _is_flat(prompt_logprobs) and prompt_logprobs[0] is not None:
        raise LogprobFormatError(f"{where}: prompt_logprobs[0] should be None (nothing predicts the first token)")
    if sample_logprobs is None or len(sample_logprobs) < 1:
        raise LogprobFormatError(f"{where}: no logprobs for the generated token (the request must set logprobs={k})")
    values = torch.empty((n, k), dtype=torch.float32)
    ids = torch.empty((n, k), dtype=torch.int32)
    for row in range(n - 1):
        v, i = _position(prompt_logprobs, row + 1, int(prompt_token_ids[row + 1]), k, f"{where} prompt position {row + 1}")
        values[row] = torch.tensor(v, dtype=torch.float32)
        ids[row] = torch.tensor(i, dtype=torch.int32)
    v, i = _position(sample_logprobs, 0, int(sampled_token_id), k, f"{where} generated position 0")
    values[n - 1] = torch.tensor(v, dtype=torch.float32)
    ids[n - 1] = torch.tensor(i, dtype=torch.int32)
    return values, ids

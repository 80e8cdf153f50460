"""Hugging Face transformers backend: one forward per batch with ``output_hidden_states``.

What is taken from the forward (see storage_layout.md):
- ``hidden_last`` = ``hidden_states[-1]``: last decoder layer output after the final norm (input of lm_head);
- ``hidden_aux``  = ``hidden_states[i]`` for the aux ids: input of decoder layer i, before any norm;
- top-k of ``log_softmax(logits)`` in fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.compute import compute_dtype_name, pick_device
from pipeline.store import ScaledRows, TargetPieces
from pipeline.store.projection import project

# Bounds the fp32 [tokens, vocab] log-softmax buffer (128k vocab x 2048 tokens = 1 GiB).
LOGPROB_CHUNK_TOKENS = 2048


class HFBackend:
    """Runs an HF causal LM and returns, per sample, the tensors the store keeps."""

    name = "hf"
    quantizes_rows = True  # forward(hidden_dtype / aux_dtype = "float8_e4m3fn" / "int7" / "q19"): ScaledRows, on the device
    projects_aux = True  # forward(aux_projection=P) returns hidden_aux as P·x [L, k], projected on the device

    def __init__(self, model_dir: Path, device: str = "auto", compute_dtype: str = "auto"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.device = pick_device(device)
        compute_dtype = compute_dtype_name(compute_dtype, self.device)
        self.compute_dtype_name = compute_dtype
        self.compute_dtype = getattr(torch, compute_dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.compute_dtype)
        self.model.to(self.device).eval()
        self.config = self.model.config.to_dict()
        self.num_layers = int(self.model.config.num_hidden_layers)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def target_pieces(self) -> TargetPieces:
        inner = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model
        weights = {
            "embed_tokens.weight": self.model.get_input_embeddings().weight,
            "norm.weight": inner.norm.weight,
            "lm_head.weight": self.model.get_output_embeddings().weight,
        }
        # Tied embeddings share storage; safetensors refuses shared tensors, so store independent copies.
        weights = {k: v.detach().to("cpu").clone() for k, v in weights.items()}
        return TargetPieces(config=self.config, weights=weights, tokenizer=self.tokenizer)

    @torch.inference_mode()
    def forward(self, batch: list[list[int]], aux_layers: list[int], top_k: int, want_last: bool, want_aux: bool,
                hidden_dtype: torch.dtype | str = torch.float32, names: list[str] | None = None,
                aux_projection: torch.Tensor | None = None,
                aux_dtype: torch.dtype | str | None = None) -> list[dict[str, torch.Tensor]]:  # fmt: skip
        """Right-padded batch forward; returns per sample {hidden_last [L,H], hidden_aux [L,A,H], topk_*} on the
        CPU, hidden states already in ``hidden_dtype`` (``aux_dtype`` for ``hidden_aux``, default the same), cast on
        the device: half the transfer for bf16; fp8, int7 and q19 (given by name) as :class:`~pipeline.store.ScaledRows`
        quantized per row on the device, a quarter of fp32. ``names``
        label the samples in errors (the vLLM backend's interface; a local forward has nothing to add).
        ``aux_projection`` (P [k, A*H] on the device, rows divided by the component scale in format 5):
        ``hidden_aux`` is ``P·x`` [L, k], projected in fp32 before the cast, so only k values per token cross to the host."""
        lengths = [len(x) for x in batch]
        width = max(lengths)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, x in enumerate(batch):
            ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         output_hidden_states=True, use_cache=False)  # fmt: skip
        hidden = out.hidden_states

        results = []
        for i, n in enumerate(lengths):
            sample: dict = {}
            if want_last:
                sample["hidden_last"] = _cast(hidden[-1][i, :n], hidden_dtype)
            if want_aux:
                fused = torch.stack([hidden[a][i, :n] for a in aux_layers], dim=1)
                sample["hidden_aux"] = self.encode_aux(fused, aux_projection, hidden_dtype if aux_dtype is None
                                                       else aux_dtype, to_host=False)  # fmt: skip
            sample["topk_logprobs"], sample["topk_ids"] = topk_logprobs(out.logits[i, :n], top_k)
            results.append({k: v.to("cpu", non_blocking=True) for k, v in sample.items()})
        return results


    def encode_aux(self, fused: torch.Tensor, projection: torch.Tensor | None, dtype: torch.dtype | str,
                   to_host: bool = True):  # fmt: skip
        """Fused aux rows ``[L, A, H]`` (any device) -> what the store takes: ``P·x`` when projected, cast or
        quantized on the device. ``forward`` calls it, and extraction for the batches its calibration ran."""
        x = fused.to(self.device)
        out = _cast(x if projection is None else project(x, projection), dtype)
        return out.to("cpu") if to_host else out


def _cast(t: torch.Tensor, dtype: torch.dtype | str):
    return ScaledRows.quantize(t, dtype) if isinstance(dtype, str) else t.to(dtype)


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``log_softmax(logits).topk(k)`` in token chunks; returns (values fp32, ids int32)."""
    values, ids = [], []
    for start in range(0, logits.shape[0], LOGPROB_CHUNK_TOKENS):
        lp = torch.log_softmax(logits[start:start + LOGPROB_CHUNK_TOKENS].float(), dim=-1)
        v, j = lp.topk(k, dim=-1)
        values.append(v)
        ids.append(j.to(torch.int32))
    return torch.cat(values), torch.cat(ids)

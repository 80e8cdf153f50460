"""Small Llama building blocks shared by the EAGLE-1 and EAGLE-3 draft heads.

Written for clarity and exact control over attention (nanoGPT / gpt-fast style), not speed:

* attention takes explicit position ids and an explicit list of key/value *blocks*, each with its own boolean
  mask, so one primitive serves a KV cache (inference), block-diagonal causal packing (training) and the TTT
  "diagonal" keys of EAGLE-3 (a key that only the query at the same row may see);
* training masks stay lazy (:class:`DocCausal`: the document ids, not a ``[T, T]`` tensor), and :func:`attend`
  then runs torch's flash kernel once per document on the CPU (TTT diagonals merged through its log-sum-exp), or
  works through query chunks, each recomputed in backward, so memory grows linearly with T (see
  :func:`attention_impl`);
* rotary embeddings are built from the *target's* HF config dict through transformers' own rope init functions,
  so every rope type/scaling the target uses (default, linear, dynamic, yarn, longrope, llama3, ...) is matched;
* module/parameter names are the ones the serving loaders expect (``self_attn.q_proj`` ..., ``mlp.gate_proj`` ...,
  ``input_layernorm``, ``post_attention_layernorm``, ``hidden_norm``).

Masks are boolean, ``True`` = "may attend". Compute is fp32 on CPU (bf16 matmuls are ~500x slower there).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.compute import rms_normalize

# Keys a LlamaConfig must not receive when we only need its rope fields (they name other model classes or
# carry state LlamaConfig would try to validate).
_NON_ROPE_KEYS = {"architectures", "model_type", "auto_map", "quantization_config", "transformers_version",
                  "_name_or_path", "_commit_hash", "text_config", "vision_config", "pipeline"}  # fmt: skip


class RMSNorm(nn.Module):
    """Llama RMSNorm: ``weight * x / sqrt(mean(x^2) + eps)``, normalised in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * rms_normalize(x, self.eps)


# Per-layer-type rope dicts (Gemma-3: ``{"sliding_attention": {...}, "full_attention": {...}}``) are keyed by these.
_LAYER_TYPE_KEYS = {"full_attention", "sliding_attention", "chunked_attention", "linear_attention"}
# Fields that describe the target's own attention layout, not the draft's one full-attention Llama layer.
_TARGET_LAYOUT_KEYS = {"layer_types", "rope_local_base_freq", "sliding_window", "use_sliding_window",
                       "partial_rotary_factor"}  # fmt: skip


class RopeConfigError(ValueError):
    """The target's rope fields cannot be mirrored by the draft's Llama layer."""


def draft_rope_source(target_config: dict) -> dict:
    """The target's config with its rope fields as the draft's one full-attention Llama layer reads them.

    * Per-layer-type rope (Gemma-3): the ``full_attention`` entry (the draft attends to every earlier position,
      like the target's global layers; a Llama layer has one rope, which vLLM/SGLang then serve).
    * ``partial_rotary_factor`` (Phi-3/4, top level or inside the rope dict) moves into ``rope_parameters``, where
      transformers' rope init functions and vLLM's ``get_rope`` both read it (vLLM rotates
      ``int(head_dim * factor)`` dims, as :func:`apply_rope` does).
    """
    cfg = copy.deepcopy({k: v for k, v in target_config.items() if k not in _NON_ROPE_KEYS})
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params and set(params) <= _LAYER_TYPE_KEYS:
        if not isinstance(params.get("full_attention"), dict):
            raise RopeConfigError(f"rope_parameters has per-layer-type entries {sorted(params)} but no "
                                  "'full_attention' one: the draft's one layer needs the full-attention rope; add it "
                                  "to the target's config.json")  # fmt: skip
        cfg["rope_parameters"] = params["full_attention"]
    factor = cfg.get("partial_rotary_factor")
    for k in _TARGET_LAYOUT_KEYS:
        cfg.pop(k, None)
    if isinstance(cfg.get("rope_parameters"), dict):
        factor = cfg["rope_parameters"].get("partial_rotary_factor", factor)
    if factor is not None and float(factor) != 1.0:
        if not 0.0 < float(factor) < 1.0:
            raise RopeConfigError(f"partial_rotary_factor {factor} is not in (0, 1]")
        if cfg.get("rope_parameters") is None:
            from transformers import LlamaConfig

            cfg["rope_parameters"] = dict(LlamaConfig(**cfg).rope_parameters)  # legacy rope_theta/rope_scaling
        cfg["rope_parameters"]["partial_rotary_factor"] = float(factor)
    elif isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"].pop("partial_rotary_factor", None)  # 1.0: the Llama default, written nowhere
    return cfg


def rope_llama_config(target_config: dict, *, head_dim: int | None = None):
    """A ``LlamaConfig`` carrying the draft's rope fields (:func:`draft_rope_source`, normalised to
    transformers' ``rope_parameters``).

    ``head_dim`` overrides the per-head size the frequencies are computed for (the draft's, which equals the
    target's unless overridden).
    """
    from transformers import LlamaConfig

    cfg = draft_rope_source(target_config)
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    return LlamaConfig(**cfg)


def rope_parameters(target_config: dict) -> dict:
    """The draft's rope parameters as transformers >= 5 normalises them (``rope_type``, ``rope_theta``, ...)."""
    params = rope_llama_config(target_config).rope_parameters
    return dict(params)


def rotary_dim(target_config: dict, head_dim: int) -> int:
    """How many of a head's ``head_dim`` dims the rope rotates: ``int(head_dim * partial_rotary_factor)``, as vLLM's
    ``get_rope`` and transformers' rope init functions compute it."""
    factor = float(rope_parameters(target_config).get("partial_rotary_factor", 1.0))
    dim = int(head_dim * factor)
    if dim % 2 or dim <= 0:
        raise RopeConfigError(f"partial_rotary_factor {factor} x head_dim {head_dim} = {dim} rotary dims: needs an "
                              "even, positive number")  # fmt: skip
    return dim


def rope_exact_length(target_config: dict) -> tuple[str, int] | None:
    """``(rope_type, n)`` for rope types whose frequencies transformers changes at run time with the length of the
    forward (``dynamic`` recomputes them, ``longrope`` switches to its long factors, beyond ``n`` tokens): the draft's
    :class:`RotaryEmbedding` matches the target for sequences of at most ``n`` tokens only. None for static types.
    (Beyond ``n`` the target's frequencies depend on how long each whole forward was, e.g. on the padded batch at
    extraction, which a packed-row draft cannot reproduce.)"""
    params = rope_parameters(target_config)
    rope_type = params.get("rope_type", "default")
    if rope_type == "longrope":
        n = params.get("original_max_position_embeddings") or target_config.get("original_max_position_embeddings")
        return rope_type, int(n or target_config.get("max_position_embeddings", 2048))
    if "dynamic" in rope_type:
        return rope_type, int(target_config.get("max_position_embeddings", 2048))
    return None


class RotaryEmbedding(nn.Module):
    """RoPE cos/sin for explicit position ids, frequencies from transformers' ``ROPE_INIT_FUNCTIONS``.

    Dynamic variants (``dynamic``, ``longrope``) use the frequencies transformers computes at init (those for
    sequences up to ``max_position_embeddings`` / ``original_max_position_embeddings``); the runtime switch
    transformers applies beyond that length is not replicated, and training refuses stores holding longer samples
    for such targets (:func:`rope_exact_length`).
    """

    def __init__(self, target_config: dict, head_dim: int):
        super().__init__()
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        config = rope_llama_config(target_config, head_dim=head_dim)
        params = config.rope_parameters
        self.rope_type = params.get("rope_type", "default")
        if self.rope_type == "default":
            base = float(params["rope_theta"])
            dim = rotary_dim(target_config, head_dim)
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            scaling = 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[self.rope_type](config, None)
        self.attention_scaling = float(scaling)
        self.register_buffer("inv_freq", inv_freq.to(torch.float32), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape ``[B, N, head_dim]`` for ``position_ids [B, N]``."""
        freqs = position_ids.to(torch.float32)[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, heads, N, d]`` by ``cos/sin [B, N, r]`` (HF's half-split convention). With partial rotary
    (``r < d``) only the first ``r`` dims rotate and the rest pass through (transformers' Phi-3, vLLM's
    ``get_rope``)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    r = cos.shape[-1]
    if r < x.shape[-1]:
        rot, rest = x[..., :r], x[..., r:]
        return torch.cat([rot * cos + _rotate_half(rot) * sin, rest], dim=-1)
    return x * cos + _rotate_half(x) * sin


@dataclass
class DocCausal:
    """The block-diagonal causal mask of packed rows, kept as document ids: :func:`doc_causal_mask` without its
    ``[B, T, T]`` tensor. Query row ``t`` may see key row ``r`` iff both lie in document ``doc_ids[t] >= 0`` and
    ``r <= t``."""

    doc_ids: torch.Tensor  # [B, T]

    @property
    def shape(self) -> tuple[int, int, int]:
        b, t = self.doc_ids.shape
        return b, t, t

    def dense(self) -> torch.Tensor:
        if not hasattr(self, "_dense"):  # once per mask, not once per attention call (TTT steps, recomputes)
            self._dense = doc_causal_mask(self.doc_ids)
        return self._dense

    def rows(self, lo: int, hi: int, key_lo: int, key_hi: int) -> torch.Tensor:
        """``dense()[:, lo:hi, key_lo:key_hi]`` without building the rest."""
        dq, dk = self.doc_ids[:, lo:hi, None], self.doc_ids[:, None, key_lo:key_hi]
        qi = torch.arange(lo, hi, device=dq.device)[:, None]
        ki = torch.arange(key_lo, key_hi, device=dq.device)[None, :]
        return (dq == dk) & (dq >= 0) & (ki <= qi)

    def segments(self) -> list[list[tuple[int, int]]] | None:
        """Per batch row, the ``[lo, hi)`` runs of one document (padding left out); None when some document's rows
        are not one run (then the mask is not a set of causal blocks on the diagonal)."""
        if not hasattr(self, "_segments"):  # once per mask (TTT steps, recomputes)
            self._segments = _runs(self.doc_ids)
        return self._segments

    def first_key(self, lo: int, hi: int) -> int:
        """The first key row any query in ``[lo, hi)`` may see: the earliest first row of their documents."""
        doc = self.doc_ids
        b, t = doc.shape
        if not hasattr(self, "_first"):  # per row: the first row of its document (O(T), once per mask)
            ids = doc.clamp_min(0)
            rows = torch.arange(t, device=doc.device).expand(b, t)
            first = torch.full((b, int(ids.max()) + 1 if t else 1), t, dtype=torch.long, device=doc.device)
            first = first.scatter_reduce(1, ids, rows, "amin")
            self._first = torch.where(doc >= 0, first.gather(1, ids), t)
        return min(int(self._first[:, lo:hi].min()), lo) if hi > lo else lo


def _runs(doc_ids: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    out = []
    for row in doc_ids.tolist():
        runs: list[tuple[int, int]] = []
        seen: set[int] = set()
        lo = 0
        for t in range(1, len(row) + 1):
            if t == len(row) or row[t] != row[lo]:
                if row[lo] >= 0:
                    if row[lo] in seen:
                        return None
                    seen.add(row[lo])
                    runs.append((lo, t))
                lo = t
        out.append(runs)
    return out


@dataclass
class KVBlock:
    """A set of keys/values and which queries may see them.

    ``k``/``v``: ``[B, n_kv, S, d]``. ``mask``: bool, ``[B, N, S]`` or ``[N, S]`` (broadcast over the batch), or a
    lazy :class:`DocCausal` (``S == N``). ``diagonal=True``: ``S == N`` and key ``s`` belongs to query ``s`` only
    (EAGLE-3's TTT keys); ``mask`` is then ``[B, N]`` (or ``[N]``) and says whether that one key exists.
    """

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | DocCausal
    diagonal: bool = False


IMPLS = ("auto", "dense", "chunked", "flex", "flash")
# Bytes of fp32 scores one attention chunk may hold (scores, probabilities and their masked copy); queries
# are cut into chunks that fit, each recomputed in backward. Rows whose scores fit at once stay one chunk.
CHUNK_SCORE_BYTES = int(os.environ.get("PIPELINE_ATTENTION_CHUNK_BYTES", 256 << 20))
# On the CPU one dense chunk is faster (1.3-1.5x at T = 1,024-2,048, bench/attention.py): kept up to this size.
CPU_DENSE_SCORE_BYTES = int(os.environ.get("PIPELINE_ATTENTION_CPU_DENSE_BYTES", 4 << 30))


def attention_impl(q: torch.Tensor, blocks: Sequence[KVBlock]) -> str:
    """The path :func:`attend` takes (``PIPELINE_ATTENTION`` = auto|dense|chunked|flex overrides ``auto``).

    Cache masks (inference) always go ``dense``. Training blocks (a lazy :class:`DocCausal` block, then TTT
    diagonals) under ``auto``: ``flash`` on the CPU when every document is one run of rows (packed rows are);
    otherwise ``chunked`` — query chunks whose scores fit ``CHUNK_SCORE_BYTES``, one chunk when all fit — except
    on the CPU while all scores fit ``CPU_DENSE_SCORE_BYTES``, where ``dense`` is faster.
    ``flex`` (opt-in, CUDA): one FlexAttention call over step-0 keys and TTT diagonals with a block mask.
    """
    impl = os.environ.get("PIPELINE_ATTENTION", "auto")
    if impl not in IMPLS:
        raise ValueError(f"PIPELINE_ATTENTION={impl!r}: choose one of {', '.join(IMPLS)}")
    lazy = isinstance(blocks[0].mask, DocCausal) and not blocks[0].diagonal
    structured = lazy and all(b.diagonal for b in blocks[1:])
    if not structured:
        return "dense"
    if impl == "flash" and (q.device.type != "cpu" or blocks[0].mask.segments() is None):
        raise ValueError("PIPELINE_ATTENTION=flash: needs the CPU and documents that are single runs of rows")
    if impl == "auto":
        if q.device.type == "cpu" and blocks[0].mask.segments() is not None:
            return "flash"
        n = q.shape[2]
        cpu_dense = q.device.type == "cpu" and n * _score_bytes_per_row(q, n + len(blocks) - 1) <= CPU_DENSE_SCORE_BYTES
        return "dense" if cpu_dense else "chunked"
    return impl


def attend(q: torch.Tensor, blocks: Sequence[KVBlock]) -> torch.Tensor:
    """Grouped-query softmax attention of ``q [B, n_heads, N, d]`` over the union of ``blocks``.

    One softmax spans all blocks. A query that may see no key outputs zeros instead of NaN (such queries are
    padding; NaN would leak into a masked loss through ``0 * NaN``). Training blocks (a lazy :class:`DocCausal`
    block, then TTT diagonals) take the path :func:`attention_impl` names; every path computes the same function.
    """
    impl = attention_impl(q, blocks)
    if impl == "chunked":
        return _attend_chunked(q, blocks)
    if impl == "flex":
        return _attend_flex(q, blocks)
    if impl == "flash":
        return _attend_flash(q, blocks)
    return _attend_dense(q, [KVBlock(b.k, b.v, b.mask.dense(), b.diagonal) if isinstance(b.mask, DocCausal)
                             else b for b in blocks])  # fmt: skip


def _attend_dense(q: torch.Tensor, blocks: Sequence[KVBlock]) -> torch.Tensor:
    b, nh, n, d = q.shape
    nkv = blocks[0].k.shape[1]
    qg = q.reshape(b, nkv, nh // nkv, n, d).float() * d**-0.5
    low = torch.finfo(torch.float32).min
    scores = []
    visible = torch.zeros(b, 1, 1, n, 1, dtype=torch.bool, device=q.device)
    for blk in blocks:
        k = blk.k.float()
        if blk.diagonal:
            s = (qg * k[:, :, None]).sum(-1, keepdim=True)  # [B, nkv, g, N, 1]
            m = blk.mask.reshape(-1, 1, 1, n, 1)
        else:
            s = torch.einsum("bhgnd,bhsd->bhgns", qg, k)
            m = blk.mask.reshape(-1, 1, 1, n, blk.mask.shape[-1])
        scores.append(s.masked_fill(~m, low))
        visible = visible | m.any(-1, keepdim=True)
    # Masked keys underflow to exactly 0 next to any visible key; a query with none would get a uniform
    # average over masked keys, so zero it instead.
    probs = torch.softmax(torch.cat(scores, dim=-1), dim=-1) * visible
    out = torch.zeros_like(qg)
    start = 0
    for blk, s in zip(blocks, scores, strict=True):
        p = probs[..., start:start + s.shape[-1]]
        start += s.shape[-1]
        v = blk.v.float()
        out = out + (p * v[:, :, None] if blk.diagonal else torch.einsum("bhgns,bhsd->bhgnd", p, v))
    return out.reshape(b, nh, n, d).to(q.dtype)


def _score_bytes_per_row(q: torch.Tensor, keys: int) -> int:
    b, nh = q.shape[:2]
    return 3 * 4 * b * nh * max(keys, 1)  # fp32 scores, probabilities, masked scores


def _chunk_rows(q: torch.Tensor, keys: int) -> int:
    return max(1, min(q.shape[2], CHUNK_SCORE_BYTES // _score_bytes_per_row(q, keys)))


def _attend_chunked(q: torch.Tensor, blocks: Sequence[KVBlock]) -> torch.Tensor:
    """Exact attention through query chunks over (step-0 keys of rows ``<=`` the chunk, diagonals of the chunk's
    rows). Under autograd each chunk is recomputed in backward, so only one chunk's scores are ever alive."""
    main, diags = blocks[0], blocks[1:]
    mask: DocCausal = main.mask  # type: ignore[assignment]
    n = q.shape[2]
    rows = _chunk_rows(q, n + len(diags))  # a diagonal adds one key per query
    if rows >= n:  # one chunk: the plain dense computation, nothing to recompute
        return _attend_dense(q, [KVBlock(main.k, main.v, mask.dense()), *diags])
    recompute = torch.is_grad_enabled() and (q.requires_grad or main.k.requires_grad)
    outs = []
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        key_lo = mask.first_key(lo, hi)
        sub = mask.rows(lo, hi, key_lo, hi)
        own = [blk.mask.reshape(-1, n)[:, lo:hi] for blk in diags]
        tensors = [q[:, :, lo:hi], main.k[:, :, key_lo:hi], main.v[:, :, key_lo:hi]]
        for blk in diags:
            tensors += [blk.k[:, :, lo:hi], blk.v[:, :, lo:hi]]

        def chunk(*t, sub=sub, own=own):
            ks = [KVBlock(t[1], t[2], sub)]
            ks += [KVBlock(t[3 + 2 * j], t[4 + 2 * j], m, diagonal=True) for j, m in enumerate(own)]
            return _attend_dense(t[0], ks)

        if recompute:
            from torch.utils.checkpoint import checkpoint

            outs.append(checkpoint(chunk, *tensors, use_reentrant=False))
        else:
            outs.append(chunk(*tensors))
    return torch.cat(outs, dim=2)


def _attend_flash(q: torch.Tensor, blocks: Sequence[KVBlock]) -> torch.Tensor:
    """Training attention on the CPU: torch's fused flash kernel (causal, blocked, no ``[T, T]`` tensor) once per
    document run, so the cost is the sum of the documents' squared lengths, not the row's; TTT diagonals are merged
    into the same softmax through the kernel's log-sum-exp (:class:`_DocFlashAttention`)."""
    main, diags = blocks[0], blocks[1:]
    n = q.shape[2]
    segments = main.mask.segments()  # type: ignore[union-attr]
    exists = torch.stack([blk.mask.reshape(-1, n).expand(q.shape[0], n) for blk in diags]) if diags else None
    kv = [t.to(q.dtype) for blk in diags for t in (blk.k, blk.v)]
    return _DocFlashAttention.apply(segments, q.shape[-1] ** -0.5, exists, q, main.k.to(q.dtype),
                                    main.v.to(q.dtype), *kv)  # fmt: skip


class _DocFlashAttention(torch.autograd.Function):
    """Softmax attention over (causal keys of the query's document run, one diagonal key per TTT step).

    The flash kernel gives each query's output ``o0`` and log-sum-exp ``l0`` over its document's keys; with the
    diagonal scores ``s_j``, one softmax over all keys is ``out = a * o0 + sum_j b_j v_j``, ``a = exp(l0 - L)``,
    ``b_j = exp(s_j - L)``, ``L = logsumexp(l0, s_j)``. Backward: the union softmax's score gradient of a
    document key is ``a p0 (dout . v - dout . out)``, which is what the kernel's backward computes when given
    ``a * dout`` as the output gradient and ``out`` (the merged output) for its ``rowsum(dout * out)`` term."""

    @staticmethod
    def forward(ctx, segments, scale, exists, q, k0, v0, *diag):
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        b, nh, n, d = q.shape
        nkv = k0.shape[1]
        out0 = q.new_zeros(b, nh, n, d)
        lse0 = q.new_full((b, nh, n), float("-inf"))
        for r, runs in enumerate(segments):
            for lo, hi in runs:
                o, lse = flash(q[r:r + 1, :, lo:hi], k0[r:r + 1, :, lo:hi], v0[r:r + 1, :, lo:hi], is_causal=True,
                               scale=scale)  # fmt: skip
                out0[r, :, lo:hi], lse0[r, :, lo:hi] = o[0], lse[0]
        ctx.segments, ctx.scale, ctx.n_diag = segments, scale, len(diag) // 2
        if not diag:
            ctx.save_for_backward(q, k0, v0, out0, lse0)
            return out0
        qg = q.view(b, nkv, nh // nkv, n, d)
        ks, vs = torch.stack(diag[0::2]), torch.stack(diag[1::2])  # [m, B, nkv, N, d]
        s = (qg[None] * ks[:, :, :, None]).sum(-1) * scale  # [m, B, nkv, g, N]
        s = s.masked_fill(~exists[:, :, None, None], float("-inf"))
        both = torch.cat([lse0.view(b, nkv, nh // nkv, n)[None], s])
        total = torch.logsumexp(both, 0)
        weights = torch.exp(both - torch.where(total.isfinite(), total, 0))  # a query with no key: all zero
        out = (weights[0, ..., None] * out0.view(qg.shape) + (weights[1:, ..., None] * vs[:, :, :, None]).sum(0))
        out = out.view(b, nh, n, d)
        ctx.save_for_backward(q, k0, v0, out, lse0, weights, ks, vs)
        return out

    @staticmethod
    def backward(ctx, dout):
        flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        q, k0, v0, out, lse0, *rest = ctx.saved_tensors
        b, nh, n, d = q.shape
        nkv = k0.shape[1]
        dout = dout.contiguous()
        dq, dk0, dv0 = torch.zeros_like(q), torch.zeros_like(k0), torch.zeros_like(v0)
        grads_diag: list[torch.Tensor] = []
        grad0 = dout
        if rest:
            weights, ks, vs = rest
            shape = (b, nkv, nh // nkv, n, d)
            dg, qg = dout.view(shape), q.view(shape)
            dot_out = (dg * out.view(shape)).sum(-1)  # [B, nkv, g, N]
            ds = weights[1:] * ((dg[None] * vs[:, :, :, None]).sum(-1) - dot_out) * ctx.scale  # [m, B, nkv, g, N]
            dq = (ds[..., None] * ks[:, :, :, None]).sum(0).reshape(q.shape)
            dks = (ds[..., None] * qg[None]).sum(3)
            dvs = (weights[1:, ..., None] * dg[None]).sum(3)
            grads_diag = [g for j in range(ctx.n_diag) for g in (dks[j], dvs[j])]
            grad0 = (weights[0, ..., None] * dg).reshape(q.shape)
        for r, runs in enumerate(ctx.segments):
            for lo, hi in runs:
                sl = (slice(r, r + 1), slice(None), slice(lo, hi))
                g_q, g_k, g_v = flash_bwd(grad0[sl], q[sl], k0[sl], v0[sl], out[sl], lse0[sl], 0.0, True,
                                          scale=ctx.scale)  # fmt: skip
                dq[sl] += g_q
                dk0[sl] += g_k
                dv0[sl] += g_v
        return (None, None, None, dq, dk0, dv0, *grads_diag)


_FLEX: dict = {}


def _attend_flex(q: torch.Tensor, blocks: Sequence[KVBlock]) -> torch.Tensor:
    """FlexAttention over ``cat(step-0 keys, diagonal keys of steps 1..m)`` with a block mask built from the
    document ids: no ``[T, T]`` tensor exists, and blocks that no query may see are skipped. Compiled on CUDA
    (FlexAttention has no backward on the CPU; the CPU tests run it forward only)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    main, diags = blocks[0], blocks[1:]
    doc = main.mask.doc_ids  # type: ignore[union-attr]
    b, nh, n, d = q.shape
    exists = torch.stack([blk.mask.reshape(-1, n).expand(b, n) for blk in diags], 1) if diags else None

    def mask_mod(bi, hi, qi, ki):
        step, r = ki // n, ki % n
        seen = (doc[bi, qi] == doc[bi, r]) & (doc[bi, qi] >= 0) & (r <= qi)
        if exists is None:
            return seen
        return torch.where(step == 0, seen, (r == qi) & exists[bi, (step - 1).clamp(min=0), qi])

    keys = n * (1 + len(diags))
    block_mask = create_block_mask(mask_mod, b, None, n, keys, device=q.device)
    k = torch.cat([main.k, *[blk.k for blk in diags]], dim=2)
    v = torch.cat([main.v, *[blk.v for blk in diags]], dim=2)
    if q.device.type == "cuda":
        fn = _FLEX.setdefault("compiled", torch.compile(flex_attention, dynamic=False))
    else:
        fn = flex_attention
    out = fn(q, k.to(q.dtype), v.to(q.dtype), block_mask=block_mask, scale=d**-0.5, enable_gqa=True)
    visible = (doc >= 0)[:, None, :, None]  # padding rows see nothing: zeros, as the other paths give
    return out * visible


# The caller decides what the new keys are attended together with: it receives the new (rotated) keys/values
# and returns the blocks to attend over (e.g. cache contents + new keys, or step-0 keys + TTT diagonals).
AttendTo = Callable[[torch.Tensor, torch.Tensor], Sequence[KVBlock]]


class Attention(nn.Module):
    """Llama GQA attention whose q/k/v may read a wider input (EAGLE-3: ``2H``)."""

    def __init__(self, in_dim: int, hidden_size: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 bias: bool = False):  # fmt: skip
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(in_dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(in_dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(in_dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend_to: AttendTo) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Returns (output ``[B, N, H]``, new rotated keys, new values ``[B, n_kv, N, d]``)."""
        q, k, v = self.project(x, cos, sin)
        return self.o_proj(self.merge_heads(attend(q, attend_to(k, v)))), k, v

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Rotated queries ``[B, heads, N, d]``, rotated keys and values ``[B, n_kv, N, d]`` of ``x``."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    @staticmethod
    def merge_heads(out: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = out.shape
        return out.transpose(1, 2).reshape(b, n, -1)


class MLP(nn.Module):
    """SwiGLU: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu", bias: bool = False):
        super().__init__()
        from transformers.activations import ACT2FN

        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One Llama decoder layer in the two EAGLE flavours.

    * ``eagle3=False`` (EAGLE-1, ``input_layernorm=False``): attention reads ``h`` itself (no input norm, as in
      the reference and vLLM's ``llama_eagle.py``); residual ``h``.
    * ``eagle3=True``: attention reads ``cat(input_layernorm(embeds), hidden_norm(h))`` (``2H`` wide);
      residual ``h`` (taken *before* ``hidden_norm``, vLLM/speculators ``norm_before_residual=False``).

    Both: ``h' = h + attn``; ``out = h' + mlp(post_attention_layernorm(h'))``.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 rms_norm_eps: float, hidden_act: str = "silu", *, eagle3: bool = False,
                 input_layernorm: bool = True, attention_bias: bool = False, mlp_bias: bool = False):  # fmt: skip
        super().__init__()
        self.eagle3 = eagle3
        in_dim = 2 * hidden_size if eagle3 else hidden_size
        self.self_attn = Attention(in_dim, hidden_size, n_heads, n_kv_heads, head_dim, bias=attention_bias)
        self.mlp = MLP(hidden_size, intermediate_size, hidden_act, bias=mlp_bias)
        if eagle3 or input_layernorm:
            self.input_layernorm = RMSNorm(hidden_size, rms_norm_eps)
        else:
            self.input_layernorm = None
        self.hidden_norm = RMSNorm(hidden_size, rms_norm_eps) if eagle3 else None
        self.post_attention_layernorm = RMSNorm(hidden_size, rms_norm_eps)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend_to: AttendTo,
                embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Returns (layer output ``[B, N, H]``, new keys, new values)."""
        if self.eagle3 and embeds is None:
            raise ValueError("an EAGLE-3 layer needs the token embeddings")
        q, k, v = self.before_attention(hidden, cos, sin, embeds)
        return self.after_attention(hidden, attend(q, attend_to(k, v))), k, v

    # The two attention-free halves of the layer: what `compile_blocks` hands to torch.compile (attention stays
    # eager: its document runs change from batch to batch).
    def before_attention(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         embeds: torch.Tensor | None = None):  # fmt: skip
        if self.eagle3:
            x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        elif self.input_layernorm is not None:
            x = self.input_layernorm(hidden)
        else:
            x = hidden
        return self.self_attn.project(x, cos, sin)

    def after_attention(self, residual: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        h = residual + self.self_attn.o_proj(self.self_attn.merge_heads(attn))
        return h + self.mlp(self.post_attention_layernorm(h))

    def compile_blocks(self, **options) -> None:
        """Run :meth:`before_attention` / :meth:`after_attention` through ``torch.compile(**options)`` (fused
        norms, rope, SwiGLU and residuals); the module's parameters and names are unchanged."""
        self.before_attention = torch.compile(self.before_attention, **options)
        self.after_attention = torch.compile(self.after_attention, **options)


def compile_layers(model: nn.Module, **options) -> nn.Module:
    """``compile_blocks`` on every decoder layer of ``model`` (training's ``--compile``); returns ``model``."""
    for m in model.modules():
        if isinstance(m, DecoderLayer):
            m.compile_blocks(**options)
    return model


class KVCache:
    """Per-layer rotated keys/values ``[B, n_kv, S, head_dim]`` for incremental drafting.

    ``append`` adds the keys of new positions; ``crop(n)`` keeps the first ``n`` (drop rejected drafts);
    ``select(indices)`` keeps arbitrary positions in the given order (tree decoding: keep the accepted branch).
    """

    def __init__(self, num_layers: int = 1):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    def __len__(self) -> int:
        return 0 if self.k[0] is None else int(self.k[0].shape[2])

    @property
    def length(self) -> int:
        return len(self)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` after the cached positions; returns all keys/values of that layer."""
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k, v
        else:
            self.k[layer] = torch.cat([self.k[layer], k], dim=2)
            self.v[layer] = torch.cat([self.v[layer], v], dim=2)
        return self.k[layer], self.v[layer]

    def crop(self, n: int) -> None:
        """Keep the first ``n`` positions of every layer."""
        for i, (k, v) in enumerate(zip(self.k, self.v, strict=True)):
            if k is not None:
                self.k[i], self.v[i] = k[:, :, :n], v[:, :, :n]

    def select(self, indices: torch.Tensor) -> None:
        """Keep the positions ``indices`` (``[S']`` shared by the batch, or ``[B, S']`` per row)."""
        for i, (k, v) in enumerate(zip(self.k, self.v, strict=True)):
            if k is None:
                continue
            if indices.dim() == 1:
                idx = indices.to(k.device)
                self.k[i], self.v[i] = k.index_select(2, idx), v.index_select(2, idx)
            else:
                idx = indices.to(k.device)[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
                self.k[i], self.v[i] = k.gather(2, idx), v.gather(2, idx)


def cache_attend_to(cache: KVCache | None, layer: int, mask: torch.Tensor) -> AttendTo:
    """Attend over (cached + new) keys with ``mask [B, N, S_cached + N]`` (or ``[N, S]``); appends to ``cache``."""

    def fn(k: torch.Tensor, v: torch.Tensor) -> list[KVBlock]:
        if cache is not None:
            k, v = cache.append(layer, k, v)
        if mask.shape[-1] != k.shape[2]:
            raise ValueError(f"mask covers {mask.shape[-1]} keys but there are {k.shape[2]} (cached + new)")
        return [KVBlock(k, v, mask)]

    return fn


def doc_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask ``[B, T, T]`` for packed rows: same document (``>= 0``) and key row <= query row.

    Rows increase with position inside a document, so "key row <= query row" is "key position <= query position".
    """
    t = doc_ids.shape[-1]
    same = (doc_ids[:, :, None] == doc_ids[:, None, :]) & (doc_ids[:, :, None] >= 0)
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    return same & causal


def causal_mask(n_new: int, n_cached: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """``[n_new, n_cached + n_new]``: new query ``i`` sees every cached key and new keys ``<= i``."""
    new = torch.ones(n_new, n_new, dtype=torch.bool, device=device).tril()
    return torch.cat([torch.ones(n_new, n_cached, dtype=torch.bool, device=device), new], dim=1)


def shift_left(x: torch.Tensor, d: int, fill: float | int = 0) -> torch.Tensor:
    """``out[:, t] = x[:, t + d]`` (``fill`` past the end); any trailing dims are kept."""
    if d == 0:
        return x
    pad = torch.full_like(x[:, :d], fill)
    return torch.cat([x[:, d:], pad], dim=1)


def same_doc_ahead(doc_ids: torch.Tensor, d: int) -> torch.Tensor:
    """``[B, T]`` bool: row ``t + d`` exists and lies in the same (non-padding) document as row ``t``."""
    return (shift_left(doc_ids, d, -1) == doc_ids) & (doc_ids >= 0)


def uniform_noise(x: torch.Tensor, std: float, doc_ids: torch.Tensor | None = None,
                  scale_by_length: bool = False) -> torch.Tensor:  # fmt: skip
    """EAGLE's feature augmentation ``(U[0,1) - 0.5) * std`` (optionally ``* 512 / L``).

    The reference scales by the padded sequence length; for packed rows ``L`` is each token's document length.
    """
    noise = (torch.rand_like(x) - 0.5) * std
    if scale_by_length:
        if doc_ids is None:
            lengths = torch.full(x.shape[:2], x.shape[1], dtype=x.dtype, device=x.device)
        else:
            counts = F.one_hot(doc_ids.clamp_min(0), num_classes=int(doc_ids.max().clamp_min(0)) + 1).sum(1)
            lengths = counts.gather(1, doc_ids.clamp_min(0)).to(x.dtype)
        noise = noise * (512.0 / lengths.clamp_min(1))[..., None]
    return x + noise


def gaussian_noise(x: torch.Tensor, std: float) -> torch.Tensor:
    return x + torch.randn_like(x) * std


def ttt_attention_mask(doc_ids: torch.Tensor, step: int) -> torch.Tensor:
    """Which keys the step-``step`` query of each row may see: bool ``[B, T, (step+1) * T]``.

    Key index ``j * T + r`` is row ``r``'s key of step ``j``. Block 0: same document and ``r <= t``; blocks
    ``1..step``: only ``r == t`` (the row's own chain), for non-padding rows.
    """
    b, t = doc_ids.shape
    blocks = [doc_causal_mask(doc_ids)]
    eye = torch.eye(t, dtype=torch.bool, device=doc_ids.device)[None] & (doc_ids >= 0)[:, :, None]
    blocks += [eye.expand(b, t, t)] * step
    return torch.cat(blocks, dim=2)


"""Export trained draft heads in the formats serving engines load, and load them back.

Formats (``fmt``) and the public loaders they were matched against (read Aug 2026):

* EAGLE-1 ``"vllm"`` — vLLM ``method="eagle"``: ``vllm/model_executor/models/llama_eagle.py``
  (``EagleLlamaForCausalLM``; vLLM prefixes every non-``lm_head`` name with ``model.``, builds ``fc`` without bias,
  replaces ``layers.0.input_layernorm`` by Identity, has no ``lm_head`` module) and
  ``vllm/transformers_utils/configs/eagle.py`` (``EAGLEConfig`` turns ``LlamaForCausalLM`` into
  ``EagleLlamaForCausalLM``). ``config.json``: a Llama config with ``architectures: ["LlamaForCausalLM"]`` (what
  the public EAGLE-1 checkpoints use; SGLang maps the same name to ``LlamaForCausalLMEagle``),
  ``num_hidden_layers: 1``. ``model.safetensors``: ``fc.weight [H, 2H]``, ``layers.0.self_attn.{q,k,v,o}_proj``,
  ``layers.0.mlp.{gate,up,down}_proj``, ``layers.0.post_attention_layernorm``. No ``embed_tokens``/``lm_head``:
  vLLM shares them from the target, rejects an ``lm_head`` key (no such module; ``AutoWeightsLoader`` raises) and,
  in versions whose ``load_weights`` skips ``embed_tokens`` at PP=1 while ``process_eagle_weight`` still flags
  ``has_own_embed_tokens``, would keep an *unloaded* embedding instead of sharing the target's.
* EAGLE-3 ``"vllm"`` (default; also SGLang's format) — vLLM ``llama_eagle3.py`` (``Eagle3LlamaForCausalLM``
  registered as ``LlamaForCausalLMEagle3``; maps ``midlayer.`` to ``layers.0.``, ``d2t`` to
  ``draft_id_to_target_id``, skips ``t2d``; fc input ``3 * target_hidden_size``; reads
  ``eagle_config.eagle_aux_hidden_state_layer_ids`` in ``gpu_model_runner._get_eagle3_aux_layers_from_config``)
  and SGLang ``python/sglang/srt/models/llama_eagle3.py`` (module ``model.midlayer`` — a ``layers.0.*`` key would be
  *silently dropped* there, hence ``midlayer.*``; ``tie_word_embeddings: true`` would make its lm_head the full
  embedding, hence ``false``; ``d2t`` becomes ``hot_token_id``). ``config.json``: ``architectures:
  ["LlamaForCausalLMEagle3"]``, ``draft_vocab_size``, ``target_hidden_size``, ``eagle_config:
  {"eagle_aux_hidden_state_layer_ids": [...], "use_aux_hidden_state": true}``, ``norm_before_residual: false``.
  Weights: ``fc.weight [H, A*H]``, ``midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}``,
  ``midlayer.self_attn.{q,k,v}_proj [.., 2H]``, ``midlayer.self_attn.o_proj``, ``midlayer.mlp.*``,
  ``norm.weight``, ``lm_head.weight [draft_vocab, H]``, ``d2t`` int64 ``[draft_vocab]``, ``t2d`` bool ``[V]``.
* EAGLE-3 ``"speculators"`` — vllm-project/speculators ``src/speculators/models/eagle3/config.py``
  (``Eagle3SpeculatorConfig``), ``src/speculators/config.py``, ``convert/eagle/eagle3_converter.py`` (commit
  c05b95b, after v0.7.0.1) and vLLM ``vllm/transformers_utils/configs/speculators/{base,algos}.py``:
  ``architectures: ["Eagle3Speculator"]``, ``speculators_model_type: "eagle3"``, ``speculators_config``
  (``algorithm``, ``proposal_methods[0].speculative_tokens``, ``default_proposal_method``, ``verifier
  {name_or_path, architectures}``), ``transformer_layer_config`` (a Llama config dict), top-level
  ``draft_vocab_size``, ``target_hidden_size``, ``eagle_aux_hidden_state_layer_ids``, ``norm_before_residual:
  false`` (vLLM's adapter defaults it to *true* when absent). Weights as above with ``layers.0.*`` instead of
  ``midlayer.*``.

Aux layer ids are HF ``output_hidden_states`` indices = the input of decoder layer ``i`` = vLLM's layer id
``i``. SGLang before PR #25454 (May 2026) added 1 to explicit ids (it read them as "output of layer i"); current
SGLang only does so when the first id is 1. So when the ids are the engines' shared default ``{2, N//2, N-3}``
the field is left out (every engine then uses its default, which is exactly those layers), and otherwise
:func:`aux_layer_note` says, in the export's output, which engines read them how.

Vocabulary maps: a draft vocabulary as large as the target's has no ``d2t``/``t2d`` (vLLM's ``llama_eagle3`` then
builds no ``draft_id_to_target_id`` and refuses a ``d2t`` weight). ``--format speculators`` carries the (frozen,
target-identical) ``embed_tokens.weight`` in ``model.safetensors``: speculators' own
``Eagle3DraftModel.from_pretrained`` otherwise leaves its embedding all zeros (without a warning); vLLM loads it
when present and shares the target's otherwise.

Rope fields are the draft's (:func:`pipeline.draft.layers.draft_rope_source`: the target's rope as one
full-attention Llama layer reads it, ``partial_rotary_factor`` inside ``rope_parameters``), written as normalised
``rope_parameters`` plus the legacy ``rope_theta`` / ``rope_scaling`` pair older loaders read, so the served draft
rotates exactly as it was trained.

Our own metadata sits under the single extra key ``"pipeline"`` (ignored by every loader above) so that
:func:`load_export` can rebuild the module. The frozen target pieces the module needs at load time
(``embed_tokens``, and EAGLE-1's ``lm_head``) are, with ``include_embeddings=True``, written to
``pipeline_extra/target_weights.safetensors``: a subdirectory, because vLLM/SGLang/transformers glob
``*.safetensors`` in the top directory only, so the served files stay exactly what the loaders expect.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline import __version__
from pipeline.draft.layers import rope_parameters
from pipeline.draft.registry import get, head_of
from pipeline.store import config_sha256

EXPORT_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
SIDECAR_FILE = "pipeline_extra/target_weights.safetensors"
SPECULATORS_VERSION = "0.7.0"  # the speculators release line whose config schema we write


def rope_config_fields(target_config: dict) -> dict[str, Any]:
    """The draft's rope as Llama config fields. Yarn gets its ``attention_factor`` written out: DeepSeek's
    ``mscale``/``mscale_all_dim`` give a factor that loaders older than transformers 5 / vLLM 0.11 computed
    differently from the generic yarn, and an explicit factor is read the same way by all."""
    params = rope_parameters(target_config)
    if params.get("rope_type") == "yarn" and params.get("attention_factor") is None:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        from pipeline.draft.layers import rope_llama_config

        params["attention_factor"] = float(ROPE_INIT_FUNCTIONS["yarn"](rope_llama_config(target_config), None)[1])
    scaling = None
    if params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return {"rope_parameters": params, "rope_theta": params["rope_theta"], "rope_scaling": scaling}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _llama_body(config: Any, dtype: torch.dtype) -> dict[str, Any]:
    """The HF Llama fields of a one-layer draft (sizes, rope and eps identical to the target's)."""
    body: dict[str, Any] = {
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": 1,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "tie_word_embeddings": False,
        "use_cache": True,
        "initializer_range": 0.02,
        **rope_config_fields(config.target_config),
        "torch_dtype": _dtype_name(dtype),
        "dtype": _dtype_name(dtype),
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.target_config.get(key) is not None:
            body[key] = config.target_config[key]
    return body


def _metadata(config: Any, fmt: str, prefix: str, sidecar: bool, extra: dict | None, needs: list[str]) -> dict:
    tc = config.target_config
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "code_version": __version__,
        "variant": config.variant,
        "fmt": fmt,
        "layer_prefix": prefix,
        "draft_config": config.to_dict(),
        "target": {"name_or_path": config.target_name, "config_sha256": config_sha256(tc),
                   "architectures": tc.get("architectures"), "hidden_size": config.hidden_size,
                   "vocab_size": config.vocab_size},  # fmt: skip
        "aux_layer_ids": getattr(config, "aux_layer_ids", None),
        "aux_layer_convention": "hf_output_hidden_states_index",
        "aux_layer_note": aux_layer_note(config),
        "needs_target_weights": needs,
        "target_weights_file": SIDECAR_FILE if sidecar else None,
        "extra": extra or {},
    }


def export_weights(model: nn.Module, prefix_from: str, prefix_to: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The head's trained state (``draft_state_dict``) in ``dtype`` (floats only), ``prefix_from`` keys renamed."""
    out = {}
    for k, v in model.draft_state_dict().items():
        if k.startswith(prefix_from):
            k = prefix_to + k[len(prefix_from):]
        v = v.detach().cpu()
        out[k] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
    return out


def export_draft(model: nn.Module, config: Any | None, out_dir: str | Path,
                 fmt: str = "vllm", extra: dict | None = None, *, include_embeddings: bool = True,
                 dtype: torch.dtype | None = None, num_speculative_tokens: int = 3) -> Path:  # fmt: skip
    """Write ``config.json`` + ``model.safetensors`` (+ the target-weights sidecar) into ``out_dir``.

    ``dtype``: storage dtype of the float weights (default: the model's). ``num_speculative_tokens``: the
    proposal length recorded in the speculators config (vLLM uses it as the default ``num_speculative_tokens``).
    """
    config = config or model.config
    head = head_of(model)
    served = head.servable(model)
    if served is not model:  # e.g. a projected store's P folded into fc: fc·PᵀP
        model, config = served, served.config
    if fmt not in head.export_formats:
        raise ValueError(f"{head.name} heads export as {' or '.join(head.export_formats)}, not --format {fmt}")
    dtype = dtype or next(v.dtype for v in model.draft_state_dict().values() if v.is_floating_point())
    body = _llama_body(config, dtype)
    cfg, weights, prefix = head.export_layout(model, config, fmt, body, dtype, num_speculative_tokens)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shared = head.target_pieces(model)
    cfg["pipeline"] = _metadata(config, fmt, prefix, include_embeddings, extra, list(shared))
    save_file(weights, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    if include_embeddings:
        (out / SIDECAR_FILE).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in shared.items()}, str(out / SIDECAR_FILE),
                  metadata={"format": "pt"})  # fmt: skip
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def speculators_config(config: Any, body: dict, common: dict, aux_ids: dict, num_speculative_tokens: int) -> dict:
    """An EAGLE-3 ``config.json`` in speculators' schema (module docstring) around the Llama ``body``."""
    tc = config.target_config
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": num_speculative_tokens,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": config.target_name,
                         "architectures": list(tc.get("architectures") or ["LlamaForCausalLM"])},
        },
        "transformer_layer_config": body,
        **common,
        **aux_ids,
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "embed_requires_grad": False,
        "torch_dtype": body["torch_dtype"],
        "dtype": body["dtype"],
    }  # fmt: skip


def engine_default_aux_layers(num_layers: int) -> list[int]:
    """vLLM's and SGLang's EAGLE-3 default aux layers for an N-layer target: ``(2, N//2, N-3)``."""
    return [2, num_layers // 2, num_layers - 3]


def aux_layers_are_default(config: Any) -> bool:
    n = int(config.target_config.get("num_hidden_layers", -1))
    return list(config.aux_layer_ids) == engine_default_aux_layers(n)


def aux_layer_note(config: Any) -> str | None:
    """What an export's user must know about the aux layer ids (None: nothing, e.g. EAGLE-1, which reads none)."""
    if not getattr(config, "aux_layer_ids", None):
        return None
    ids = list(config.aux_layer_ids)
    if aux_layers_are_default(config):
        return (f"aux layers {ids} are the engines' default (2, N//2, N-3): the field is left out, so vLLM, SGLang "
                "(every version) and speculators each use their default, which is these layers")  # fmt: skip
    return (f"aux layers {ids} (HF hidden-state indices = inputs of decoder layers {ids}) are written out: vLLM and "
            f"SGLang after PR #25454 read them as written; SGLang before that PR adds 1 to each id and would feed "
            f"{[i + 1 for i in ids]}: serve with a newer SGLang or retrain on the default (2, N//2, N-3)")  # fmt: skip


def load_export(path: str | Path, target_weights: dict[str, torch.Tensor] | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[nn.Module, dict]:  # fmt: skip
    """Rebuild the module of an :func:`export_draft` directory; returns (model in eval mode, metadata).

    The frozen target pieces come from ``target_weights`` (e.g. ``StoreReader.target_weights()``) or else from
    the export's sidecar file.
    """
    root = Path(path)
    cfg = json.loads((root / "config.json").read_text())
    meta = cfg.get("pipeline")
    if not meta:
        raise ValueError(f"{root}: not a pipeline export (no 'pipeline' key in config.json)")
    if meta["format_version"] > EXPORT_FORMAT_VERSION:
        raise ValueError(f"{root}: export format {meta['format_version']} is newer than this code")
    try:
        head = get(meta["variant"])
    except ValueError as e:
        raise ValueError(f"{root}: {e}") from e
    model = head.from_config(meta["draft_config"])
    config, native = model.config, head.layer_prefix

    prefix = meta["layer_prefix"]
    state = {(native + k[len(prefix):] if k.startswith(prefix) else k): v
             for k, v in load_file(str(root / WEIGHTS_FILE)).items()}  # fmt: skip
    missing, unexpected = model.load_state_dict(state, strict=False)
    optional = head.optional_weights(config)
    missing = [k for k in missing if k not in optional]
    if missing or unexpected:
        raise ValueError(f"{root}: weights do not match the config (missing {missing}, unexpected {unexpected})")

    shared = target_weights
    if shared is None and meta.get("target_weights_file"):
        shared = load_file(str(root / meta["target_weights_file"]))
    if shared is None:
        raise ValueError(f"{root}: the export has no target weights; pass target_weights= "
                         f"(needs {meta['needs_target_weights']})")  # fmt: skip
    model.load_target_weights(shared)
    model.to(dtype).eval()
    return model, {**meta, "path": str(root), "config": cfg}

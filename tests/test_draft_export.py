"""Exports: config keys / weight names / shapes against the public loaders' expectations, and round trips.

The ``*_loader_names`` helpers restate, as data, how each public loader maps checkpoint names onto its modules
(see the module docstring of pipeline/draft/export.py for the files and versions); every exported key must land
on a loader parameter and every loader parameter (other than shared embeddings) must be covered.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import require_optional
from safetensors import safe_open
from safetensors.torch import load_file
from synthetic_target import make_batch, target_weights, tiny_target, tiny_target_config

from pipeline.draft.eagle1 import Eagle1Config, Eagle1Draft
from pipeline.draft.eagle3 import Eagle3Config, Eagle3Draft, build_draft_vocab
from pipeline.draft.export import SIDECAR_FILE, export_draft, load_export
from pipeline.draft.layers import causal_mask
from pipeline.store import config_sha256

pytestmark = pytest.mark.usefixtures("one_thread")

V, H, AUX, VD = 1000, 64, [1, 2, 3], 300
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 128}  # fmt: skip
STACKED = ((".q_proj", ".qkv_proj"), (".k_proj", ".qkv_proj"), (".v_proj", ".qkv_proj"),
           (".gate_proj", ".gate_up_proj"), (".up_proj", ".gate_up_proj"))  # fmt: skip


@pytest.fixture(scope="module")
def target():
    tc = tiny_target_config(vocab_size=V, hidden_size=H, rope_parameters=LLAMA3_ROPE, bos_token_id=1,
                            eos_token_id=2)  # fmt: skip
    return tc, tiny_target(tc, seed=0, init_std=0.3)


@pytest.fixture(scope="module")
def batch(target):
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, V, (n,), generator=g) for n in (30, 20)]
    return make_batch(target[1], samples, AUX, 8)


def eagle1(target) -> Eagle1Draft:
    tc, tgt = target
    torch.manual_seed(0)
    m = Eagle1Draft(Eagle1Config.from_target(tc, target_name="/models/tiny-llama"))
    for p in m.trainable_parameters():  # not the init values, so a mix-up would show
        torch.nn.init.normal_(p, std=0.05)
    m.load_target_weights(target_weights(tgt))
    return m.eval()


def eagle3(target, batch, aux: list[int] = AUX, vd: int = VD) -> Eagle3Draft:
    tc, tgt = target
    torch.manual_seed(0)
    m = Eagle3Draft(Eagle3Config.from_target(tc, aux, vd, target_name="/models/tiny-llama"))
    for p in m.trainable_parameters():
        torch.nn.init.normal_(p, std=0.05)
    m.load_target_weights(target_weights(tgt))
    counts = np.bincount(batch["topk_ids"][..., 0].flatten().numpy(), minlength=V)
    m.set_vocab(*build_draft_vocab(counts, vd)[:2])
    return m.eval()


def read_export(path) -> tuple[dict, dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    cfg = json.loads((path / "config.json").read_text())
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        shapes = {k: (tuple(f.get_tensor(k).shape), f.get_tensor(k).dtype) for k in f.keys()}  # noqa: SIM118
    return cfg, shapes


def stacked(name: str) -> str:
    for old, new in STACKED:
        if old in name:
            return name.replace(old, new)
    return name


def assert_same_rope(cfg: dict, target_config: dict):
    from transformers import LlamaConfig

    assert cfg["rope_theta"] == LLAMA3_ROPE["rope_theta"]
    assert cfg["rope_scaling"] == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    assert cfg["rope_parameters"] == LLAMA3_ROPE
    cfg, target_config = copy.deepcopy(cfg), copy.deepcopy(target_config)  # transformers edits rope dicts
    assert LlamaConfig(**cfg).rope_parameters == LlamaConfig(**target_config).rope_parameters == LLAMA3_ROPE


def eagle1_step(model, batch):
    f, ids, pos = batch["hidden_last"][:1], batch["input_ids"][:1], batch["position_ids"][:1]
    with torch.no_grad():
        return model.step(f, ids, pos, None, causal_mask(f.shape[1]))


def eagle3_step(model, batch):
    aux, ids, pos = batch["hidden_aux"][:1], batch["input_ids"][:1], batch["position_ids"][:1]
    with torch.no_grad():
        return model.step(model.fuse(aux), ids, pos, None, causal_mask(aux.shape[1]))


# ---- EAGLE-1 / vLLM ------------------------------------------------------------------------------------------

# vLLM llama_eagle.py: LlamaModel params (input_layernorm is an Identity on layer 0; no lm_head module).
VLLM_EAGLE1_PARAMS = {"fc.weight", "embed_tokens.weight", "layers.0.self_attn.qkv_proj.weight",
                      "layers.0.self_attn.o_proj.weight", "layers.0.mlp.gate_up_proj.weight",
                      "layers.0.mlp.down_proj.weight", "layers.0.post_attention_layernorm.weight"}  # fmt: skip


def test_eagle1_vllm_export(tmp_path, target, batch):
    tc, _ = target
    model = eagle1(target)
    out = export_draft(model, model.config, tmp_path / "e1", "vllm", {"run": "test"})
    cfg, shapes = read_export(out)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 1 and cfg["tie_word_embeddings"] is False
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "rms_norm_eps", "vocab_size", "max_position_embeddings", "hidden_act", "bos_token_id"):
        assert cfg[key] == {**tc, "head_dim": 16}[key], key
    assert_same_rope(cfg, tc)
    assert shapes["fc.weight"] == ((H, 2 * H), torch.float32)
    assert "fc.bias" not in shapes and not any("lm_head" in k or "embed_tokens" in k for k in shapes)
    # vLLM: every name gets "model." (none is lm_head), then the stacked q/k/v, gate/up mapping.
    mapped = {stacked(k) for k in shapes}
    assert mapped <= VLLM_EAGLE1_PARAMS and mapped == VLLM_EAGLE1_PARAMS - {"embed_tokens.weight"}
    assert {k for k in shapes if "proj" in k} == {f"layers.0.self_attn.{p}_proj.weight" for p in "qkvo"} | {
        f"layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}  # fmt: skip
    meta = cfg["pipeline"]
    assert meta["variant"] == "eagle1" and meta["extra"] == {"run": "test"}
    assert meta["target"]["name_or_path"] == "/models/tiny-llama"
    assert set(meta["needs_target_weights"]) == {"embed_tokens.weight", "lm_head.weight"}
    assert (out / SIDECAR_FILE).exists() and not list(out.glob("pipeline_extra.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]

    loaded, lmeta = load_export(out)
    a, b = eagle1_step(model, batch), eagle1_step(loaded, batch)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert lmeta["variant"] == "eagle1" and loaded.config == model.config

    with pytest.raises(ValueError, match="fc without bias"):
        export_draft(Eagle1Draft(Eagle1Config.from_target(tc, fc_bias=True)), None, tmp_path / "bias", "vllm")


def test_eagle1_export_without_embeddings_needs_target_weights(tmp_path, target, batch):
    model = eagle1(target)
    out = export_draft(model, None, tmp_path / "e1", "vllm", include_embeddings=False)
    assert not (out / SIDECAR_FILE).exists()
    with pytest.raises(ValueError, match="target_weights"):
        load_export(out)
    loaded, _ = load_export(out, target_weights=target_weights(target[1]))
    assert torch.equal(eagle1_step(model, batch)[1], eagle1_step(loaded, batch)[1])


# ---- EAGLE-3 / vLLM + SGLang ---------------------------------------------------------------------------------

# vLLM llama_eagle3.py: Eagle3LlamaForCausalLM params after its name mapping.
VLLM_EAGLE3_PARAMS = {"model.fc.weight", "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                      "draft_id_to_target_id"} | {f"model.layers.0.{n}" for n in (
    "self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight", "hidden_norm.weight")}  # fmt: skip
# SGLang llama_eagle3.py: LlamaForCausalLMEagle3 named_parameters (unknown names are skipped silently!).
SGLANG_EAGLE3_PARAMS = {"model.fc.weight", "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
    f"model.midlayer.{n}" for n in (
        "self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight",
        "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
        "hidden_norm.weight")}  # fmt: skip


def vllm_eagle3_name(name: str) -> str | None:
    if "t2d" in name:
        return None
    if "d2t" in name:
        return name.replace("d2t", "draft_id_to_target_id")
    if "lm_head" not in name:
        name = "model." + name
    return stacked(name.replace("midlayer.", "layers.0."))


def sglang_eagle3_name(name: str) -> str | None:
    if "d2t" in name or "t2d" in name:
        return None
    name = stacked(name)
    return name if name in SGLANG_EAGLE3_PARAMS else f"model.{name}"


def assert_eagle3_shapes(shapes: dict, prefix: str, embed: bool = False):
    assert shapes["fc.weight"] == ((H, 3 * H), torch.float32)
    assert shapes[f"{prefix}self_attn.q_proj.weight"][0] == (4 * 16, 2 * H)
    assert shapes[f"{prefix}self_attn.k_proj.weight"][0] == (2 * 16, 2 * H)
    assert shapes[f"{prefix}self_attn.v_proj.weight"][0] == (2 * 16, 2 * H)
    assert shapes[f"{prefix}self_attn.o_proj.weight"][0] == (H, 4 * 16)
    assert shapes[f"{prefix}hidden_norm.weight"][0] == (H,)
    assert shapes["norm.weight"][0] == (H,) and shapes["lm_head.weight"][0] == (VD, H)
    assert shapes["d2t"] == ((VD,), torch.int64) and shapes["t2d"] == ((V,), torch.bool)
    assert (shapes.get("embed_tokens.weight") == ((V, H), torch.float32)) if embed else "embed_tokens.weight" not in shapes


def test_eagle3_vllm_export(tmp_path, target, batch):
    tc, _ = target
    model = eagle3(target, batch)
    out = export_draft(model, model.config, tmp_path / "e3", "vllm", {"epoch": 3})
    cfg, shapes = read_export(out)
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 1 and cfg["tie_word_embeddings"] is False
    assert cfg["draft_vocab_size"] == VD and cfg["target_hidden_size"] == H and cfg["vocab_size"] == V
    assert cfg["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": AUX, "use_aux_hidden_state": True}
    assert cfg["norm_before_residual"] is False and cfg["rms_norm_eps"] == tc["rms_norm_eps"]
    assert_same_rope(cfg, tc)
    assert_eagle3_shapes(shapes, "midlayer.")
    vllm = {vllm_eagle3_name(k) for k in shapes} - {None}
    assert vllm == VLLM_EAGLE3_PARAMS - {"model.embed_tokens.weight"}
    sgl = {sglang_eagle3_name(k) for k in shapes} - {None}
    assert sgl == SGLANG_EAGLE3_PARAMS - {"model.embed_tokens.weight"}
    assert cfg["pipeline"]["aux_layer_ids"] == AUX and cfg["pipeline"]["needs_target_weights"] == ["embed_tokens.weight"]
    # not the engines' default (2, N//2, N-3): written out, and the export says who reads them how
    note = cfg["pipeline"]["aux_layer_note"]
    assert "before that PR adds 1" in note and str([i + 1 for i in AUX]) in note

    loaded, meta = load_export(out)
    a, b = eagle3_step(model, batch), eagle3_step(loaded, batch)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(loaded.d2t, model.d2t) and torch.equal(loaded.t2d, model.t2d)
    assert meta["extra"] == {"epoch": 3}


def test_eagle3_speculators_export(tmp_path, target, batch):
    tc, _ = target
    model = eagle3(target, batch)
    out = export_draft(model, None, tmp_path / "spec", "speculators", num_speculative_tokens=5)
    cfg, shapes = read_export(out)
    assert cfg["architectures"] == ["Eagle3Speculator"] and cfg["speculators_model_type"] == "eagle3"
    spec = cfg["speculators_config"]
    assert spec["algorithm"] == "eagle3" and spec["default_proposal_method"] == "greedy"
    assert spec["proposal_methods"][0] == {"proposal_type": "greedy", "speculative_tokens": 5,
                                           "verifier_accept_k": 1, "accept_tolerance": 0.0}  # fmt: skip
    assert spec["verifier"] == {"name_or_path": "/models/tiny-llama", "architectures": ["LlamaForCausalLM"]}
    tl = cfg["transformer_layer_config"]
    assert tl["model_type"] == "llama" and tl["num_hidden_layers"] == 1 and tl["vocab_size"] == V
    assert tl["hidden_size"] == H and tl["head_dim"] == 16 and tl["tie_word_embeddings"] is False
    assert_same_rope(tl, tc)
    assert cfg["draft_vocab_size"] == VD and cfg["target_hidden_size"] == H
    assert cfg["eagle_aux_hidden_state_layer_ids"] == AUX and cfg["norm_before_residual"] is False
    assert_eagle3_shapes(shapes, "layers.0.", embed=True)
    assert torch.equal(load_file(str(out / "model.safetensors"))["embed_tokens.weight"], model.embed_tokens.weight)
    # vLLM's speculators adapter: the transformers config is transformer_layer_config + the eagle3 fields.
    pre = dict(tl)
    pre.update(draft_vocab_size=cfg.get("draft_vocab_size"), target_hidden_size=cfg["target_hidden_size"],
               norm_before_residual=cfg.get("norm_before_residual", True),
               eagle_aux_hidden_state_layer_ids=cfg["eagle_aux_hidden_state_layer_ids"])  # fmt: skip
    assert pre["norm_before_residual"] is False  # the adapter's default would be True: must be explicit
    assert {vllm_eagle3_name(k) for k in shapes} - {None} == VLLM_EAGLE3_PARAMS

    loaded, meta = load_export(out)
    a, b = eagle3_step(model, batch), eagle3_step(loaded, batch)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and meta["fmt"] == "speculators"


def test_eagle3_bf16_export(tmp_path, target, batch):
    model = eagle3(target, batch)
    out = export_draft(model, None, tmp_path / "bf16", "vllm", dtype=torch.bfloat16)
    cfg, shapes = read_export(out)
    assert cfg["torch_dtype"] == "bfloat16" and shapes["fc.weight"][1] == torch.bfloat16
    assert shapes["d2t"][1] == torch.int64 and shapes["t2d"][1] == torch.bool
    loaded, _ = load_export(out)
    torch.testing.assert_close(eagle3_step(loaded, batch)[1], eagle3_step(model, batch)[1], rtol=0.05, atol=0.05)


def test_metadata_config_hash_matches_store_fingerprint(tmp_path, target, batch):
    model = eagle3(target, batch)
    cfg, _ = read_export(export_draft(model, None, tmp_path / "h", "vllm"))
    assert cfg["pipeline"]["target"]["config_sha256"] == config_sha256(target[0])


def test_default_aux_layers_are_left_to_the_engines(tmp_path):
    tc = tiny_target_config(vocab_size=V, hidden_size=H, num_layers=8)
    deep = (tc, tiny_target(tc, seed=0, init_std=0.3))
    default = [2, 8 // 2, 8 - 3]  # vLLM's and SGLang's EAGLE-3 default for an 8-layer target
    samples = [torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(1)) for n in (30, 20)]
    model = eagle3(deep, make_batch(deep[1], samples, default, 8), aux=default)
    for fmt in ("vllm", "speculators"):
        out = export_draft(model, None, tmp_path / fmt, fmt)
        cfg, _ = read_export(out)
        served = json.dumps({k: v for k, v in cfg.items() if k != "pipeline"})
        assert "eagle_aux_hidden_state_layer_ids" not in served, fmt  # every engine falls back to (2, N//2, N-3)
        assert cfg["pipeline"]["aux_layer_ids"] == default and "left out" in cfg["pipeline"]["aux_layer_note"]
        loaded, _ = load_export(out)
        assert loaded.config.aux_layer_ids == default
    assert read_export(tmp_path / "vllm")[0]["eagle_config"] == {"use_aux_hidden_state": True}


def test_full_size_draft_vocabulary_has_no_maps(tmp_path, target, batch):
    model = eagle3(target, batch, vd=V)
    assert torch.equal(model.d2t, torch.zeros(V, dtype=torch.int64)) and bool(model.t2d.all())
    for fmt in ("vllm", "speculators"):
        out = export_draft(model, None, tmp_path / fmt, fmt)
        cfg, shapes = read_export(out)
        assert "d2t" not in shapes and "t2d" not in shapes, fmt  # vLLM's llama_eagle3 refuses a d2t then
        assert cfg["draft_vocab_size"] == V and shapes["lm_head.weight"][0] == (V, H)
        loaded, _ = load_export(out)
        a, b = eagle3_step(model, batch), eagle3_step(loaded, batch)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("vd", [VD, V], ids=["draft-vocab", "full-vocab"])
def test_speculators_package_loads_the_export_with_our_logits(tmp_path, target, batch, vd):
    """The speculators export loaded by the ``speculators`` package itself (its ``Eagle3DraftModel``, the training
    forward with teacher forcing) gives the project's draft-vocabulary logits at every TTT step."""
    require_optional("speculators.models.eagle3", "PIPELINE_REQUIRE_SPECULATORS")
    from pipeline.draft.speculators_check import compare_logits, load_with_speculators

    verifier = tmp_path / "verifier"  # speculators reads its config (aux layer ids) and weights (verifier head)
    target[1].save_pretrained(verifier)
    model = eagle3(target, batch, vd=vd)
    model.config.target_name = str(verifier)
    theirs = load_with_speculators(export_draft(model, None, tmp_path / "spec", "speculators", dtype=torch.float32))
    assert torch.equal(theirs.embed_tokens.weight, model.embed_tokens.weight)  # not left at zeros
    if vd < V:
        assert torch.equal(theirs.d2t, model.d2t) and torch.equal(theirs.t2d, model.t2d)
    steps = compare_logits(model, theirs, {k: v[:1] for k, v in batch.items()}, steps=3)  # row 0: one document
    assert [s["step"] for s in steps] == [0, 1, 2]
    for s in steps:
        assert s["rel_diff"] < 1e-5 and s["argmax_agree"] == 1.0, s

"""Every target family users bring (tiny random targets from transformers' config classes, tests/family_targets.py):
the draft's shapes, rope, norm and logits read from each family's config as the served Llama draft needs them,
the EAGLE-3 vocabulary refusal, and lossless greedy decoding in the evaluator (sliding windows, eager-only
attention) with random heads and with heads that are accepted."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LIVE_REPORT
from family_targets import FAMILIES, WINDOW, family_config, family_model
from synthetic_draft import fit_draft, greedy_continuations, tiny_draft
from synthetic_target import target_weights

from pipeline.draft.common import TargetConfigError, norm_weight_offset, target_logits
from pipeline.draft.eagle3 import Eagle3Config, Eagle3Draft, prediction_coverage
from pipeline.draft.export import export_draft
from pipeline.draft.layers import RotaryEmbedding, apply_rope, rope_parameters
from pipeline.evaluate.decode import speculative_generate
from pipeline.evaluate.drafter import Drafter, DraftSettings
from pipeline.evaluate.target import TargetError, load_target, target_generate

pytestmark = pytest.mark.usefixtures("one_thread")

V = 256
AUX = (1, 2, 3)
CHAIN = DraftSettings(mode="chain", depth=3)
TREE = DraftSettings(mode="tree", depth=3, top_k=2, total_tokens=6)


@pytest.fixture(scope="module")
def models():
    return {}


def model_of(models: dict, family: str):
    if family not in models:
        models[family] = family_model(family, V)
    return models[family]


def cfg_dict(family: str, **kw) -> dict:
    return json.loads(json.dumps(family_config(family, V, **kw).to_dict()))  # as a store's config.json reads back


# ---- point 6: draft shapes from each family's fields -----------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_draft_shape_fields_per_family(family):
    tc = cfg_dict(family)
    c = Eagle3Config.from_target(tc, AUX, draft_vocab_size=128)
    assert c.hidden_size == 64 and c.hidden_act == "silu"  # the served Llama layer's only activation
    assert not c.attention_bias and not c.mlp_bias
    expected_mlp = {"qwen3_moe": 32 * 2, "gpt_oss": 64 * 2, "deepseek_v3": 32 * (2 + 1)}.get(family, 128)
    assert c.intermediate_size == expected_mlp  # the MLP work per token, not a per-expert / dense-layer field
    assert c.head_dim == (64 // 4 if family == "deepseek_v3" else tc.get("head_dim") or 16)
    if family == "deepseek_v3":
        assert tc["head_dim"] == 8 and c.num_key_value_heads == 4  # DeepSeek's head_dim is its rope slice
    Eagle3Draft(c)  # builds


def test_missing_mlp_field_is_refused_with_its_name():
    tc = cfg_dict("gpt_oss")
    del tc["num_experts_per_tok"]
    with pytest.raises(TargetConfigError, match="num_experts_per_tok"):
        Eagle3Config.from_target(tc, AUX)


# Real-shaped configs (transformers' defaults for these classes: the published models' sizes) where a field's
# meaning matters: vocabularies past uint16, per-expert and dense-layer MLP fields, DeepSeek's rope-slice head_dim.
REAL_SHAPED = {  # class -> (vocab, draft MLP width, draft head_dim)
    "Qwen3Config": (151936, 22016, 128),
    "Qwen3MoeConfig": (151936, 768 * 8, 2048 // 32),
    "GptOssConfig": (201088, 2880 * 4, 64),
    "Gemma3TextConfig": (262208, 9216, 256),
    "DeepseekV3Config": (129280, 2048 * (8 + 1), 7168 // 128),
}


@pytest.mark.parametrize("cls_name", sorted(REAL_SHAPED))
def test_real_shaped_configs_and_large_vocabularies(cls_name):
    import numpy as np
    import transformers

    from pipeline.draft.eagle3 import build_draft_vocab, target_to_draft

    tc = json.loads(json.dumps(getattr(transformers, cls_name)().to_dict()))
    vocab, mlp, head_dim = REAL_SHAPED[cls_name]
    c = Eagle3Config.from_target(tc, (2, 4, 6), draft_vocab_size=32000)
    assert (c.vocab_size, c.intermediate_size, c.head_dim, c.draft_vocab_size) == (vocab, mlp, head_dim, 32000)
    RotaryEmbedding(c.target_config, c.head_dim)  # the draft's rope builds from the family's rope fields
    # a 32k draft vocabulary over ids past 65,535 (stored as uint32 top-k ids): maps and coverage stay exact
    counts = np.zeros(vocab, dtype=np.int64)
    counts[vocab - 32000:] = 5  # the most frequent tokens are the highest ids
    d2t, t2d, coverage = build_draft_vocab(counts, 32000)
    top = torch.tensor([vocab - 1, vocab - 32000, 70000 if vocab - 32000 > 70000 else 0])
    assert coverage == 1.0 and t2d[vocab - 1] and int(t2d.sum()) == 32000
    assert target_to_draft(top, d2t, vocab).tolist()[:2] == [31999, 0]
    ids = torch.tensor([[vocab - 1], [vocab - 2], [3], [vocab - 3]], dtype=torch.int64)
    reader = _Reader([{"topk_ids": ids, "loss_mask": torch.tensor([0, 1, 1, 1], dtype=torch.bool)}])
    assert prediction_coverage(reader, t2d) == pytest.approx(2 / 3)


# ---- points 2 and 3: rope -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["phi3", "phi3_longrope", "llama", "qwen3"])
def test_partial_rotary_matches_the_target(models, family):
    """The draft rotates ``int(head_dim * partial_rotary_factor)`` dims exactly as the target (and vLLM) do."""
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    target = model_of(models, family)
    tc = target.config.to_dict()
    c = Eagle3Config.from_target(tc, AUX)
    rot = RotaryEmbedding(c.target_config, c.head_dim)
    pos = torch.arange(40)[None]
    x = torch.randn(1, 40, 64)
    cos_t, sin_t = target.model.rotary_emb(x, pos)
    cos, sin = rot(pos)
    factor = tc.get("partial_rotary_factor") or tc["rope_parameters"].get("partial_rotary_factor") or 1.0
    assert cos.shape[-1] == int(c.head_dim * factor)
    torch.testing.assert_close(cos, cos_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sin, sin_t, rtol=1e-5, atol=1e-6)
    q, k = torch.randn(1, 4, 40, c.head_dim), torch.randn(1, 2, 40, c.head_dim)
    q_t, k_t = apply_rotary_pos_emb(q, k, cos_t, sin_t)
    torch.testing.assert_close(apply_rope(q, cos, sin), q_t)
    torch.testing.assert_close(apply_rope(k, cos, sin), k_t)
    # the export says what was trained: vLLM's get_rope reads partial_rotary_factor from rope_parameters
    params = rope_parameters(c.target_config)
    assert params.get("partial_rotary_factor", 1.0) == factor


def test_gemma3_draft_uses_the_full_attention_rope(models, tmp_path):
    target = model_of(models, "gemma3_text")
    tc = json.loads(json.dumps(target.config.to_dict()))
    c = Eagle3Config.from_target(tc, AUX, draft_vocab_size=128)
    rot = RotaryEmbedding(c.target_config, c.head_dim)
    torch.testing.assert_close(rot.inv_freq, target.model.rotary_emb.full_attention_inv_freq)
    assert rot.attention_scaling == target.model.rotary_emb.full_attention_attention_scaling
    model = Eagle3Draft(c)
    out = json.loads((export_draft(model, None, tmp_path / "e3") / "config.json").read_text())
    assert out["rope_parameters"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}
    assert out["rope_theta"] == 1000000.0 and "sliding_attention" not in json.dumps(out["rope_parameters"])


def test_deepseek_yarn_attention_factor_is_written():
    """vLLM versions differ in how generic yarn reads DeepSeek's mscale: the export writes the factor trained with."""
    tc = cfg_dict("deepseek_v3")
    c = Eagle3Config.from_target(tc, AUX, draft_vocab_size=128)
    rot = RotaryEmbedding(c.target_config, c.head_dim)
    from pipeline.draft.export import rope_config_fields

    fields = rope_config_fields(c.target_config)
    assert fields["rope_parameters"]["attention_factor"] == pytest.approx(rot.attention_scaling)
    assert fields["rope_scaling"]["attention_factor"] == pytest.approx(rot.attention_scaling)


# ---- point 4: Gemma's norm, softcapping, embeddings --------------------------------------------------------------


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "llama"])
def test_gemma_norm_softcap_and_embedding(models, family):
    target = model_of(models, family)
    tc = json.loads(json.dumps(target.config.to_dict()))
    weights = target_weights(target)
    ids = torch.randint(0, V, (1, 12))
    out = target(ids, output_hidden_states=True)
    # the target's logits from its lm_head input, with Gemma-2's final softcapping
    logits = target_logits(out.hidden_states[-1][0], weights["lm_head.weight"], tc)
    torch.testing.assert_close(logits, out.logits[0].float(), rtol=1e-5, atol=1e-5)
    # --head-init target: the draft's Llama norm computes the target's (1 + w) norm
    head = Eagle3Draft(Eagle3Config.from_target(tc, AUX, draft_vocab_size=V))
    head.load_target_weights(weights)
    head.init_head_from_target(weights)
    x = torch.randn(3, 64)
    torch.testing.assert_close(head.norm(x), target.model.norm(x), rtol=1e-5, atol=1e-5)
    assert norm_weight_offset(tc) == (0.0 if family == "llama" else 1.0)
    # the draft embeds with the raw table: what vLLM's drafts get from the target's shared embed_tokens module
    # (Gemma multiplies by sqrt(H) in its model's forward, outside that module)
    torch.testing.assert_close(head.embed_tokens(ids), target.model.embed_tokens.weight[ids])


def test_full_target_objective_uses_the_softcapped_logits(models):
    from pipeline.draft.eagle3 import _step_target

    target = model_of(models, "gemma2")
    head = tiny_draft(target, "eagle3", AUX)
    head.load_target_weights(target_weights(target), target_head=True)
    ids = torch.randint(0, V, (1, 10))
    out = target(ids, output_hidden_states=True)
    batch = {"hidden_last": out.hidden_states[-1]}
    arg, draft_ids, p = _step_target(head, batch, 0, "full")
    used = torch.arange(head.d2t.shape[0]) + head.d2t  # the draft vocabulary in target ids
    want = torch.softmax(out.logits[0, 1:, used].float(), -1)  # row t + 1, softcapped by the target itself
    assert draft_ids is None
    torch.testing.assert_close(p[0, :9], want, rtol=1e-4, atol=1e-5)
    assert torch.equal(arg[0, :9], out.logits[0, 1:].argmax(-1))


# ---- point 5: EAGLE-3 with no target prediction in its vocabulary --------------------------------------------------


class _Reader:
    def __init__(self, samples):
        self.samples = samples

    has = {"topk_ids", "loss_mask"}

    def __len__(self):
        return len(self.samples)

    def sample(self, i, fields=None):
        return self.samples[i]


def test_eagle3_refuses_a_vocabulary_holding_no_target_prediction():
    mask = torch.tensor([0, 1, 1, 1, 1], dtype=torch.bool)
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[:10] = True
    outside = {"topk_ids": torch.full((5, 4), 50), "loss_mask": mask}
    with pytest.raises(TargetConfigError, match="draft vocabulary.*regenerate"):
        prediction_coverage(_Reader([outside, outside]), t2d)
    inside = {"topk_ids": torch.tensor([[3], [50], [4], [5], [6]]), "loss_mask": mask}
    assert prediction_coverage(_Reader([inside]), t2d) == pytest.approx(3 / 4)  # rows 0..3 predict tokens 1..4
    # stores without top-k ids (--target full): the argmax of the target's lm_head over hidden_last
    g = torch.Generator().manual_seed(0)
    head, hidden = torch.randn(V, 8, generator=g), torch.randn(5, 8, generator=g)
    full = _Reader([{"hidden_last": hidden, "loss_mask": mask}])
    full.has = {"hidden_last", "loss_mask"}
    assert prediction_coverage(full, t2d) == -1.0  # no lm_head given: not measured
    hot = torch.zeros(V, dtype=torch.bool)
    hot[(hidden[:-1] @ head.T).argmax(-1)] = True
    assert prediction_coverage(full, hot, head) == 1.0
    with pytest.raises(TargetConfigError, match="draft vocabulary"):
        prediction_coverage(full, ~hot, head)


# ---- point 1: the evaluator on every family (sliding windows, eager-only attention) --------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_random_heads_are_lossless_past_the_window(models, family):
    """Greedy chain decoding of 40 tokens (past the 16-position windows) equals the target's own; trees too
    while the window holds every position, and past it a one-line refusal instead of a wrong answer."""
    target = model_of(models, family)
    g = torch.Generator().manual_seed(3)
    windowed = getattr(target.config, "sliding_window", None) is not None and family not in ("qwen2", "qwen3")
    for variant in ("eagle1", "eagle3"):
        drafter = Drafter(tiny_draft(target, variant, AUX, draft_vocab_size=V // 2, seed=2))
        prompt = torch.randint(3, V, (6,), generator=g)
        plain = target_generate(target, prompt, 40, set())
        assert speculative_generate(target, drafter, prompt, CHAIN, 40, set()).tokens == plain.tokens
        short = target_generate(target, prompt, WINDOW - 6 - TREE.total_tokens - 1, set())
        assert speculative_generate(target, drafter, prompt, TREE, len(short.tokens), set()).tokens == short.tokens
        if windowed:
            with pytest.raises(TargetError, match="sliding window"):
                speculative_generate(target, drafter, prompt, TREE, 40, set())


@pytest.mark.parametrize("family", ["mistral_window", "gemma3_text", "gpt_oss", "phi3"])
def test_fitted_heads_are_accepted_and_lossless(models, family):
    """Heads fitted to the target's own greedy continuations: accepted drafts, partial acceptances compact the
    caches (sliding ones included) and the output stays the target's."""
    target = model_of(models, family)
    prompts = torch.randint(3, V, (8, 4), generator=torch.Generator().manual_seed(0))
    seqs = greedy_continuations(target, prompts, 36)
    for variant in ("eagle1", "eagle3"):
        head = tiny_draft(target, variant, AUX, seed=1)
        fit_draft(head, target, seqs, steps=120, lr=1e-2, ttt_steps=2)
        drafter = Drafter(head)
        accepted = forwards = 0
        for i in range(3):
            spec = speculative_generate(target, drafter, prompts[i], CHAIN, 36, set())
            assert spec.tokens == target_generate(target, prompts[i], 36, set()).tokens
            accepted += spec.decode_tokens - spec.target_forwards
            forwards += spec.target_forwards
        assert accepted > forwards // 2, (family, variant, accepted, forwards)  # tau > 1.5


@pytest.mark.parametrize("family", ["gpt_oss", "gemma2", "llama"])
def test_load_target_picks_an_attention_the_family_supports(tmp_path, family, smollm2_tokenizer):
    model = family_model(family, len(smollm2_tokenizer), layers=2)
    model.save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_target(tmp_path)
    assert loaded.config._attn_implementation in ("sdpa", "eager")
    assert loaded.config._attn_implementation == ("eager" if family == "gpt_oss" else "sdpa")


# ---- the family matrix: extract -> verify -> train both heads -> export both formats -> lossless eval ------------

MATRIX = sorted(FAMILIES)
WINDOWED = {"mistral_window", "gemma2", "gemma3_text", "gpt_oss"}
RECORDS, NEW, STEPS = 2, 32, 60  # records regenerated, answer tokens regenerated / evaluated, steps per head
MATRIX_REPORT = LIVE_REPORT  # the closing summary lists every cell's tau


def run_cli(*args: str) -> str:
    from click.testing import CliRunner

    from pipeline.cli import main

    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, f"pipeline {' '.join(map(str, args))}\n{res.output}"
    return res.output


@pytest.mark.parametrize("family", MATRIX)
def test_family_matrix(tmp_path, smollm2_tokenizer, family):
    """A tiny random ``family`` target with SmolLM2's tokenizer through every stage, as a user runs them: its own
    answers to 2 ShareGPT records (regenerate), extract, verify, both heads trained on them, exported in both
    formats, evaluated on the first of those prompts. The eval's greedy output must equal the target's own (0
    mismatches), in chain mode past the sliding windows and, for families without one, in tree mode too; the
    heads' drafts must be accepted."""
    model_dir = tmp_path / "target"
    family_model(family, len(smollm2_tokenizer), layers=8, init_std=0.1).save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    regen, store = tmp_path / "regen.jsonl", tmp_path / "store"
    run_cli("regenerate", "--model", model_dir, "--out", regen, "--limit", RECORDS, "--max-new-tokens", NEW,
            "--max-length", 256, "--device", "cpu", "--no-progress")
    run_cli("extract", "--model", model_dir, "--data", regen, "--out", store, "--max-length", 256, "--top-k", 4,
            "--shard-size", 3, "--no-progress")
    run_cli("verify", store)
    first = json.loads(regen.read_text().splitlines()[0])["messages"]
    user = next(i for i, m in enumerate(first) if m["role"] == "user")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": first[:user + 1]}) + "\n")
    for variant in ("eagle1", "eagle3"):
        run = tmp_path / variant
        run_cli("train", "--feats", store, "--variant", variant, "--out", run, "--max-steps", STEPS, "--lr", 1e-2,
                "--tokens-per-batch", 512, "--draft-vocab-size", 2048, "--ttt-steps", 2, "--val-fraction", 0,
                *(("--head-init", "target") if variant == "eagle3" else ()), "--no-progress")
        if variant == "eagle3":  # the run records the share of target predictions its vocabulary holds
            draft = json.loads((run / "config.json").read_text())["draft"]
            assert 0.0 < draft["draft_vocab_prediction_coverage"] <= 1.0
        formats = ("vllm", "speculators") if variant == "eagle3" else ("vllm",)
        for fmt in formats:
            out = tmp_path / f"{variant}-{fmt}"
            run_cli("export", run, "--format", fmt, "--out", out, "--dtype", "fp32")
            cfg = json.loads((out / "config.json").read_text())
            body = cfg.get("transformer_layer_config", cfg)
            assert body["hidden_act"] == "silu" and "sliding_attention" not in json.dumps(body["rope_parameters"])
        modes = ("chain",) if family in WINDOWED else ("chain", "tree")
        for mode in modes:
            report = tmp_path / f"{variant}-{mode}.json"
            run_cli("eval", "--draft", tmp_path / f"{variant}-vllm", "--prompts", prompts, "--mode", mode,
                    "--depth", 3, "--top-k", 2, "--total-tokens", 6, "--max-new-tokens", NEW, "--policy", "fixed",
                    "--linears", "stock", "--baselines", "", "--report", report, "--no-progress")
            rep = json.loads(report.read_text())
            MATRIX_REPORT.append(f"families: {family} {variant} {mode}: tau {rep['acceptance_length']:.2f}, "
                                 f"mismatches {rep['mismatches']}")
            assert rep["mismatches"] == 0 and rep["turns"] == 1, (family, variant, mode)
            assert rep["acceptance_length"] > 1.0, (family, variant, mode, rep["acceptance_length"])
            if family in WINDOWED:
                assert rep["prompts"][0]["prompt_tokens"] + NEW > WINDOW  # the decoding crossed the window


def test_train_refuses_eagle3_on_answers_that_are_not_the_targets(tmp_path, smollm2_tokenizer):
    """ShareGPT's own answers through a random Qwen3-MoE target whose argmaxes never fall among the data's 2,048
    most frequent tokens: `pipeline train --variant eagle3` stops with one `error:` line before any step."""
    from click.testing import CliRunner

    from pipeline.cli import main

    model_dir, store, run = tmp_path / "target", tmp_path / "store", tmp_path / "run"
    family_model("qwen3_moe", len(smollm2_tokenizer), layers=8, init_std=0.1).save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    run_cli("extract", "--model", model_dir, "--out", store, "--limit", 6, "--max-length", 128, "--top-k", 4,
            "--shard-size", 3, "--no-progress")
    res = CliRunner().invoke(main, ["train", "--feats", str(store), "--variant", "eagle3", "--out", str(run),
                                    "--max-steps", "2", "--draft-vocab-size", "2048", "--no-progress"])
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "none of the target's next-token argmaxes" in lines[0] and "--draft-vocab-size" in lines[0]
    assert not (run / "final").exists() and not (run / "metrics.jsonl").exists()

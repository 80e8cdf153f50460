"""The vLLM-independent halves of the vLLM backend: connector files, layer/norm mapping, prompt-logprob top-k."""

from __future__ import annotations

import fcntl
import os
import threading
import time

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from vllm_replay import (
    ReplayLogprob,
    _as_dicts,
    _as_flat,
    _columns,
    connector_file_name,
    write_connector_file,
    write_replay,
)

from pipeline.extract import vllm_connector as vc
from pipeline.extract.vllm_logprobs import LogprobFormatError, position_topk, store_topk

N = 8  # layers of the tiny test model


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt(smollm2_tokenizer) -> list[int]:
    return smollm2_tokenizer.encode("The quick brown fox jumps over the lazy dog, twice.")


def hf_forward(model, ids: list[int]):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), output_hidden_states=True)


# ---------------------------------------------------------------------------------------------------- files


def test_connector_file_layout_and_mapping_match_hf(tiny_llama_dir, tiny_model, prompt, tmp_path):
    layer_ids = vc.vllm_layer_ids([5, 0, 2, 2], N, want_last=True, want_aux=True)
    assert layer_ids == [0, 2, 5, N]  # sorted and unique: the order vLLM stacks them in
    write_replay(tiny_llama_dir, [prompt], tmp_path, layer_ids, top_k=4)
    (path,) = tmp_path.glob("*.safetensors")
    with safe_open(str(path), framework="pt") as f:  # exactly the connector's two tensors
        assert set(f.keys()) == {"hidden_states", "token_ids"}
        assert tuple(f.get_slice("hidden_states").get_shape()) == (len(prompt), 4, 64)
    hidden, token_ids = vc.read_connector_file(path)
    assert token_ids.dtype == torch.int64 and token_ids.tolist() == prompt

    hs = hf_forward(tiny_model, prompt).hidden_states
    # vLLM layer id i < N is HF hidden_states[i] (the input of decoder layer i) as is
    for j, lid in enumerate(layer_ids[:-1]):
        torch.testing.assert_close(hidden[:, j], hs[lid][0], atol=0, rtol=0)
    # layer N is pre-norm in vLLM: it is not HF's last entry until the final norm is applied
    assert not torch.allclose(hidden[:, -1], hs[N][0], atol=1e-3)
    norm_w = tiny_model.model.norm.weight.detach()
    eps = vc.final_norm_eps(tiny_model.config.to_dict())
    out = vc.map_to_store(hidden, layer_ids, [5, 0, N], N, True, True, norm_w, eps, torch.float32)
    torch.testing.assert_close(out["hidden_last"], hs[N][0], atol=0, rtol=0)  # same ops as LlamaRMSNorm
    # aux indices keep the store's order; aux index N means HF's post-norm entry too
    for j, a in enumerate([5, 0, N]):
        torch.testing.assert_close(out["hidden_aux"][:, j], hs[a][0], atol=0, rtol=0)
    only_aux = vc.map_to_store(hidden, layer_ids, [2], N, False, True, None, None, torch.bfloat16)
    assert set(only_aux) == {"hidden_aux"} and only_aux["hidden_aux"].dtype == torch.bfloat16


def test_rms_norm_matches_hf_in_bf16():
    torch.manual_seed(0)
    ref = LlamaRMSNorm(96, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(96) * 0.1 + 1)
    x = (torch.randn(7, 96) * 5).to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(vc.rms_norm(x, ref.weight, 1e-6), ref(x), atol=0, rtol=0)


def test_layer_id_validation_and_unsupported_norms():
    assert vc.vllm_layer_ids([2, 4], N, want_last=False, want_aux=True) == [2, 4]
    assert vc.vllm_layer_ids([2, 4], N, want_last=True, want_aux=False) == [N]
    with pytest.raises(ValueError, match="outside"):
        vc.vllm_layer_ids([9], N, want_last=False, want_aux=True)
    with pytest.raises(ValueError, match="gemma"):
        vc.final_norm_eps({"model_type": "gemma2", "rms_norm_eps": 1e-6})
    with pytest.raises(ValueError, match="rms_norm_eps"):
        vc.final_norm_eps({"model_type": "gpt2", "layer_norm_epsilon": 1e-5})
    hidden = torch.zeros(3, 2, 4)
    with pytest.raises(ValueError, match="not extracted"):
        vc.map_to_store(hidden, [2, 4], [3], N, False, True, None, None, torch.float32)
    with pytest.raises(ValueError, match="2 layers"):
        vc.map_to_store(torch.zeros(3, 3, 4), [2, 4], [2], N, False, True, None, None, torch.float32)


def test_reader_waits_for_the_writers_lock(tmp_path):
    path = tmp_path / connector_file_name("req-0-abcd1234")
    lock = path.with_name(path.name + vc.LOCK_SUFFIX)
    fd = os.open(lock, os.O_CREAT | os.O_WRONLY, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what vLLM 0.33's worker holds until its async write is done

    def writer():
        time.sleep(0.3)
        write_connector_file(path, torch.ones(2, 1, 3), [5, 6])
        os.close(fd)

    t = threading.Thread(target=writer)
    t0 = time.monotonic()
    t.start()
    hidden, ids = vc.read_connector_file(path)
    t.join()
    assert time.monotonic() - t0 >= 0.25 and ids.tolist() == [5, 6] and hidden.shape == (2, 1, 3)
    # a writer that never lets go is a clear error, not a hang
    fd = os.open(lock, os.O_WRONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(vc.ConnectorFileError, match="still holds the lock"):
            vc.read_connector_file(path, lock_timeout_s=0.2)
    finally:
        os.close(fd)
    vc.remove_connector_file(path)
    assert not path.exists() and not lock.exists()


def test_bad_files_are_reported(tmp_path):
    with pytest.raises(vc.ConnectorFileError, match="missing"):
        vc.read_connector_file(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(vc.ConnectorFileError, match="unreadable"):
        vc.read_connector_file(bad)
    from safetensors.torch import save_file

    save_file({"hidden_states": torch.zeros(3, 2, 4), "token_ids": torch.zeros(2, dtype=torch.int64)}, str(bad))
    with pytest.raises(vc.ConnectorFileError, match=r"\[T, n_layers, H\]"):
        vc.read_connector_file(bad)
    save_file({"hidden": torch.zeros(3, 2, 4)}, str(bad))
    with pytest.raises(vc.ConnectorFileError, match="no tensor"):
        vc.read_connector_file(bad)


# ---------------------------------------------------------------------------------------------------- logprobs


def vllm_logprobs(lp: torch.Tensor, ids: list[int], k: int) -> tuple[list, int, list]:
    """(prompt_logprobs columns, sampled token, sample columns) as vLLM's engine computes them."""
    prompt = [None] + [_columns(lp[t - 1], ids[t], k) for t in range(1, len(ids))]
    sampled = int(lp[-1].argmax())
    return prompt, sampled, [_columns(lp[-1], sampled, k)]


@pytest.mark.parametrize("flat", [False, True])
def test_prompt_logprobs_give_the_hf_topk(tiny_model, prompt, flat):
    k = 6
    lp = torch.log_softmax(hf_forward(tiny_model, prompt).logits[0].float(), -1)
    # make some prompt tokens land inside the top-k (k entries per position) and others outside (k + 1)
    ids = list(prompt)
    for t in (2, 5):
        ids[t] = int(lp[t - 1].argmax())
    lp = torch.log_softmax(hf_forward(tiny_model, ids).logits[0].float(), -1)
    ref_v, ref_i = lp.topk(k, -1)
    prompt_cols, sampled, sample_cols = vllm_logprobs(lp, ids, k)
    convert = _as_flat if flat else _as_dicts
    prompt_lp, sample_lp = convert(prompt_cols), convert(sample_cols)
    if not flat:
        sizes = [len(d) for d in prompt_lp[1:]]
        assert sizes[1] == k and sizes[4] == k and k + 1 in sizes  # both shapes of vLLM's dicts occur
    values, topk_ids = store_topk(ids, prompt_lp, sampled, sample_lp, k)
    assert values.dtype == torch.float32 and topk_ids.dtype == torch.int32 and values.shape == (len(ids), k)
    torch.testing.assert_close(values, ref_v, atol=0, rtol=0)
    assert torch.equal(topk_ids, ref_i.to(torch.int32))


def test_alignment_row_t_is_entry_t_plus_1():
    # Prompt [10, 11, 12]; k = 1. Entry t predicts token t; store row r predicts token r + 1.
    prompt_lp = [None,
                 {11: ReplayLogprob(-0.5, 1)},                              # row 0 (given token 10): top is 11
                 {12: ReplayLogprob(-3.0, 7), 40: ReplayLogprob(-0.1, 1)}]  # row 1: 12 is outside the top-1
    sample_lp = [{50: ReplayLogprob(-0.2, 1)}]                              # row 2: after the whole prompt  # fmt: skip
    values, ids = store_topk([10, 11, 12], prompt_lp, 50, sample_lp, 1)
    assert ids.flatten().tolist() == [11, 40, 50]
    assert values.flatten().tolist() == pytest.approx([-0.5, -0.1, -0.2])
    # a one-token sample has only the generated position
    values, ids = store_topk([10], [None], 50, sample_lp, 1)
    assert ids.tolist() == [[50]]


def test_ties_and_json_round_trips():
    # The actual token ties with the k-th entry but torch.topk picked the other one: k + 1 entries, same value.
    lp = torch.log_softmax(torch.tensor([3.0, 1.0, 1.0, 0.0]), -1)
    cols = _columns(lp, 2, 2)
    assert [c[0] for c in cols] == [2, 0, 1] and cols[0][2] == 3  # vLLM's rank counts >=, so the tie ranks 3
    v, i = position_topk(_as_dicts([cols])[0], 2, 2)
    assert i == [0, 1] and v == pytest.approx(lp[[0, 1]].tolist())
    # JSON keys are strings and Logprob objects plain dicts after a round trip; both are accepted
    as_json = {str(t): {"logprob": x, "rank": r} for t, x, r in cols}
    assert position_topk(as_json, 2, 2)[1] == [0, 1]


def test_malformed_logprobs_are_rejected():
    sample = [{5: ReplayLogprob(-0.1, 1)}]
    with pytest.raises(LogprobFormatError, match="prompt_logprobs="):
        store_topk([1, 2], None, 5, sample, 1)
    with pytest.raises(LogprobFormatError, match="2 prompt_logprobs entries for 3"):
        store_topk([1, 2, 3], [None, {2: ReplayLogprob(-1.0, 1)}], 5, sample, 1)
    with pytest.raises(LogprobFormatError, match="should be None"):
        store_topk([1, 2], [{1: ReplayLogprob(-1.0, 1)}, {2: ReplayLogprob(-1.0, 1)}], 5, sample, 1)
    with pytest.raises(LogprobFormatError, match="expected 2 or 3"):  # asked for k=2, engine gave k=4
        store_topk([1, 2], [None, {i: ReplayLogprob(-1.0, i) for i in range(1, 6)}], 5, sample, 2)
    with pytest.raises(LogprobFormatError, match="generated token"):
        store_topk([1, 2], [None, {2: ReplayLogprob(-1.0, 1)}], 5, [], 1)
    with pytest.raises(LogprobFormatError, match="not one of them"):
        position_topk({7: ReplayLogprob(-1.0, 1), 8: ReplayLogprob(-2.0, 2)}, 9, 1)
    flat = _as_flat([None, [[3, -2.0, 2], [4, -1.0, 1]]])
    with pytest.raises(LogprobFormatError, match="first column is token 3"):
        store_topk([1, 2], flat, 5, _as_flat([[[5, -0.1, 1], [5, -0.1, 1]]]), 1)

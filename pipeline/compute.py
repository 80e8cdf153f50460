"""Rules every stage computes by: which device, which dtype "auto" means, the Llama RMSNorm.

Extraction, regeneration, training and evaluation each choose a device and a compute precision; they choose the
same way, written once here (this module imports only torch, so any stage may use it).
"""

from __future__ import annotations

import torch


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU; anything else as torch names it."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def auto_precision(device: torch.device) -> str:
    """What ``auto`` precision means on ``device``: ``bf16`` on a GPU, ``fp32`` elsewhere (bf16 matmuls are ~500x
    slower than fp32 on CPUs without native bf16; low precision stays a storage format there)."""
    return "bf16" if device.type == "cuda" else "fp32"


PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def compute_dtype_name(requested: str, device: torch.device) -> str:
    """The torch dtype name a model computes in: ``requested`` (a torch name such as ``float32``), or for ``auto``
    the device's :func:`auto_precision`."""
    return PRECISION_DTYPES[auto_precision(device)] if requested == "auto" else requested


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps)`` over the last dim, computed in fp32 and returned in ``x``'s dtype (HF
    ``LlamaRMSNorm`` before its weight)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

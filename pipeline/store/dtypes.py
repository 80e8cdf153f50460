"""Storage dtypes: logical dtype names, casts to and from the stored bits, fp8 rows with their scales, codecs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.store.errors import StoreError

# Logical dtype name -> (zarr/numpy storage dtype, torch dtype).  bf16 and fp8 have no numpy dtype: their bits go
# in uint16 / uint8.
FP8 = "float8_e4m3fn"
HIDDEN_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float16": (np.dtype(np.float16), torch.float16),
    "bfloat16": (np.dtype(np.uint16), torch.bfloat16),
    "float32": (np.dtype(np.float32), torch.float32),
    FP8: (np.dtype(np.uint8), torch.float8_e4m3fn),
}
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_SUFFIX = "_scale"  # fp8 fields carry one fp32 scale per token row (per aux layer) in "<field>_scale"
LOGPROB_DTYPES = ("float32", "float16")


CODECS = ("none", "zstd", "blosc")


def storage_dtype(logical: str) -> np.dtype:
    if logical in HIDDEN_DTYPES:
        return HIDDEN_DTYPES[logical][0]
    return np.dtype(logical)


def topk_ids_dtype(vocab_size: int) -> str:
    """Format 2 stores top-k ids as uint16 when every id fits (vocab <= 65,536), else int32."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def quantize_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row float8_e4m3fn: ``(q, scale)`` with ``t ~= q.float() * scale[..., None]`` and
    ``scale = max|row| / 448`` in fp32 (1 for all-zero rows). A row holding NaN/inf gets a non-finite scale."""
    x = t.detach().float()
    amax = x.abs().amax(-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (x / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


@dataclass
class Fp8Rows:
    """Hidden rows already quantized by :func:`quantize_fp8` where they were computed (the GPU), so that one byte
    per value crosses to the host; ``ShardWriter.append`` takes them in place of a float tensor."""

    q: torch.Tensor  # float8_e4m3fn [..., H]
    scale: torch.Tensor  # fp32 [...]

    @classmethod
    def quantize(cls, t: torch.Tensor) -> Fp8Rows:
        return cls(*quantize_fp8(t))

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def is_floating_point(self) -> bool:
        return True

    def to(self, *args, **kwargs) -> Fp8Rows:
        return Fp8Rows(self.q.to(*args, **kwargs), self.scale.to(*args, **kwargs))


# e4m3 bits -> fp32 value: a 256-entry table gathers ~4x faster than torch's fp8 -> fp32 cast on the CPU
_FP8_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()


def dequantize_fp8(q: np.ndarray, scale: np.ndarray) -> torch.Tensor:
    """Stored fp8 bits (uint8) and their row scales -> fp32 values (exactly ``float(e4m3) * scale``)."""
    values = _FP8_VALUES[q]  # a new array: the rows may be a read-only memmap or cached chunk
    np.multiply(values, np.asarray(scale)[..., None], out=values)
    return torch.from_numpy(values)


def encode_field(name: str, t: torch.Tensor | Fp8Rows, logical: str) -> dict[str, np.ndarray]:
    """The stored arrays of one field of one sample: itself, plus ``<name>_scale`` for fp8."""
    if logical == FP8:
        q, scale = (t.q.cpu(), t.scale.cpu()) if isinstance(t, Fp8Rows) else quantize_fp8(t.cpu())
        return {name: q.view(torch.uint8).numpy(), name + SCALE_SUFFIX: scale.numpy()}
    if logical == "uint16" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= 1 << 16):
        raise StoreError(f"{name}: ids outside [0, 65536) cannot be stored as uint16")
    return {name: to_storage(t, logical)}


def to_storage(t: torch.Tensor, logical: str) -> np.ndarray:
    """Cast a tensor to its storage dtype and return the numpy array holding exactly the stored bytes."""
    if logical == "bfloat16":
        return t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    if logical in HIDDEN_DTYPES:
        return t.detach().to("cpu", HIDDEN_DTYPES[logical][1]).contiguous().numpy()
    return t.detach().cpu().numpy().astype(logical, copy=False)


def from_storage(a: np.ndarray, logical: str) -> torch.Tensor:
    """Stored numpy rows -> torch tensor of the logical dtype (one copy; the input may be a read-only memmap).
    uint16 ids come back as int32 (torch supports few operations on uint16)."""
    if logical == "uint16":
        return torch.from_numpy(a.astype(np.int32))
    t = torch.from_numpy(np.array(a, copy=True))
    if logical == "bfloat16":
        return t.view(torch.bfloat16)
    return t


def _compressors(codec: str, itemsize: int) -> Any:
    from zarr.codecs import BloscCodec, ZstdCodec

    if codec == "none":
        return None
    if codec == "zstd":
        return ZstdCodec(level=3)
    if codec == "blosc":
        return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle" if itemsize <= 2 else "shuffle",
                          typesize=itemsize)  # fmt: skip
    raise StoreError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


def _finite(arr: np.ndarray, logical: str) -> bool:
    if logical == "bfloat16":  # exponent bits all ones = inf or nan
        return not bool(((arr & 0x7F80) == 0x7F80).any())
    if logical == FP8:  # e4m3fn has no inf; NaN is S.1111.111 (its row scale is non-finite too)
        return not bool(((arr & 0x7F) == 0x7F).any())
    return bool(np.isfinite(arr).all())


_PRECISION = {"float32": 3, "float16": 2, "bfloat16": 2, FP8: 1}

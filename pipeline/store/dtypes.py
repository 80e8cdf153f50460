"""Storage dtypes: logical dtype names, casts to and from the stored bits, scaled rows (fp8, int7, q19), codecs."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from pipeline.store.errors import StoreError

# Logical dtype name -> (zarr/numpy storage dtype, torch dtype).  bf16 and fp8 have no numpy dtype: their bits go
# in uint16 / uint8.
FP8 = "float8_e4m3fn"
# 7-bit symmetric integer codes (-63..63) with one fp32 scale per row, stored zigzag (0, -1, 1, -2, ... -> 0, 1, 2,
# 3, ...) in a byte so that the small magnitudes that dominate a projected row have zero high bits: bit-shuffled
# zstd then stores them in about as many bits as their entropy (bench/store.py (g)).
INT7 = "int7"
INT7_MAX = 63
# 19 levels (codes -9..9), stored the same way: format 5's default for a projected hidden_aux, whose components are
# divided by their calibration scale first (projection.py), so that one row step suits every component
Q19 = "q19"
CODE_MAX = {INT7: INT7_MAX, Q19: 9}
HIDDEN_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float16": (np.dtype(np.float16), torch.float16),
    "bfloat16": (np.dtype(np.uint16), torch.bfloat16),
    "float32": (np.dtype(np.float32), torch.float32),
    FP8: (np.dtype(np.uint8), torch.float8_e4m3fn),
    INT7: (np.dtype(np.uint8), torch.uint8),
    Q19: (np.dtype(np.uint8), torch.uint8),
}
SCALED = (FP8, INT7, Q19)  # dtypes stored as one byte per value + an fp32 scale per row in "<field>_scale"
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_SUFFIX = "_scale"  # scaled fields carry one fp32 scale per token row (per aux layer) in "<field>_scale"
LOGPROB_DTYPES = ("float32", "float16")


# "auto": per array, the codec that stored it smallest on SmolLM2 (bench/store.py (b)): bit-shuffled zstd (blosc)
# for int7/q19 codes and fp16 log-probs, zstd for the rest
CODECS = ("auto", "none", "zstd", "blosc")


def storage_dtype(logical: str) -> np.dtype:
    if logical in HIDDEN_DTYPES:
        return HIDDEN_DTYPES[logical][0]
    return np.dtype(logical)


def topk_ids_dtype(vocab_size: int) -> str:
    """Format 2 stores top-k ids as uint16 when every id fits (vocab <= 65,536), else int32."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def _row_scale(t: torch.Tensor, top: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t in fp32, max|row| / top)``, the scale 1 for all-zero rows."""
    x = t.detach().float()
    amax = x.abs().amax(-1)
    return x, torch.where(amax > 0, amax / top, torch.ones_like(amax))


def aux_dtype_for(aux_dtype: str | None, projected: bool, hidden_dtype: str, scaled: bool = True) -> str:
    """``hidden_aux``'s stored dtype: "auto" is q19 when projected with a component scale (``scaled``: format 5), int7
    when projected without one (a format 3-4 projection), else the hidden dtype (None: the hidden dtype)."""
    if aux_dtype == "auto":
        return (Q19 if scaled else INT7) if projected else hidden_dtype
    return aux_dtype or hidden_dtype


def check_hidden_dtype(name: str, flag: str, error: type[Exception] = StoreError) -> None:
    """``hidden_last`` (and a whole ``hidden_aux`` by default) takes every hidden dtype but the integer codes."""
    if name not in HIDDEN_DTYPES or name in CODE_MAX:
        raise error(f"{flag} {name!r}: choose one of {', '.join(d for d in HIDDEN_DTYPES if d not in CODE_MAX)}")


def quantize_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row float8_e4m3fn: ``(q, scale)`` with ``t ~= q.float() * scale[..., None]`` and
    ``scale = max|row| / 448`` in fp32 (1 for all-zero rows). A row holding NaN/inf gets a non-finite scale."""
    x, scale = _row_scale(t, FP8_MAX)
    q = (x / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def quantize_int7(t: torch.Tensor, top: int = INT7_MAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int7: ``(zigzag codes uint8, scale)`` with ``t ~= code_value * scale[..., None]``, ``scale = max|row|
    / top`` in fp32 (1 for all-zero rows), codes in ``-top..top``. A non-finite value gets code 127, which holds no
    value (quarantined)."""
    x, scale = _row_scale(t, top)
    q = torch.round(x / scale[..., None]).clamp(-top, top)
    code = torch.where(q >= 0, 2 * q, -2 * q - 1)
    return torch.where(torch.isfinite(code), code, 2 * INT7_MAX + 1).to(torch.uint8), scale


# q19: int7's zigzag codes limited to -9..9 (scale = max|row| / 9)
QUANTIZERS = {FP8: quantize_fp8, INT7: quantize_int7, Q19: partial(quantize_int7, top=CODE_MAX[Q19])}


@dataclass
class ScaledRows:
    """Hidden rows already quantized (fp8 or int7, one scale per row) where they were computed (the GPU), so that
    one byte per value crosses to the host; ``ShardWriter.append`` takes them in place of a float tensor."""

    q: torch.Tensor  # float8_e4m3fn or uint8 int7/q19 codes [..., H]
    scale: torch.Tensor  # fp32 [...]

    @classmethod
    def quantize(cls, t: torch.Tensor, logical: str = FP8) -> ScaledRows:
        return cls(*QUANTIZERS[logical](t))

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def is_floating_point(self) -> bool:
        return True

    def to(self, *args, **kwargs) -> ScaledRows:
        return ScaledRows(self.q.to(*args, **kwargs), self.scale.to(*args, **kwargs))


# stored byte -> fp32 value: a 256-entry table gathers ~4x faster than torch's fp8 -> fp32 cast on the CPU. int7
# (q19): zigzag codes 0..126 (0..18), NaN for the codes no value has (127 marks a non-finite row).
_CODE = np.arange(256)
_VALUES = {FP8: torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy(),
           **{name: np.where(_CODE <= 2 * top, np.where(_CODE % 2 == 0, _CODE // 2, -(_CODE + 1) // 2),
                             np.nan).astype(np.float32) for name, top in CODE_MAX.items()}}  # fmt: skip


def dequantize(q: np.ndarray, scale: np.ndarray, logical: str = FP8) -> torch.Tensor:
    """Stored bytes (fp8 bits or int7/q19 codes) and their row scales -> fp32 values (exactly ``value * scale``)."""
    values = _VALUES[logical][q]  # a new array: the rows may be a read-only memmap or cached chunk
    np.multiply(values, np.asarray(scale)[..., None], out=values)
    return torch.from_numpy(values)


def encode_field(name: str, t: torch.Tensor | ScaledRows, logical: str) -> dict[str, np.ndarray]:
    """The stored arrays of one field of one sample: itself, plus ``<name>_scale`` for the scaled dtypes."""
    if logical in SCALED:
        q, scale = (t.q.cpu(), t.scale.cpu()) if isinstance(t, ScaledRows) else QUANTIZERS[logical](t.cpu())
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


def _compressors(codec: str, itemsize: int, logical: str = "") -> Any:
    from zarr.codecs import BloscCodec, ZstdCodec

    if codec == "auto":
        codec = "blosc" if logical in (*CODE_MAX, "float16") else "zstd"
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
    if logical in CODE_MAX:  # codes past 126 (q19: 18) hold no value (a non-finite row)
        return not bool((arr > 2 * CODE_MAX[logical]).any())
    return bool(np.isfinite(arr).all())


_PRECISION = {"float32": 4, "float16": 3, "bfloat16": 3, FP8: 2, INT7: 1, Q19: 0}

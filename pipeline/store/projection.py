"""The fixed projection of EAGLE-3's fused features: the store keeps ``y = P·x`` instead of ``x``.

EAGLE-3 reads its ``A`` aux layers only through ``fc`` (``A*H -> H``, linear, no bias), so storing ``y = P·x``
with ``P`` of shape ``[k, A*H]`` and orthonormal rows changes what a head can learn only by the directions ``P``
drops: the head reads ``y`` as ``(fc·Pᵀ)·y`` and export writes ``fc·PᵀP``, the ``[H, A*H]`` matrix every
serving engine loads. ``P`` is the top-``k`` eigenvectors of the uncentered second moment ``Σ x xᵀ`` of a
calibration slice (the extraction's first batches), estimated once per store: it is published in the store
(``projection.safetensors``) by the first worker, under the store lock, and every other worker, a resumed run and
a repair load that file, so every shard is written with the same bits. Its sha256, ``k``, the calibration size
and the kept energy are in the fingerprint (``storage_layout.md``, "Format version 3" and "4").

Format 5 adds a **component scale** ``s`` (``[k]``, ``s_j = rms_j^0.5``, the RMS of ``y_j`` over the calibration
tokens): the store keeps ``y / s``, so that the components, whose RMS spans three orders of magnitude, share one
row step more evenly; the reader multiplies back. ``s`` is published beside ``P`` and its sha256 is in the record.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

PROJECTION_FILE = "projection.safetensors"
METHOD = "pca-uncentered"
DEFAULT_CALIBRATION_TOKENS = 16384
# s_j = rms_j ** RMS_POWER: 0 would be format 4's single row step, 1 would whiten; 0.5 with q19 codes held quality at
# int7's bytes (bench/aux_coding.py, README "Compact store")
RMS_POWER = 0.5
GRAM_ROWS = 4096  # calibration rows per fp32 product (their sums are fp64)
GRAM_BLOCK = 288  # columns per block row of a product's upper triangle
SCALE_TENSOR = "{}_component_scale"  # the name of s in projection.safetensors


def auto_projection_k(hidden_size: int, aux_layers: int) -> int:
    """``--aux-projection auto``: k = 2H (at most the A*H values there are), the measured choice: stored as int7 it
    keeps more of each row than k = H in fp8, in fewer bytes (README "Compact store")."""
    return min(2 * hidden_size, aux_layers * hidden_size)


class GramAccumulator:
    """``Σ x xᵀ`` over calibration rows in fp64, on ``device`` (the forward's device: rows do not travel), from
    products of up to ``GRAM_ROWS`` rows that fill the upper triangle only (block rows of ``GRAM_BLOCK`` columns,
    ~0.6 of the full product's work) and are mirrored. On a CPU the products are fp32 (summed in fp64): on one thread
    that is 1/3 of the time of fp64 products, and P's subspace moved by 0.002 on SmolLM2's features (README "Compact
    store", extraction); a GPU keeps fp64, where a TF32 setting would otherwise round the products to 10 bits."""

    def __init__(self, width: int, device: str | torch.device = "cpu"):
        self._gram = torch.zeros(width, width, dtype=torch.float64, device=device)
        self._dtype = torch.float32 if self._gram.device.type == "cpu" else torch.float64
        self._pending: list[torch.Tensor] = []
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        self._pending.append(x.reshape(x.shape[0], -1).to(self._gram.device, self._dtype))
        self.rows += int(x.shape[0])
        if sum(len(p) for p in self._pending) >= GRAM_ROWS:
            self._flush()

    @property
    def gram(self) -> torch.Tensor:
        """The fp64 sum so far ``[width, width]``, symmetric."""
        self._flush()
        return self._gram

    def _flush(self) -> None:
        if not self._pending:
            return
        x, self._pending = torch.cat(self._pending), []
        upper = torch.zeros_like(self._gram, dtype=self._dtype)
        for start in range(0, x.shape[1], GRAM_BLOCK):
            block = slice(start, start + GRAM_BLOCK)
            upper[block, start:] = x[:, block].T @ x[:, start:]
        upper = upper.triu()
        self._gram += (upper + upper.triu(1).T).double()


def principal_projection(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """``(P [k, width] fp32 with orthonormal rows, kept energy)`` from an uncentered second moment.

    Rows are the eigenvectors of the ``k`` largest eigenvalues, in decreasing order, each signed so that its
    largest-magnitude entry is positive (eigenvectors are defined up to sign: this makes ``P`` a function of the
    matrix). Kept energy = the share of ``trace(gram)`` that ``P`` keeps (``Σ |P x|² / Σ |x|²`` over the slice)."""
    p, energy, _ = _principal(gram, k)
    return p, energy


def _principal(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, float, torch.Tensor]:
    """:func:`principal_projection` plus the ``k`` eigenvalues (``Σ y_j²`` over the slice), in P's order."""
    width = gram.shape[0]
    if not 1 <= k <= width:
        raise ValueError(f"projection k={k}: must lie in [1, {width}]")
    values, vectors = torch.linalg.eigh(gram.detach().cpu().double())  # ascending
    order = values.argsort(descending=True)[:k]
    top = vectors[:, order].T.contiguous()  # [k, width]
    pivot = top.abs().argmax(dim=1)
    top *= torch.sign(top[torch.arange(k), pivot])[:, None]
    total = float(torch.diagonal(gram).sum())
    kept = float(values[order].clamp_min(0).sum())
    return top.float().contiguous(), (kept / total if total > 0 else 1.0), values[order]


def component_scale(sum_squares: torch.Tensor, rows: int) -> torch.Tensor:
    """``s`` [k] fp32 from each component's ``Σ y_j²`` over ``rows`` calibration rows: ``rms_j ** RMS_POWER``, 1
    where a component was never non-zero."""
    s = (sum_squares.double().clamp_min(0) / max(rows, 1)).sqrt().pow(RMS_POWER)
    return torch.where(s > 0, s, torch.ones_like(s)).float()


def encoder(p: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The matrix extraction applies: ``P``, rows divided by ``s`` when the store has a component scale."""
    return p if scale is None else p / scale.to(p.device)[:, None]


def fit_projection(rows: Iterable[torch.Tensor], width: int, k: int, calibration_tokens: int,
                   device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, dict]:  # fmt: skip
    """``(P, s, their fingerprint record)`` from the first ``calibration_tokens`` rows of ``rows`` (one tensor of
    feature rows per sample, in forward order; non-finite rows left out): what extraction and conversion both
    estimate. ``s`` comes from the eigenvalues (``Σ y_j²`` over the same rows)."""
    gram = GramAccumulator(width, device)
    records = 0
    for x in rows:
        if gram.rows >= calibration_tokens:
            break
        x = x.reshape(x.shape[0], -1)[: calibration_tokens - gram.rows]
        with _one_thread():
            gram.add(x[torch.isfinite(x).all(dim=1)])
        records += 1
    with _one_thread():
        p, energy, values = _principal(gram.gram, k)
        scale = component_scale(values, gram.rows)
    calibration = {"tokens": calibration_tokens, "rows": gram.rows, "records": records}
    return p, scale, describe_projection(p, energy, calibration, scale)


@contextmanager
def _one_thread():
    """The CPU's fp64 sums and eigensolver split their work by the thread count, and so round differently: P (whose
    sha256 is in the fingerprint) is computed on one thread, so that every process writes the same store."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def projection_sha256(p: torch.Tensor) -> str:
    """sha256 of P's fp32 little-endian bytes (what the fingerprint records)."""
    return hashlib.sha256(np.ascontiguousarray(p.detach().cpu().float().numpy(), dtype="<f4").tobytes()).hexdigest()


def describe_projection(p: torch.Tensor, energy: float, calibration: dict,
                        scale: torch.Tensor | None = None) -> dict:  # fmt: skip
    """The fingerprint's record of one projected field (``component_scale``: format 5, when stored as ``y / s``)."""
    record = {"k": int(p.shape[0]), "input_width": int(p.shape[1]), "method": METHOD, "calibration": calibration,
              "energy": round(float(energy), 6), "sha256": projection_sha256(p)}  # fmt: skip
    if scale is not None:
        record["component_scale"] = {"rms_power": RMS_POWER, "sha256": projection_sha256(scale)}
    return record


def project(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``[n, A, H]`` (or ``[n, A*H]``) rows -> ``[n, k]`` fp32, on the device of ``p``."""
    return x.reshape(x.shape[0], -1).to(p.device, torch.float32) @ p.T


def save_projection(root: Path, p: torch.Tensor, record: dict, field: str = "hidden_aux",
                    scale: torch.Tensor | None = None) -> None:  # fmt: skip
    """Publish ``root/projection.safetensors`` (P, s where there is one, and their record) atomically: temporary
    file, fsync, no-replace link, so that concurrent workers and a crash never leave a half-written or replaced
    projection."""
    from safetensors.torch import save_file

    final = Path(root) / PROJECTION_FILE
    tmp = final.with_name(f".tmp-{PROJECTION_FILE}-{os.getpid()}")
    tensors = {field: p.detach().cpu().float().contiguous()}
    if scale is not None:
        tensors[SCALE_TENSOR.format(field)] = scale.detach().cpu().float().contiguous()
    save_file(tensors, str(tmp), metadata={"pipeline": json.dumps({field: record}, sort_keys=True)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    try:
        os.link(tmp, final)  # never replaces a published projection
    finally:
        tmp.unlink()


def read_projection_file(root: Path, field: str = "hidden_aux") -> tuple[torch.Tensor, dict, torch.Tensor | None]:
    """``(P, record, s or None)`` of a published projection; the record's sha256s are recomputed from P and s."""
    from safetensors import SafetensorError, safe_open

    path = Path(root) / PROJECTION_FILE
    try:
        with safe_open(str(path), "pt") as f:
            record = json.loads(f.metadata()["pipeline"])[field]
            p = f.get_tensor(field)
            scale = f.get_tensor(SCALE_TENSOR.format(field)) if "component_scale" in record else None
    except (OSError, SafetensorError, KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: cannot read the projection of {field} ({e})") from e
    found = {**record, "sha256": projection_sha256(p)}
    if scale is not None:
        found["component_scale"] = {**record["component_scale"], "sha256": projection_sha256(scale)}
    return p, found, scale


def load_projection(root: Path, record: dict, field: str = "hidden_aux") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The published ``(P, s or None)`` of ``field``, checked against its fingerprint record (shapes, sha256s)."""
    p, found, scale = read_projection_file(root, field)
    shape = (record["k"], record["input_width"])
    same_scale = found.get("component_scale") == record.get("component_scale") and (
        scale is None or tuple(scale.shape) == shape[:1])
    if tuple(p.shape) != shape or found["sha256"] != record["sha256"] or not same_scale:
        raise ValueError(f"{Path(root) / PROJECTION_FILE}: the projection of {field} does not match the store's "
                         f"fingerprint (shape {tuple(p.shape)}, sha256 {found['sha256'][:12]}…, component scale "
                         f"{(found.get('component_scale') or {}).get('sha256', 'none')[:12]}; recorded "
                         f"{record['k']}x{record['input_width']}, {record['sha256'][:12]}…, "
                         f"{(record.get('component_scale') or {}).get('sha256', 'none')[:12]})")  # fmt: skip
    return p, scale

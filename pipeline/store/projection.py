"""The fixed projection of EAGLE-3's fused features: the store keeps ``y = P·x`` instead of ``x``.

EAGLE-3 reads its ``A`` aux layers only through ``fc`` (``A*H -> H``, linear, no bias), so storing ``y = P·x``
with ``P`` of shape ``[k, A*H]`` and orthonormal rows changes what a head can learn only by the directions ``P``
drops: the head reads ``y`` as ``(fc·Pᵀ)·y`` and export writes ``fc·PᵀP``, the ``[H, A*H]`` matrix every
serving engine loads. ``P`` is the top-``k`` eigenvectors of the uncentered second moment ``Σ x xᵀ`` of a
calibration slice (the extraction's first batches), estimated once per store: it is published in the store
(``projection.safetensors``) by the first worker, under the store lock, and every other worker, a resumed run and
a repair load that file, so every shard is written with the same bits. Its sha256, ``k``, the calibration size
and the kept energy are in the fingerprint (``storage_layout.md``, "Format version 3" and "4").
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


def auto_projection_k(hidden_size: int, aux_layers: int) -> int:
    """``--aux-projection auto``: k = 2H (at most the A*H values there are), the measured choice: stored as int7 it
    keeps more of each row than k = H in fp8, in fewer bytes (README "Compact store")."""
    return min(2 * hidden_size, aux_layers * hidden_size)


class GramAccumulator:
    """``Σ x xᵀ`` over calibration rows in fp64, on ``device`` (the forward's device: rows do not travel)."""

    def __init__(self, width: int, device: str | torch.device = "cpu"):
        self.gram = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(x.shape[0], -1).to(self.gram.device, torch.float64)
        self.gram.addmm_(x.T, x)
        self.rows += int(x.shape[0])


def principal_projection(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """``(P [k, width] fp32 with orthonormal rows, kept energy)`` from an uncentered second moment.

    Rows are the eigenvectors of the ``k`` largest eigenvalues, in decreasing order, each signed so that its
    largest-magnitude entry is positive (eigenvectors are defined up to sign: this makes ``P`` a function of the
    matrix). Kept energy = the share of ``trace(gram)`` that ``P`` keeps (``Σ |P x|² / Σ |x|²`` over the slice)."""
    width = gram.shape[0]
    if not 1 <= k <= width:
        raise ValueError(f"projection k={k}: must lie in [1, {width}]")
    values, vectors = torch.linalg.eigh(gram.detach().cpu().double())  # ascending
    top = vectors[:, values.argsort(descending=True)[:k]].T.contiguous()  # [k, width]
    pivot = top.abs().argmax(dim=1)
    top *= torch.sign(top[torch.arange(k), pivot])[:, None]
    total = float(torch.diagonal(gram).sum())
    kept = float(values.sort(descending=True).values[:k].clamp_min(0).sum())
    return top.float().contiguous(), (kept / total if total > 0 else 1.0)


def fit_projection(rows: Iterable[torch.Tensor], width: int, k: int, calibration_tokens: int,
                   device: str | torch.device = "cpu") -> tuple[torch.Tensor, dict]:  # fmt: skip
    """``(P, its fingerprint record)`` from the first ``calibration_tokens`` rows of ``rows`` (one tensor of feature
    rows per sample, in forward order; non-finite rows left out): what extraction and conversion both estimate."""
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
        p, energy = principal_projection(gram.gram, k)
    return p, describe_projection(p, energy, {"tokens": calibration_tokens, "rows": gram.rows, "records": records})


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


def describe_projection(p: torch.Tensor, energy: float, calibration: dict) -> dict:
    """The fingerprint's record of one projected field."""
    return {"k": int(p.shape[0]), "input_width": int(p.shape[1]), "method": METHOD, "calibration": calibration,
            "energy": round(float(energy), 6), "sha256": projection_sha256(p)}  # fmt: skip


def project(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``[n, A, H]`` (or ``[n, A*H]``) rows -> ``[n, k]`` fp32, on the device of ``p``."""
    return x.reshape(x.shape[0], -1).to(p.device, torch.float32) @ p.T


def save_projection(root: Path, p: torch.Tensor, record: dict, field: str = "hidden_aux") -> None:
    """Publish ``root/projection.safetensors`` (P and its record) atomically: temporary file, fsync, no-replace
    link, so that concurrent workers and a crash never leave a half-written or replaced projection."""
    from safetensors.torch import save_file

    final = Path(root) / PROJECTION_FILE
    tmp = final.with_name(f".tmp-{PROJECTION_FILE}-{os.getpid()}")
    save_file({field: p.detach().cpu().float().contiguous()}, str(tmp),
              metadata={"pipeline": json.dumps({field: record}, sort_keys=True)})  # fmt: skip
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    try:
        os.link(tmp, final)  # never replaces a published projection
    finally:
        tmp.unlink()


def read_projection_file(root: Path, field: str = "hidden_aux") -> tuple[torch.Tensor, dict]:
    """``(P, record)`` of a published projection; the record's sha256 is recomputed from P."""
    from safetensors import SafetensorError, safe_open

    path = Path(root) / PROJECTION_FILE
    try:
        with safe_open(str(path), "pt") as f:
            record = json.loads(f.metadata()["pipeline"])[field]
            p = f.get_tensor(field)
    except (OSError, SafetensorError, KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: cannot read the projection of {field} ({e})") from e
    return p, {**record, "sha256": projection_sha256(p)}


def load_projection(root: Path, record: dict, field: str = "hidden_aux") -> torch.Tensor:
    """The published P of ``field``, checked against its fingerprint record (shape and sha256)."""
    p, found = read_projection_file(root, field)
    if tuple(p.shape) != (record["k"], record["input_width"]) or found["sha256"] != record["sha256"]:
        raise ValueError(f"{Path(root) / PROJECTION_FILE}: the projection of {field} does not match the store's "
                         f"fingerprint (shape {tuple(p.shape)}, sha256 {found['sha256'][:12]}…; recorded "
                         f"{record['k']}x{record['input_width']}, {record['sha256'][:12]}…)")  # fmt: skip
    return p

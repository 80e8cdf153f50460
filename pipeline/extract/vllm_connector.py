"""vLLM's hidden-state export, seen from the store: the connector's files and their layer convention.

Nothing here imports vLLM; the live backend (:mod:`pipeline.extract.vllm_backend`), the connector that vLLM loads
(:mod:`pipeline.extract.vllm_capture`) and the tests share these functions.

Matched against vLLM 0.18.1, 0.32.0 (the CPU build) and 0.33.0 (``vllm/distributed/kv_transfer/kv_connector/v1/
example_hidden_states_connector.py``, ``vllm/model_executor/models/extract_hidden_states.py``,
``vllm/v1/spec_decode/extract_hidden_states.py``, ``vllm/model_executor/models/llama.py``):

* With ``speculative_config={"method": "extract_hidden_states", "num_speculative_tokens": 1,
  "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": ids}}}`` and
  :func:`kv_transfer_config` (the project's :class:`~pipeline.extract.vllm_capture.PipelineHiddenStatesConnector`,
  vLLM's ``ExampleHiddenStatesConnector`` made device-neutral), every finished request leaves one safetensors
  file ``DIR/<engine request id>.safetensors`` with two tensors: ``hidden_states`` ``[T, len(ids), H]`` in the
  model dtype and ``token_ids`` ``[T]`` (int64, the prompt tokens). The path comes back in
  ``RequestOutput.kv_transfer_params["hidden_states_path"]``; it must be taken from there, because the engine
  appends 8 random characters to the caller's request id (``InputProcessor.assign_request_id``, both versions)
  before the connector names the file.
* The file is written by a thread of the worker and guarded by ``<path>.lock``: the writer holds an exclusive
  ``flock`` until the file is complete, a reader takes a shared one first (vLLM >= 0.32; 0.18.1's example
  connector wrote synchronously during the forward, without a lock file). :func:`read_connector_file` handles
  both.
* Layer id *i* is the residual stream after *i* decoder layers (``hidden_states + residual``): the embedding
  output for 0, the input of decoder layer *i* for 0 < i < N, and for i = N the last layer's output **before**
  the final norm. The store's convention is HF ``output_hidden_states`` indexing, identical for i < N, whereas HF
  index N is **after** the final norm: :func:`map_to_store` applies the norm with the target's stored
  ``norm.weight`` and ``rms_norm_eps`` exactly as HF's ``LlamaRMSNorm`` does.
* The model appends captured layers while it walks its layers, so axis 1 of ``hidden_states`` follows increasing
  layer id whatever order the ids were configured in (:func:`vllm_layer_ids` asks for them sorted and unique).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import torch

from pipeline.compute import rms_normalize

HIDDEN_STATES_KEY = "hidden_states"
TOKEN_IDS_KEY = "token_ids"
PATH_PARAM = "hidden_states_path"  # key of RequestOutput.kv_transfer_params
LOCK_SUFFIX = ".lock"
CONNECTOR_NAME = "PipelineHiddenStatesConnector"
CONNECTOR_MODULE = "pipeline.extract.vllm_capture"  # vLLM imports the class from here in its own processes
CONNECTOR_ERROR_FILE = "connector-error.txt"  # the connector's last words, read by the backend when the engine dies
SPEC_METHOD = "extract_hidden_states"

# Final norms that are not ``weight * rms_normalize(x)`` (Gemma scales by 1 + weight): refused rather than guessed.
UNSUPPORTED_NORM_MODEL_TYPES = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text"})


class ConnectorFileError(RuntimeError):
    """A hidden-states file that is missing, unreadable or does not match its request."""


def kv_transfer_config(storage_dir: str | os.PathLike) -> dict:
    """vLLM's ``kv_transfer_config`` that loads the project's connector, writing into ``storage_dir``."""
    return {"kv_connector": CONNECTOR_NAME, "kv_connector_module_path": CONNECTOR_MODULE, "kv_role": "kv_producer",
            "kv_connector_extra_config": {"shared_storage_path": str(storage_dir)}}  # fmt: skip


def connector_failure(storage_dir: str | os.PathLike) -> str | None:
    """The first line the connector recorded before it failed inside the engine (None: it did not)."""
    path = Path(storage_dir) / CONNECTOR_ERROR_FILE
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    return text.splitlines()[0] if text else None


def read_connector_file(path: str | os.PathLike, lock_timeout_s: float = 600.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden_states [T, n, H], token_ids [T] int64)`` of one request's file.

    Waits (up to ``lock_timeout_s``) for the writer's exclusive lock on ``<path>.lock`` when that file exists, the
    way vLLM's own ``load_hidden_states`` does, so an asynchronous write is never read half done.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    lock = path.with_name(path.name + LOCK_SUFFIX)
    fd = None
    try:
        if lock.exists():
            try:
                fd = os.open(lock, os.O_RDONLY)
            except FileNotFoundError:  # removed between the check and the open: the writer is done
                fd = None
            if fd is not None:
                _wait_shared(fd, lock, lock_timeout_s)
        if not path.exists():
            raise ConnectorFileError(f"{path}: hidden-states file missing")
        try:
            data = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise ConnectorFileError(f"{path}: unreadable hidden-states file ({type(e).__name__}: {e})") from e
    finally:
        if fd is not None:
            os.close(fd)  # releases the shared lock
    missing = {HIDDEN_STATES_KEY, TOKEN_IDS_KEY} - set(data)
    if missing:
        raise ConnectorFileError(f"{path}: no tensor(s) {sorted(missing)} (has {sorted(data)})")
    hs, ids = data[HIDDEN_STATES_KEY], data[TOKEN_IDS_KEY]
    if hs.ndim != 3 or ids.ndim != 1 or hs.shape[0] != ids.shape[0]:
        raise ConnectorFileError(f"{path}: hidden_states {tuple(hs.shape)} and token_ids {tuple(ids.shape)} are not "
                                 "[T, n_layers, H] and [T]")  # fmt: skip
    return hs, ids.to(torch.int64)


def _wait_shared(fd: int, lock: Path, timeout_s: float) -> None:
    # Polled rather than blocking so that a writer that died holding the lock cannot hang extraction forever.
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise ConnectorFileError(f"{lock}: the writer still holds the lock after {timeout_s:.0f} s") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def remove_connector_file(path: str | os.PathLike) -> None:
    """Delete a request's file and its lock file (both may already be gone)."""
    path = Path(path)
    for p in (path, path.with_name(path.name + LOCK_SUFFIX)):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------------------------------------------- layers


def vllm_layer_ids(aux_layers: list[int], num_layers: int, want_last: bool, want_aux: bool) -> list[int]:
    """The ``eagle_aux_hidden_state_layer_ids`` to configure: sorted and unique, the order vLLM stacks them in.

    Layer N (pre-norm last layer) is included when the store wants ``hidden_last`` or an aux index N.
    """
    ids = set(aux_layers) if want_aux else set()
    if want_last:
        ids.add(num_layers)
    bad = sorted(i for i in ids if not 0 <= i <= num_layers)
    if bad:
        raise ValueError(f"layer ids {bad} outside [0, {num_layers}] for a {num_layers}-layer target")
    if not ids:
        raise ValueError("nothing to extract: neither hidden_last nor hidden_aux is wanted")
    return sorted(ids)


def final_norm_eps(config: dict) -> float:
    """The target's final RMSNorm epsilon; ValueError for models whose final norm is not a plain RMSNorm."""
    model_type = str(config.get("model_type", ""))
    if model_type in UNSUPPORTED_NORM_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r}: its final norm is not weight * rms_normalize(x); the vLLM "
                         "backend cannot rebuild HF's post-norm last layer for it (use --backend hf)")  # fmt: skip
    for key in ("rms_norm_eps", "norm_eps", "layer_norm_eps"):
        if config.get(key) is not None:
            return float(config[key])
    raise ValueError(f"model_type {model_type!r}: the config has no rms_norm_eps; cannot apply the final norm")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF ``LlamaRMSNorm``: normalize in fp32, cast back to ``x``'s dtype, then scale (result in ``x``'s dtype)."""
    return weight.to(x.dtype) * rms_normalize(x, eps)


def map_to_store(hidden_states: torch.Tensor, layer_ids: list[int], aux_layers: list[int], num_layers: int,
                 want_last: bool, want_aux: bool, norm_weight: torch.Tensor | None, eps: float | None,
                 hidden_dtype: torch.dtype) -> dict[str, torch.Tensor]:  # fmt: skip
    """The store's ``hidden_last [T, H]`` / ``hidden_aux [T, A, H]`` from one connector file's ``hidden_states``.

    ``layer_ids`` label axis 1 of ``hidden_states`` (as configured, see :func:`vllm_layer_ids`); ``aux_layers``
    are the store's HF indices, in the store's order. Index N is post-norm in HF, so vLLM's pre-norm layer N gets
    the final norm (``norm_weight``, ``eps``) wherever the store wants it.
    """
    if hidden_states.ndim != 3 or hidden_states.shape[1] != len(layer_ids):
        raise ValueError(f"hidden_states {tuple(hidden_states.shape)} does not hold the {len(layer_ids)} layers "
                         f"{layer_ids} (expected [T, {len(layer_ids)}, H])")  # fmt: skip
    column = {lid: j for j, lid in enumerate(layer_ids)}
    post_norm: torch.Tensor | None = None

    def hf_index(i: int) -> torch.Tensor:
        nonlocal post_norm
        if i not in column:
            raise ValueError(f"layer {i} was not extracted (extracted: {layer_ids})")
        h = hidden_states[:, column[i]]
        if i != num_layers:
            return h
        if post_norm is None:
            if norm_weight is None or eps is None:
                raise ValueError("the final norm weight and eps are needed to map vLLM's layer N to HF's index N")
            post_norm = rms_norm(h, norm_weight, eps)
        return post_norm

    out: dict[str, torch.Tensor] = {}
    if want_last:
        out["hidden_last"] = hf_index(num_layers).to(hidden_dtype)
    if want_aux:
        out["hidden_aux"] = torch.stack([hf_index(a) for a in aux_layers], dim=1).to(hidden_dtype)
    return out

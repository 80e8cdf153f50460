"""DeepSpeed, wrapped in one place: process group, config assembly, engine, checkpoints, metric reduction.

Runs as a plain process (it sets the rendezvous environment itself), under ``torchrun`` and under the ``deepspeed``
launcher. CPU: gloo, fp32, torch AdamW, no shm op (no C++ compiles). GPU: nccl, bf16, FusedAdam.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.compute import auto_precision


@dataclass
class EngineConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    total_steps: int = 1000
    grad_accum: int = 1
    clip: float = 0.5
    zero_stage: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    user_config: str | None = None  # --deepspeed ds.json; its keys win over the flags


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> tuple[int, int, torch.device]:
    """Initialise the process group once; returns (rank, world_size, device)."""
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # a plain process: be rank 0 of 1 (else DeepSpeed tries MPI discovery)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")  # fmt: skip
    import deepspeed
    import deepspeed.ops

    if not cuda:  # the shm all-reduce op is a 30 s C++ JIT compile that gloo does not need
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if cuda and re.search(r"\d\.\d+[a-z]", arch):
        # DeepSpeed 0.19's JIT op builder (FusedAdam) parses "9.0a" as an int and fails; the suffix only enables
        # architecture-specific instructions its kernels do not use.
        os.environ["TORCH_CUDA_ARCH_LIST"] = re.sub(r"(\d\.\d+)[a-z]+", r"\1", arch)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def deepspeed_config(cfg: EngineConfig, device: torch.device) -> dict:
    precision = cfg.precision
    if precision == "auto":
        precision = auto_precision(device)
    config = {
        "train_micro_batch_size_per_gpu": 1,  # one packed row per micro step; the row size is the batch knob
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.clip,
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "betas": list(cfg.betas), "eps": 1e-8,
                                                  "weight_decay": cfg.weight_decay,
                                                  "torch_adam": device.type != "cuda"}},
        "scheduler": {"type": "WarmupDecayLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": cfg.lr, "warmup_num_steps": max(cfg.warmup_steps, 1),
            "total_num_steps": max(cfg.total_steps, cfg.warmup_steps + 1), "warmup_type": "linear"}},
        "zero_optimization": {"stage": cfg.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }  # fmt: skip
    if cfg.user_config:
        config = _merge(config, json.loads(Path(cfg.user_config).read_text()))
    return config


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Engine:
    """A DeepSpeed engine around one draft model, plus the collective helpers the trainer needs."""

    def __init__(self, model: torch.nn.Module, cfg: EngineConfig, device: torch.device):
        import deepspeed

        self.config = deepspeed_config(cfg, device)
        params = [p for p in model.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model.to(device), model_parameters=params, config=self.config)
        self.device = device
        self.dtype = torch.bfloat16 if self.config["bf16"]["enabled"] else (
            torch.float16 if self.config["fp16"]["enabled"] else torch.float32)  # fmt: skip

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def rank(self) -> int:
        return torch.distributed.get_rank()

    @property
    def world_size(self) -> int:
        return torch.distributed.get_world_size()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in batch.items():
            v = v.to(self.device, non_blocking=True)
            out[k] = v.to(self.dtype) if v.is_floating_point() and k != "loss_mask" else v
        return out

    def backward_step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def all_mean(self, values: dict[str, float], weights: dict[str, float] | None = None) -> dict[str, float]:
        """Average metrics across ranks (weighted by counted tokens where a weight is given)."""
        keys = sorted(values)
        w = [float((weights or {}).get(k, 1.0)) for k in keys]
        t = torch.tensor([values[k] * wk for k, wk in zip(keys, w, strict=True)] + w, dtype=torch.float64,
                         device=self.device)  # nccl reduces device tensors only
        torch.distributed.all_reduce(t)
        n = len(keys)
        return {k: (t[i] / t[n + i]).item() if t[n + i] else 0.0 for i, k in enumerate(keys)}

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        torch.distributed.barrier()

    # ---- checkpoints
    def save(self, ckpt_dir: Path, tag: str, client_state: dict, keep_last: int) -> None:
        # Frozen target weights come from the store again on load: leave them out of every checkpoint.
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state,
                                    exclude_frozen_parameters=True)  # fmt: skip
        self.barrier()
        if self.rank == 0 and keep_last > 0:
            tags = sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step")),
                          key=lambda p: int(p.name[4:]))  # fmt: skip
            for old in tags[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()

    def load(self, ckpt_dir: Path, tag: str | None = None) -> dict | None:
        path, client_state = self.engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=False)
        return client_state if path is not None else None

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable + frozen weights on CPU in fp32, gathered across ranks under ZeRO-3."""
        if self.config["zero_optimization"]["stage"] == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                return {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}
        return {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}

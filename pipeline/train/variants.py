"""The bridge between the generic trainer and the draft heads: what each variant needs from the store, how it
is built from the store alone, its loss, and its held-out metrics (per-step accuracy, simulated τ)."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.draft import eagle1, eagle3
from pipeline.store import StoreReader

VARIANTS = ("eagle1", "eagle3")
EAGLE1_CHAIN_STEPS = 5  # drafting depth simulated for EAGLE-1's held-out τ (its default serving depth)


def _check(cfg) -> None:
    if cfg.variant not in VARIANTS:
        raise ValueError(f"--variant {cfg.variant!r}: choose one of {', '.join(VARIANTS)}")


def required_fields(cfg) -> tuple[str, ...]:
    """Store arrays the loader must read for this variant and target (beyond input_ids/loss_mask)."""
    _check(cfg)
    if cfg.variant == "eagle1":  # the vloss target is the stored last hidden state in both target modes
        return ("hidden_last",) if cfg.target == "full" else ("hidden_last", "topk_ids", "topk_logprobs")
    return ("hidden_aux", "hidden_last") if cfg.target == "full" else ("hidden_aux", "topk_ids", "topk_logprobs")


def build(cfg, reader: StoreReader) -> tuple[torch.nn.Module, Any, dict]:
    """Draft module (frozen target pieces loaded from the store), its objective, and facts to log."""
    _check(cfg)
    weights = reader.target_weights()
    target_name = reader.fingerprint["model"].get("path") or reader.fingerprint["model"]["name"]
    if cfg.variant == "eagle1":
        config = eagle1.Eagle1Config.from_target(reader.target_config(), target_name=target_name)
        model = eagle1.Eagle1Draft(config)
        model.load_target_weights(weights)
        objective = eagle1.Eagle1Objective(v_weight=cfg.v_weight, p_weight=cfg.p_weight, noise=cfg.noise or "uniform",
                                           noise_std=cfg.noise_std, noise_scale_by_length=cfg.noise_scale_by_length,
                                           target=cfg.target)  # fmt: skip
        info = {"variant": "eagle1", "config": config.to_dict()}
    else:
        config = eagle3.Eagle3Config.from_store(reader, cfg.draft_vocab_size)
        model = eagle3.Eagle3Draft(config)
        d2t, t2d, coverage = eagle3.build_draft_vocab(reader.token_counts(), config.draft_vocab_size)
        model.set_vocab(d2t, t2d)
        model.load_target_weights(weights, target_head=cfg.target == "full")
        objective = eagle3.Eagle3Objective(ttt_steps=cfg.ttt_steps, step_decay=cfg.step_decay, target=cfg.target,
                                           noise=cfg.noise or "none", noise_std=cfg.noise_std,
                                           noise_scale_by_length=cfg.noise_scale_by_length)  # fmt: skip
        info = {"variant": "eagle3", "config": config.to_dict(), "draft_vocab_size": config.draft_vocab_size,
                "draft_vocab_coverage": coverage}  # fmt: skip
    info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, objective, info


def load_run(run_dir, which: str = "final") -> tuple[torch.nn.Module, dict]:
    """A trained draft from a run directory (``final`` or ``best`` weights) and its draft.json record."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(run_dir) / which
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path}: no trained weights (is {run_dir} a finished `pipeline train` run?)")
    record = json.loads((path / "draft.json").read_text())
    if record["variant"] == "eagle1":
        model = eagle1.Eagle1Draft(eagle1.Eagle1Config.from_dict(record["draft"]["config"]))
    else:
        model = eagle3.Eagle3Draft(eagle3.Eagle3Config.from_dict(record["draft"]["config"]))
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.eval(), record


def export_run(run_dir, out, fmt: str = "vllm", which: str = "final", dtype: torch.dtype | None = None):
    """Export a run's ``final``/``best`` weights with their provenance; returns (export path, draft.json record)."""
    import json
    from pathlib import Path

    from pipeline.draft.export import export_draft

    run_dir = Path(run_dir)
    model, record = load_run(run_dir, which)
    if fmt == "speculators" and record["variant"] != "eagle3":
        raise ValueError("--format speculators is for EAGLE-3 heads; use --format vllm for EAGLE-1")
    train_cfg = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    extra = {"run_dir": str(run_dir.resolve()), "weights": which,
             "store_fingerprint_digest": train_cfg.get("store_fingerprint_digest"),
             "code_version": record.get("code_version")}  # fmt: skip
    return export_draft(model, model.config, out, fmt, extra, dtype=dtype), record


def loss(cfg, model, batch: dict[str, torch.Tensor], objective) -> tuple[torch.Tensor, dict[str, float]]:
    mod = eagle1 if cfg.variant == "eagle1" else eagle3
    return mod.training_loss(model, batch, objective)


def weighted(metrics: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Pair each metric with the number of rows it averages over (``tokens_i`` for per-step ones)."""
    out = {}
    for k, v in metrics.items():
        if k.startswith("tokens"):
            continue
        suffix = k.rsplit("_", 1)[-1]
        out[k] = (v, metrics.get(f"tokens_{suffix}" if suffix.isdigit() else "tokens", metrics["tokens"]))
    return out


def _steps(cfg) -> int:
    return EAGLE1_CHAIN_STEPS if cfg.variant == "eagle1" else cfg.ttt_steps


def eval_keys(cfg) -> list[str]:
    return [f"cond_acc_{i}" for i in range(_steps(cfg))]


def evaluate(cfg, model, batch: dict[str, torch.Tensor], objective) -> dict[str, tuple[float, float]]:
    """Held-out metrics of one batch as {name: (value, weight)}: teacher-forced loss/accuracy per step and the
    conditional acceptance of a simulated greedy chain (weight = rows eligible at that step)."""
    _, metrics = loss(cfg, model, batch, objective)
    out = weighted(metrics)
    mod = eagle1 if cfg.variant == "eagle1" else eagle3
    chain = mod.chain_acceptance(model, batch, steps=_steps(cfg))
    for i, (a, n) in enumerate(zip(chain["cond_acc"], chain["eligible"], strict=True)):
        out[f"cond_acc_{i}"] = (a, float(n))
    return out


def simulated_tau(cfg, mean: dict[str, float]) -> float:
    """τ = 1 + Σ_i Π_{j≤i} a_j from the held-out conditional acceptances (counts the bonus token)."""
    from pipeline.draft.common import acceptance_length

    return acceptance_length([mean.get(k, 0.0) for k in eval_keys(cfg)])

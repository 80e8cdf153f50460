"""The bridge between the generic trainer and the draft heads: what each variant needs from the store, how it
is built from the store alone, its loss, and its held-out metrics (per-step accuracy, simulated τ)."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.draft import registry
from pipeline.store import StoreReader


def head(cfg) -> registry.DraftHead:
    """The registered draft head ``cfg.variant`` names (ValueError naming the choices otherwise)."""
    try:
        return registry.get(cfg.variant)
    except ValueError as e:
        raise ValueError(f"--variant {cfg.variant!r}: {e}") from e


def required_fields(cfg) -> tuple[str, ...]:
    """Store arrays the loader must read for this variant and target (beyond input_ids/loss_mask)."""
    return head(cfg).required_fields(cfg)


def build(cfg, reader: StoreReader) -> tuple[torch.nn.Module, Any, dict]:
    """Draft module (frozen target pieces loaded from the store), its objective, and facts to log."""
    model, objective, info = head(cfg).build(cfg, reader)
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
    model = registry.get(record["variant"]).from_config(record["draft"]["config"])
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.eval(), record


def export_run(run_dir, out, fmt: str = "vllm", which: str = "final", dtype: torch.dtype | None = None):
    """Export a run's ``final``/``best`` weights with their provenance; returns (export path, draft.json record)."""
    import json
    from pathlib import Path

    from pipeline.draft.export import export_draft

    run_dir = Path(run_dir)
    model, record = load_run(run_dir, which)
    train_cfg = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    extra = {"run_dir": str(run_dir.resolve()), "weights": which,
             "store_fingerprint_digest": train_cfg.get("store_fingerprint_digest"),
             "code_version": record.get("code_version")}  # fmt: skip
    return export_draft(model, model.config, out, fmt, extra, dtype=dtype), record


def loss(cfg, model, batch: dict[str, torch.Tensor], objective,
         training: bool = True) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """The variant's objective. ``--loss-tokens all`` (training only) counts every token of a sample, not only
    the assistant's: the rows are computed anyway, and the target's distribution is a target there too."""
    if training and cfg.loss_tokens == "all":
        batch = {**batch, "loss_mask": (batch["doc_ids"] >= 0).to(batch["loss_mask"].dtype)}
    elif cfg.loss_tokens not in ("assistant", "all"):
        raise ValueError(f"--loss-tokens {cfg.loss_tokens!r}: choose assistant or all")
    return head(cfg).loss(model, batch, objective)


def weighted(metrics: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Pair each metric with the number of rows it averages over (``tokens_i`` for per-step ones)."""
    out = {}
    for k, v in metrics.items():
        if k.startswith("tokens"):
            continue
        suffix = k.rsplit("_", 1)[-1]
        out[k] = (v, metrics.get(f"tokens_{suffix}" if suffix.isdigit() else "tokens", metrics["tokens"]))
    return out


def eval_keys(cfg) -> list[str]:
    return [f"cond_acc_{i}" for i in range(head(cfg).chain_steps(cfg))]


def evaluate(cfg, model, batch: dict[str, torch.Tensor], objective) -> dict[str, tuple[float, float]]:
    """Held-out metrics of one batch as {name: (value, weight)}: teacher-forced loss/accuracy per step and the
    conditional acceptance of a simulated greedy chain (weight = rows eligible at that step)."""
    _, metrics = loss(cfg, model, batch, objective, training=False)
    out = weighted(metrics)
    h = head(cfg)
    chain = h.chain_acceptance(model, batch, h.chain_steps(cfg))
    for i, (a, n) in enumerate(zip(chain["cond_acc"], chain["eligible"], strict=True)):
        out[f"cond_acc_{i}"] = (a, float(n))
    return out


def simulated_tau(cfg, mean: dict[str, float]) -> float:
    """τ = 1 + Σ_i Π_{j≤i} a_j from the held-out conditional acceptances (counts the bonus token)."""
    from pipeline.draft.common import acceptance_length

    return acceptance_length([mean.get(k, 0.0) for k in eval_keys(cfg)])

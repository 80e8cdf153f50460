"""Run logging: a JSONL file in the run directory, wandb (offline unless told otherwise, never required), a plot."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from pipeline.store import TMP_PREFIX
from pipeline.train.rundir import writing

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends one JSON object per record; on resume, drops records past the resumed step (they are redone)."""

    def __init__(self, run_dir: Path, resume_step: int | None, wandb_project: str | None, config: dict,
                 enabled: bool = True):  # fmt: skip
        self.path = run_dir / METRICS_FILE
        self.enabled = enabled
        self.wandb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = [json.dumps(r, sort_keys=True) for r in _records(self.path) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_name(f".{METRICS_FILE}{TMP_PREFIX}{os.getpid()}")
            with writing(self.path, "keeping the records up to the resumed step"):
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            with writing(self.path, "removing the records of a run that never checkpointed"):
                self.path.unlink()  # a fresh run in a directory without checkpoints
        self.wandb = _start_wandb(run_dir, wandb_project, config)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with writing(self.path, f"appending the step {record.get('step')} record"), open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(run_dir: Path, project: str | None, config: dict):
    mode = os.environ.get("WANDB_MODE", "offline")
    if mode == "disabled":
        return None
    try:
        import wandb

        return wandb.init(project=project or "pipeline", dir=str(run_dir), mode=mode, config=config,
                          name=run_dir.name, reinit="finish_previous")  # fmt: skip
    except Exception as e:  # noqa: BLE001 - logging must never stop a training run
        warnings.warn(f"wandb unavailable ({e}); metrics go to {run_dir / METRICS_FILE} only", stacklevel=2)
        return None


def _records(path: Path) -> list[dict]:
    """The complete records of a metrics file; a line cut short (a full disk, a kill mid-write) is left out."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    return _records(path) if path.exists() else []


def plot_curves(run_dir: Path, out: Path) -> Path:
    """PNG of the training curves (loss terms, accuracy, learning rate, validation) of one run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    steps = [r["step"] for r in train]
    for key in sorted({k for r in train for k in r if k == "loss" or k.endswith("loss") or k.startswith("loss_")}):
        axes[0].plot(steps, [r.get(key) for r in train], label=key)
    axes[0].set_yscale("log")
    axes[0].set_title("training loss")
    for key in sorted({k for r in train for k in r if k == "acc" or k.startswith("acc_")}):
        axes[1].plot(steps, [r.get(key) for r in train], label=key)
    axes[1].set_title("top-1 accuracy vs target (train)")
    axes[2].plot(steps, [r.get("lr") for r in train])
    axes[2].set_title("learning rate")
    if val:
        vsteps = [r["step"] for r in val]
        for key in sorted({k for r in val for k in r if k.startswith("acc")}):
            axes[3].plot(vsteps, [r.get(key) for r in val], marker="o", label=key)
        if any("tau" in r for r in val):
            ax = axes[3].twinx()
            ax.plot(vsteps, [r.get("tau") for r in val], "k--", marker="s", label="simulated τ")
            ax.set_ylabel("simulated τ")
    axes[3].set_title("held-out accuracy / simulated τ")
    for ax in axes:
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

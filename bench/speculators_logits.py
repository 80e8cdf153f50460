"""A trained EAGLE-3 run exported with ``--format speculators``, loaded by the ``speculators`` package itself, against
the project's own draft: logits at every training-time-test step on real stored samples (their aux features).

Needs ``speculators`` (``scripts/setup.sh --speculators``, or its own venv with ``pip install --no-deps
speculators==0.9.0`` plus ``datasets openai loguru hs-connectors`` on the CPU torch) and the store the run trained
on (its aux features and tokens).

    python bench/speculators_logits.py --run RUN_DIR --feats STORE [--samples 4] [--steps 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def main() -> None:
    from pipeline.draft.speculators_check import compare_logits, load_with_speculators
    from pipeline.store import StoreReader
    from pipeline.train.variants import export_run, load_run

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--feats", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

    ours, _ = load_run(args.run)
    ours.float().eval()
    reader = StoreReader(args.feats)
    ours.load_target_weights(reader.target_weights())
    with tempfile.TemporaryDirectory() as tmp:
        export, _ = export_run(args.run, Path(tmp) / "spec", "speculators", "final", torch.float32)
        theirs = load_with_speculators(export)
    worst: dict[int, dict] = {}
    for i in range(min(args.samples, len(reader))):
        s = reader.sample(i, ("input_ids", "loss_mask", "hidden_aux"))
        n = s["input_ids"].shape[0]
        row = {"input_ids": s["input_ids"].long()[None], "loss_mask": s["loss_mask"].float()[None],
               "position_ids": torch.arange(n)[None], "doc_ids": torch.zeros(1, n, dtype=torch.long),
               "hidden_aux": s["hidden_aux"].float().reshape(1, n, -1)}  # fmt: skip
        for r in compare_logits(ours, theirs, row, args.steps):
            print(f"sample {i} ({n} tokens) step {r['step']}: max |diff| {r['max_abs_diff']:.2e} "
                  f"(relative {r['rel_diff']:.2e}), argmax agreement {r['argmax_agree']:.4f}")  # fmt: skip
            w = worst.setdefault(r["step"], {"max_abs_diff": 0.0, "rel_diff": 0.0, "argmax_agree": 1.0, "rows": 0})
            w.update(max_abs_diff=max(w["max_abs_diff"], r["max_abs_diff"]), rel_diff=max(w["rel_diff"], r["rel_diff"]),
                     argmax_agree=min(w["argmax_agree"], r["argmax_agree"]), rows=w["rows"] + r["rows"])  # fmt: skip
    for step, w in sorted(worst.items()):
        print(f"TTT step {step}: {w['rows']} rows, worst max |diff| {w['max_abs_diff']:.2e} (relative "
              f"{w['rel_diff']:.2e}), lowest argmax agreement {w['argmax_agree']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()

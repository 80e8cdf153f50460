#!/usr/bin/env bash
# The longer recipe: the best τ this 2-core CPU gives in a few hours (its measured numbers are in README.md).
# One extraction, reused by both heads; held-out simulated τ picks the best checkpoint of each run.
#   scripts/recipe.sh [OUT_DIR]          (default: recipe/)
set -euo pipefail
OUT=${1:-recipe}
P=${PIPELINE:-.venv/bin/pipeline}
$P extract --out "$OUT/feats" --limit 800 --max-length 1024 --shard-size 100
$P inspect "$OUT/feats"
$P train --feats "$OUT/feats" --variant eagle1 --out "$OUT/runs/eagle1" --epochs 2 --tokens-per-batch 2048 \
  --lr 1e-3 --val-fraction 0.05 --eval-every 100 --save-every 100
$P train --feats "$OUT/feats" --variant eagle3 --out "$OUT/runs/eagle3" --epochs 1 --tokens-per-batch 2048 \
  --lr 1e-3 --draft-vocab-size 16384 --ttt-steps 5 --val-fraction 0.05 --eval-every 100 --save-every 100
for head in eagle1 eagle3; do
  [ -d "$OUT/heads/$head" ] || $P export "$OUT/runs/$head" --weights best --out "$OUT/heads/$head"
done
# All 80 MT-bench questions, both turns, 256 new tokens; each run also decodes the same prompts plainly.
for head in eagle1 eagle3; do
  for mode in chain tree; do
    $P eval --draft "$OUT/heads/$head" --mode "$mode" --max-new-tokens 256 --report "$OUT/eval-$head-$mode.json"
  done
done
$P eval --compare "$OUT/eval-eagle1-chain.json" "$OUT/eval-eagle3-chain.json"

#!/usr/bin/env bash
# The longer recipe: more data, longer runs and a larger MT-bench slice than `pipeline demo` (≈2¼ h on the
# 2-core CPU, 75 min of it extraction; its measured numbers are in README.md). One extraction is reused by both
# heads; the held-out simulated τ picks the exported checkpoint of each run.
#   scripts/recipe.sh [OUT_DIR] [MT_BENCH_QUESTIONS] [NEW_TOKENS]      (default: recipe/ 2 96)
# All 80 questions with 256 new tokens: scripts/recipe.sh recipe 80 256 (≈4 h per head and mode on this CPU,
# minutes on a GPU with --device cuda).
set -euo pipefail
OUT=${1:-recipe}
QUESTIONS=${2:-2}
NEW_TOKENS=${3:-96}
P=${PIPELINE:-.venv/bin/pipeline}
$P extract --out "$OUT/feats" --limit 800 --max-length 1024 --shard-size 100
$P inspect "$OUT/feats"
$P train --feats "$OUT/feats" --variant eagle1 --out "$OUT/runs/eagle1" --max-steps 160 --tokens-per-batch 2048 \
  --lr 1e-3 --val-fraction 0.05 --eval-every 40 --save-every 40
$P train --feats "$OUT/feats" --variant eagle3 --out "$OUT/runs/eagle3" --max-steps 64 --tokens-per-batch 2048 \
  --lr 1e-3 --draft-vocab-size 8192 --ttt-steps 4 --val-fraction 0.05 --eval-every 32 --save-every 32
for head in eagle1 eagle3; do
  [ -d "$OUT/heads/$head" ] || $P export "$OUT/runs/$head" --weights best --out "$OUT/heads/$head"
done
# Both MT-bench turns; each run also decodes the same prompts plainly (the speed baseline and the lossless check).
# Chain: depth 5. Tree: depth 5, 4 children per expanded node, 20 drafted nodes verified per target forward.
for head in eagle1 eagle3; do
  $P eval --draft "$OUT/heads/$head" --mode chain --depth 5 --limit "$QUESTIONS" --max-new-tokens "$NEW_TOKENS" \
    --report "$OUT/eval-$head-chain.json"
  $P eval --draft "$OUT/heads/$head" --mode tree --depth 5 --top-k 4 --total-tokens 20 --limit "$QUESTIONS" \
    --max-new-tokens "$NEW_TOKENS" --report "$OUT/eval-$head-tree.json"
done
$P eval --compare "$OUT/eval-eagle1-chain.json" "$OUT/eval-eagle3-chain.json"
$P eval --compare "$OUT/eval-eagle1-tree.json" "$OUT/eval-eagle3-tree.json"

#!/usr/bin/env bash
# The longer recipe: more data, longer runs and more MT-bench questions than `pipeline demo`, the demo's measured
# choices kept (1,024-token packed rows, lr 2e-3, one EAGLE-3 TTT step, 4,096-token draft vocabulary, cost-aware
# drafting). About an hour on the 2-core CPU (its measured numbers are in README.md); every stage resumes where it
# stopped when run again with the same OUT_DIR (an OUT_DIR of the earlier, 800-record recipe is refused by
# `pipeline extract`: use a new one). One extraction is reused by both heads; the held-out simulated τ picks the
# exported checkpoint of each run. A finished run (its summary.json) is not trained again; each evaluation's report
# is named by its question count and length, so another evaluation size runs again on the same heads.
#   scripts/recipe.sh [OUT_DIR] [MT_BENCH_QUESTIONS] [NEW_TOKENS]      (default: recipe/ 10 128)
# All 80 questions with 256 new tokens: scripts/recipe.sh recipe 80 256 (about an hour per head and mode on this
# CPU; minutes on a GPU, which every stage picks by itself).
set -euo pipefail
OUT=${1:-recipe}
QUESTIONS=${2:-10}
NEW_TOKENS=${3:-128}
P=${PIPELINE:-.venv/bin/pipeline}
$P extract --out "$OUT/feats" --limit 400 --max-length 1024 --shard-size 50
$P inspect "$OUT/feats"
COMMON=(--tokens-per-batch 1024 --lr 2e-3 --val-fraction 0.05 --eval-every 100 --save-every 100 --no-progress)
[ -f "$OUT/runs/eagle1/summary.json" ] || $P train --feats "$OUT/feats" --variant eagle1 --out "$OUT/runs/eagle1" \
  --max-steps 400 "${COMMON[@]}"
[ -f "$OUT/runs/eagle3/summary.json" ] || $P train --feats "$OUT/feats" --variant eagle3 --out "$OUT/runs/eagle3" \
  --max-steps 800 --draft-vocab-size 4096 --ttt-steps 1 "${COMMON[@]}"
for head in eagle1 eagle3; do  # config.json is written last: a head without it was cut short, so export again
  [ -f "$OUT/heads/$head/config.json" ] || { rm -rf "$OUT/heads/$head"; $P export "$OUT/runs/$head" --weights best \
    --out "$OUT/heads/$head"; }
done
# Both MT-bench turns. Every evaluation also decodes the same prompts plainly (the speed baseline and the lossless
# check); the first one also runs transformers `generate` and prompt lookup (the baselines do not depend on the head).
# Cost-aware drafting (--policy adaptive): at most depth 6; tree: 4 children per expanded node, at most 16 nodes.
BASELINES=generate,prompt_lookup
for head in eagle3 eagle1; do
  for mode in chain tree; do
    report="$OUT/eval-$head-$mode-q$QUESTIONS-n$NEW_TOKENS.json"
    [ -f "$report" ] || $P eval --draft "$OUT/heads/$head" --mode "$mode" --depth 6 --top-k 4 --total-tokens 16 \
      --limit "$QUESTIONS" --max-new-tokens "$NEW_TOKENS" --baselines "$BASELINES" --no-progress --report "$report"
    BASELINES=""
  done
done
for mode in chain tree; do
  $P eval --compare "$OUT/eval-eagle1-$mode-q$QUESTIONS-n$NEW_TOKENS.json" \
    "$OUT/eval-eagle3-$mode-q$QUESTIONS-n$NEW_TOKENS.json"
done
